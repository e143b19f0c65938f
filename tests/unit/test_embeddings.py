"""Utterance embeddings (``BatchPredictor.embed_waveforms``): torch == ONNX for the same
tiny model, padding invariance, NaN rows for unusable audio."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model.inference.batch import SLUPredictor
from model.inference.onnx import OnnxSLUPredictor, load_predictor
from model.nn.export import export_onnx
from tests.support import tiny_package, tone


@pytest.fixture(scope="module")
def predictors(tmp_path_factory: pytest.TempPathFactory) -> tuple[SLUPredictor, OnnxSLUPredictor]:
    package = tiny_package("emb-test")
    bundle = export_onnx(package, tmp_path_factory.mktemp("bundle") / "fp32")
    onnx = load_predictor(Path(bundle.folder), batch_size=4, use_lm=False)
    assert isinstance(onnx, OnnxSLUPredictor)
    return SLUPredictor(package, batch_size=4, use_lm=False), onnx


def _waves() -> list[np.ndarray]:
    # Different lengths so that batches pad: 0.4 s .. 1.9 s.
    return [tone(0.4 + 0.3 * i, freq=200.0 + 90 * i) for i in range(6)]


def test_torch_and_onnx_embeddings_agree(
    predictors: tuple[SLUPredictor, OnnxSLUPredictor],
) -> None:
    torch_pred, onnx_pred = predictors
    waves = _waves()
    rates = [16000] * len(waves)
    a = torch_pred.embed_waveforms(waves, rates)
    b = onnx_pred.embed_waveforms(waves, rates)
    # (N, D) = (6, d_model 32)
    assert a.shape == b.shape == (6, 32)
    assert a.dtype == np.float32
    assert np.isfinite(a).all()
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("which", [0, 1])
def test_embedding_is_padding_invariant(
    predictors: tuple[SLUPredictor, OnnxSLUPredictor], which: int
) -> None:
    predictor = predictors[which]
    waves = _waves()
    rates = [16000] * len(waves)
    batched = predictor.embed_waveforms(waves, rates)  # batches of 4: the short ones padded
    alone = np.stack([predictor.embed_waveforms([w], [16000])[0] for w in waves])
    np.testing.assert_allclose(batched, alone, atol=1e-5, rtol=1e-4)


def test_unusable_audio_gives_nan_rows_and_resampling_works(
    predictors: tuple[SLUPredictor, OnnxSLUPredictor],
) -> None:
    _, predictor = predictors
    good = tone(1.0)
    good_8k = good[::2].copy()  # the same tone at 8 kHz: resampled like predict_waveforms
    waves = [good, np.zeros(0, np.float32), np.full(800, np.nan, np.float32),
             good[:100], good_8k]
    out = predictor.embed_waveforms(waves, [16000, 16000, 16000, 16000, 8000])
    assert out.shape == (5, 32)
    assert np.isfinite(out[[0, 4]]).all()
    assert np.isnan(out[1:4]).all()
    assert predictor.embed_waveforms([], []).shape == (0, 32)
    with pytest.raises(ValueError, match="sample rates"):
        predictor.embed_waveforms([good], [])
