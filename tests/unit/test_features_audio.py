"""Features, SpecAugment and audio preparation."""

import numpy as np
import pytest
import soundfile as sf
import torch

from model.frontend.audio import AudioError, load_audio, prepare_waveform
from model.frontend.features import FeatureConfig, FeatureExtractor, SpecAugment

torch.set_num_threads(1)


def test_feature_shape_and_normalisation() -> None:
    extractor = FeatureExtractor(FeatureConfig())
    wave = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    feats = extractor(wave)
    # centred STFT with a 160-sample hop: 1 + 16000 // 160 = 101 frames of 80 bins
    assert feats.shape == (101, 80)
    assert torch.allclose(feats.mean(0), torch.zeros(80), atol=1e-4)
    assert torch.allclose(feats.std(0), torch.ones(80), atol=1e-3)


def test_features_do_not_depend_on_gain() -> None:
    extractor = FeatureExtractor(FeatureConfig())
    # Broadband audio (energy in every mel bin far above the log floor of 1e-6):
    # per-utterance normalisation removes a gain change completely.
    wave = np.random.default_rng(1).standard_normal(8000).astype(np.float32) * 0.3
    np.testing.assert_allclose(extractor(wave), extractor(wave * 0.25), atol=1e-3)


def test_specaugment_stays_inside_lengths() -> None:
    feats = torch.ones(2, 50, 80)
    lengths = torch.tensor([50, 20])
    out = SpecAugment(freq_masks=2, freq_width=10, time_masks=2, time_width_frac=0.2,
                      time_width_max=10)(feats, lengths, torch.Generator().manual_seed(0))
    assert (out[1, 20:] == 1).all()  # padding untouched
    assert (out == 0).any()
    assert (feats == 1).all()  # input not mutated


def test_prepare_waveform_downmixes_and_resamples() -> None:
    stereo = np.stack([np.ones(8000), -np.ones(8000)], axis=1).astype(np.float32)
    mono = prepare_waveform(stereo, 8000, 16000)
    assert mono.ndim == 1 and mono.size == 16000
    assert np.abs(mono).max() < 1e-5  # the two channels cancel


@pytest.mark.parametrize(("audio", "message"), [
    (np.zeros(0, dtype=np.float32), "empty"),
    (np.array([0.0, np.nan], dtype=np.float32), "NaN"),
    (np.zeros((2, 2, 2), dtype=np.float32), "1-D"),
])
def test_prepare_waveform_rejects_bad_audio(audio: np.ndarray, message: str) -> None:
    with pytest.raises(AudioError, match=message):
        prepare_waveform(audio, 16000)


def test_load_audio_reads_any_rate_and_reports_unreadable(tmp_path) -> None:
    path = tmp_path / "a.wav"
    sf.write(path, np.zeros(22050, dtype=np.float32), 22050)
    assert load_audio(path).size == 16000
    (tmp_path / "bad.wav").write_bytes(b"nope")
    with pytest.raises(AudioError, match="cannot read"):
        load_audio(tmp_path / "bad.wav")


def test_global_normalisation_uses_stored_statistics() -> None:
    from model.frontend.features import global_stats, normalise_features

    torch.manual_seed(0)
    raws = [torch.randn(50, 80) * 3 + 2, torch.randn(30, 80) * 3 + 2]
    mean, std = global_stats(raws)
    cfg = FeatureConfig(normalise="global", mean=mean, std=std)
    pooled = normalise_features(torch.cat(raws), cfg)
    assert pooled.mean().abs() < 1e-4 and (pooled.std() - 1).abs() < 1e-2
    wave = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    extractor = FeatureExtractor(cfg)
    torch.testing.assert_close(extractor(wave), normalise_features(extractor.raw(wave), cfg))
    with pytest.raises(ValueError, match="mean and std"):
        FeatureConfig(normalise="global")
