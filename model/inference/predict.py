"""Batch prediction over a JSON Lines manifest (the ``voiceloop predict`` contract).

The model may be a torch package folder, an ONNX deploy bundle, an MLflow pyfunc model
folder (see ``model.inference.onnx.load_predictor``); the stage layer resolves MLflow URIs
to such folders.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from model.inference.prediction import Prediction, write_predictions
from voiceloop.settings import Settings

__all__ = ["PredictSummary", "predict_manifest"]


@dataclass(frozen=True)
class PredictSummary:
    """How many lines were read, written, and written with an ``error``."""

    read: int
    written: int
    errors: int


def _read_inputs(manifest: Path) -> list[tuple[str, Path | None, str | None]]:
    """(id, audio path or None, problem or None) per non-empty input line."""
    items: list[tuple[str, Path | None, str | None]] = []
    with manifest.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                items.append((f"line-{line_no}", None, f"line {line_no} is not JSON: {exc.msg}"))
                continue
            if not isinstance(record, dict):
                items.append((f"line-{line_no}", None, f"line {line_no} is not a JSON object"))
                continue
            uid = str(record.get("id") or f"line-{line_no}")
            audio = record.get("audio")
            if not record.get("id") or not audio:
                missing = [k for k in ("id", "audio") if not record.get(k)]
                items.append((uid, None, f"line {line_no} lacks {', '.join(missing)}"))
                continue
            path = Path(audio)
            items.append((uid, path if path.is_absolute() else manifest.parent / path, None))
    return items


def predict_manifest(
    settings: Settings,
    model_dir: Path,
    manifest: Path,
    out: Path,
    batch_size: int = 16,
    progress: bool = False,
    use_lm: bool | None = None,
) -> PredictSummary:
    """Predict every line of ``manifest`` into ``out`` (same order, one line each).

    ``use_lm``: transcribe with the model's LM beam search when it carries one (default:
    ``decode.lm.enabled``)."""
    import torch

    from model.inference.onnx import load_predictor

    predictor = load_predictor(
        model_dir, batch_size=batch_size,
        max_parse_len=settings.decode.max_parse_len, threads=torch.get_num_threads(),
        use_lm=settings.decode.lm.enabled if use_lm is None else use_lm,
    )
    items = _read_inputs(manifest)
    readable = [(i, uid, path) for i, (uid, path, problem) in enumerate(items) if problem is None]
    predicted = predictor.predict_files(
        [uid for _, uid, _ in readable], [path for _, _, path in readable], progress=progress
    )
    by_index = {i: p for (i, _, _), p in zip(readable, predicted, strict=True)}
    results = [
        by_index.get(i) or Prediction(id=uid, model_version=predictor.version, error=problem)
        for i, (uid, _, problem) in enumerate(items)
    ]
    written = write_predictions(out, results)
    return PredictSummary(read=len(items), written=written, errors=sum(p.error is not None for p in results))
