"""ONNX deploy bundles: export equivalence (with padding), int8 quantisation, the ONNX
Runtime predictor against the torch one, error predictions and folder dispatch.

The model is tiny and randomly initialised: what is tested is that export and ONNX
Runtime reproduce eager torch, not accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import soundfile as sf
import torch

from model.frontend.features import FeatureConfig
from model.inference.batch import SLUPredictor
from model.inference.onnx import OnnxSLUPredictor, load_predictor
from model.nn.export import (
    DeployBundle,
    check_bundle,
    export_onnx,
    load_bundle_config,
    make_session,
    open_bundle,
    quantize_bundle,
)
from model.nn.network import EncoderConfig, JointModel, ModelConfig, min_input_frames
from model.nn.package import ModelPackage, save_package
from model.nn.qat import WEIGHT_QMAX, WEIGHT_REDUCE_RANGE
from model.nn.tokens import ParseVocab

torch.set_num_threads(1)

_VOCAB = ParseVocab.build(
    ["HassTurnOn", "HassTurnOff", "HassLightSet"], ["area", "name", "brightness"],
    ["turn on the kitchen light", "set the bedroom to fifty percent"],
)
_FEATURES = FeatureConfig(normalise="global", mean=(-6.0,) * 80, std=(2.5,) * 80)


def _package() -> ModelPackage:
    torch.manual_seed(0)
    cfg = ModelConfig(
        EncoderConfig(d_model=32, layers=2, heads=2, ffn_mult=2, conv_kernel=5, subsampling=8,
                      causal_conv=True),
        n_chars=29, n_intents=len(_VOCAB.intents), n_parse_tokens=len(_VOCAB),
        decoder_layers=1, decoder_heads=2, decoder_ffn=64, max_parse_len=12, ctc_upsample=4,
    )
    return ModelPackage(JointModel(cfg).eval(), _FEATURES, _VOCAB, clarify_threshold=0.37,
                        metadata={"version": "test-7", "role": "student"})


@pytest.fixture(scope="module")
def package() -> ModelPackage:
    return _package()


@pytest.fixture(scope="module")
def bundles(package: ModelPackage, tmp_path_factory: pytest.TempPathFactory
            ) -> tuple[DeployBundle, DeployBundle]:
    root = tmp_path_factory.mktemp("bundles")
    fp32 = export_onnx(package, root / "fp32")  # verifies against torch on a padded batch
    return fp32, quantize_bundle(fp32.folder, root / "int8")


def _waves(seconds: tuple[float, ...] = (0.45, 1.1, 1.7, 0.8), seed: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for s in seconds:
        t = np.arange(int(16000 * s)) / 16000
        tone = 0.3 * np.sin(2 * np.pi * rng.uniform(150, 900) * t)
        out.append((tone + 0.05 * rng.standard_normal(t.size)).astype(np.float32))
    return out


def test_export_matches_eager_torch_on_a_padded_batch(
    package: ModelPackage, bundles: tuple[DeployBundle, DeployBundle]
) -> None:
    fp32, _ = bundles
    # Another length than the export example: 257 frames -> 128 -> 63 -> 31 encoder frames.
    diffs = check_bundle(fp32, package.model, atol=1e-4, frames=257)
    assert set(diffs) == {"encoder", "ctc_logits", "intent_logits", "decoder"}
    assert max(diffs.values()) < 1e-4


def test_padding_invariance_survives_export(bundles: tuple[DeployBundle, DeployBundle]) -> None:
    fp32, _ = bundles
    session = make_session(fp32.encoder)
    torch.manual_seed(1)
    long, short = torch.randn(200, 80), torch.randn(90, 80)
    batch = torch.zeros(2, 200, 80)
    batch[0], batch[1, :90] = long, short
    enc, enc_len, ctc, intent = session.run(None, {
        "feats": batch.numpy(), "lengths": np.array([200, 90], dtype=np.int64)})
    alone = session.run(None, {"feats": short[None].numpy(), "lengths": np.array([90])})
    # 90 frames -> 44 -> 21 -> 10 encoder frames; 4 CTC slots each.
    assert enc_len.tolist() == [24, 10] and alone[1].tolist() == [10]
    np.testing.assert_allclose(enc[1, :10], alone[0][0], atol=1e-5)
    assert np.abs(enc[1, 10:]).max() == 0.0  # padding stays zero
    np.testing.assert_allclose(ctc[1, :40], alone[2][0], atol=1e-5)
    np.testing.assert_allclose(intent[1], alone[3][0], atol=1e-5)


def test_bundle_config_carries_the_package_config(
    package: ModelPackage, bundles: tuple[DeployBundle, DeployBundle], tmp_path: Path
) -> None:
    fp32, int8 = bundles
    save_package(package, tmp_path / "pkg")
    saved = json.loads((tmp_path / "pkg" / "config.json").read_text())
    written = json.loads(fp32.config.read_text())
    assert {k: v for k, v in written.items() if k != "onnx"} == saved
    cfg = load_bundle_config(fp32.folder)
    assert cfg.model == package.model.cfg
    assert cfg.features == _FEATURES  # global mean/std included
    assert cfg.parse_vocab == _VOCAB
    assert cfg.clarify_threshold == pytest.approx(0.37)
    assert cfg.version == "test-7"
    assert cfg.onnx["int8"] is False and not fp32.quantized
    assert load_bundle_config(int8.folder).onnx["int8"] is True and int8.quantized
    assert load_bundle_config(int8.folder).onnx["quantization"]["reduce_range"] is WEIGHT_REDUCE_RANGE


def _matmul_weight_bytes(path: Path, ops: tuple[str, ...]) -> int:
    graph = onnx.load(str(path)).graph
    inits = {i.name: i for i in graph.initializer}
    return sum(len(inits[n.input[1]].raw_data) for n in graph.node
               if n.op_type in ops and n.input[1] in inits)


def test_int8_bundle_has_int8_matmul_weights_and_is_smaller(
    package: ModelPackage, bundles: tuple[DeployBundle, DeployBundle],
) -> None:
    fp32, int8 = bundles
    for path in (int8.encoder, int8.decoder):
        graph = onnx.load(str(path)).graph
        inits = {i.name: i for i in graph.initializer}
        integer = [n for n in graph.node if n.op_type == "MatMulInteger"]
        assert integer, f"{path.name}: no MatMulInteger"
        for node in integer:
            weight = inits[node.input[1]]
            assert weight.data_type == onnx.TensorProto.INT8
            # The 7-bit grid QAT trains on (|q| <= 64: no int16 saturation on AVX2 without VNNI).
            assert int(np.abs(onnx.numpy_helper.to_array(weight).astype(np.int32)).max()) \
                == WEIGHT_QMAX == 64, node.name
        # No float matmul with a constant weight is left behind.
        for node in graph.node:
            if node.op_type in ("MatMul", "Gemm") and node.input[1] in inits:
                assert inits[node.input[1]].data_type != onnx.TensorProto.FLOAT, node.name
    # Every matmul weight of the model is stored once, as one byte per value: nn.Linear
    # layers and nn.MultiheadAttention's packed in_proj (cross-attention's split into its
    # query and key/value parts included).
    weights = sum(m.weight.numel() for m in package.model.modules() if isinstance(m, torch.nn.Linear))
    weights += sum(m.in_proj_weight.numel() for m in package.model.modules()
                   if isinstance(m, torch.nn.MultiheadAttention))
    after = sum(_matmul_weight_bytes(p, ("MatMulInteger",)) for p in (int8.encoder, int8.decoder))
    assert after == weights
    # ... and the files, although this tiny model's fp32 conv front end (32 channels × 3×3
    # over 80 mel bins) and graph structure (the traced encoder's shape arithmetic) weigh
    # relatively more than in a real model.
    assert int8.size_bytes() < 0.7 * fp32.size_bytes()


def test_int8_outputs_stay_close(package: ModelPackage,
                                 bundles: tuple[DeployBundle, DeployBundle]) -> None:
    _, int8 = bundles
    diffs = check_bundle(int8, package.model, atol=1.0)
    assert diffs["intent_logits"] < 0.1


def test_onnx_predictor_equals_torch_predictor(
    package: ModelPackage, bundles: tuple[DeployBundle, DeployBundle]
) -> None:
    fp32, _ = bundles
    waves = _waves()
    ids = [f"u{i}" for i in range(len(waves))]
    torch_pred = SLUPredictor(package, batch_size=3).predict_waveforms(ids, waves, [16000] * 4)
    onnx_pred = OnnxSLUPredictor(fp32.folder, batch_size=3).predict_waveforms(
        ids, waves, [16000] * 4)
    assert [p.id for p in onnx_pred] == ids
    for t, o in zip(torch_pred, onnx_pred, strict=True):
        assert o.error is None
        assert (o.transcript, o.intent, o.slots, o.clarify) == (
            t.transcript, t.intent, t.slots, t.clarify)
        assert o.confidence == pytest.approx(t.confidence, abs=1e-5)
        assert o.model_version == t.model_version == "test-7"
    # The whole decoder output, parse included (the random model's confidences straddle
    # the 0.37 threshold, so both clarify values occur).
    assert {p.clarify for p in torch_pred} == {True, False}
    feats = [SLUPredictor(package).extractor(w) for w in waves]
    torch_dec = SLUPredictor(package).decode_features(feats)
    onnx_dec = OnnxSLUPredictor(fp32.folder).decode_features(feats)
    for t, o in zip(torch_dec, onnx_dec, strict=True):
        assert (o.transcript, o.intent, o.parse_intent, o.slots) == (
            t.transcript, t.intent, t.parse_intent, t.slots)


def test_onnx_predictor_error_lines_match_torch(
    package: ModelPackage, bundles: tuple[DeployBundle, DeployBundle], tmp_path: Path
) -> None:
    _, int8 = bundles
    good = tmp_path / "good.wav"
    sf.write(good, _waves((0.6,))[0], 16000)
    text = tmp_path / "not_audio.wav"
    text.write_text("not a wav")
    short = tmp_path / "short.wav"
    sf.write(short, np.zeros(100, dtype=np.float32), 16000)
    paths = [good, tmp_path / "missing.wav", text, short]
    ids = ["good", "missing", "text", "short"]
    onnx_pred = OnnxSLUPredictor(int8.folder).predict_files(ids, paths)
    torch_pred = SLUPredictor(package).predict_files(ids, paths)
    assert onnx_pred[0].error is None and onnx_pred[0].intent in _VOCAB.intents
    for o, t in zip(onnx_pred[1:], torch_pred[1:], strict=True):
        assert o.error and o.error == t.error
        assert o.model_dump(exclude={"error"}) == t.model_dump(exclude={"error"})
    assert "too short" in (onnx_pred[3].error or "")
    # The shortest accepted audio decodes (×8 front end: at least 15 frames).
    frames = min_input_frames(8)
    assert frames == 15
    minimal = OnnxSLUPredictor(int8.folder).predict_waveforms(
        ["m"], [np.ones(frames * 160 + 160, dtype=np.float32) * 0.1], [16000])
    assert minimal[0].error is None


def test_load_predictor_dispatches_on_folder_contents(
    package: ModelPackage, bundles: tuple[DeployBundle, DeployBundle], tmp_path: Path
) -> None:
    fp32, _ = bundles
    save_package(package, tmp_path / "torch")
    assert isinstance(load_predictor(tmp_path / "torch"), SLUPredictor)
    assert isinstance(load_predictor(fp32.folder), OnnxSLUPredictor)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="expected a torch package"):
        load_predictor(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        load_predictor(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="not a deploy bundle"):
        open_bundle(tmp_path / "torch")
    with pytest.raises(ValueError, match="already quantised"):
        quantize_bundle(bundles[1].folder, tmp_path / "again")
