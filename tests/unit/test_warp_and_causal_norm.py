"""Feature-domain voice perturbation (speed, tempo, VTLP, tilt) and causal normalisation."""

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torchaudio
from scipy.signal import resample_poly

from model.frontend.features import (
    FeatureConfig,
    FeatureExtractor,
    causal_normalise,
    global_stats,
    normalise_features,
)
from model.frontend.warp import (
    LOG_POWER_PER_DB,
    FeatureWarp,
    add_tilt,
    mel_bin_centres,
    stretch_time,
    warp_frequency,
)
from model.inference.streaming import StreamingFeatures

torch.set_num_threads(1)

_SR = 16000
_CAUSAL = FeatureConfig(normalise="causal", mean=(-5.0,) * 80, std=(3.0,) * 80,
                        causal_prior_frames=50)


def _harmonic_wave(seconds: float, seed: int = 0) -> np.ndarray:
    """A voiced-like signal: 39 harmonics of a gliding 140 Hz f0, syllable-rate envelope,
    a little noise (keeps every mel bin above the log floor)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(_SR * seconds)) / _SR
    f0 = 140 * (1 + 0.3 * np.sin(2 * np.pi * 0.7 * t))
    phase = 2 * np.pi * np.cumsum(f0) / _SR
    voiced = sum(np.sin(h * phase) / h for h in range(1, 40))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 1.5 * t)) ** 2
    return (0.1 * voiced * envelope + 0.003 * rng.standard_normal(t.size)).astype(np.float32)


# --- frequency warp / time stretch / tilt -------------------------------------------------


def test_bin_centres_match_torchaudio_filterbank_peaks() -> None:
    # 1 Hz resolution filterbank: each triangle peaks at its centre frequency.
    fb = torchaudio.functional.melscale_fbanks(_SR // 2 + 1, 0.0, _SR / 2, 80, _SR)
    peaks = fb.argmax(0).double()
    assert (peaks - mel_bin_centres(80, _SR)).abs().max() <= 1.0


def test_unit_factors_are_identities() -> None:
    feats = torch.randn(37, 80)
    torch.testing.assert_close(warp_frequency(feats, 1.0, _SR), feats, rtol=0, atol=0)
    torch.testing.assert_close(stretch_time(feats, 1.0), feats, rtol=0, atol=0)
    # The interpolation path itself is an identity too (alpha barely off 1).
    torch.testing.assert_close(warp_frequency(feats, 1.0 + 1e-9, _SR), feats)
    half = feats.half()
    assert warp_frequency(half, 1.1, _SR).dtype == torch.float16
    assert stretch_time(half, 1.1).dtype == torch.float16


@pytest.mark.parametrize("alpha", [0.85, 0.9, 1.1, 1.2])
@pytest.mark.parametrize("k", [10, 30, 50])
def test_frequency_warp_moves_a_peak_to_alpha_times_its_frequency(alpha: float, k: int) -> None:
    feats = torch.full((3, 80), -10.0)
    feats[:, k] = 0.0
    out = warp_frequency(feats, alpha, _SR)
    centres = mel_bin_centres(80, _SR)
    expected = int((centres - alpha * centres[k]).abs().argmin())
    assert expected != k  # the warp is not vacuous
    assert (out.argmax(-1) == expected).all()


def test_frequency_warp_clamps_to_the_edge_bins() -> None:
    feats = torch.arange(80.0).repeat(2, 1)
    assert (warp_frequency(feats, 1.3, _SR)[:, 0] == 0).all()  # below bin 0 → bin 0
    assert (warp_frequency(feats, 0.7, _SR)[:, -1] == 79).all()  # above the top → top bin


@pytest.mark.parametrize(("frames", "beta"), [(100, 1.1), (100, 0.9), (101, 1.05), (7, 3.0),
                                              (1, 0.5), (2, 10.0)])
def test_time_stretch_length_and_linear_ramp(frames: int, beta: float) -> None:
    ramp = torch.arange(frames, dtype=torch.float32)[:, None] * torch.linspace(1, 2, 80)
    out = stretch_time(ramp, beta)
    assert out.shape == (max(1, round(frames / beta)), 80)
    # Output frame j is the input at time j·beta: a ramp stays the same ramp (frames whose
    # position lies past the last input frame repeat it).
    pos = (torch.arange(out.size(0)) * beta).clamp(max=frames - 1)
    torch.testing.assert_close(out, pos[:, None].float() * torch.linspace(1, 2, 80))


def test_time_stretch_works_on_batches() -> None:
    feats = torch.randn(3, 50, 80)
    out = stretch_time(feats, 1.25)
    assert out.shape == (3, 40, 80)
    torch.testing.assert_close(out[1], stretch_time(feats[1], 1.25))


def test_tilt_adds_the_curve_and_checks_its_shape() -> None:
    feats = torch.randn(5, 80)
    curve = torch.linspace(-1, 1, 80)
    torch.testing.assert_close(add_tilt(feats, curve), feats + curve)
    with pytest.raises(ValueError, match=r"\(80,\)"):
        add_tilt(feats, torch.zeros(79))


@pytest.mark.parametrize("bad", [0.0, -1.1, float("nan"), float("inf")])
def test_invalid_factors_raise(bad: float) -> None:
    feats = torch.zeros(10, 80)
    with pytest.raises(ValueError, match="alpha"):
        warp_frequency(feats, bad, _SR)
    with pytest.raises(ValueError, match="beta"):
        stretch_time(feats, bad)


def test_feature_warp_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="speed"):
        FeatureWarp(80, _SR, speed=(0.0, 1.1), vtlp=None, tilt_db=0.0, p=1.0)
    with pytest.raises(ValueError, match="vtlp"):
        FeatureWarp(80, _SR, speed=None, vtlp=(1.2, 0.8), tilt_db=0.0, p=1.0)
    with pytest.raises(ValueError, match="tilt_db"):
        FeatureWarp(80, _SR, speed=None, vtlp=None, tilt_db=-1.0, p=1.0)
    with pytest.raises(ValueError, match="p must"):
        FeatureWarp(80, _SR, speed=None, vtlp=None, tilt_db=0.0, p=1.5)
    warp = FeatureWarp(80, _SR, speed=None, vtlp=None, tilt_db=0.0, p=1.0)
    with pytest.raises(ValueError, match="80"):
        warp(torch.zeros(10, 40), torch.Generator().manual_seed(0))


def test_feature_warp_is_reproducible_and_respects_time_stretch_flag() -> None:
    warp = FeatureWarp(80, _SR, speed=(0.9, 1.1), vtlp=(0.9, 1.1), tilt_db=6.0, p=1.0)
    feats = torch.randn(200, 80).half()
    a = warp(feats, torch.Generator().manual_seed(3))
    b = warp(feats, torch.Generator().manual_seed(3))
    assert a.dtype == torch.float16
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert a.size(0) != 200  # speed applied with p=1 changes the length (s != 1 a.s.)
    aligned = warp(feats, torch.Generator().manual_seed(3), time_stretch=False)
    assert aligned.shape == feats.shape
    assert (aligned.float() - feats.float()).abs().mean() > 0.1  # still perturbed
    # Different seeds give different voices.
    c = warp(feats, torch.Generator().manual_seed(4), time_stretch=False)
    assert not torch.equal(aligned, c)


def test_feature_warp_with_p_zero_is_identity_and_tilt_stays_in_range() -> None:
    feats = torch.randn(30, 80)
    off = FeatureWarp(80, _SR, speed=(0.9, 1.1), vtlp=(0.9, 1.1), tilt_db=6.0, p=0.0)
    torch.testing.assert_close(off(feats, torch.Generator().manual_seed(0)), feats)
    tilt_only = FeatureWarp(80, _SR, speed=None, vtlp=None, tilt_db=6.0, p=1.0)
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        curve = tilt_only(feats, gen) - feats
        # One curve for all frames, smooth, within ±1.5·tilt_db (tilt ±½ + two ripples ½).
        torch.testing.assert_close(curve, curve[:1].expand_as(curve))
        assert curve.abs().max() <= 1.5 * 6.0 * LOG_POWER_PER_DB + 1e-5
        # Smooth: the steepest possible step between bins is the tilt's plus the ripples'
        # (6/79 + 3π·6/79 dB ≈ 0.18 in log power); white noise would step ~5 dB.
        steepest = (6.0 + 3 * np.pi * 6.0) / 79 * LOG_POWER_PER_DB
        assert curve[0].diff().abs().max() <= steepest + 1e-5


def test_speed_perturbation_is_approximated_by_warp_plus_stretch() -> None:
    """Audio resampled by s (Kaldi speed perturbation) vs. the same transform done on
    the log-mels of the original: warp_frequency(·, s) then stretch_time(·, s).

    Relative error ``‖approx − target‖ / ‖target − mean(target)‖`` over the common frames,
    measured on this 2 s harmonic signal:

    ========  ==================  ===================  ====================
    speed s   warp + stretch      stretch only (tempo) nothing (original)
    ========  ==================  ===================  ====================
    1.1       0.165               0.386                0.899
    0.9       0.213               0.382                0.939
    ========  ==================  ===================  ====================

    (Part of what remains at 0.9 is the top of the band, which resampling leaves empty
    above 7.2 kHz while the warp repeats the edge bin.)
    """
    extractor = FeatureExtractor(FeatureConfig(normalise="none"))
    wave = _harmonic_wave(2.0)
    base = extractor.raw(wave)

    def rel_error(approx: torch.Tensor, target: torch.Tensor) -> float:
        n = min(approx.size(0), target.size(0))
        approx, target = approx[:n], target[:n]
        return float((approx - target).norm() / (target - target.mean()).norm())

    for speed, (up, down) in [(1.1, (10, 11)), (0.9, (10, 9))]:
        target = extractor.raw(resample_poly(wave, up, down).astype(np.float32))
        approx = stretch_time(warp_frequency(base, speed, _SR), speed)
        assert abs(approx.size(0) - target.size(0)) <= 1
        warped = rel_error(approx, target)
        tempo_only = rel_error(stretch_time(base, speed), target)
        nothing = rel_error(base, target)
        assert warped < 0.25
        assert warped < 0.6 * tempo_only < 0.6 * nothing


# --- causal normalisation -------------------------------------------------------------


def test_causal_normalisation_formula() -> None:
    raw = torch.randn(20, 80) * 2 - 4
    out = normalise_features(raw, _CAUSAL)
    n0, mean, std = 50, torch.tensor(_CAUSAL.mean), torch.tensor(_CAUSAL.std)
    for t in (0, 7, 19):
        running = (n0 * mean + raw[: t + 1].sum(0)) / (n0 + t + 1)
        torch.testing.assert_close(out[t], (raw[t] - running) / std)
    # N0 = 0: the plain running mean, so the first frame is all zeros.
    zero_prior = FeatureConfig(normalise="causal", mean=_CAUSAL.mean, std=_CAUSAL.std,
                               causal_prior_frames=0)
    assert normalise_features(raw, zero_prior)[0].abs().max() < 1e-6


def test_causal_normalisation_of_a_padded_batch_equals_per_utterance() -> None:
    torch.manual_seed(0)
    utts = [torch.randn(n, 80) * 3 - 5 for n in (40, 17, 33)]
    padded = torch.nn.utils.rnn.pad_sequence(utts, batch_first=True, padding_value=7.0)
    batch = normalise_features(padded, _CAUSAL)
    for b, utt in enumerate(utts):
        torch.testing.assert_close(batch[b, : utt.size(0)], normalise_features(utt, _CAUSAL))


def test_causal_normalisation_removes_a_channel_offset_once_the_prior_fades() -> None:
    torch.manual_seed(1)
    raws = [torch.randn(600, 80) * 2 - 5 for _ in range(3)]
    mean, std = global_stats(raws)
    cfg = FeatureConfig(normalise="causal", mean=mean, std=std, causal_prior_frames=100)
    raw = torch.randn(2000, 80) * 2 - 5
    offset = torch.linspace(-4.0, 4.0, 80)  # a microphone/channel EQ of up to ±17 dB
    residual = normalise_features(raw + offset, cfg) - normalise_features(raw, cfg)
    # The offset's weight in frame t is N0 / (N0 + t + 1): gone from the features after
    # a few N0 (≤ 1/6 of it after 5·N0), whereas 'global' keeps all of it.
    late = residual[500:].abs() / (offset.abs() / torch.tensor(std))
    assert late.max() < 1 / 6 + 1e-4
    assert residual[0].abs().max() > 1.0  # at the start the offset is still there
    glob = FeatureConfig(normalise="global", mean=mean, std=std)
    kept = normalise_features(raw + offset, glob) - normalise_features(raw, glob)
    assert kept[-1].abs().max() > 1.0


def test_causal_normalisation_continues_a_stream() -> None:
    raw = torch.randn(90, 80)
    whole = causal_normalise(raw, _CAUSAL)
    head = causal_normalise(raw[:31], _CAUSAL)
    tail = causal_normalise(raw[31:], _CAUSAL, raw[:31].double().sum(0), 31)
    torch.testing.assert_close(torch.cat([head, tail]), whole)


def test_causal_config_validation_and_json_round_trip() -> None:
    with pytest.raises(ValueError, match="mean and std"):
        FeatureConfig(normalise="causal")
    with pytest.raises(ValueError, match="causal_prior_frames"):
        FeatureConfig(normalise="causal", mean=(0.0,) * 80, std=(1.0,) * 80,
                      causal_prior_frames=-1)
    with pytest.raises(ValueError, match="'causal'"):
        FeatureConfig(normalise="causual")
    # save_package / export write asdict(config) as JSON and read FeatureConfig(**json).
    restored = FeatureConfig(**json.loads(json.dumps(asdict(_CAUSAL))))
    assert restored == _CAUSAL and restored.causal_prior_frames == 50
    # Configs written before the field existed load with the default.
    old = {k: v for k, v in asdict(_CAUSAL).items() if k != "causal_prior_frames"}
    assert FeatureConfig(**old).causal_prior_frames == 100


@pytest.mark.parametrize("pieces", [[400, 400, 2000, 77, 4000], [16000], [100] * 80])
def test_streaming_causal_features_equal_offline(pieces: list[int]) -> None:
    extractor = FeatureExtractor(_CAUSAL)
    wave = _harmonic_wave(sum(pieces) / _SR, seed=2)
    stream = StreamingFeatures(extractor)
    out, start = [], 0
    for n in pieces:
        out.append(stream.accept(wave[start : start + n]))
        start += n
    out.append(stream.finish())
    offline = normalise_features(extractor.raw(wave), _CAUSAL)
    torch.testing.assert_close(torch.cat(out), offline, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(extractor(wave), offline)
