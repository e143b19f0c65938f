"""Tiny end-to-end: corpus → train (real MLflow) → resume → evaluate → predict.

The model is far too small and trained far too briefly to be accurate; these tests check
the plumbing and the contracts, not accuracy (that is what the benchmarks measure).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from mlflow.tracking import MlflowClient

from model.data.corpus import CorpusLayout
from model.frontend.cache import load_split
from model.inference.batch import SLUPredictor
from model.nn.package import has_lm, load_package
from model.training.fit import RunLayout, capped_threads
from voiceloop.settings import Settings
from voiceloop.stages import evaluate_stage, predict_stage, train_stage

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def trained(tiny_workspace: Callable[[str], Settings]) -> tuple[Settings, Path]:
    torch.set_num_threads(capped_threads(2))
    settings = tiny_workspace("pipeline")
    return settings, settings.models_dir / "teacher" / "model"


def test_training_writes_package_metrics_and_mlflow_run(trained: tuple[Settings, Path]) -> None:
    settings, model_dir = trained
    layout = RunLayout(model_dir.parent)
    package = load_package(model_dir)
    assert package.metadata["role"] == "teacher"
    assert 0.0 <= package.clarify_threshold <= 1.0
    metrics = json.loads(layout.metrics.read_text())
    assert {"valid_semer", "valid_wer", "heldout_semer", "parameters", "wall_minutes",
            "intent_temperature"} <= set(metrics)
    assert layout.curves.stat().st_size > 1000
    history = layout.history.read_text().splitlines()
    assert len(history) == 1 + settings.train.epochs

    client = MlflowClient(settings.tracking_uri, registry_uri=settings.tracking_uri)
    run = client.get_run(json.loads(layout.run_file.read_text())["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.d_model"] == str(settings.model.d_model)
    for task in ("ctc", "intent", "inter_ctc"):  # tagged CTC: no parse decoder
        steps = client.get_metric_history(run.info.run_id, f"step/loss_{task}")
        weights = client.get_metric_history(run.info.run_id, f"step/weight_{task}")
        assert steps and weights
    version = client.get_model_version_by_alias(f"{settings.tracking.registered_model}-teacher",
                                                "current")
    assert version.run_id == run.info.run_id


def test_training_attaches_a_tuned_transcript_lm(trained: tuple[Settings, Path]) -> None:
    settings, model_dir = trained
    assert has_lm(model_dir)
    tuning = json.loads((model_dir / "lm" / "tuning.json").read_text())
    lm = settings.decode.lm
    assert len(tuning["grid"]) == len(lm.lm_weights) * len(lm.word_scores)
    # A tagged model's slots come from the beam: its weights are tuned by SemER.
    assert tuning["criterion"] == "semer"
    assert tuning["beam_semer"] == min(tuning["grid"].values())
    package = load_package(model_dir)
    assert package.lm_dir == model_dir / "lm"
    # Every word of a beam transcript is a lexicon word (greedy CTC spells freely).
    lexicon_file = model_dir / "lm" / "lexicon.txt"
    lexicon = {line.split("\t")[0] for line in lexicon_file.read_text().splitlines()}
    rows, feats = load_split(settings, "valid", False, package.features)
    beam = SLUPredictor(package).predict_features([r.id for r in rows], feats)
    greedy = SLUPredictor(package, use_lm=False).predict_features([r.id for r in rows], feats)
    assert all(set(p.transcript.split()) <= lexicon for p in beam)
    assert [p.intent for p in beam] == [p.intent for p in greedy]  # the LM only touches text


def test_resume_continues_from_checkpoint(trained: tuple[Settings, Path]) -> None:
    settings, model_dir = trained
    layout = RunLayout(model_dir.parent)
    before = torch.load(layout.last, weights_only=False)
    run_before = json.loads(layout.run_file.read_text())["run_id"]
    more = settings.model_copy(
        update={"train": settings.train.model_copy(update={"epochs": settings.train.epochs + 1})}
    )
    outcome = train_stage(more, progress=False)
    after = torch.load(layout.last, weights_only=False)
    assert after["epoch"] == before["epoch"] + 1
    assert after["step"] > before["step"]
    assert len(after["history"]) == len(before["history"]) + 1
    assert outcome.run_id == run_before  # same MLflow run continued
    client = MlflowClient(settings.tracking_uri, registry_uri=settings.tracking_uri)
    epochs = client.get_metric_history(run_before, "valid_semer")
    assert sorted(m.step for m in epochs) == list(range(settings.train.epochs + 1))
    assert outcome.result.epochs_run == settings.train.epochs + 1


def test_evaluate_writes_reports_and_logs(trained: tuple[Settings, Path]) -> None:
    settings, _ = trained
    uri = f"models:/{settings.tracking.registered_model}-teacher@current"
    result = evaluate_stage(settings, uri, "test", progress=False)
    for name in ("metrics", "evaluation", "markdown", "confusion_matrix", "reliability"):
        assert result.files[name].exists(), name
    flat = json.loads(result.files["metrics"].read_text())
    assert all(isinstance(v, int | float) for v in flat.values())
    assert result.report.n == len(
        (CorpusLayout(settings.corpus_dir).manifest("test")).read_text().splitlines())
    assert settings.artifact_root not in result.out_dir.parents


def test_predict_contract_any_rate_stereo_and_errors(
    trained: tuple[Settings, Path], tmp_path: Path
) -> None:
    settings, model_dir = trained
    t = np.arange(int(8000 * 1.5)) / 8000
    stereo = np.stack([np.sin(2 * np.pi * 300 * t), np.sin(2 * np.pi * 500 * t)], axis=1) * 0.1
    sf.write(tmp_path / "stereo8k.wav", stereo, 8000)
    (tmp_path / "broken.wav").write_bytes(b"RIFF not really a wav")
    lines = [
        {"id": "a", "audio": "stereo8k.wav"},
        {"id": "b", "audio": str(tmp_path / "broken.wav")},
        {"id": "c"},
    ]
    manifest = tmp_path / "in.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    out = tmp_path / "out.jsonl"
    summary = predict_stage(settings, str(model_dir), manifest, out)
    assert (summary.read, summary.written, summary.errors) == (4, 4, 3)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["a", "b", "c", "line-4"]
    good = records[0]
    assert set(good) == {"id", "transcript", "intent", "slots", "confidence", "model_version",
                         "clarify"}
    assert 0.0 <= good["confidence"] <= 1.0
    assert all(set(s) == {"type", "value"} for s in good["slots"])
    assert "cannot read" in records[1]["error"]
    assert "lacks audio" in records[2]["error"]
