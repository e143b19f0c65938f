"""Evaluate a model folder on a corpus split and write/log the report."""

from __future__ import annotations

import json
import re
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
    report: EvaluationReport
    out_dir: Path
    files: dict[str, Path]


def evaluate_model(
    settings: Settings,
    model_uri: str,
    split: str = "test",
    out_dir: Path | None = None,
    progress: bool = True,
    track: bool = True,
    use_lm: bool | None = None,
) -> EvaluateResult:
    """Predict ``split`` with the model, score it, write the report, log it to MLflow.

    The report goes to ``out_dir`` (default ``<model folder>/../eval/<split>``, or
    ``<models_dir>/eval/<uri>/<split>`` for an MLflow URI); with
    ``track``, files and metrics (prefixed ``<split>/``) are logged to the model's
    training run when it has one, else to a new ``evaluate`` run. ``use_lm``: transcripts
    from the model's LM beam search when it has one (default ``decode.lm.enabled``).
    """
    from voiceloop.tracking import RunLogger, resolve_model_uri

    folder = resolve_model_uri(model_uri, settings)
    package = load_package(folder)
    rows, feats = load_split(settings, split, progress, package.features)
    preds = predict_dataset(package, [r.id for r in rows], feats, settings.decode.batch_size,
                            settings.decode.max_parse_len,
                            settings.decode.lm.enabled if use_lm is None else use_lm)
    report = evaluate(rows, preds)
    if out_dir is None:
        # Never write into an MLflow artifact store: a registry URI gets its own folder.
        is_path = not model_uri.startswith(("models:/", "runs:/"))
        slug = re.sub(r"[^A-Za-z0-9@._-]+", "_", model_uri.split(":/", 1)[-1]).strip("_")
        out_dir = folder.parent / "eval" / split if is_path else (
            settings.models_dir / "eval" / slug / split)
    files = write_report(report, out_dir, f"{package.version} on {settings.profile}/{split}")
    files["predictions"] = out_dir / "predictions.jsonl"
    write_predictions(files["predictions"], preds)
    if track:
        run_id = package.metadata.get("run_id")
        tracker = (
            RunLogger.attach(settings, run_id) if run_id
            else RunLogger.start(settings, f"evaluate-{settings.profile}", {"stage": "evaluate"})
        )
        metrics = json.loads(files["metrics"].read_text())
        tracker.log_metrics({f"{split}/{k}": v for k, v in metrics.items()}, 0)
        tracker.log_artifacts(out_dir, f"evaluation/{split}")
        tracker.finish()
    return EvaluateResult(report, out_dir, files)
