"""Great Expectations suite for a corpus manifest.

A manifest (JSON Lines, see :mod:`model.data.manifest`) is validated in two steps:

1. :func:`manifest_frame` reads the raw rows, without pydantic validation so that bad
   rows reach the suite, and adds derived columns measured from the audio files
   (exists, decodes, sample rate, channels, measured duration) and from the rows
   themselves (splits a template appears in, transcript and slot hygiene).
2. :func:`validate_manifests` runs a Great Expectations suite over that frame and turns
   every failing row into a :class:`RowFailure` whose reason names the offending value,
   so that a data engineer (or the ingest flow's quarantine step) can act on row ids.

GX runs in an ephemeral, in-memory context: nothing is written to disk. A fresh context
is built per call on purpose: building it costs ~40 ms, while a cached one keeps the last
validated DataFrames alive in its batch cache.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import soundfile as sf

# GX decides whether to send usage analytics from this variable; a validation library has
# no business phoning home from a training pipeline. setdefault keeps an explicit opt-in.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

import great_expectations as gx
from great_expectations.core import (
    ExpectationSuiteValidationResult,
    ExpectationValidationResult,
)
from great_expectations.data_context.types.base import ProgressBarsConfig
from great_expectations.expectations.row_conditions import Column

from model.data.manifest import ManifestRow
from model.data.splits import ALL_SPLITS, template_group
from voiceloop.settings import ValidationSettings

__all__ = [
    "ENGINES",
    "REQUIRED_COLUMNS",
    "SPLITS",
    "ManifestValidationReport",
    "RowFailure",
    "manifest_frame",
    "validate_manifests",
]

REQUIRED_COLUMNS: tuple[str, ...] = (
    "id",
    "audio",
    "duration_s",
    "transcript",
    "intent",
    "slots",
    "engine",
    "voice",
    "augment",
    "split",
    "template_id",
    "domain",
)
SPLITS: tuple[str, ...] = ALL_SPLITS
ENGINES: tuple[str, ...] = ("espeak-ng", "flite", "festival", "traffic")

# Keep the column list in step with the pydantic contract; a drift here is a bug.
assert set(REQUIRED_COLUMNS) <= set(ManifestRow.model_fields)

# Normalised text: lower-case words of letters and apostrophes, single spaces, numbers
# spelled out (so no digits). The same rule holds for slot values, which are spoken words.
_CLEAN_TEXT = re.compile(r"[a-z']+(?: [a-z']+)*")

_ROW_INDEX = "row_index"  # unique position of a row in the frame, always present
_MARKDOWN_ROW_CAP = 50


@dataclass(frozen=True)
class RowFailure:
    """One row that broke one expectation.

    Attributes:
        row_id: the manifest ``id``, or ``"line N"`` (``"<file> line N"`` when several
            manifests are validated together) when the row has no usable id.
        expectation: GX expectation type, e.g. ``expect_column_values_to_be_in_set``.
        column: the frame column the expectation checked (may be a derived column such
            as ``sample_rate`` or ``n_splits_of_template``).
        reason: human-readable explanation naming the offending value.
    """

    row_id: str
    expectation: str
    column: str
    reason: str


@dataclass(frozen=True)
class ManifestValidationReport:
    """Outcome of validating one or more manifests.

    Attributes:
        manifest: the manifest validated, or the folder shared by all when several were.
        rows: number of rows read (including lines that were not valid JSON objects).
        success: True when every expectation passed.
        expectations_evaluated: expectations GX evaluated, over all batches.
        expectations_failed: expectations that failed or could not be evaluated.
        failures: row-level failures, deduplicated, sorted by ``row_id``.
        table_failures: table-level failures (missing columns, zero rows, expectations
            that could not run).
    """

    manifest: Path
    rows: int
    success: bool
    expectations_evaluated: int
    expectations_failed: int
    failures: list[RowFailure]
    table_failures: list[str]

    def to_markdown(self, max_rows: int = _MARKDOWN_ROW_CAP) -> str:
        """Readable report: a summary, table-level failures and a capped table of rows.

        Args:
            max_rows: at most this many failing rows are listed; a ``... N more`` line
                stands for the rest.
        """
        status = "PASSED" if self.success else "FAILED"
        bad_ids = {f.row_id for f in self.failures}
        lines = [
            f"# Manifest validation: {status}",
            "",
            f"- manifest: `{self.manifest}`",
            f"- rows: {self.rows}",
            (
                f"- expectations: {self.expectations_evaluated} evaluated, "
                f"{self.expectations_failed} failed"
            ),
            f"- failing rows: {len(bad_ids)} ({len(self.failures)} failures)",
        ]
        if self.table_failures:
            lines += ["", "## Table-level failures", ""]
            lines += [f"- {_md_cell(msg)}" for msg in self.table_failures]
        if self.failures:
            lines += [
                "",
                "## Failing rows",
                "",
                "| id | column | expectation | reason |",
                "|---|---|---|---|",
            ]
            for f in self.failures[:max_rows]:
                cells = (f.row_id, f.column, f.expectation, f.reason)
                lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
            if len(self.failures) > max_rows:
                lines += ["", f"... {len(self.failures) - max_rows} more"]
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable dict of the whole report."""
        return {
            "manifest": str(self.manifest),
            "rows": self.rows,
            "success": self.success,
            "expectations_evaluated": self.expectations_evaluated,
            "expectations_failed": self.expectations_failed,
            "failures": [asdict(f) for f in self.failures],
            "table_failures": list(self.table_failures),
        }


def _md_cell(value: str) -> str:
    # A pipe or newline inside a cell would break the markdown table.
    return value.replace("|", "\\|").replace("\n", " ")


# --------------------------------------------------------------------------------------
# The frame


def _read_lines(path: Path) -> list[tuple[int, dict[str, Any] | None]]:
    """``(line number, row)`` for every non-blank line; ``row`` is None when the line is
    not a JSON object.

    Not :func:`model.data.manifest.iter_raw_manifest`: that stops at the first bad line
    and drops line numbers, and validation must report bad lines by number and go on.
    """
    rows: list[tuple[int, dict[str, Any] | None]] = []
    # Undecodable bytes become U+FFFD: the row then fails the text checks instead of
    # aborting the whole read.
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                value = None
            rows.append((line_no, value if isinstance(value, dict) else None))
    return rows


@dataclass(frozen=True)
class _Probe:
    exists: bool
    decodes: bool
    sample_rate: int
    channels: int
    duration_s: float
    error: str


def _probe_audio(path: Path) -> _Probe:
    """Header facts of one audio file; a missing or unreadable file gives -1 / NaN."""
    if not path.is_file():
        return _Probe(False, False, -1, -1, math.nan, "missing")
    try:
        with sf.SoundFile(str(path)) as fh:
            # Reading a block proves the payload decodes, not just the header.
            fh.read(frames=min(fh.frames, 1024))
            return _Probe(True, True, fh.samplerate, fh.channels, fh.frames / fh.samplerate, "")
    except Exception as exc:  # noqa: BLE001 - any decode error is a finding, not a crash
        return _Probe(True, False, -1, -1, math.nan, f"{type(exc).__name__}: {exc}")


def _slots_problem(slots: Any) -> str | None:
    """Why ``slots`` is malformed, or None when it is a list of clean ``{type, value}``."""
    if not isinstance(slots, list):
        return "slots is missing" if not _is_present(slots) else f"slots is not a list: {slots!r}"
    for slot in slots:
        if not isinstance(slot, dict):
            return f"slot is not an object: {slot!r}"
        kind, value = slot.get("type"), slot.get("value")
        if not isinstance(kind, str) or not kind:
            return f"slot has no type: {slot!r}"
        if not isinstance(value, str) or not _CLEAN_TEXT.fullmatch(value):
            return f"slot {kind!r} value {value!r} is not lower-case words without digits"
    return None


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _is_present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def manifest_frame(manifests: Sequence[Path]) -> pd.DataFrame:
    """Raw manifest rows plus derived columns, ready for the GX suite.

    Each row keeps its raw fields as read (except ``duration_s``, coerced to float with
    non-numbers as NaN so that range checks can run), plus:

    - ``manifest_path``, ``line_no``, ``row_index``, ``json_object`` (False for a line
      that is not a JSON object): where the row came from.
    - ``audio_path`` (resolved; relative paths against the manifest's folder),
      ``audio_exists``, ``audio_decodes``, ``audio_error``, ``sample_rate`` and
      ``channels`` (-1 when the audio does not decode), ``measured_duration_s`` and
      ``duration_error_s`` = ``|duration_s - measured|`` (NaN when unknown).
    - ``n_splits_of_template``: distinct splits the row's ``template_id`` appears in
      across all ``manifests`` (NA without a template id).
    - ``slot_types`` (list), ``slots_valid``, ``transcript_clean`` (bools).

    Args:
        manifests: JSON Lines manifest files.

    Returns:
        One row per non-blank line of every manifest, in file order.

    Raises:
        FileNotFoundError: a manifest does not exist. A bad row never raises.
    """
    records: list[dict[str, Any]] = []
    derived: list[dict[str, Any]] = []
    probes: dict[Path, _Probe] = {}  # synthetic and augmented corpora reuse files
    for manifest in manifests:
        manifest = Path(manifest)
        base = manifest.resolve().parent
        for line_no, raw in _read_lines(manifest):
            row = raw if raw is not None else {}
            audio = row.get("audio")
            audio_path: Path | None = None
            if isinstance(audio, str) and audio:
                audio_path = Path(audio) if Path(audio).is_absolute() else base / audio
            probe = _Probe(False, False, -1, -1, math.nan, "no audio path")
            if audio_path is not None:
                if audio_path not in probes:
                    probes[audio_path] = _probe_audio(audio_path)
                probe = probes[audio_path]
            slots = row.get("slots")
            transcript = row.get("transcript")
            records.append(row)
            derived.append(
                {
                    "manifest_path": str(manifest),
                    "line_no": line_no,
                    "json_object": raw is not None,
                    "audio_path": str(audio_path) if audio_path is not None else None,
                    "audio_exists": probe.exists,
                    "audio_decodes": probe.decodes,
                    "audio_error": probe.error,
                    "sample_rate": probe.sample_rate,
                    "channels": probe.channels,
                    "measured_duration_s": probe.duration_s,
                    "slot_types": [
                        s["type"]
                        for s in slots
                        if isinstance(s, dict) and isinstance(s.get("type"), str)
                    ]
                    if isinstance(slots, list)
                    else [],
                    "slots_valid": _slots_problem(slots) is None,
                    "transcript_clean": isinstance(transcript, str)
                    and _CLEAN_TEXT.fullmatch(transcript) is not None,
                }
            )

    frame = pd.DataFrame.from_records(records) if records else pd.DataFrame(index=range(0))
    extra = pd.DataFrame.from_records(derived, index=frame.index) if derived else None
    if extra is None:
        extra = pd.DataFrame(
            {
                "manifest_path": pd.Series(dtype=object),
                "line_no": pd.Series(dtype=int),
                "json_object": pd.Series(dtype=bool),
                "audio_path": pd.Series(dtype=object),
                "audio_exists": pd.Series(dtype=bool),
                "audio_decodes": pd.Series(dtype=bool),
                "audio_error": pd.Series(dtype=object),
                "sample_rate": pd.Series(dtype=int),
                "channels": pd.Series(dtype=int),
                "measured_duration_s": pd.Series(dtype=float),
                "slot_types": pd.Series(dtype=object),
                "slots_valid": pd.Series(dtype=bool),
                "transcript_clean": pd.Series(dtype=bool),
            }
        )
    # A raw field named like a derived column (say a traffic row carrying its own
    # ``sample_rate``) is kept as ``raw_<name>``: the measured value is what gets checked.
    clashes = set(extra.columns) | {_ROW_INDEX, "duration_error_s", "n_splits_of_template"}
    frame = frame.rename(columns={c: f"raw_{c}" for c in frame.columns if c in clashes})
    frame = pd.concat([frame, extra], axis=1)
    frame[_ROW_INDEX] = range(len(frame))

    if "duration_s" in frame.columns:
        # bool is an int to pandas; a JSON true is not a duration.
        duration = frame["duration_s"].map(lambda v: None if isinstance(v, bool) else v)
        frame["duration_s"] = pd.to_numeric(duration, errors="coerce").astype(float)
        frame["duration_error_s"] = (frame["duration_s"] - frame["measured_duration_s"]).abs()
    else:
        frame["duration_error_s"] = math.nan

    frame["n_splits_of_template"] = _splits_per_template(frame)
    return frame


def _template_splits(frame: pd.DataFrame) -> dict[Any, list[str]]:
    """Sorted distinct splits of every (hashable, present) template id."""
    if "template_id" not in frame.columns or "split" not in frame.columns:
        return {}
    splits: dict[Any, set[str]] = {}
    for template, split in zip(frame["template_id"], frame["split"], strict=True):
        if _is_present(template) and _hashable(template) and _is_present(split):
            splits.setdefault(template, set()).add(str(split))
    return {t: sorted(s) for t, s in splits.items()}


def _splits_per_template(frame: pd.DataFrame) -> pd.Series:
    """Distinct template splits per row's template: a held-out-voice split counts as the
    split its sentences come from (``test_heldout`` shares ``test``'s templates)."""
    if "template_id" not in frame.columns:
        return pd.Series(pd.NA, index=frame.index, dtype="Int64")
    splits = {t: sorted({template_group(s) for s in ss})
              for t, ss in _template_splits(frame).items()}
    counts = [
        len(splits[t]) if _is_present(t) and _hashable(t) and t in splits else pd.NA
        for t in frame["template_id"]
    ]
    return pd.Series(counts, index=frame.index, dtype="Int64")


def _slot_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per slot (``row_index``, ``id``, ``slot_type``) for the vocabulary check."""
    rows = [
        {_ROW_INDEX: idx, "slot_type": kind}
        for idx, kinds in zip(frame[_ROW_INDEX], frame["slot_types"], strict=True)
        for kind in kinds
    ]
    slots = pd.DataFrame(rows, columns=[_ROW_INDEX, "slot_type"])
    if "id" in frame.columns:
        slots["id"] = frame["id"].to_numpy()[slots[_ROW_INDEX].to_numpy(dtype=int)]
    return slots


# --------------------------------------------------------------------------------------
# The suite


@dataclass(frozen=True)
class _Vocab:
    settings: ValidationSettings
    intents: frozenset[str]
    slot_types: frozenset[str]
    domains: frozenset[str] | None


def _row_expectations(vocab: _Vocab) -> list[gx.expectations.Expectation]:
    e = gx.expectations
    s = vocab.settings
    # GX row conditions (``==`` on a GX Column builds a condition, it does not compare):
    # a missing file is reported once, as missing, not again as undecodable, wrong rate,
    # wrong channel count.
    exists = Column("audio_exists") == True
    decodes = Column("audio_decodes") == True
    checks: list[gx.expectations.Expectation] = [
        e.ExpectTableRowCountToBeBetween(min_value=1),
        e.ExpectTableColumnsToMatchSet(column_set=list(REQUIRED_COLUMNS), exact_match=False),
        e.ExpectColumnValuesToBeInSet(column="json_object", value_set=[True]),
    ]
    checks += [e.ExpectColumnValuesToNotBeNull(column=c) for c in REQUIRED_COLUMNS]
    checks += [
        e.ExpectColumnValuesToBeUnique(column="id"),
        e.ExpectColumnValuesToBeBetween(
            column="duration_s", min_value=s.min_duration_s, max_value=s.max_duration_s
        ),
        e.ExpectColumnValuesToBeBetween(
            column="duration_error_s", min_value=0, max_value=s.duration_tolerance_s
        ),
        e.ExpectColumnValuesToBeInSet(column="audio_exists", value_set=[True]),
        e.ExpectColumnValuesToBeInSet(
            column="audio_decodes", value_set=[True], row_condition=exists
        ),
        e.ExpectColumnValuesToBeInSet(
            column="sample_rate", value_set=[s.sample_rate], row_condition=decodes
        ),
        e.ExpectColumnValuesToBeInSet(column="channels", value_set=[1], row_condition=decodes),
        e.ExpectColumnValuesToBeInSet(column="intent", value_set=sorted(vocab.intents)),
        e.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
        e.ExpectColumnValuesToBeInSet(column="engine", value_set=list(ENGINES)),
        e.ExpectColumnValuesToBeInSet(column="transcript_clean", value_set=[True]),
        e.ExpectColumnValuesToBeInSet(column="slots_valid", value_set=[True]),
        e.ExpectColumnValuesToBeInSet(column="n_splits_of_template", value_set=[1]),
    ]
    if vocab.domains is not None:
        checks.append(
            e.ExpectColumnValuesToBeInSet(column="domain", value_set=sorted(vocab.domains))
        )
    return checks


@dataclass(frozen=True)
class _Suite:
    rows: gx.ValidationDefinition
    slots: gx.ValidationDefinition


# GX falls back on a process-wide "current project" (the last context built), so two
# validations running at once could resolve each other's stores: one at a time.
_LOCK = threading.Lock()


def _suite(vocab: _Vocab) -> _Suite:
    """A new ephemeral GX context holding both validation definitions for ``vocab``."""
    context = gx.get_context(mode="ephemeral")
    # tqdm bars per metric are noise in logs and flows.
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas("manifest")

    def definition(name: str, checks: list[gx.expectations.Expectation]) -> gx.ValidationDefinition:
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
        suite = gx.ExpectationSuite(name=f"manifest_{name}")
        for check in checks:
            suite.add_expectation(check)
        suite = context.suites.add(suite)
        return context.validation_definitions.add(
            gx.ValidationDefinition(name=f"manifest_{name}", data=batch, suite=suite)
        )

    slot_check = gx.expectations.ExpectColumnValuesToBeInSet(
        column="slot_type", value_set=sorted(vocab.slot_types)
    )
    return _Suite(
        rows=definition("rows", _row_expectations(vocab)), slots=definition("slots", [slot_check])
    )


# --------------------------------------------------------------------------------------
# Results -> report


def _fmt(value: Any) -> str:
    """A value as it would read in the manifest: numbers bare, strings quoted."""
    if isinstance(value, np.generic):
        value = value.item()  # np.int64(8000) -> 8000
    if not _is_present(value) or value is pd.NA:
        return "missing"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value) if isinstance(value, (int, float)) else repr(value)


def _set(values: Collection[Any], limit: int = 6) -> str:
    items = sorted(str(v) for v in values)
    shown = ", ".join(items[:limit]) + (
        f", ... ({len(items)} in all)" if len(items) > limit else ""
    )
    return "{" + shown + "}"


def _reasoner(frame: pd.DataFrame, vocab: _Vocab) -> Callable[[str, str, pd.Series], str]:
    """Builds ``reason(expectation_type, column, row)`` naming the row's actual value."""
    s = vocab.settings
    template_splits = _template_splits(frame)
    id_counts = (
        frame["id"].map(lambda v: v if _hashable(v) else repr(v)).value_counts(dropna=True)
        if "id" in frame.columns
        else pd.Series(dtype=int)
    )

    def by_column(column: str, row: pd.Series) -> str | None:
        value = _fmt(row.get(column))
        if column == "json_object":
            return f"line {row['line_no']} of {row['manifest_path']} is not a JSON object"
        if column == "id":
            return f"id {value} appears {int(id_counts.get(row.get('id'), 2))} times"
        if column == "duration_s":
            return (
                f"duration_s {value} outside [{_fmt(s.min_duration_s)}, {_fmt(s.max_duration_s)}]"
            )
        if column == "duration_error_s":
            return (
                f"duration_s {_fmt(row['duration_s'])} but audio lasts "
                f"{row['measured_duration_s']:.3f} s (off by {row['duration_error_s']:.3f} s, "
                f"tolerance {_fmt(s.duration_tolerance_s)})"
            )
        if column == "audio_exists":
            return f"audio file missing: {row['audio_path'] or 'no path given'}"
        if column == "audio_decodes":
            return f"audio file does not decode: {row['audio_path']} ({row['audio_error']})"
        if column == "sample_rate":
            return f"sample_rate {value} not in {{{s.sample_rate}}}"
        if column == "channels":
            return f"channels {value} not in {{1}}"
        if column == "intent":
            return f"intent {value} not in intent vocabulary {_set(vocab.intents)}"
        if column == "split":
            return f"split {value} not in {_set(SPLITS)}"
        if column == "engine":
            return f"engine {value} not in {_set(ENGINES)}"
        if column == "domain" and vocab.domains is not None:
            return f"domain {value} not in {_set(vocab.domains)}"
        if column == "transcript_clean":
            return (
                f"transcript {_fmt(row.get('transcript'))} is not lower-case letters, "
                "spaces and apostrophes"
            )
        if column == "slots_valid":
            return _slots_problem(row.get("slots")) or "slots malformed"
        if column == "n_splits_of_template":
            template = row.get("template_id")
            splits = ", ".join(template_splits.get(template, []))
            return f"template {template} appears in splits {splits}"
        return None

    def reason(expectation: str, column: str, row: pd.Series) -> str:
        if expectation == "expect_column_values_to_not_be_null":
            return f"{column} is missing" + (" or not a number" if column == "duration_s" else "")
        return (
            by_column(column, row) or f"{column} value {_fmt(row.get(column))} failed {expectation}"
        )

    return reason


def _row_label(row: pd.Series, several: bool) -> str:
    value = row.get("id")
    if _is_present(value) and str(value):
        return str(value)
    where = f"{Path(row['manifest_path']).name} " if several else ""
    return f"{where}line {row['line_no']}"


def _raised(result: ExpectationValidationResult) -> str | None:
    """The exception message when GX could not evaluate an expectation, else None."""
    info = result.exception_info or {}
    if info.get("raised_exception"):
        return str(info.get("exception_message") or "error")
    for nested in info.values():
        if isinstance(nested, dict) and nested.get("raised_exception"):
            return str(nested.get("exception_message") or "error")
    return None


def _table_message(result: ExpectationValidationResult) -> str:
    kind = result.expectation_config.type
    details = result.result or {}
    if kind == "expect_table_columns_to_match_set":
        missing = (details.get("details") or {}).get("mismatched", {}).get("missing") or []
        return "missing required columns: " + ", ".join(sorted(missing))
    if kind == "expect_table_row_count_to_be_between":
        return f"manifest has {details.get('observed_value', 0)} rows"
    return f"{kind} failed: {details.get('observed_value')!r}"


def validate_manifests(
    manifests: Sequence[Path],
    settings: ValidationSettings,
    intents: Collection[str],
    slot_types: Collection[str],
    domains: Collection[str] | None = None,
) -> ManifestValidationReport:
    """Validate manifests with the GX suite and report failures by row id.

    All manifests are validated as one table, so ids must be unique and templates must
    not cross splits across all of them (e.g. pass train, valid and test together).

    Args:
        manifests: JSON Lines manifests (at least one).
        settings: duration bounds, duration tolerance and the expected sample rate.
        intents: the intent vocabulary (e.g. the grammar's intents).
        slot_types: the slot-type vocabulary.
        domains: the allowed domain tags; None skips the domain check.

    Raises:
        ValueError: no manifests given.
        FileNotFoundError: a manifest does not exist.
    """
    if not manifests:
        raise ValueError("validate_manifests needs at least one manifest")
    paths = [Path(m) for m in manifests]
    frame = manifest_frame(paths)
    vocab = _Vocab(
        settings=settings,
        intents=frozenset(intents),
        slot_types=frozenset(slot_types),
        domains=frozenset(domains) if domains is not None else None,
    )
    slots = _slot_frame(frame)
    with _LOCK:
        suite = _suite(vocab)
        results = [
            (frame, _run(suite.rows, frame)),
            (slots, _run(suite.slots, slots)),
        ]

    reason = _reasoner(frame, vocab)
    several = len(paths) > 1
    failures: set[RowFailure] = set()
    table_failures: list[str] = []
    skipped: set[str] = set()
    evaluated = failed = 0
    for batch, run in results:
        evaluated += run.statistics["evaluated_expectations"]
        failed += run.statistics["unsuccessful_expectations"]
        for result in run.results:
            if result.success:
                continue
            config = result.expectation_config
            column = str(config.kwargs.get("column") or "")
            error = _raised(result)
            if error is not None:
                if column and column not in batch.columns:
                    skipped.add(column)  # already named by the required-columns check
                else:
                    table_failures.append(f"{config.type}({column}) could not run: {error}")
                continue
            index_list = (result.result or {}).get("unexpected_index_list")
            if not column or index_list is None:
                table_failures.append(_table_message(result))
                continue
            for entry in index_list:
                position = int(entry[_ROW_INDEX])
                row = frame.iloc[position]
                if not row["json_object"] and column != "json_object":
                    continue  # a line that is not a JSON object is reported once, as such
                if batch is slots:
                    text = (
                        f"slot type {_fmt(entry.get('slot_type'))} not in slot vocabulary "
                        f"{_set(vocab.slot_types)}"
                    )
                else:
                    text = reason(config.type, column, row)
                failures.add(RowFailure(_row_label(row, several), config.type, column, text))
    if skipped:
        table_failures.append(
            "expectations not evaluated for missing columns: " + ", ".join(sorted(skipped))
        )
    ordered = sorted(failures, key=lambda f: (f.row_id, f.column, f.expectation, f.reason))
    manifest = paths[0] if not several else Path(os.path.commonpath([p.resolve() for p in paths]))
    return ManifestValidationReport(
        manifest=manifest,
        rows=len(frame),
        success=failed == 0 and not ordered and not table_failures,
        expectations_evaluated=evaluated,
        expectations_failed=failed,
        failures=ordered,
        table_failures=table_failures,
    )


def _run(
    definition: gx.ValidationDefinition, batch: pd.DataFrame
) -> ExpectationSuiteValidationResult:
    # Index by our own unique position: ids may be missing or duplicated, which is
    # exactly when a failure must still point at the right row. The id rides along so
    # GX's own result JSON stays readable.
    index = ["id", _ROW_INDEX] if "id" in batch.columns else [_ROW_INDEX]
    return definition.run(
        batch_parameters={"dataframe": batch},
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": index},
    )
