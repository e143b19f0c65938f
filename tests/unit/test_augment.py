"""Unit tests of model.data.augment on tiny synthetic 16 kHz signals (sines, chirps)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from scipy import signal

from model.data import augment as aug_mod
from model.data.augment import KINDS, Augmenter, RIRBank, active_rms, augment_rng, replay
from model.data.manifest import AugmentStep
from voiceloop.settings import AugmentSettings, NoiseSettings, ReverbSettings

SR = 16000
# Short RT60s keep the two simulated rooms cheap (~0.1 s together).
REVERB = ReverbSettings(p=0.3, rt60_s=(0.2, 0.4), bank_size=2)


def _sine(freq: float = 440.0, seconds: float = 1.0, amp: float = 0.1) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _chirp(seconds: float = 1.0, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (amp * signal.chirp(t, f0=100, t1=seconds, f1=6000)).astype(np.float32)


def _only(kind: str, **overrides: object) -> AugmentSettings:
    """Settings that always augment with exactly ``kind``."""
    probs = {"reverb": 0.0, "noise": 0.0, "telephone": 0.0, "gain": 0.0, "clip": 0.0}
    probs[kind] = 1.0
    noise = overrides.pop("noise", NoiseSettings(p=probs["noise"]))
    return AugmentSettings(
        p=1.0,
        noise=noise,
        reverb=ReverbSettings(p=probs["reverb"], rt60_s=REVERB.rt60_s,
                              bank_size=REVERB.bank_size),
        gain_p=probs["gain"],
        clip_p=probs["clip"],
        telephone_p=probs["telephone"],
        **overrides,
    )


def _band_power(x: np.ndarray, low: float, high: float) -> float:
    freqs, psd = signal.welch(x, fs=SR, nperseg=1024)
    band = (freqs >= low) & (freqs <= high)
    return float(psd[band].mean())


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory) -> RIRBank:
    return RIRBank.build(REVERB, seed=7, sample_rate=SR,
                         cache_dir=tmp_path_factory.mktemp("rirs"))


@pytest.fixture(scope="module")
def babble_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    # Each "talker" is a distinct tone, so its presence in the mix is visible in a spectrum.
    folder = tmp_path_factory.mktemp("babble")
    paths = []
    for freq in (1000.0, 2000.0, 3000.0):
        path = folder / f"talker_{int(freq)}.wav"
        sf.write(path, _sine(freq, seconds=0.7, amp=0.3), SR)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------- noise


@pytest.mark.parametrize("kind", ["white", "pink"])
def test_noise_snr_matches_target(kind: str) -> None:
    x = _sine()
    settings = _only("noise", noise=NoiseSettings(p=1.0, kinds=[kind], snr_db=(5.0, 25.0)))
    augmenter = Augmenter(settings, SR, None, [])
    for i in range(5):
        out, steps = augmenter(x, augment_rng(0, f"utt{i}"))
        (step,) = steps
        assert step.kind == "noise" and step.params["noise"] == kind
        noise = out.astype(np.float64) - x
        # A steady sine is active in every frame, so active RMS == plain RMS here.
        measured = 10 * np.log10(np.mean(x.astype(np.float64) ** 2) / np.mean(noise**2))
        assert abs(measured - float(step.params["snr_db"])) < 1.0


def test_pink_noise_falls_with_frequency() -> None:
    x = _sine(amp=0.05)
    settings = _only("noise", noise=NoiseSettings(p=1.0, kinds=["pink"], snr_db=(0.0, 0.0)))
    out, _ = Augmenter(settings, SR, None, [])(x, augment_rng(0, "pink"))
    noise = out.astype(np.float64) - x
    # 1/f: ~3 dB per octave, so 1-2 kHz vs 4-8 kHz differs by ~6 dB per Hz.
    ratio_db = 10 * np.log10(_band_power(noise, 1000, 2000) / _band_power(noise, 4000, 7900))
    assert 4.0 < ratio_db < 8.0


def test_active_rms_ignores_silence() -> None:
    x = np.concatenate([np.zeros(SR), _sine(amp=0.1), np.zeros(SR)])
    assert active_rms(x, SR) == pytest.approx(0.1 / np.sqrt(2), rel=0.01)


def test_babble_uses_given_sources(babble_files: list[Path]) -> None:
    x = _sine(freq=300.0)
    settings = _only("noise", noise=NoiseSettings(p=1.0, kinds=["babble"], snr_db=(0.0, 0.0),
                                                  babble_talkers=(2, 2)))
    augmenter = Augmenter(settings, SR, None, babble_files)
    out, (step,) = augmenter(x, augment_rng(0, "babble"))
    chosen = str(step.params["sources"]).split("|")
    assert step.params["noise"] == "babble" and step.params["talkers"] == 2
    assert len(set(chosen)) == 2 and set(chosen) <= {str(p) for p in babble_files}
    noise = out.astype(np.float64) - x
    for path in babble_files:
        freq = float(path.stem.split("_")[1])
        power = _band_power(noise, freq - 50, freq + 50)
        # Chosen talkers' tones are in the mix; the unchosen one is >40 dB below them.
        if str(path) in chosen:
            assert power > 1e-6
        else:
            assert power < 1e-10


def test_babble_excluded_without_sources() -> None:
    settings = _only("noise", noise=NoiseSettings(p=1.0, kinds=["white", "babble"]))
    augmenter = Augmenter(settings, SR, None, [])
    for i in range(10):
        _, steps = augmenter(_sine(), augment_rng(0, f"utt{i}"))
        assert [s.params["noise"] for s in steps] == ["white"]
    # Babble as the only noise kind and no sources: nothing can fire.
    only_babble = _only("noise", noise=NoiseSettings(p=1.0, kinds=["babble"]))
    out, steps = Augmenter(only_babble, SR, None, [])(_sine(), augment_rng(0, "x"))
    assert steps == [] and np.array_equal(out, _sine())


# ---------------------------------------------------------------------------- reverb


def test_reverb_keeps_alignment_and_level(bank: RIRBank) -> None:
    x = _chirp()
    out, (step,) = Augmenter(_only("reverb"), SR, bank, [])(x, augment_rng(0, "rev"))
    assert step.kind == "reverb"
    assert 0 <= int(step.params["rir_index"]) < len(bank)
    assert REVERB.rt60_s[0] <= float(step.params["rt60_s"]) <= REVERB.rt60_s[1]
    assert not np.allclose(out, x, atol=1e-3)
    # RMS normalised to the dry signal's.
    assert np.sqrt(np.mean(out.astype(np.float64) ** 2)) == pytest.approx(
        np.sqrt(np.mean(x.astype(np.float64) ** 2)), rel=1e-3)
    # Direct path kept in place: cross-correlation of wet vs dry peaks at lag 0 (±2).
    xcorr = signal.correlate(out, x, mode="full", method="fft")
    lag = int(np.argmax(np.abs(xcorr))) - (x.size - 1)
    assert abs(lag) <= 2


# ---------------------------------------------------------------------------- telephone


def test_telephone_removes_out_of_band_energy() -> None:
    x = (0.1 * np.random.default_rng(0).standard_normal(SR)).astype(np.float32)
    out, (step,) = Augmenter(_only("telephone"), SR, None, [])(x, augment_rng(0, "tel"))
    assert step.params == {"band_low_hz": 300.0, "band_high_hz": 3400.0, "codec_rate_hz": 8000}
    in_band = _band_power(out, 500, 3000)
    assert _band_power(x, 500, 3000) == pytest.approx(in_band, rel=0.2)
    assert 10 * np.log10(_band_power(out, 4000, 8000) / in_band) < -35
    assert 10 * np.log10(_band_power(out, 0, 150) / in_band) < -20


# ---------------------------------------------------------------------------- gain, clip


def test_gain_changes_rms_by_db() -> None:
    x = _sine(amp=0.2)
    settings = _only("gain", gain_db=(-12.0, 3.0))
    out, (step,) = Augmenter(settings, SR, None, [])(x, augment_rng(0, "gain"))
    ratio_db = 20 * np.log10(np.sqrt(np.mean(out.astype(np.float64) ** 2))
                             / np.sqrt(np.mean(x.astype(np.float64) ** 2)))
    assert ratio_db == pytest.approx(float(step.params["gain_db"]), abs=0.01)
    assert step.params["clipped_fraction"] == 0.0


def test_gain_past_full_scale_clips_and_records() -> None:
    x = _sine(amp=0.9)
    out, (step,) = Augmenter(_only("gain", gain_db=(6.0, 6.0)), SR, None, [])(
        x, augment_rng(0, "loud"))
    assert float(np.max(np.abs(out))) <= 1.0
    assert 0.3 < float(step.params["clipped_fraction"]) < 0.9


def test_clip_bounds_peak() -> None:
    x = _sine(amp=0.5)
    out, (step,) = Augmenter(_only("clip"), SR, None, [])(x, augment_rng(0, "clip"))
    level = float(step.params["clip_level"])
    assert 0.3 <= level <= 0.8
    assert float(np.max(np.abs(out))) <= level * 0.5 + 1e-6
    assert float(step.params["clipped_fraction"]) > 0.0


# ---------------------------------------------------------------------------- whole chain


def test_output_contract_and_input_untouched(bank: RIRBank, babble_files: list[Path]) -> None:
    settings = AugmentSettings(p=1.0, reverb=REVERB)
    augmenter = Augmenter(settings, SR, bank, babble_files)
    x = _chirp(amp=0.9)
    before = x.copy()
    seen = set()
    for i in range(40):
        out, steps = augmenter(x, augment_rng(3, f"utt{i}"))
        assert out.shape == x.shape and out.dtype == np.float32
        assert float(np.max(np.abs(out))) <= 1.0 and out is not x
        assert steps and {s.kind for s in steps} <= set(KINDS)
        kinds = [s.kind for s in steps]
        assert kinds == sorted(kinds, key=KINDS.index)  # reverb -> noise -> ... -> clip
        seen.update(kinds)
    assert np.array_equal(x, before)
    assert seen == set(KINDS)


def test_same_seed_and_id_reproduce_different_ids_differ(
        bank: RIRBank, babble_files: list[Path]) -> None:
    augmenter = Augmenter(AugmentSettings(p=1.0, reverb=REVERB), SR, bank, babble_files)
    x = _chirp()
    a, steps_a = augmenter(x, augment_rng(11, "utt-a"))
    b, steps_b = augmenter(x, augment_rng(11, "utt-a"))
    assert np.array_equal(a, b) and steps_a == steps_b
    others = [augmenter(x, augment_rng(11, f"utt-{i}")) for i in range(5)]
    assert all(not np.array_equal(a, o) or steps_a != s for o, s in others)
    assert augment_rng(1, "u").random() != augment_rng(2, "u").random()


def test_replay_reproduces_output(bank: RIRBank, babble_files: list[Path]) -> None:
    augmenter = Augmenter(AugmentSettings(p=1.0, reverb=REVERB), SR, bank, babble_files)
    x = _chirp(amp=0.8)
    for i in range(30):
        out, steps = augmenter(x, augment_rng(5, f"utt{i}"))
        # Through JSON, as the manifest stores them.
        stored = [AugmentStep.model_validate_json(s.model_dump_json()) for s in steps]
        again = replay(x, stored, SR, bank, babble_files)
        np.testing.assert_allclose(again, out, atol=1e-6, rtol=0)


def test_replay_finds_moved_babble_files(babble_files: list[Path], tmp_path: Path) -> None:
    settings = _only("noise", noise=NoiseSettings(p=1.0, kinds=["babble"]))
    out, steps = Augmenter(settings, SR, None, babble_files)(_sine(), augment_rng(0, "m"))
    moved = []
    for path in babble_files:
        target = tmp_path / path.name
        target.write_bytes(path.read_bytes())
        moved.append(target)
    np.testing.assert_allclose(replay(_sine(), steps, SR, None, moved), out, atol=1e-6)


def test_probability_zero_and_one(bank: RIRBank) -> None:
    x = _sine()
    never = Augmenter(AugmentSettings(p=0.0), SR, bank, [])
    for i in range(20):
        out, steps = never(x, augment_rng(0, f"utt{i}"))
        assert steps == [] and np.array_equal(out, x) and out is not x
    # Every transform rarely fires by itself, so the forced pick must kick in.
    rare = AugmentSettings(p=1.0, noise=NoiseSettings(p=0.01), reverb=REVERB.model_copy(
        update={"p": 0.01}), gain_p=0.01, clip_p=0.01, telephone_p=0.01)
    always = Augmenter(rare, SR, bank, [])
    forced = set()
    for i in range(60):
        _, steps = always(x, augment_rng(0, f"utt{i}"))
        assert len(steps) >= 1
        forced.update(s.kind for s in steps)
    assert len(forced) >= 4  # the forced choice is spread over the transforms


# ---------------------------------------------------------------------------- RIR bank


def test_rir_bank_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = RIRBank.build(REVERB, seed=3, sample_rate=SR, cache_dir=tmp_path)
    assert len(first) == 2 and len(list(tmp_path.glob("*.npy"))) == 2

    def _no_simulation(*args: object) -> np.ndarray:
        raise AssertionError("cached room was simulated again")

    monkeypatch.setattr(aug_mod, "_simulate_room", _no_simulation)
    start = time.perf_counter()
    second = RIRBank.build(REVERB, seed=3, sample_rate=SR, cache_dir=tmp_path)
    assert time.perf_counter() - start < 0.5
    for i in range(2):
        (rir_a, rt_a), (rir_b, rt_b) = first.get(i), second.get(i)
        assert np.array_equal(rir_a, rir_b) and rt_a == rt_b
        assert rir_a.dtype == np.float32 and rir_a.ndim == 1
        assert float(np.max(np.abs(rir_a))) == pytest.approx(1.0)
        assert REVERB.rt60_s[0] <= rt_a <= REVERB.rt60_s[1]
    # Room i depends on (seed, i) only: a smaller bank is a prefix of a bigger one.
    smaller = RIRBank.build(REVERB.model_copy(update={"bank_size": 1}), 3, SR, tmp_path)
    assert np.array_equal(smaller.get(0)[0], first.get(0)[0])
    assert not np.array_equal(first.get(0)[0][:100], first.get(1)[0][:100])


# ---------------------------------------------------------------------------- bad input


def test_bad_input_raises(bank: RIRBank) -> None:
    augmenter = Augmenter(AugmentSettings(p=1.0), SR, None, [])
    rng = augment_rng(0, "bad")
    with pytest.raises(ValueError, match="mono"):
        augmenter(np.zeros((2, 100), dtype=np.float32), rng)
    with pytest.raises(ValueError, match="floating"):
        augmenter(np.zeros(100, dtype=np.int16), rng)
    with pytest.raises(ValueError, match="empty"):
        augmenter(np.zeros(0, dtype=np.float32), rng)
    with pytest.raises(ValueError, match="NaN"):
        augmenter(np.full(100, np.nan, dtype=np.float32), rng)
    with pytest.raises(ValueError, match="utterance_id"):
        augment_rng(0, "")
    with pytest.raises(ValueError, match="Hz"):
        Augmenter(AugmentSettings(), 16000, bank.__class__([np.ones(4)], [0.3], seed=0,
                                                          sample_rate=8000,
                                                          rt60_range=(0.2, 0.4)), [])
    x = _sine()
    with pytest.raises(ValueError, match="unknown augment kind"):
        replay(x, [AugmentStep(kind="echo")], SR, None, [])
    with pytest.raises(ValueError, match="missing parameter"):
        replay(x, [AugmentStep(kind="gain")], SR, None, [])
    with pytest.raises(ValueError, match="rir_bank"):
        replay(x, [AugmentStep(kind="reverb", params={"rir_index": 0})], SR, None, [])
    with pytest.raises(ValueError, match="seed"):
        replay(x, [AugmentStep(kind="reverb", params={"rir_index": 0, "rir_seed": 99})],
               SR, bank, [])
    with pytest.raises(ValueError, match="out of range"):
        replay(x, [AugmentStep(kind="reverb", params={"rir_index": 5})], SR, bank, [])
    with pytest.raises(ValueError, match="babble source"):
        replay(x, [AugmentStep(kind="noise", params={"noise": "babble", "snr_db": 5.0,
                                                     "noise_seed": 1, "sources": "nope.wav"})],
               SR, None, [])
