"""The deploy bundle as an MLflow pyfunc model, through a real (SQLite) MLflow: log,
register, alias, load by ``models:/name@alias``, predict; and ``voiceloop predict`` on
the same URI, on the downloaded pyfunc folder and on the bundle folder.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from model.frontend.features import FeatureConfig
from model.inference.onnx import OnnxSLUPredictor, load_predictor, pyfunc_bundle_dir
from model.inference.prediction import Prediction, read_predictions
from model.nn.export import DeployBundle, export_onnx, quantize_bundle
from model.nn.network import EncoderConfig, JointModel, ModelConfig
from model.nn.package import ModelPackage
from model.nn.tokens import ParseVocab
from serving.pyfunc import log_pyfunc, register_pyfunc, wav_base64
from voiceloop.settings import Settings, load_settings
from voiceloop.stages import predict_stage
from voiceloop.tracking import RunLogger, mlflow_scope, resolve_model_uri

pytestmark = pytest.mark.integration

torch.set_num_threads(1)

_NAME = "voiceloop-slu-pyfunc-test"
_VOCAB = ParseVocab.build(["HassTurnOn", "HassTurnOff"], ["area", "name"],
                          ["turn on the kitchen light", "off"])


def _package() -> ModelPackage:
    torch.manual_seed(0)
    cfg = ModelConfig(
        EncoderConfig(d_model=32, layers=1, heads=2, ffn_mult=2, conv_kernel=5, subsampling=8),
        n_chars=29, n_intents=len(_VOCAB.intents), n_parse_tokens=len(_VOCAB),
        decoder_layers=1, decoder_heads=2, decoder_ffn=64, max_parse_len=10, ctc_upsample=4,
    )
    return ModelPackage(JointModel(cfg).eval(), FeatureConfig(), _VOCAB, 0.5,
                        {"version": "pyfunc-test-1"})


def _wave(seconds: float, freq: float) -> np.ndarray:
    t = np.arange(int(16000 * seconds)) / 16000
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, DeployBundle]:
    root = tmp_path_factory.mktemp("pyfunc")
    settings = load_settings(profile="tiny", workspace=root / "ws")
    # Workspace settings put MLflow at sqlite:///<tmp>/ws/mlflow/mlflow.db, artifacts beside it.
    assert settings.tracking_uri.startswith("sqlite:///") and str(root) in settings.tracking_uri
    fp32 = export_onnx(_package(), root / "bundle-fp32")
    int8 = quantize_bundle(fp32.folder, root / "bundle-int8")
    logger = RunLogger.start(settings, "pyfunc-test")
    info = log_pyfunc(logger.client, logger.run_id, int8.folder)
    assert logger.client.get_run(logger.run_id).info.status == "RUNNING"  # left as it was
    logger.finish()
    version = register_pyfunc(logger.client, info, _NAME, alias="candidate")
    assert str(logger.client.get_model_version_by_alias(_NAME, "candidate").version) == version
    return settings, int8


@pytest.fixture
def global_mlflow_uri(registered: tuple[Settings, DeployBundle]) -> Iterator[None]:
    """``mlflow.pyfunc.load_model("models:/…")`` reads the process-wide URIs: set, then restore."""
    with mlflow_scope(registered[0].tracking_uri):
        yield


@pytest.mark.usefixtures("global_mlflow_uri")
def test_pyfunc_loads_by_alias_and_returns_contract_dicts(
    registered: tuple[Settings, DeployBundle], tmp_path: Path
) -> None:
    _, bundle = registered
    wav = tmp_path / "a.wav"
    sf.write(wav, _wave(0.8, 300.0), 16000)
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio")
    frame = pd.DataFrame({
        "id": ["path", "b64", "missing", "garbage", "notwav", "none"],
        "audio": [str(wav), None, str(tmp_path / "nowhere.wav"), None, str(bad), None],
        "audio_base64": [None, wav_base64(_wave(1.2, 500.0), 8000), None, "%%%not base64",
                         None, None],
    })
    before = frame.copy()
    loaded = mlflow.pyfunc.load_model(f"models:/{_NAME}@candidate")
    out = loaded.predict(frame)
    pd.testing.assert_frame_equal(frame, before)  # input not mutated
    assert [d["id"] for d in out] == list(frame["id"])
    for d in out[:2]:
        p = Prediction.model_validate(d)  # the contract, exactly
        assert p.error is None and p.intent in _VOCAB.intents and 0 <= p.confidence <= 1
        assert p.model_version == "pyfunc-test-1"
    for d in out[2:]:
        assert d["error"] and d["transcript"] == "" and d["model_version"] == "pyfunc-test-1"
    assert "cannot read" in out[2]["error"]
    assert "base64" in out[3]["error"]
    assert "neither audio nor audio_base64" in out[5]["error"]
    # Same answers as running the bundle directly on the same batch (int8 activations
    # are quantised with one scale per batch tensor, so batch-mates nudge the numbers).
    b64_audio, b64_rate = sf.read(io.BytesIO(base64.b64decode(frame["audio_base64"][1])),
                                  dtype="float32")
    direct = OnnxSLUPredictor(bundle.folder).predict_waveforms(
        ["path", "b64"], [sf.read(wav, dtype="float32")[0], b64_audio], [16000, b64_rate])
    for got, want in zip(out[:2], direct, strict=True):
        expected = want.model_dump(mode="json", exclude_none=True)
        assert got.pop("confidence") == pytest.approx(expected.pop("confidence"), abs=1e-4)
        assert got == expected
    # The base64 column alone is enough (the logged input example has only it).
    only = loaded.predict(pd.DataFrame({"id": ["x"], "audio_base64": [wav_base64(_wave(1, 200), 16000)]}))
    assert only[0]["id"] == "x" and "error" not in only[0]


def test_voiceloop_predict_accepts_models_uri_pyfunc_folder_and_bundle(
    registered: tuple[Settings, DeployBundle], tmp_path: Path
) -> None:
    settings, bundle = registered
    # As the CLI runs: no process-wide MLflow URI; everything comes from the settings.
    assert mlflow.get_tracking_uri() != settings.tracking_uri
    sf.write(tmp_path / "a.wav", _wave(0.9, 350.0), 16000)
    manifest = tmp_path / "in.jsonl"
    manifest.write_text(
        json.dumps({"id": "a", "audio": "a.wav"}) + "\n"
        + json.dumps({"id": "b", "audio": "missing.wav"}) + "\n", encoding="utf-8")
    uri = f"models:/{_NAME}@candidate"
    pyfunc_dir = resolve_model_uri(uri, settings)
    assert (pyfunc_dir / "MLmodel").is_file()
    assert pyfunc_bundle_dir(pyfunc_dir).joinpath("encoder.onnx").is_file()
    assert isinstance(load_predictor(pyfunc_dir), OnnxSLUPredictor)
    results = {}
    for label, model_ref in (("uri", uri), ("folder", str(pyfunc_dir)), ("bundle", str(bundle.folder))):
        out = tmp_path / f"{label}.jsonl"
        summary = predict_stage(settings, model_ref, manifest, out)
        assert (summary.read, summary.written, summary.errors) == (2, 2, 1)
        results[label] = read_predictions(out)
    assert results["uri"] == results["folder"] == results["bundle"]
    first, second = results["uri"]
    assert first.id == "a" and first.error is None and first.model_version == "pyfunc-test-1"
    assert second.id == "b" and second.error


_STANDALONE = """
import sys
repo = sys.argv[2]
sys.path[:] = [p for p in sys.path if p not in ("", ".", repo)]
import mlflow.pyfunc, pandas as pd
loaded = mlflow.pyfunc.load_model(sys.argv[1])
import model, serving
assert not model.__file__.startswith(repo + "/model"), model.__file__
print(loaded.predict(pd.DataFrame({"id": ["s"], "audio": [sys.argv[3]]}))[0]["id"])
"""


def test_pyfunc_loads_without_the_repository_on_the_path(
    registered: tuple[Settings, DeployBundle], tmp_path: Path
) -> None:
    """The ``model``/``serving`` code logged with the model is what gets imported."""
    settings, _ = registered
    pyfunc_dir = resolve_model_uri(f"models:/{_NAME}@candidate", settings)
    sf.write(tmp_path / "a.wav", _wave(0.7, 250.0), 16000)
    repo = str(Path(__file__).resolve().parents[2])
    done = subprocess.run(
        [sys.executable, "-c", _STANDALONE, str(pyfunc_dir), repo, str(tmp_path / "a.wav")],
        check=False, cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "s"


def test_mlflow_scope_restores_unset_globals(tmp_path: Path) -> None:
    """Regression: resolving models:/ URIs used to leave MLflow's registry URI pointing at
    one workspace for the rest of the process."""
    import os

    from mlflow.tracking._model_registry import utils as registry_utils

    before = (registry_utils._registry_uri, os.environ.get("MLFLOW_REGISTRY_URI"),
              mlflow.get_tracking_uri())
    uri = f"sqlite:///{tmp_path / 'scoped.db'}"
    with mlflow_scope(uri):
        assert mlflow.get_registry_uri() == uri and mlflow.get_tracking_uri() == uri
    after = (registry_utils._registry_uri, os.environ.get("MLFLOW_REGISTRY_URI"),
             mlflow.get_tracking_uri())
    assert after == before
