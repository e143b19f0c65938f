"""Great Expectations suite for one production-traffic batch, joined with facts measured
from its stored audio.

The frame validated here is what ``monitoring.ingest`` builds per batch: the request rows
of the batch (:data:`serving.traffic.TRAFFIC_SCHEMA` columns, feedback rows removed) plus
:data:`AUDIO_FACT_COLUMNS` from :func:`audio_facts` (does the stored audio decode, its
rate, is it finite, and its :mod:`monitoring.signal_features` under an ``audio_`` prefix,
so that measured values never shadow what the service logged, e.g. ``duration_s``).

Checks (thresholds from :class:`~voiceloop.settings.IngestSettings`):

- metadata: ``request_id`` present, non-empty, neither repeated inside the batch nor
  ingested before (the first occurrence is kept: :func:`validate_traffic` takes the ids
  earlier batches brought); ``timestamp`` and ``model_version`` present; ``confidence``
  in ``[0, 1]``; ``route`` in :data:`serving.contracts.ROUTES`; ``latency_ms`` >= 0.
- audio: decodes; then (only for audio that decodes, so that one broken file gives one
  reason) finite samples, rate in ``[min_sample_rate, max_sample_rate]`` Hz (the store
  keeps the *uploaded* rate; the model resamples), duration in
  ``[min_duration_s, max_duration_s]``, ``silence_share <= max_silence_share``,
  ``clipping_share <= max_clipping_share``.

Every failing row gets all its reasons, each naming the value ("duration 0.05 s below
0.3 s"). A table-level failure (a required column missing, an expectation GX could not
evaluate) fails every row: a batch whose contract broke is not partly trusted.

GX runs like :mod:`monitoring.manifest_suite` (an ephemeral context, COMPLETE results
indexed by a row position, one validation at a time) and reuses its runner; unlike there,
one :class:`TrafficSuite` is built per ingestion run and validates every batch of it
(building a context costs ~40 ms, and a run validates many small batches).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

# As in manifest_suite: no usage analytics from a pipeline (an explicit opt-in stays).
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

import great_expectations as gx
from great_expectations.data_context.types.base import ProgressBarsConfig
from great_expectations.expectations.row_conditions import Column

# One lock, runner and value formatter for every GX suite of the project: GX resolves a
# process-wide "current project", so two suites must never validate at the same time.
from monitoring.manifest_suite import _LOCK, _ROW_INDEX, _fmt, _raised, _run
from monitoring.signal_features import SignalFeatures, signal_features
from serving.contracts import ROUTES
from serving.traffic import TRAFFIC_SCHEMA
from voiceloop.settings import IngestSettings

__all__ = [
    "AUDIO_FACT_COLUMNS",
    "REQUIRED_COLUMNS",
    "TrafficSuite",
    "TrafficValidation",
    "audio_facts",
    "traffic_expectations",
    "validate_traffic",
]

_SIGNAL_FIELDS: tuple[str, ...] = tuple(
    name for name in SignalFeatures.__dataclass_fields__ if name not in ("sample_rate", "samples")
)
AUDIO_FACT_COLUMNS: tuple[str, ...] = (
    "audio_decodes", "audio_error", "audio_sample_rate", "audio_samples",
    *(f"audio_{name}" for name in _SIGNAL_FIELDS),
)
"""Facts of the stored audio: ``audio_decodes`` (bool), ``audio_error`` (why not, else
""), ``audio_sample_rate`` (Hz, -1 when it does not decode), ``audio_samples``, and
``audio_<feature>`` for every :class:`SignalFeatures` measure (``audio_duration_s``,
``audio_level_dbfs``, … ``audio_finite``); NaN when the audio does not decode."""

REQUIRED_COLUMNS: tuple[str, ...] = (*TRAFFIC_SCHEMA.names, *AUDIO_FACT_COLUMNS)

# Derived by validate_traffic: False on a repeated request id, with the reason alongside.
_ID_NEW = "request_id_new"
_ID_REPEAT = "request_id_repeat"


def audio_facts(
    samples: np.ndarray | None, sample_rate: int, error: str = "", transcript: str = ""
) -> dict[str, Any]:
    """The :data:`AUDIO_FACT_COLUMNS` of one request.

    Args:
        samples: the decoded stored audio ``(samples,)`` float32, or None when it could
            not be read (then ``error`` says why).
        sample_rate: its rate in Hz.
        error: why the audio is missing or does not decode.
        transcript: the predicted transcript (for ``speaking_rate``).
    """
    if samples is None:
        facts: dict[str, Any] = {f"audio_{name}": math.nan for name in _SIGNAL_FIELDS}
        facts["audio_finite"] = False
        return {"audio_decodes": False, "audio_error": error or "no audio",
                "audio_sample_rate": -1, "audio_samples": -1, **facts}
    measured = signal_features(samples, sample_rate, transcript)
    return {"audio_decodes": True, "audio_error": "", "audio_sample_rate": int(sample_rate),
            "audio_samples": measured.samples,
            **{f"audio_{name}": getattr(measured, name) for name in _SIGNAL_FIELDS}}


def traffic_expectations(settings: IngestSettings) -> list[gx.expectations.Expectation]:
    """The suite's expectations, in the order reasons are listed."""
    e = gx.expectations
    s = settings
    # A GX row condition (``==`` on a GX Column builds it, it does not compare): checks
    # of the audio's content run only where it decodes.
    decodes = Column("audio_decodes") == True
    return [
        e.ExpectTableColumnsToMatchSet(column_set=list(REQUIRED_COLUMNS), exact_match=False),
        e.ExpectColumnValuesToNotBeNull(column="request_id"),
        e.ExpectColumnValueLengthsToBeBetween(column="request_id", min_value=1),
        e.ExpectColumnValuesToBeInSet(column=_ID_NEW, value_set=[True]),
        e.ExpectColumnValuesToNotBeNull(column="timestamp"),
        e.ExpectColumnValuesToNotBeNull(column="model_version"),
        e.ExpectColumnValueLengthsToBeBetween(column="model_version", min_value=1),
        e.ExpectColumnValuesToNotBeNull(column="confidence"),
        e.ExpectColumnValuesToBeBetween(column="confidence", min_value=0.0, max_value=1.0),
        e.ExpectColumnValuesToNotBeNull(column="route"),
        e.ExpectColumnValuesToBeInSet(column="route", value_set=list(ROUTES)),
        e.ExpectColumnValuesToNotBeNull(column="latency_ms"),
        e.ExpectColumnValuesToBeBetween(column="latency_ms", min_value=0.0),
        e.ExpectColumnValuesToBeInSet(column="audio_decodes", value_set=[True]),
        e.ExpectColumnValuesToBeInSet(column="audio_finite", value_set=[True],
                                      row_condition=decodes),
        e.ExpectColumnValuesToBeBetween(column="audio_sample_rate",
                                        min_value=s.min_sample_rate,
                                        max_value=s.max_sample_rate, row_condition=decodes),
        # No row condition below: these facts are NaN where the audio does not decode,
        # and GX skips nulls in range checks (a row condition costs a pandas query over
        # every column of the batch: a fifth of the suite's time on a 256-row batch).
        e.ExpectColumnValuesToBeBetween(column="audio_duration_s", min_value=s.min_duration_s,
                                        max_value=s.max_duration_s),
        e.ExpectColumnValuesToBeBetween(column="audio_silence_share", min_value=0.0,
                                        max_value=s.max_silence_share),
        e.ExpectColumnValuesToBeBetween(column="audio_clipping_share", min_value=0.0,
                                        max_value=s.max_clipping_share),
    ]


@dataclass(frozen=True)
class TrafficValidation:
    """Outcome of validating one batch's frame.

    Attributes:
        rows: rows validated.
        passed: per row (frame order): True when it broke no expectation.
        reasons: per row: every reason it failed, in suite order ([] when it passed).
        table_failures: batch-level failures (these fail every row).
        expectations_evaluated, expectations_failed: GX's statistics.
        failed_checks: failing rows per check (``column`` or ``column:expectation``).
    """

    rows: int
    passed: list[bool]
    reasons: list[list[str]]
    table_failures: list[str] = field(default_factory=list)
    expectations_evaluated: int = 0
    expectations_failed: int = 0
    failed_checks: dict[str, int] = field(default_factory=dict)

    @property
    def accepted(self) -> int:
        return sum(self.passed)

    @property
    def quarantined(self) -> int:
        return self.rows - self.accepted


def _num(value: Any) -> str:
    """A number as a reason shows it: at most 3 significant decimals, no trailing zeros."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return _fmt(value)


def _reason(expectation: str, column: str, row: pd.Series, s: IngestSettings) -> str:
    """Why ``row`` failed ``expectation`` on ``column``, naming its value."""
    value = row.get(column)
    if expectation == "expect_column_values_to_not_be_null":
        return f"{column} missing"
    if expectation == "expect_column_value_lengths_to_be_between":
        return f"{column} is empty"
    if column == _ID_NEW:
        return str(row.get(_ID_REPEAT) or f"request_id {_fmt(row.get('request_id'))} repeated")
    if column == "confidence":
        return f"confidence {_num(value)} outside [0, 1]"
    if column == "route":
        return f"route {_fmt(value)} not in {{{', '.join(sorted(ROUTES))}}}"
    if column == "latency_ms":
        return f"latency_ms {_num(value)} below 0"
    if column == "audio_decodes":
        return f"audio does not decode: {row.get('audio_error') or 'unknown error'}"
    if column == "audio_finite":
        return "audio has non-finite samples"
    if column == "audio_sample_rate":
        return (f"sample rate {_num(value)} Hz outside "
                f"[{s.min_sample_rate}, {s.max_sample_rate}] Hz")
    if column == "audio_duration_s":
        side = (f"below {_num(s.min_duration_s)}" if value < s.min_duration_s
                else f"above {_num(s.max_duration_s)}")
        return f"duration {_num(value)} s {side} s"
    if column == "audio_silence_share":
        return f"silence share {_num(value)} above {_num(s.max_silence_share)}"
    if column == "audio_clipping_share":
        return f"clipping share {_num(value)} above {_num(s.max_clipping_share)}"
    return f"{column} value {_fmt(value)} failed {expectation}"


def _with_request_id_facts(frame: pd.DataFrame, seen: Mapping[str, str]) -> pd.DataFrame:
    """A copy of ``frame`` with the row position and the repeated-request-id facts."""
    out = frame.copy()  # the caller's frame stays as it was
    out[_ROW_INDEX] = np.arange(len(out))
    new: list[bool] = []
    why: list[str] = []
    first_row: dict[str, int] = {}
    ids = out["request_id"] if "request_id" in out.columns else pd.Series([None] * len(out))
    for position, rid in enumerate(ids):
        if not isinstance(rid, str) or not rid:
            new.append(True)  # missing ids have their own check
            why.append("")
        elif rid in seen:
            new.append(False)
            why.append(f"request_id {rid!r} already ingested in batch {seen[rid]}")
        elif rid in first_row:
            new.append(False)
            why.append(f"request_id {rid!r} repeats row {first_row[rid]} of this batch")
        else:
            first_row[rid] = position
            new.append(True)
            why.append("")
    out[_ID_NEW] = new
    out[_ID_REPEAT] = why
    return out


class TrafficSuite:
    """The traffic suite for ``settings``, ready to validate many batches.

    Args:
        settings: the ingestion thresholds.
    """

    def __init__(self, settings: IngestSettings) -> None:
        self.settings = settings
        self._expectations = traffic_expectations(settings)
        self._definition: gx.ValidationDefinition | None = None

    def _build(self) -> gx.ValidationDefinition:
        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False)  # log noise
        batch = (context.data_sources.add_pandas("traffic").add_dataframe_asset("batch")
                 .add_batch_definition_whole_dataframe("all"))
        suite = gx.ExpectationSuite(name="traffic_batch")
        for check in self._expectations:
            suite.add_expectation(check)
        suite = context.suites.add(suite)
        return context.validation_definitions.add(
            gx.ValidationDefinition(name="traffic_batch", data=batch, suite=suite))

    def validate(
        self, frame: pd.DataFrame, seen: Mapping[str, str] | None = None
    ) -> TrafficValidation:
        """Validate one batch.

        Args:
            frame: request rows joined with :func:`audio_facts` (:data:`REQUIRED_COLUMNS`);
                not modified.
            seen: request id → batch id, for ids earlier batches already brought.

        Returns:
            Per-row pass/fail and reasons, in ``frame``'s row order.
        """
        n = len(frame)
        if n == 0:
            return TrafficValidation(rows=0, passed=[], reasons=[])
        batch = _with_request_id_facts(frame, seen or {})
        with _LOCK:
            if self._definition is None:
                self._definition = self._build()
            run = _run(self._definition, batch)

        order = {(c.type, str(c.kwargs.get("column") or "")): i
                 for i, c in enumerate(e.configuration for e in self._expectations)}
        found: list[list[tuple[int, str]]] = [[] for _ in range(n)]
        table_failures: list[str] = []
        checks: Counter[str] = Counter()
        for result in run.results:
            if result.success:
                continue
            config = result.expectation_config
            column = str(config.kwargs.get("column") or "")
            error = _raised(result)
            if error is not None:
                if column not in batch.columns:
                    continue  # the required-columns check names it once
                table_failures.append(f"{config.type}({column}) could not run: {error}")
                continue
            index_list = (result.result or {}).get("unexpected_index_list")
            if not column or index_list is None:
                missing = (((result.result or {}).get("details") or {}).get("mismatched")
                           or {}).get("missing") or []
                table_failures.append(
                    "missing required columns: " + ", ".join(sorted(missing)) if missing
                    else f"{config.type} failed: {(result.result or {}).get('observed_value')!r}")
                continue
            rank = order.get((config.type, column), len(order))
            name = column if config.type != "expect_column_values_to_not_be_null" else (
                f"{column}:missing")
            for entry in index_list:
                position = int(entry[_ROW_INDEX])
                found[position].append(
                    (rank, _reason(config.type, column, batch.iloc[position], self.settings)))
                checks[name] += 1
        reasons = [[text for _, text in sorted(set(row))] for row in found]
        if table_failures:
            reasons = [[f"batch: {msg}" for msg in table_failures] + row for row in reasons]
        return TrafficValidation(
            rows=n,
            passed=[not row for row in reasons],
            reasons=reasons,
            table_failures=table_failures,
            expectations_evaluated=int(run.statistics["evaluated_expectations"]),
            expectations_failed=int(run.statistics["unsuccessful_expectations"]),
            failed_checks=dict(sorted(checks.items())),
        )


def validate_traffic(
    frame: pd.DataFrame, settings: IngestSettings, seen: Mapping[str, str] | None = None
) -> TrafficValidation:
    """Validate one batch with a suite built for this call (see :class:`TrafficSuite`,
    which validates many batches with one suite)."""
    return TrafficSuite(settings).validate(frame, seen)
