"""Drift references and monitoring windows: the two sides of every drift check.

- :func:`build_reference` featurises a model's *own validation data* (the corpus'
  ``valid`` split: the distribution the model was selected on) exactly as ingestion
  featurises traffic — signal features of the audio, the model's answers, its pooled
  encoder embeddings, the predicted domain — so reference and traffic columns mean the
  same thing. It is computed once per model version and kept in the
  :class:`monitoring.drift.ReferenceStore`.
- :func:`load_window` reads the latest ``rows`` curated traffic rows embedded by a given
  model (rows embedded by another model version are not comparable); :func:`load_first`
  the earliest, which are the *live* reference of a version adapted by a retraining
  (``monitoring.adapted_reference``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from model.data.corpus import CorpusLayout
from model.data.grammar import load_values, predicted_domain
from model.data.manifest import read_manifest
from model.frontend.audio import load_audio
from model.inference.batch import BatchPredictor
from monitoring.schema import embedding_columns
from monitoring.signal_features import signal_features_frame
from voiceloop.settings import Settings

__all__ = ["build_reference", "load_first", "load_window"]

_FEATURES = ("duration_s", "level_dbfs", "snr_db", "speaking_rate", "spectral_centroid_hz",
             "silence_share", "clipping_share")


def build_reference(settings: Settings, predictor: BatchPredictor, split: str = "valid",
                    limit: int | None = 2000, chunk: int = 128) -> pd.DataFrame:
    """The reference frame of ``predictor``'s model on corpus split ``split`` (at most
    ``limit`` utterances, a fixed random subset), columns per ``monitoring.schema``.

    ``latency_ms`` is NaN: the reference answers were not served, so the drift report
    leaves that column to the traffic side's own history.

    Raises:
        FileNotFoundError: the corpus has no such split.
    """
    layout = CorpusLayout(settings.corpus_dir)
    path = layout.manifest(split)
    if not path.exists():
        raise FileNotFoundError(f"no {split} manifest at {path}: build the corpus first")
    rows = read_manifest(path)
    if limit is not None and len(rows) > limit:
        keep = np.random.default_rng(settings.seed).choice(len(rows), limit, replace=False)
        rows = [rows[i] for i in sorted(keep)]
    values = load_values(settings.corpus.language)
    rate = predictor.feature_config.sample_rate
    frames = []
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        waves = [load_audio(r.audio_path(layout.manifests_dir), rate) for r in part]
        preds = predictor.predict_waveforms([r.id for r in part], waves, [rate] * len(part))
        signal = signal_features_frame(waves, [rate] * len(part), [p.transcript for p in preds])
        emb = predictor.embed_waveforms(waves, [rate] * len(part))
        frame = pd.DataFrame({
            "request_id": [r.id for r in part], "timestamp": pd.NaT, "batch_id": f"reference-{split}",
            "device_id": None, "route": "production", "model_version": predictor.version,
            "registry_version": None, "embedding_model": predictor.version,
            "audio": [r.audio for r in part], "audio_offset": 0, "audio_bytes": 0,
            "transcript": [p.transcript for p in preds],
            "slots": [json.dumps([s.model_dump() for s in p.slots]) for p in preds],
            **{name: signal[name].astype("float64").to_numpy() for name in _FEATURES},
            "confidence": [p.confidence for p in preds], "latency_ms": math.nan,
            "intent": [p.intent for p in preds],
            "domain": [predicted_domain(p.intent, p.slots, values) for p in preds],
            "clarify": [p.clarify for p in preds],
        })
        frames.append(pd.concat(
            [frame, pd.DataFrame(emb, columns=embedding_columns(emb.shape[1]))], axis=1))
    out = pd.concat(frames, ignore_index=True)
    return out[np.isfinite(out[embedding_columns(predictor.embedding_dim)]).all(axis=1)]


def _rows_of(curated: Path, embedding_model: str, rows: int, newest: bool,
             served_by: str | None = None) -> pd.DataFrame:
    """``rows`` curated rows embedded by ``embedding_model`` (and answered by
    ``served_by`` when given): the newest or the oldest (by batch id, then timestamp),
    oldest first in the result."""
    files = sorted((curated / "traffic").rglob("*.parquet"), key=lambda p: p.stem, reverse=newest)
    frames, total = [], 0
    for path in files:
        frame = pq.read_table(path).to_pandas()
        keep = frame["embedding_model"] == embedding_model
        if served_by is not None:
            keep &= frame["model_version"] == served_by
        frame = frame[keep]
        if frame.empty:
            continue
        frames.append(frame)
        total += len(frame)
        if total >= rows:
            break
    if not frames:
        return pd.DataFrame()
    ordered = pd.concat(frames, ignore_index=True).sort_values("timestamp", kind="stable")
    return (ordered.tail(rows) if newest else ordered.head(rows)).reset_index(drop=True)


def load_window(curated: Path, embedding_model: str, rows: int) -> pd.DataFrame:
    """The latest ``rows`` curated rows embedded by ``embedding_model`` (newest batches
    first by batch id, then by timestamp), oldest first in the result."""
    return _rows_of(curated, embedding_model, rows, newest=True)


def load_first(curated: Path, embedding_model: str, rows: int,
               served_by: str | None = None) -> pd.DataFrame:
    """The earliest ``rows`` curated rows embedded by ``embedding_model`` — and, with
    ``served_by``, answered by that model version (ingestion embeds a backlog with the
    model in production when it runs, so rows its predecessor answered can carry a new
    version's embeddings) — oldest batches first by batch id, then by timestamp; fewer
    when fewer exist (empty: none)."""
    return _rows_of(curated, embedding_model, rows, newest=False, served_by=served_by)
