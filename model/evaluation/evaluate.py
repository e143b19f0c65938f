"""Evaluate a model folder on a corpus split and write the report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from model.evaluation.report import EvaluationReport, evaluate, write_report
from model.frontend.cache import load_split
from model.inference.batch import predict_dataset
from model.inference.prediction import write_predictions
from model.nn.package import load_package
from voiceloop.settings import Settings

__all__ = ["EvaluateResult", "evaluate_model"]


@dataclass(frozen=True)
class EvaluateResult:
    """The report, where it was written, and the model's training run id (if any)."""

    report: EvaluationReport
    out_dir: Path
    files: dict[str, Path]
    run_id: str | None


def evaluate_model(
    settings: Settings,
    model_dir: Path,
    split: str = "test",
    out_dir: Path | None = None,
    progress: bool = True,
    use_lm: bool | None = None,
) -> EvaluateResult:
    """Predict ``split`` with the torch model folder ``model_dir``, score it and write the
    report to ``out_dir`` (default ``<model_dir>/../eval/<split>``). ``use_lm``:
    transcripts from the model's LM beam search when it has one (default
    ``decode.lm.enabled``)."""
    package = load_package(model_dir)
    rows, feats = load_split(settings, split, progress, package.features)
    preds = predict_dataset(package, [r.id for r in rows], feats, settings.decode.batch_size,
                            settings.decode.max_parse_len,
                            settings.decode.lm.enabled if use_lm is None else use_lm)
    report = evaluate(rows, preds)
    out_dir = out_dir or model_dir.parent / "eval" / split
    files = write_report(report, out_dir, f"{package.version} on {settings.profile}/{split}")
    files["predictions"] = out_dir / "predictions.jsonl"
    write_predictions(files["predictions"], preds)
    run_id = package.metadata.get("run_id")
    return EvaluateResult(report, out_dir, files, str(run_id) if run_id else None)
