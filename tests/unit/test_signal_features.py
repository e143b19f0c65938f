"""Signal features on synthetic signals whose true values are known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from monitoring.schema import SIGNAL_FEATURES
from monitoring.signal_features import signal_features, signal_features_frame

RATE = 16000


def _gated_tone_in_noise(snr_db: float, seconds: float = 3.0, seed: int = 0) -> np.ndarray:
    """White noise throughout (σ = 0.01, -40 dBFS) and a 440 Hz tone in the middle half,
    scaled so that tone power / noise power = ``snr_db``: what speech between pauses in a
    noisy room looks like to an energy VAD."""
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    sigma = 0.01
    noise = rng.normal(0.0, sigma, n)
    amp = math.sqrt(2.0 * sigma**2 * 10 ** (snr_db / 10.0))  # sine power = amp² / 2
    t = np.arange(n) / RATE
    gate = (t >= seconds / 4) & (t < 3 * seconds / 4)
    return (noise + gate * amp * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)


@pytest.mark.parametrize("snr_db", [5.0, 10.0, 20.0, 30.0])
def test_snr_of_a_gated_tone_in_white_noise(snr_db: float) -> None:
    feats = signal_features(_gated_tone_in_noise(snr_db), RATE, "turn on the light")
    assert feats.snr_db == pytest.approx(snr_db, abs=2.0)
    assert feats.duration_s == pytest.approx(3.0)
    # The VAD finds the tone: 1.5 s voiced, so 4 words / 1.5 s.
    assert feats.speaking_rate == pytest.approx(4 / 1.5, rel=0.1)
    assert feats.silence_share == 0.0
    assert feats.clipping_share == 0.0
    assert feats.finite


def test_centroid_and_level_of_a_pure_tone() -> None:
    t = np.arange(RATE) / RATE
    feats = signal_features((0.5 * np.sin(2 * np.pi * 1000.0 * t)).astype(np.float32), RATE)
    assert feats.spectral_centroid_hz == pytest.approx(1000.0, rel=0.03)
    # RMS of 0.5·sin is 0.354: -9.03 dBFS.
    assert feats.level_dbfs == pytest.approx(20 * math.log10(0.5 / math.sqrt(2)), abs=0.05)
    # The centroid is in Hz at any rate (10 ms frames whatever the rate).
    t8 = np.arange(8000) / 8000
    at_8k = signal_features((0.5 * np.sin(2 * np.pi * 1000.0 * t8)).astype(np.float32), 8000)
    assert at_8k.spectral_centroid_hz == pytest.approx(1000.0, rel=0.03)
    assert at_8k.sample_rate == 8000 and at_8k.duration_s == pytest.approx(1.0)


def test_clipping_share_of_a_clipped_tone() -> None:
    t = np.arange(RATE) / RATE
    clipped = np.clip(2.0 * np.sin(2 * np.pi * 300.0 * t), -1.0, 1.0).astype(np.float32)
    # |2 sin| >= 0.999 for the phases where |sin| >= 0.4995: 1 - (2/π)·asin(0.4995) = 0.667.
    expected = 1 - 2 / math.pi * math.asin(0.4995)
    assert signal_features(clipped, RATE).clipping_share == pytest.approx(expected, abs=0.01)
    # As stored by the traffic writer (16-bit PCM, read back /32768): still counted.
    pcm = np.round(clipped * 32768).clip(-32768, 32767) / 32768
    assert signal_features(pcm.astype(np.float32), RATE).clipping_share == pytest.approx(
        expected, abs=0.01)


def test_silence_and_near_silence() -> None:
    digital = signal_features(np.zeros(RATE, np.float32), RATE, "hello")
    assert digital.silence_share == 1.0
    assert math.isnan(digital.snr_db) and math.isnan(digital.speaking_rate)
    assert math.isnan(digital.spectral_centroid_hz)
    assert digital.level_dbfs == pytest.approx(-100.0)
    hiss = np.random.default_rng(1).normal(0, 1e-4, RATE).astype(np.float32)  # -80 dBFS
    assert signal_features(hiss, RATE).silence_share == 1.0
    # Half a second of tone, then half a second of digital silence: half the frames silent.
    t = np.arange(RATE // 2) / RATE
    half = np.concatenate([0.3 * np.sin(2 * np.pi * 500 * t), np.zeros(RATE // 2)])
    assert signal_features(half.astype(np.float32), RATE).silence_share == pytest.approx(0.5)


def test_undefined_inputs_and_bad_arguments() -> None:
    empty = signal_features(np.zeros(0, np.float32), RATE)
    assert empty.duration_s == 0.0 and math.isnan(empty.level_dbfs)
    bad = np.ones(1600, np.float32)
    bad[5] = np.nan
    feats = signal_features(bad, RATE)
    assert not feats.finite and math.isnan(feats.clipping_share)
    tiny = signal_features(np.full(50, 0.1, np.float32), RATE)  # shorter than one frame
    assert tiny.silence_share == 0.0 and tiny.level_dbfs == pytest.approx(-20.0, abs=0.01)
    with pytest.raises(ValueError, match="mono"):
        signal_features(np.zeros((10, 2), np.float32), RATE)
    with pytest.raises(ValueError, match="sample_rate"):
        signal_features(np.zeros(10, np.float32), 0)


def test_frame_columns_follow_the_curated_schema() -> None:
    frame = signal_features_frame([_gated_tone_in_noise(10.0, 1.0)] * 2, [RATE, RATE],
                                  ["a b", "c"])
    assert tuple(frame.columns[: len(SIGNAL_FEATURES)]) == SIGNAL_FEATURES
    assert len(frame) == 2
    with pytest.raises(ValueError, match="lengths must match"):
        signal_features_frame([np.zeros(10, np.float32)], [RATE, RATE])
