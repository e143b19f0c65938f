"""Drift detection: Evidently reports on a window of traffic against the model's reference,
a documented decision rule, threshold calibration on baseline windows, and the store of
references.

Inputs follow the column contract of :mod:`monitoring.schema`: numerical columns
(``SIGNAL_FEATURES`` + ``PREDICTION_FEATURES``), categorical answer columns
(``CATEGORICAL_FEATURES``) and embedding columns ``emb_0 … emb_{D-1}``.

The pipeline, per window:

1. :func:`run_drift_report` runs Evidently 0.7.23 (new API) twice:

   - *data + prediction report* on the whole window: one ``ValueDrift`` per numerical
     column (distance method, ``monitoring.drift.numerical``), one per categorical answer
     column (``intent``, ``domain``, ``clarify`` and :data:`SLOT_COUNT`, derived from
     ``slots``: prediction drift on their distributions) and a ``DriftedColumnsCount``
     over the numerical columns;
   - *embedding report*: ``EmbeddingsDrift`` on a seeded sample of at most
     ``embedding.sample_rows`` rows per side, projected on a whitened PCA fitted on the
     whole reference. Evidently draws a t-SNE map of every row it is given for
     embedding drift, and that map, not the drift method, is what costs: sampling keeps
     a 10,000-row window inside a 30 s budget on one core.

   Results are read by metric id (``metric.metric_id`` ↔ the ``id`` of each entry of
   ``snapshot.dict()["metrics"]``), never by position, and summarised as JSON keyed by
   Evidently's metric name (``ValueDrift(column=snr_db,method=wasserstein,threshold=0.1)``).
2. :func:`decide_drift` applies the decision rule of :class:`~voiceloop.settings.DriftSettings`
   (data drift on ≥ ``min_drifted`` numerical columns — ``latency_ms``, a service column,
   is scored and reported but never counted — prediction drift, embedding drift,
   or an estimated accuracy drop, see :mod:`monitoring.performance`) and returns a
   :class:`DriftDecision`. :func:`detect_drift` does 1 + 2 + the performance estimate.

Thresholds and false alarms. Every score is a distance (higher = more drift); a signal
drifts when its score reaches its threshold. Distances, unlike p-values, do not flag
negligible shifts just because a window is large, but their values under *no* drift
depend on the window size and on the data, so the thresholds in ``params.yaml`` are only
defaults. :func:`calibrate_thresholds` sets each one at a high quantile (× a margin) of
its scores on same-distribution *baseline windows*, which must be held apart both from
the reference rows and from the windows later judged (thresholds tuned on the windows
they report on understate the false-alarm rate), and drawn the way the monitor judges:
consecutive traffic (:func:`consecutive_windows`) varies more than random rows. Thresholds
hold for windows of the calibration size; larger windows only lower the false-alarm rate.

References. :class:`ReferenceStore` keeps one reference frame per model version under
``<workspace>/monitoring/reference/<key>.parquet`` with a JSON sidecar; the featurisation
of the reference belongs to the ingestion code.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from model.fileio import atomic_path
from monitoring.performance import PerformanceEstimate, estimate_performance
from monitoring.schema import (
    CATEGORICAL_FEATURES,
    EMBEDDING_PREFIX,
    PREDICTION_FEATURES,
    SERVICE_FEATURES,
    SIGNAL_FEATURES,
)
from voiceloop.settings import DriftSettings

__all__ = [
    "CATEGORICAL_COLUMNS",
    "EMBEDDINGS_NAME",
    "NUMERICAL_COLUMNS",
    "SLOT_COUNT",
    "DriftDecision",
    "DriftInputs",
    "DriftResult",
    "ReferenceMeta",
    "ReferenceStore",
    "Signal",
    "Thresholds",
    "Window",
    "calibrate_thresholds",
    "consecutive_windows",
    "decide_drift",
    "detect_drift",
    "run_drift_report",
    "sample_windows",
    "signal_kind",
    "signal_scores",
]

log = logging.getLogger(__name__)

NUMERICAL_COLUMNS: tuple[str, ...] = SIGNAL_FEATURES + PREDICTION_FEATURES
"""Numerical columns compared one by one (data drift)."""

SLOT_COUNT = "slot_count"
"""A categorical answer column derived from ``slots`` (the answer's slots as JSON): how
many slots the answer filled, as ``"0"``, ``"1"``, ``"2"`` or ``"3+"``. Users who name
things the model never heard (new rooms, new devices) get answers with fewer slots long
before intents or audio move; NaN where ``slots`` is absent or unreadable (a frame
without ``slots`` skips this signal)."""

CATEGORICAL_COLUMNS: tuple[str, ...] = (*CATEGORICAL_FEATURES, SLOT_COUNT)
"""Categorical answer columns compared one by one (prediction drift)."""

_SLOT_COUNT_CAP = 3


def signal_kind(column: str) -> Literal["data", "service", "prediction"]:
    """The :class:`Signal` kind of a numerical or categorical column.

    Raises:
        ValueError: ``column`` is neither.
    """
    if column in SERVICE_FEATURES:
        return "service"
    if column in NUMERICAL_COLUMNS:
        return "data"
    if column in CATEGORICAL_COLUMNS:
        return "prediction"
    raise ValueError(f"{column!r} is no drift column: numerical {NUMERICAL_COLUMNS}, "
                     f"categorical {CATEGORICAL_COLUMNS}")


EMBEDDINGS_NAME = "encoder"
"""Name of the embedding group in Evidently's data definition."""

_PC_PREFIX = "pc_"
_EMB_RE = re.compile(rf"^{re.escape(EMBEDDING_PREFIX)}(\d+)$")
# A calibrated threshold of 0 (a column constant in every baseline window) would flag
# every window; the smallest threshold still flags any change of such a column.
_MIN_THRESHOLD = 1e-6

# How a method's no-drift scatter grows as a sample shrinks: the power of (1/m + 1/n)
# (Thresholds.apply). Methods not listed are not rescaled.
_NOISE_POWER: dict[str, float] = {"wasserstein": 0.5, "jensenshannon": 0.5, "hellinger": 0.5,
                                  "ed": 0.5, "distance": 0.5, "psi": 1.0, "kl_div": 1.0}

SignalKind = Literal["data", "service", "prediction", "embedding", "performance", "rule"]


# --------------------------------------------------------------------------- contracts


class Window(BaseModel):
    """The rows judged: first and last ``timestamp`` (None without timestamps), ``n`` rows."""

    model_config = ConfigDict(frozen=True)

    start: datetime | None = None
    end: datetime | None = None
    n: int = Field(ge=0)


class Signal(BaseModel):
    """One drift signal of a window.

    Attributes:
        name: a column (``snr_db``, ``intent``), ``embeddings``, ``drifted_columns`` or
            ``estimated_accuracy_drop``.
        kind: ``data`` (numerical column), ``service`` (a numerical column of how the
            answer was served, ``monitoring.schema.SERVICE_FEATURES``: reported, never a
            reason for drift), ``prediction`` (categorical answer column), ``embedding``,
            ``performance`` or ``rule`` (the count of drifted ``data`` columns).
        method: how the score was computed (Evidently stat test or embedding method,
            ``cbpe``, ``count``).
        score: the score (a distance, a count or an accuracy drop; higher = more drift);
            None when the signal could not be computed (see ``detail``).
        threshold: drift when ``score >= threshold`` (``>`` for the accuracy drop).
        drifted: whether this signal crossed its threshold.
        metric: Evidently's metric name the score was read from, if any.
        detail: why a signal was skipped, or what it covered.
    """

    model_config = ConfigDict(frozen=True)

    name: str
    kind: SignalKind
    method: str
    score: float | None
    threshold: float
    drifted: bool
    metric: str | None = None
    detail: str = ""


class DriftResult(BaseModel):
    """What :func:`run_drift_report` measured on one window (no decision yet).

    Attributes:
        model_version: the model whose reference was used.
        window: the current window.
        reference_rows: rows of the reference.
        signals: per numerical column, per categorical column, and ``embeddings``.
        summary: JSON-ready summary keyed by Evidently metric name (see module doc).
        report_paths: HTML reports written (data + prediction, embeddings).
        embedding_rows: rows compared for embedding drift (reference, current) after
            filtering and sampling.
        seconds: wall-clock seconds of the run, by part (``data``, ``embeddings``,
            ``html``, ``total``).
    """

    model_version: str | None = None
    window: Window
    reference_rows: int
    signals: list[Signal]
    summary: dict[str, Any]
    report_paths: list[str] = []
    embedding_rows: tuple[int, int] = (0, 0)
    seconds: dict[str, float] = {}

    def signal(self, name: str) -> Signal:
        """The signal called ``name``; ``KeyError`` if there is none."""
        for s in self.signals:
            if s.name == name:
                return s
        raise KeyError(f"no signal {name!r}; have {[s.name for s in self.signals]}")


class DriftDecision(BaseModel):
    """The verdict on one window, as alerts and events carry it.

    Attributes:
        drifted: the decision rule fired (and the window had enough rows).
        sufficient: the window had at least ``min_samples`` rows; an insufficient window
            is never drifted and does not count as a clean window for alert episodes.
        signals: every signal with score, threshold and flag, the rule signals included.
        window: the judged window.
        model_version: the production model whose reference was used.
        reasons: one line per rule that fired (``data drift: snr_db, level_dbfs``).
        performance: the label-free performance estimate, if computed.
        report_paths: the HTML reports.
        created: when the decision was made (UTC).
    """

    drifted: bool
    sufficient: bool = True
    signals: list[Signal]
    window: Window
    model_version: str | None = None
    reasons: list[str] = []
    performance: PerformanceEstimate | None = None
    report_paths: list[str] = []
    created: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @property
    def drifted_signals(self) -> list[Signal]:
        """The signals that crossed their thresholds."""
        return [s for s in self.signals if s.drifted]


class Thresholds(BaseModel):
    """Thresholds calibrated by :func:`calibrate_thresholds` (see :meth:`apply`).

    Attributes:
        numerical / categorical: threshold per column.
        embedding: the embedding threshold (None: no embedding score in the baselines).
        max_accuracy_drop: the accuracy-drop threshold (never below the configured one).
        quantile, margin: the calibration rule used.
        windows: baseline windows used; window_rows: their median size (rows).
        null_scores: per signal, the baseline scores (for reports and the benchmark).
        created: when (UTC).
    """

    numerical: dict[str, float]
    categorical: dict[str, float]
    embedding: float | None = None
    max_accuracy_drop: float
    quantile: float
    margin: float
    windows: int
    window_rows: int
    null_scores: dict[str, list[float]] = {}
    created: datetime = Field(default_factory=lambda: datetime.now(UTC))

    def apply(self, settings: DriftSettings, rows: int | None = None,
              reference_rows: int | None = None) -> DriftSettings:
        """``settings`` with these thresholds in place of the configured ones.

        ``rows`` / ``reference_rows``: the sizes of the window they will judge and of its
        reference. Under no drift a score scatters as the noise of two samples, ∝
        ``1/m + 1/n`` for a divergence (``psi``, ``kl_div``) and its square root for a
        distance (``wasserstein``, ``jensenshannon``, ``hellinger``, ``ed``, the
        embeddings' ``distance``). A window smaller than the calibration's
        ``window_rows`` therefore gets its thresholds raised by that ratio (the
        embeddings counted at their ``sample_rows``); other methods, and windows at
        least as large (conservative), keep the calibrated thresholds. A demo's
        post-promotion check judged 121 rows with thresholds of 150-row windows. The
        reference size of the calibration is taken to be ``reference_rows`` (None:
        much larger than the window).

        Raises:
            ValueError: ``rows`` or ``reference_rows`` below 1.
        """
        for name, value in (("rows", rows), ("reference_rows", reference_rows)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")

        def scale(method: str, n: int | None, calibrated: int, ref: int | None) -> float:
            power = _NOISE_POWER.get(method)
            if n is None or n >= calibrated or power is None:
                return 1.0
            inv_ref = 1.0 / ref if ref else 0.0
            return ((inv_ref + 1.0 / n) / (inv_ref + 1.0 / calibrated)) ** power

        k_num = scale(settings.numerical.method, rows, self.window_rows, reference_rows)
        k_cat = scale(settings.categorical.method, rows, self.window_rows, reference_rows)
        sample = settings.embedding.sample_rows
        k_emb = scale(settings.embedding.method, None if rows is None else min(rows, sample),
                      min(self.window_rows, sample),
                      None if reference_rows is None else min(reference_rows, sample))
        update: dict[str, Any] = {
            "numerical": settings.numerical.model_copy(update={"thresholds": {
                **settings.numerical.thresholds,
                **{k: v * k_num for k, v in self.numerical.items()}}}),
            "categorical": settings.categorical.model_copy(update={"thresholds": {
                **settings.categorical.thresholds,
                **{k: v * k_cat for k, v in self.categorical.items()}}}),
            "max_accuracy_drop": self.max_accuracy_drop,
        }
        if self.embedding is not None:
            update["embedding"] = settings.embedding.model_copy(
                update={"threshold": self.embedding * k_emb})
        return settings.model_copy(update=update)


# --------------------------------------------------------------------------- inputs


def _embedding_columns_of(frame: pd.DataFrame) -> list[str]:
    """``emb_*`` columns of ``frame``, in index order."""
    found = [(int(m.group(1)), c) for c in frame.columns if (m := _EMB_RE.match(str(c)))]
    return [c for _, c in sorted(found)]


@dataclass(frozen=True)
class DriftInputs:
    """A reference frame and a current-window frame, checked against the schema.

    Both need every numerical and categorical column of :mod:`monitoring.schema`; the
    embedding columns are those of the reference (the current window must have the same
    ones, or none, in which case embedding drift is skipped). The frames are never
    modified.

    Raises:
        TypeError: a side that is not a DataFrame.
        ValueError: a missing column (named, with the side), an empty reference, or
            embedding columns that differ between the sides.
    """

    reference: pd.DataFrame
    current: pd.DataFrame
    embedding_cols: list[str] = field(init=False)

    def __post_init__(self) -> None:
        required = [*NUMERICAL_COLUMNS, *CATEGORICAL_FEATURES]  # SLOT_COUNT is derived
        for side, frame in (("reference", self.reference), ("current", self.current)):
            if not isinstance(frame, pd.DataFrame):
                raise TypeError(f"{side} must be a pandas DataFrame, got {type(frame).__name__}")
            missing = [c for c in required if c not in frame.columns]
            if missing:
                raise ValueError(f"{side} frame lacks columns {missing} (monitoring.schema)")
        if len(self.reference) == 0:
            raise ValueError("the reference frame is empty")
        ref_emb = _embedding_columns_of(self.reference)
        cur_emb = _embedding_columns_of(self.current)
        if cur_emb and cur_emb != ref_emb:
            raise ValueError(f"embedding columns differ: reference has {len(ref_emb)} "
                             f"({ref_emb[:1]}…), current has {len(cur_emb)} ({cur_emb[:1]}…)")
        object.__setattr__(self, "embedding_cols", ref_emb if cur_emb else [])

    @property
    def window(self) -> Window:
        """The current window's time span (from ``timestamp``, if present) and size."""
        start = end = None
        if "timestamp" in self.current.columns and len(self.current):
            ts = pd.to_datetime(self.current["timestamp"], utc=True, errors="coerce").dropna()
            if len(ts):
                start, end = ts.min().to_pydatetime(), ts.max().to_pydatetime()
        return Window(start=start, end=end, n=len(self.current))


def _slot_count(slots: Any) -> str | float:
    """``"0"`` … ``"3+"`` for an answer's slots (a JSON list, or a list); NaN when unreadable."""
    if isinstance(slots, str):
        try:
            slots = json.loads(slots)
        except json.JSONDecodeError:
            return math.nan
    if not isinstance(slots, (list, tuple, np.ndarray)):
        return math.nan
    n = len(slots)
    return f"{_SLOT_COUNT_CAP}+" if n >= _SLOT_COUNT_CAP else str(n)


def _scalar_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """A new frame of the numerical (float) and categorical (str, NaN kept) columns,
    :data:`SLOT_COUNT` derived from ``slots``."""
    out = pd.DataFrame(index=pd.RangeIndex(len(frame)))
    for col in NUMERICAL_COLUMNS:
        values = pd.to_numeric(frame[col], errors="coerce").to_numpy(dtype=float)
        out[col] = np.where(np.isfinite(values), values, np.nan)
    slots = frame["slots"] if "slots" in frame.columns else pd.Series([None] * len(frame))
    out[SLOT_COUNT] = pd.Series([_slot_count(v) for v in slots], dtype=object)
    for col in CATEGORICAL_FEATURES:
        values = frame[col].reset_index(drop=True)
        # Evidently treats the categories as labels: ``clarify`` (bool) becomes
        # "True"/"False", so both sides compare the same strings.
        out[col] = values.where(values.isna(), values.astype(str)).astype(object)
    return out


def _usable(series: pd.Series) -> bool:
    return bool(series.notna().any())


def _thresholds_for(settings: DriftSettings) -> dict[str, float]:
    """Threshold per numerical and categorical column; unknown override keys raise."""
    out: dict[str, float] = {}
    for cols, block in ((NUMERICAL_COLUMNS, settings.numerical),
                        (CATEGORICAL_COLUMNS, settings.categorical)):
        unknown = sorted(set(block.thresholds) - set(cols))
        if unknown:
            raise ValueError(f"thresholds for unknown columns {unknown}; known: {list(cols)}")
        for col in cols:
            out[col] = float(block.thresholds.get(col, block.threshold))
    return out


@dataclass(frozen=True)
class _EmbeddingFrames:
    reference: pd.DataFrame | None
    current: pd.DataFrame | None
    columns: list[str]
    detail: str


def _embedding_frames(inputs: DriftInputs, settings: DriftSettings, seed: int) -> _EmbeddingFrames:
    """Comparable rows of both sides, PCA-projected (fitted on the whole reference) and
    sampled to at most ``sample_rows`` per side; frames are None when skipped."""
    cfg = settings.embedding
    cols = inputs.embedding_cols
    if not cols:
        return _EmbeddingFrames(None, None, [], "no embedding columns")
    ref, cur = inputs.reference, inputs.current
    ref_mask = np.isfinite(ref[cols].to_numpy(dtype=float)).all(axis=1)
    cur_mask = np.isfinite(cur[cols].to_numpy(dtype=float)).all(axis=1)
    detail = ""
    if "embedding_model" in ref.columns and ref["embedding_model"].notna().any():
        # Rows embedded by another model live in another space: leave them out.
        model = ref["embedding_model"].mode().iloc[0]
        ref_mask &= (ref["embedding_model"] == model).to_numpy()
        if "embedding_model" in cur.columns:
            cur_mask &= (cur["embedding_model"] == model).to_numpy()
        detail = f"embedding_model={model}"
    x_ref = ref.loc[ref_mask, cols].to_numpy(dtype=np.float64)
    x_cur = cur.loc[cur_mask, cols].to_numpy(dtype=np.float64)
    if len(x_ref) < cfg.min_rows or len(x_cur) < cfg.min_rows:
        return _EmbeddingFrames(None, None, [], f"too few comparable rows ({len(x_ref)} "
                                f"reference, {len(x_cur)} current; need {cfg.min_rows})")
    mean = x_ref.mean(axis=0)
    if cfg.pca_components:  # at most every dimension: still whitened when k >= dims
        # Whitened PCA fitted on the reference only: the current window must not shape
        # the space it is judged in. Unit variance per component makes a mean shift in
        # a low-variance direction as visible as one in a high-variance direction.
        _, sing, vt = np.linalg.svd(x_ref - mean, full_matrices=False)
        std = sing / math.sqrt(max(len(x_ref) - 1, 1))
        keep = int(min(cfg.pca_components, (std > std[0] * 1e-9).sum()))
        basis = vt[:keep].T / std[:keep]
        names = [f"{_PC_PREFIX}{i}" for i in range(keep)]
        detail = ", ".join(filter(None, [detail, f"whitened PCA {len(cols)}→{keep}"]))
    else:
        basis = None
        names = list(cols)
    rng = np.random.default_rng(seed)

    def sample(x: np.ndarray) -> pd.DataFrame:
        if len(x) > cfg.sample_rows:
            x = x[np.sort(rng.choice(len(x), cfg.sample_rows, replace=False))]
        z = (x - mean) @ basis if basis is not None else x
        return pd.DataFrame(z, columns=names)

    ref_s, cur_s = sample(x_ref), sample(x_cur)
    sampled = (f"sampled {len(ref_s)}/{len(x_ref)} reference, "
               f"{len(cur_s)}/{len(x_cur)} current rows")
    detail = ", ".join(filter(None, [detail, sampled]))
    return _EmbeddingFrames(ref_s, cur_s, names, detail)


def _embedding_method(settings: DriftSettings) -> Any:
    """The Evidently embedding drift method object; bootstrap off so that ``threshold``
    (ours, calibrated) decides, not Evidently's built-in 95 % null quantile."""
    from evidently.legacy.metrics.data_drift import embedding_drift_methods as edm

    cfg = settings.embedding
    if cfg.method == "distance":
        return edm.distance(dist=cfg.distance, threshold=cfg.threshold, bootstrap=False)
    if cfg.method == "mmd":
        return edm.mmd(threshold=cfg.threshold, bootstrap=False)
    if cfg.method == "ratio":
        return edm.ratio(threshold=cfg.threshold)
    return edm.model(threshold=cfg.threshold, bootstrap=False)


# --------------------------------------------------------------------------- the report


def _by_id(snapshot: Any) -> dict[str, dict[str, Any]]:
    """``snapshot.dict()["metrics"]`` keyed by metric id (the entries' ``id``)."""
    return {entry["id"]: entry for entry in snapshot.dict()["metrics"] if entry}


def _lookup(entries: Mapping[str, dict[str, Any]], metric: Any) -> dict[str, Any]:
    entry = entries.get(metric.metric_id)
    if entry is None:
        raise RuntimeError(f"Evidently returned no result for {metric!r}")
    return entry


def _json_value(value: Any) -> Any:
    """Make Evidently's values JSON-safe (numpy scalars, NaN → None)."""
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def run_drift_report(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    settings: DriftSettings,
    *,
    report_dir: str | Path | None = None,
    model_version: str | None = None,
    seed: int = 0,
) -> DriftResult:
    """Compare a window with the reference in Evidently and read every signal by metric id.

    Args:
        reference: the production model's reference frame (columns per
            :mod:`monitoring.schema`).
        current: the window of curated traffic (same columns).
        settings: ``monitoring.drift`` (methods, thresholds, embedding sampling).
        report_dir: folder for ``drift.html`` (data + prediction), ``embeddings.html``
            and ``summary.json``; None writes nothing.
        model_version: recorded in the result.
        seed: seeds the embedding sample (same window + seed = same result).

    Returns:
        A :class:`DriftResult`: one signal per numerical and categorical column and one
        for the embeddings, plus the JSON summary.

    Raises:
        ValueError: frames that break the schema, or thresholds for unknown columns.
    """
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import DriftedColumnsCount, EmbeddingsDrift, ValueDrift

    start = time.perf_counter()
    inputs = DriftInputs(reference, current)
    thresholds = _thresholds_for(settings)
    ref_s, cur_s = _scalar_frame(inputs.reference), _scalar_frame(inputs.current)

    signals: dict[str, Signal] = {}
    metrics: dict[str, Any] = {}
    for col in (*NUMERICAL_COLUMNS, *CATEGORICAL_COLUMNS):
        numerical = col in NUMERICAL_COLUMNS
        method = settings.numerical.method if numerical else settings.categorical.method
        if not (_usable(ref_s[col]) and _usable(cur_s[col])):
            side = "reference" if not _usable(ref_s[col]) else "current window"
            signals[col] = Signal(name=col, kind=signal_kind(col),
                                  method=method, score=None, threshold=thresholds[col],
                                  drifted=False, detail=f"no values in the {side}")
            continue
        metrics[col] = ValueDrift(column=col, method=method, threshold=thresholds[col])
    num_cols = [c for c in NUMERICAL_COLUMNS if c in metrics]
    cat_cols = [c for c in CATEGORICAL_COLUMNS if c in metrics]
    voting = [c for c in num_cols if c not in SERVICE_FEATURES]
    count_metric = DriftedColumnsCount(
        columns=voting, num_method=settings.numerical.method,
        per_column_threshold={c: thresholds[c] for c in voting},
        drift_share=min(1.0, settings.numerical.min_drifted / max(len(voting), 1)),
    ) if voting else None

    definition = DataDefinition(numerical_columns=num_cols, categorical_columns=cat_cols)
    report = Report([*metrics.values(), *([count_metric] if count_metric else [])])
    data_snapshot = report.run(
        Dataset.from_pandas(cur_s[num_cols + cat_cols], data_definition=definition),
        Dataset.from_pandas(ref_s[num_cols + cat_cols], data_definition=definition),
    )
    t_data = time.perf_counter()
    entries = _by_id(data_snapshot)
    summary_metrics: dict[str, Any] = {}
    for col, metric in metrics.items():
        entry = _lookup(entries, metric)
        score = float(entry["value"])
        signals[col] = Signal(
            name=col, kind=signal_kind(col),
            method=metric.method, score=score, threshold=thresholds[col],
            drifted=score >= thresholds[col], metric=entry["metric_name"],
        )
        summary_metrics[entry["metric_name"]] = {"id": entry["id"], "value": _json_value(score)}
    if count_metric is not None:
        entry = _lookup(entries, count_metric)
        summary_metrics[entry["metric_name"]] = {"id": entry["id"],
                                                 "value": _json_value(entry["value"])}

    emb = _embedding_frames(inputs, settings, seed)
    emb_snapshot = None
    if emb.reference is not None and emb.current is not None:
        emb_metric = EmbeddingsDrift(embeddings_name=EMBEDDINGS_NAME,
                                     drift_method=_embedding_method(settings))
        emb_def = DataDefinition(numerical_columns=emb.columns,
                                 embeddings={EMBEDDINGS_NAME: emb.columns})
        emb_snapshot = Report([emb_metric]).run(
            Dataset.from_pandas(emb.current, data_definition=emb_def),
            Dataset.from_pandas(emb.reference, data_definition=emb_def),
        )
        entry = _lookup(_by_id(emb_snapshot), emb_metric)
        score = float(entry["value"])
        signals["embeddings"] = Signal(
            name="embeddings", kind="embedding", method=settings.embedding.method,
            score=score, threshold=settings.embedding.threshold,
            drifted=score >= settings.embedding.threshold, metric=entry["metric_name"],
            detail=emb.detail,
        )
        summary_metrics[entry["metric_name"]] = {"id": entry["id"], "value": _json_value(score),
                                                 "config": _json_value(entry.get("config", {}))}
    else:
        signals["embeddings"] = Signal(
            name="embeddings", kind="embedding", method=settings.embedding.method, score=None,
            threshold=settings.embedding.threshold, drifted=False, detail=emb.detail)
    t_emb = time.perf_counter()

    paths: list[str] = []
    if report_dir is not None:
        out = Path(report_dir)
        out.mkdir(parents=True, exist_ok=True)
        data_snapshot.save_html(str(out / "drift.html"))
        paths.append(str(out / "drift.html"))
        if emb_snapshot is not None:
            emb_snapshot.save_html(str(out / "embeddings.html"))
            paths.append(str(out / "embeddings.html"))
    t_html = time.perf_counter()

    ordered = [signals[c] for c in (*NUMERICAL_COLUMNS, *CATEGORICAL_COLUMNS, "embeddings")]
    result = DriftResult(
        model_version=model_version, window=inputs.window,
        reference_rows=len(inputs.reference), signals=ordered,
        summary={
            "metrics": summary_metrics,
            "signals": {s.name: {"metric": s.metric, "method": s.method, "score": s.score,
                                 "threshold": s.threshold, "drifted": s.drifted,
                                 **({"detail": s.detail} if s.detail else {})}
                        for s in ordered},
        },
        report_paths=paths,
        embedding_rows=(0 if emb.reference is None else len(emb.reference),
                        0 if emb.current is None else len(emb.current)),
        seconds={"data": round(t_data - start, 3), "embeddings": round(t_emb - t_data, 3),
                 "html": round(t_html - t_emb, 3), "total": round(t_html - start, 3)},
    )
    log.info("drift report on %d rows: %.1f s (data %.1f, embeddings %.1f, html %.1f)",
             result.window.n, t_html - start, t_data - start, t_emb - t_data, t_html - t_emb)
    return result


# --------------------------------------------------------------------------- the decision


def decide_drift(
    result: DriftResult,
    settings: DriftSettings,
    performance: PerformanceEstimate | None = None,
) -> DriftDecision:
    """Apply the decision rule of ``settings`` (see :class:`~voiceloop.settings.DriftSettings`).

    Args:
        result: the window's signals from :func:`run_drift_report`.
        settings: ``monitoring.drift`` (``min_samples``, ``numerical.min_drifted``,
            ``max_accuracy_drop``; per-signal thresholds are already in ``result``).
        performance: the label-free estimate of the window; its accuracy drop against
            the reference becomes the ``estimated_accuracy_drop`` signal.

    Returns:
        The decision with every signal, the rule signal ``drifted_columns`` included.
    """
    signals = list(result.signals)
    data = [s for s in signals if s.kind == "data" and s.drifted]
    scored = [s for s in signals if s.kind == "data" and s.score is not None]
    min_drifted = settings.numerical.min_drifted
    signals.append(Signal(
        name="drifted_columns", kind="rule", method="count", score=float(len(data)),
        threshold=float(min_drifted), drifted=len(data) >= min_drifted,
        detail=f"{len(data)} of {len(scored)} numerical columns drifted",
    ))
    if performance is not None:
        drop = performance.expected_accuracy_drop
        signals.append(Signal(
            name="estimated_accuracy_drop", kind="performance", method="cbpe", score=drop,
            threshold=settings.max_accuracy_drop,
            drifted=drop is not None and drop > settings.max_accuracy_drop,
            detail=(f"expected accuracy {performance.expected_accuracy:.3f} vs reference "
                    f"{performance.reference_expected_accuracy:.3f}"
                    if drop is not None else "no reference expected accuracy"),
        ))

    reasons: list[str] = []
    if len(data) >= min_drifted:
        reasons.append("data drift: " + ", ".join(s.name for s in data))
    prediction = [s.name for s in signals if s.kind == "prediction" and s.drifted]
    if prediction:
        reasons.append("prediction drift: " + ", ".join(prediction))
    if any(s.kind == "embedding" and s.drifted for s in signals):
        reasons.append("embedding drift")
    if any(s.kind == "performance" and s.drifted for s in signals):
        reasons.append("estimated accuracy drop")
    sufficient = result.window.n >= settings.min_samples
    if not sufficient:
        reasons = [(f"insufficient window: {result.window.n} rows < min_samples "
                    f"{settings.min_samples} (no decision)")]
    return DriftDecision(
        drifted=sufficient and bool(reasons), sufficient=sufficient, signals=signals,
        window=result.window, model_version=result.model_version, reasons=reasons,
        performance=performance, report_paths=result.report_paths,
    )


def detect_drift(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    settings: DriftSettings,
    *,
    report_dir: str | Path | None = None,
    model_version: str | None = None,
    annotations: Any = None,
    seed: int = 0,
) -> tuple[DriftDecision, DriftResult]:
    """One window end to end: report, performance estimate and decision.

    Arguments as in :func:`run_drift_report`; ``annotations`` as in
    :func:`monitoring.performance.estimate_performance`. With ``report_dir`` the
    decision and summary are also written to ``report_dir/summary.json``.

    Returns:
        ``(decision, result)``.
    """
    result = run_drift_report(reference, current, settings, report_dir=report_dir,
                              model_version=model_version, seed=seed)
    performance = estimate_performance(current, reference=reference, annotations=annotations)
    decision = decide_drift(result, settings, performance)
    if report_dir is not None:
        path = Path(report_dir) / "summary.json"
        payload = {"decision": decision.model_dump(mode="json"), "summary": result.summary,
                   "seconds": result.seconds}
        _atomic_write(path, json.dumps(payload, indent=2).encode("utf-8"))
        decision = decision.model_copy(
            update={"report_paths": [*decision.report_paths, str(path)]})
    return decision, result


# --------------------------------------------------------------------------- calibration


def signal_scores(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    settings: DriftSettings,
    *,
    seed: int = 0,
) -> dict[str, float | None]:
    """The scores :func:`run_drift_report` would give, without Evidently's report.

    Calls the same Evidently stat tests and embedding drift method on the same prepared
    data, skipping the report machinery and the t-SNE map (so calibrating on dozens of
    windows stays cheap). Keys: every numerical and categorical column, ``embeddings``
    and ``accuracy_drop`` (reference expected accuracy − window's). None = skipped.
    """
    from evidently.legacy.calculations.stattests import get_stattest
    from evidently.legacy.core import ColumnType

    inputs = DriftInputs(reference, current)
    ref_s, cur_s = _scalar_frame(inputs.reference), _scalar_frame(inputs.current)
    scores: dict[str, float | None] = {}
    for col in (*NUMERICAL_COLUMNS, *CATEGORICAL_COLUMNS):
        numerical = col in NUMERICAL_COLUMNS
        ref_c, cur_c = ref_s[col].dropna(), cur_s[col].dropna()
        if ref_c.empty or cur_c.empty:
            scores[col] = None
            continue
        kind = ColumnType.Numerical if numerical else ColumnType.Categorical
        method = settings.numerical.method if numerical else settings.categorical.method
        test = get_stattest(ref_c, cur_c, kind, method)
        scores[col] = float(test(ref_c, cur_c, kind, 1.0).drift_score)
    emb = _embedding_frames(inputs, settings, seed)
    if emb.reference is not None and emb.current is not None:
        score, _, _ = _embedding_method(settings)(emb.current.copy(), emb.reference.copy())
        scores["embeddings"] = float(score)
    else:
        scores["embeddings"] = None
    perf = estimate_performance(inputs.current, reference=inputs.reference)
    scores["accuracy_drop"] = perf.expected_accuracy_drop
    return scores


def calibrate_thresholds(
    reference: pd.DataFrame,
    baseline_windows: Sequence[pd.DataFrame],
    settings: DriftSettings,
    *,
    seed: int = 0,
) -> Thresholds:
    """Set every threshold at a high quantile of its scores on baseline windows.

    Baseline windows are windows *without* drift: traffic (or validation rows) from the
    reference's own distribution, **held apart** from the reference rows and from the
    windows that will be judged, and of the size the monitor will judge
    (``window_rows``). For each signal, ``threshold = quantile(scores, q) × margin``
    (``settings.calibration``); a quantile of the null distribution bounds the
    false-alarm rate of that signal, the margin covers what ≥ 20 windows cannot resolve
    of the tail. The accuracy-drop threshold never falls below the configured
    ``max_accuracy_drop`` (that one is a business tolerance, not only a noise bound).

    Args:
        reference: the reference frame.
        baseline_windows: at least ``calibration.min_windows`` frames.
        settings: the drift settings (methods, embedding sampling, calibration rule).
        seed: as in :func:`run_drift_report` (the same seed the monitor uses).

    Returns:
        :class:`Thresholds`; ``thresholds.apply(settings)`` gives the settings to judge with.

    Raises:
        ValueError: too few windows, or windows that break the schema.
    """
    cal = settings.calibration
    if len(baseline_windows) < cal.min_windows:
        raise ValueError(f"need at least {cal.min_windows} baseline windows "
                         f"(calibration.min_windows), got {len(baseline_windows)}")
    null: dict[str, list[float]] = {}
    for window in baseline_windows:
        for name, score in signal_scores(reference, window, settings, seed=seed).items():
            if score is not None:
                null.setdefault(name, []).append(score)

    def threshold(name: str) -> float | None:
        values = null.get(name)
        if not values:
            return None
        return max(float(np.quantile(values, cal.quantile)) * cal.margin, _MIN_THRESHOLD)

    fallback = _thresholds_for(settings)
    numerical = {c: threshold(c) or fallback[c] for c in NUMERICAL_COLUMNS}
    categorical = {c: threshold(c) or fallback[c] for c in CATEGORICAL_COLUMNS}
    drop = threshold("accuracy_drop")
    return Thresholds(
        numerical=numerical, categorical=categorical, embedding=threshold("embeddings"),
        max_accuracy_drop=max(settings.max_accuracy_drop, drop or 0.0),
        quantile=cal.quantile, margin=cal.margin, windows=len(baseline_windows),
        window_rows=int(np.median([len(w) for w in baseline_windows])),
        null_scores={k: [round(v, 6) for v in vs] for k, vs in null.items()},
    )


def _check_window_sizes(frame: pd.DataFrame, rows: int, count: int) -> None:
    if rows < 1 or count < 1:
        raise ValueError(f"rows and count must be positive, got rows={rows}, count={count}")
    if rows > len(frame):
        raise ValueError(f"rows {rows} > the frame's {len(frame)} rows")


def consecutive_windows(frame: pd.DataFrame, rows: int, count: int) -> list[pd.DataFrame]:
    """``count`` windows of ``rows`` *consecutive* rows of ``frame``, in its order — the
    baseline windows to calibrate on when ``frame`` is traffic in arrival order.

    The monitor judges consecutive traffic, and consecutive requests are not independent
    (a household's room, microphone and voice persist over many requests), so a window
    of consecutive rows varies more than ``rows`` rows drawn at random: thresholds
    calibrated on random draws (:func:`sample_windows`) came out too tight for the level
    and SNR signals and raised 2 false alarms in 20 judged baseline windows, on
    consecutive windows 1 (``benchmarks/drift_detection.py``, 2026-12-02). Windows are
    disjoint, starting at row 0, while ``frame`` holds ``rows × count`` rows; beyond that
    their starts spread evenly over the frame and they overlap (which understates the
    spread).

    Raises:
        ValueError: ``rows`` or ``count`` below 1, or ``rows`` above ``len(frame)``.
    """
    _check_window_sizes(frame, rows, count)
    if rows * count <= len(frame):
        starts = [i * rows for i in range(count)]
    else:
        starts = [int(x) for x in np.linspace(0, len(frame) - rows, count).round()]
        log.warning("%d calibration windows of %d rows overlap in %d rows (about %.1f "
                    "disjoint ones): thresholds will be tighter than the spread of real "
                    "windows; %d rows would make them disjoint", count, rows, len(frame),
                    len(frame) / rows, rows * count)
    return [frame.iloc[start:start + rows].reset_index(drop=True) for start in starts]


def sample_windows(frame: pd.DataFrame, rows: int, count: int, *, seed: int = 0
                   ) -> list[pd.DataFrame]:
    """``count`` windows of ``rows`` rows drawn at random from ``frame`` (baseline windows
    from rows without an order, such as validation data; for traffic see
    :func:`consecutive_windows`).

    Windows are disjoint while ``frame`` has ``rows × count`` rows; beyond that each
    window is drawn without replacement on its own, so windows overlap (which slightly
    understates the spread of real, independent windows).

    Raises:
        ValueError: ``rows`` or ``count`` below 1, or ``rows`` above ``len(frame)``.
    """
    _check_window_sizes(frame, rows, count)
    rng = np.random.default_rng(seed)
    if rows * count <= len(frame):
        order = rng.permutation(len(frame))
        return [frame.iloc[np.sort(order[i * rows:(i + 1) * rows])].reset_index(drop=True)
                for i in range(count)]
    return [frame.iloc[np.sort(rng.choice(len(frame), rows, replace=False))]
            .reset_index(drop=True) for _ in range(count)]


# --------------------------------------------------------------------------- references


_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class ReferenceMeta(BaseModel):
    """The JSON sidecar of a stored reference.

    Attributes:
        key: the file stem (the model version made file-safe).
        model_version: the model version the reference belongs to.
        rows: rows of the frame.
        created: when it was saved (UTC).
        source_split: where the rows came from (e.g. ``valid``).
        embedding_dim: number of ``emb_*`` columns.
        columns: every column of the frame.
    """

    key: str
    model_version: str
    rows: int
    created: datetime
    source_split: str
    embedding_dim: int = 0
    columns: list[str] = []


def _atomic_write(path: Path, data: bytes) -> None:
    with atomic_path(path, durable=True) as tmp:
        tmp.write_bytes(data)


class ReferenceStore:
    """References by model version: ``<root>/<key>.parquet`` + ``<key>.json`` sidecar.

    The key is the model version with characters other than letters, digits, ``.``,
    ``_``, ``-`` replaced by ``_``; the sidecar records the exact version, and loading
    checks it. The parquet file is written first and the sidecar last (each by an
    atomic rename), so a reference without sidecar is an unfinished write and does not
    exist. Calibrated thresholds may be stored beside it (``<key>.thresholds.json``).

    Args:
        root: the folder (``ReferenceStore.for_workspace`` gives
            ``<workspace>/monitoring/reference``).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @classmethod
    def for_workspace(cls, workspace: str | Path) -> ReferenceStore:
        """The store of a workspace: ``<workspace>/monitoring/reference``."""
        return cls(Path(workspace) / "monitoring" / "reference")

    @staticmethod
    def key_for(model_version: str) -> str:
        """The file-safe key of ``model_version``; ``ValueError`` if it is empty."""
        if not model_version or not model_version.strip():
            raise ValueError(f"model_version must be a non-empty string, got {model_version!r}")
        return _KEY_UNSAFE.sub("_", model_version.strip())

    def _paths(self, model_version: str) -> tuple[Path, Path]:
        key = self.key_for(model_version)
        return self.root / f"{key}.parquet", self.root / f"{key}.json"

    def save(self, frame: pd.DataFrame, model_version: str, *, source_split: str
             ) -> ReferenceMeta:
        """Store ``frame`` as the reference of ``model_version`` (replacing any).

        Raises:
            ValueError: an empty frame, or one lacking schema columns (named).
        """
        missing = [c for c in (*NUMERICAL_COLUMNS, *CATEGORICAL_FEATURES) if c not in frame.columns]
        if missing:
            raise ValueError(f"reference frame lacks columns {missing} (monitoring.schema)")
        if len(frame) == 0:
            raise ValueError("reference frame is empty")
        data_path, meta_path = self._paths(model_version)
        meta = ReferenceMeta(
            key=data_path.stem, model_version=model_version, rows=len(frame),
            created=datetime.now(UTC), source_split=source_split,
            embedding_dim=len(_embedding_columns_of(frame)),
            columns=[str(c) for c in frame.columns],
        )
        self.root.mkdir(parents=True, exist_ok=True)
        meta_path.unlink(missing_ok=True)  # the old sidecar must not vouch for new data
        buffer = frame.reset_index(drop=True).to_parquet(index=False)
        _atomic_write(data_path, buffer)
        _atomic_write(meta_path, meta.model_dump_json(indent=2).encode("utf-8"))
        return meta

    def meta(self, model_version: str) -> ReferenceMeta | None:
        """The sidecar of ``model_version``'s reference, or None if there is none."""
        _, meta_path = self._paths(model_version)
        if not meta_path.exists():
            return None
        meta = ReferenceMeta.model_validate_json(meta_path.read_text(encoding="utf-8"))
        if meta.model_version != model_version:
            # Two versions can share a key ("1/2" and "1_2"): never hand out the other's.
            return None
        return meta

    def exists(self, model_version: str) -> bool:
        """Whether a complete reference of ``model_version`` is stored."""
        return self.meta(model_version) is not None

    def load(self, model_version: str) -> tuple[pd.DataFrame, ReferenceMeta]:
        """The reference frame of ``model_version`` and its sidecar.

        Raises:
            FileNotFoundError: no complete reference for this version.
        """
        meta = self.meta(model_version)
        data_path, _ = self._paths(model_version)
        if meta is None or not data_path.exists():
            raise FileNotFoundError(f"no reference for model version {model_version!r} "
                                    f"in {self.root}")
        return pd.read_parquet(data_path), meta

    def versions(self) -> list[ReferenceMeta]:
        """Every stored reference's sidecar, newest first."""
        if not self.root.exists():
            return []
        metas = []
        for path in self.root.glob("*.json"):
            if path.name.endswith(".thresholds.json"):
                continue
            try:
                metas.append(ReferenceMeta.model_validate_json(path.read_text(encoding="utf-8")))
            except ValueError:
                log.warning("skipped an unreadable reference sidecar %s", path)
        return sorted(metas, key=lambda m: m.created, reverse=True)

    def save_thresholds(self, model_version: str, thresholds: Thresholds) -> Path:
        """Store calibrated thresholds beside the reference; returns the file."""
        path = self.root / f"{self.key_for(model_version)}.thresholds.json"
        _atomic_write(path, thresholds.model_dump_json(indent=2).encode("utf-8"))
        return path

    def load_thresholds(self, model_version: str) -> Thresholds | None:
        """Calibrated thresholds of ``model_version``'s reference, or None."""
        path = self.root / f"{self.key_for(model_version)}.thresholds.json"
        if not path.exists():
            return None
        return Thresholds.model_validate_json(path.read_text(encoding="utf-8"))

