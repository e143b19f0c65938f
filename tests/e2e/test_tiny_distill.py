"""Tiny end-to-end distillation: teacher → student with KD, dynamic chunks and QAT →
int8 ONNX bundle → teacher/student comparison → MLflow pyfunc @candidate → predict.

Checks plumbing and contracts on a model far too small to be accurate.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
import onnx
import pandas as pd
import pytest
import soundfile as sf
import torch
from mlflow.tracking import MlflowClient

from model.data.corpus import CorpusLayout
from model.data.manifest import read_manifest
from model.frontend.audio import load_audio
from model.frontend.features import FeatureExtractor
from model.inference.batch import SLUPredictor
from model.inference.streaming import StreamingRecognizer
from model.nn.package import has_lm, load_package
from model.training.fit import capped_threads
from model.training.student import StudentLayout, train_student
from voiceloop.settings import Settings
from voiceloop.stages import DistillOutcome, distill_stage, predict_stage
from voiceloop.tracking import mlflow_scope

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def distilled(tiny_workspace: Callable[[str], Settings]) -> tuple[Settings, DistillOutcome]:
    torch.set_num_threads(capped_threads(2))
    settings = tiny_workspace("distill")
    return settings, distill_stage(settings, progress=False)


def test_student_training_runs_qat_and_writes_its_files(
    distilled: tuple[Settings, DistillOutcome],
) -> None:
    settings, outcome = distilled
    result = outcome.result
    layout = StudentLayout(result.model_dir.parent)
    assert result.epochs_run == settings.student.train.epochs
    assert result.qat_start_epoch is not None and 0 < result.qat_start_epoch < result.epochs_run
    history = layout.history.read_text().splitlines()
    header = history[0].split(",")
    qat_col = header.index("qat")
    flags = [float(line.split(",")[qat_col]) for line in history[1:]]
    assert flags[0] == 0.0 and flags[-1] == 1.0  # QAT only in the last part
    for term in ("kd_ctc", "kd_intent", "ctc", "intent"):  # no parse decoder: tagged CTC
        assert f"train_loss_{term}" in header
    student = load_package(layout.model_dir)
    assert student.metadata["role"] == "student" and student.metadata["qat"] is True
    assert student.features.normalise == "causal"
    assert student.model.cfg.encoder.causal_conv
    assert (layout.pre_qat_dir / "weights.pt").exists()
    # deployed bundle: int8 weights, smaller than the float twin
    model = onnx.load(str(layout.deploy_dir / "encoder.onnx"))
    int8 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(int8) >= 4
    fp32_bytes = (layout.deploy_fp32_dir / "encoder.onnx").stat().st_size
    # (the tiny model is dominated by its fp32 conv front end; full-size ratios: benchmark)
    assert (layout.deploy_dir / "encoder.onnx").stat().st_size < 0.75 * fp32_bytes
    # the student's own tuned LM travels with the package and both bundles
    assert all(has_lm(d) for d in (layout.model_dir, layout.deploy_dir, layout.deploy_fp32_dir))


def test_comparison_and_registration(distilled: tuple[Settings, DistillOutcome]) -> None:
    settings, outcome = distilled
    flat = json.loads((outcome.result.model_dir.parent / "eval" / "test" / "comparison.json")
                      .read_text())
    for key in ("teacher_intent_accuracy", "student_intent_accuracy", "delta_slot_f1",
                "wer_relative_increase", "size_ratio"):
        assert key in flat
    assert flat["student_bytes"] < flat["teacher_bytes"]
    client = MlflowClient(settings.tracking_uri, registry_uri=settings.tracking_uri)
    version = client.get_model_version_by_alias(settings.tracking.registered_model, "candidate")
    assert version.run_id == outcome.run_id
    run = client.get_run(outcome.run_id)
    assert "compare/delta_intent_accuracy" in run.data.metrics
    assert client.get_metric_history(run.info.run_id, "step/loss_kd_ctc")


def test_pyfunc_from_registry_and_predict_cli_path(
    distilled: tuple[Settings, DistillOutcome], tmp_path: Path
) -> None:
    settings, _ = distilled
    t = np.arange(16000) / 16000
    sf.write(tmp_path / "a.wav", (0.1 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    (tmp_path / "bad.wav").write_bytes(b"nope")
    uri = f"models:/{settings.tracking.registered_model}@candidate"
    with mlflow_scope(settings.tracking_uri):  # loading by alias reads MLflow's globals
        pyfunc = mlflow.pyfunc.load_model(uri)
    out = pyfunc.predict(pd.DataFrame({"id": ["a", "b"],
                                       "audio": [str(tmp_path / "a.wav"),
                                                 str(tmp_path / "bad.wav")]}))
    records = list(out.to_dict("records")) if isinstance(out, pd.DataFrame) else list(out)
    assert records[0]["id"] == "a" and "intent" in records[0] and "slots" in records[0]
    assert records[1].get("error")
    manifest = tmp_path / "in.jsonl"
    manifest.write_text(json.dumps({"id": "a", "audio": "a.wav"}) + "\n")
    summary = predict_stage(settings, uri, manifest, tmp_path / "out.jsonl")
    assert (summary.written, summary.errors) == (1, 0)
    line = json.loads((tmp_path / "out.jsonl").read_text())
    assert line["model_version"].startswith("student-tiny")


def test_student_streams(distilled: tuple[Settings, DistillOutcome]) -> None:
    _, outcome = distilled
    package = load_package(outcome.result.model_dir)
    session = StreamingRecognizer(package, chunk=2).session()
    wave = (0.1 * np.random.default_rng(0).standard_normal(24000)).astype(np.float32)
    for piece in np.array_split(wave, 10):
        session.accept_audio(piece)
    final = session.finish()
    assert final.intent in package.parse_vocab.intents


def test_streaming_final_result_uses_the_lm_like_the_batch_pass(
    distilled: tuple[Settings, DistillOutcome],
) -> None:
    settings, outcome = distilled
    package = load_package(outcome.result.model_dir)
    assert package.lm_dir is not None
    layout = CorpusLayout(settings.corpus_dir)
    rows = read_manifest(layout.manifest("valid"))
    extractor = FeatureExtractor(package.features)
    for row in rows[:3]:
        wave = load_audio(row.audio_path(layout.manifests_dir), package.features.sample_rate)
        offline = SLUPredictor(package, chunk=2).decode_features([extractor(wave)])[0]
        session = StreamingRecognizer(package, chunk=2).session()
        for piece in np.array_split(wave, 6):
            session.accept_audio(piece)
        live = session.finish()
        assert (live.transcript, live.parse_intent, live.slots) == (
            offline.transcript, offline.parse_intent, offline.slots)


def test_student_resumes_in_the_qat_phase(distilled: tuple[Settings, DistillOutcome]) -> None:
    settings, outcome = distilled
    layout = StudentLayout(outcome.result.model_dir.parent)
    before = torch.load(layout.last, weights_only=False)
    assert before["task"]["qat_active"]
    st = settings.student
    more = settings.model_copy(update={"student": st.model_copy(update={
        "train": st.train.model_copy(update={"epochs": st.train.epochs + 1})})})
    result = train_student(more, progress=False)
    after = torch.load(layout.last, weights_only=False)
    assert after["epoch"] == before["epoch"] + 1 and after["task"]["qat_active"]
    assert result.epochs_run == st.train.epochs + 1
