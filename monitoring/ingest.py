"""Ingestion: committed production-traffic batches → the curated dataset, validated,
featurised and versioned.

For every committed batch of the traffic store (:func:`serving.traffic.list_batches`)
whose id the ledger does not hold yet, in batch-id order:

1. read its rows; feedback rows (``kind == "feedback"``) are no samples: they go to the
   ``feedback`` table as they are;
2. read each request's stored audio and measure it (:func:`monitoring.traffic_suite.
   audio_facts`), then validate the batch with the traffic suite
   (:class:`~monitoring.traffic_suite.TrafficSuite`): a request id that an earlier batch
   brought, or that repeats inside the batch, fails like any other check;
3. featurise the accepted rows: the signal features, the mean-pooled encoder embedding of
   the given model (``emb_*``, ``embedding_model`` = its version) and the predicted
   ``domain`` (:func:`model.data.grammar.predicted_domain`);
4. write the outputs under deterministic names (a rerun overwrites, never duplicates),
   each atomically (a temporary file renamed into place);
5. record the batch in the ledger, **last**.

Layout under ``<workspace>/curated`` (:func:`curated_root`)::

    traffic/dt=YYYY-MM-DD/hour=HH/<batch_id>.parquet    accepted rows, monitoring.schema columns
    quarantine/<batch_id>.parquet                       rejected rows + ``reasons``
    feedback/dt=YYYY-MM-DD/hour=HH/<batch_id>.parquet   the batch's feedback rows
    ledger.jsonl                                        what was ingested (see below)
    reports/ingest-<UTC time>.json                      one report per run
    traffic.dvc, .dvc/                                  the DVC-versioned dataset

**Ledger** (JSON Lines, append-only; a line is written in one ``write`` and fsynced):
``{"type": "batch", "batch_id", "dt", "hour", "status": "ingested"|"poison", "records",
"requests", "feedback", "accepted", "quarantined", "outputs": {"traffic", "quarantine",
"feedback"} (paths relative to the curated root, or null), "embedding_model", "error",
"run_id", "at"}`` per batch, and ``{"type": "data_version", "data_version", "dvc_file",
"batches", "run_id", "at"}`` after each DVC versioning. JSON Lines rather than SQLite:
one writer (an exclusive lock file guards the run), appends only, readable with ``jq``
and diffable; a torn last line (a crash mid-append) is ignored on reading, which only
means that batch is ingested again, overwriting its own outputs.

**Idempotence.** A batch is done when, and only when, its ledger line exists. A crash
after the outputs and before the ledger line leaves outputs that the next run rewrites
byte for byte under the same names (and removes where the new outcome has none), so
nothing is lost and nothing is counted twice; request ids "already ingested" are read
from the outputs of ledger-recorded batches only, so a half-done batch never rejects its
own rows.

**Poison batches.** An exception while reading, validating or featurising a batch
quarantines it whole (every row, or one row standing for the marker's ``records`` when
the Parquet file cannot be read; column ``rows``) with the reason, records it as
``poison`` and moves on. Transient errors (``OSError``, e.g. a flaky mount or object
store) are first retried ``retries`` times with a doubling backoff. A failure to write
the ledger itself aborts the run (nothing can be trusted after it).

**Counts** (per batch and in total; :meth:`BatchOutcome.balanced`)::

    records  = requests + feedback        (all rows of the batch)
    requests = accepted + quarantined     (request rows: "in = accepted + quarantined")

For a poison batch every row counts as a quarantined request (``feedback = 0``).

**Versioning.** After a run that recorded batches (or after an earlier run whose
versioning failed), ``curated/traffic`` is added to a DVC repository rooted at the
curated folder (``no_scm``; cache ``<workspace>/dvc-cache``, default remote
``<workspace>/dvc-remote``) and pushed; the directory hash in ``traffic.dvc`` is the
*data version*, written into the report and the ledger. The DVC root is the curated
folder, not the workspace: the repository's own pipeline (``dvc.yaml``) tracks outputs
under ``workspace/``, and DVC hides everything below a nested ``.dvc`` folder from the
outer repository, so a DVC repository at ``workspace/`` would make the outer pipeline
see its outputs as deleted. ``curated/`` holds none of them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf
import yaml
from pydantic import BaseModel, Field
from tqdm import tqdm

from model.data.grammar import load_values, predicted_domain
from model.fileio import atomic_path
from model.inference.batch import BatchPredictor
from model.inference.onnx import load_predictor
from monitoring.schema import (
    CATEGORICAL_FEATURES,
    IDENTITY_COLUMNS,
    PREDICTION_FEATURES,
    SIGNAL_FEATURES,
    embedding_columns,
)
from monitoring.traffic_suite import AUDIO_FACT_COLUMNS, TrafficSuite, audio_facts
from serving.traffic import (
    TRAFFIC_SCHEMA,
    AudioRef,
    BatchInfo,
    StoredAudio,
    list_batches,
    read_batch_frame,
)
from voiceloop.settings import IngestSettings, Settings

__all__ = [
    "BatchOutcome",
    "IngestReport",
    "Ledger",
    "curated_columns",
    "curated_root",
    "curated_schema",
    "ingest",
    "quarantine_schema",
]

log = logging.getLogger(__name__)

_TRAFFIC = "traffic"
_QUARANTINE = "quarantine"
_FEEDBACK = "feedback"
_REPORTS = "reports"
_LEDGER = "ledger.jsonl"
_LOCK_FILE = ".ingest.lock"
_TMP = ".tmp"
_DVC_FILE = f"{_TRAFFIC}.dvc"
_DVC_REMOTE = "local"


def curated_root(settings: Settings) -> Path:
    """``<workspace>/curated``: the curated dataset, its quarantine, ledger and reports."""
    return settings.workspace / "curated"


# --------------------------------------------------------------------------------------
# Schemas


def curated_columns(dim: int) -> list[str]:
    """The curated dataset's columns, in order (``monitoring.schema``): identity, signal
    features, prediction features, categorical features, ``emb_0 … emb_{dim-1}``."""
    return [*IDENTITY_COLUMNS, *SIGNAL_FEATURES, *PREDICTION_FEATURES, *CATEGORICAL_FEATURES,
            *embedding_columns(dim)]


def curated_schema(dim: int) -> pa.Schema:
    """Arrow types of :func:`curated_columns`: ``timestamp`` UTC microseconds, ``slots`` a
    JSON string (as in the traffic store), features float64, ``clarify`` bool,
    embeddings float32; ``device_id`` and ``registry_version`` nullable."""
    types: dict[str, pa.DataType] = {name: pa.string() for name in IDENTITY_COLUMNS}
    types |= {"audio_offset": pa.int64(), "audio_bytes": pa.int64()}
    types["timestamp"] = pa.timestamp("us", tz="UTC")
    types |= {name: pa.float64() for name in (*SIGNAL_FEATURES, *PREDICTION_FEATURES)}
    types |= {"intent": pa.string(), "domain": pa.string(), "clarify": pa.bool_()}
    types |= {name: pa.float32() for name in embedding_columns(dim)}
    nullable = {"device_id", "registry_version"}
    return pa.schema([pa.field(n, types[n], nullable=n in nullable) for n in curated_columns(dim)])


def quarantine_schema() -> pa.Schema:
    """Quarantine rows: the traffic columns (all nullable: a poison batch may have no
    readable row), the audio facts, ``batch_id``, ``rows`` (source rows a line stands
    for: 1, or the marker's record count for an unreadable batch), ``reasons`` and
    ``source`` (the batch's Parquet file, relative to the traffic store)."""
    facts: list[pa.Field] = []
    for name in AUDIO_FACT_COLUMNS:
        kind = (pa.bool_() if name in ("audio_decodes", "audio_finite")
                else pa.string() if name == "audio_error"
                else pa.int64() if name in ("audio_sample_rate", "audio_samples")
                else pa.float64())
        facts.append(pa.field(name, kind))
    return pa.schema([
        pa.field("batch_id", pa.string(), nullable=False),
        *[pa.field(f.name, f.type) for f in TRAFFIC_SCHEMA],
        *facts,
        pa.field("rows", pa.int64(), nullable=False),
        pa.field("reasons", pa.list_(pa.string()), nullable=False),
        pa.field("source", pa.string()),
    ])


def _feedback_schema() -> pa.Schema:
    return pa.schema([pa.field("batch_id", pa.string(), nullable=False),
                      *[pa.field(f.name, f.type) for f in TRAFFIC_SCHEMA]])


# --------------------------------------------------------------------------------------
# Reports


class BatchOutcome(BaseModel):
    """What happened to one batch (see the module docstring for the count equations).

    Attributes:
        batch_id, dt, hour: the batch and its partition.
        status: ``ingested`` or ``poison`` (quarantined whole).
        records, requests, feedback, accepted, quarantined: row counts.
        attempts: tries it took (> 1 after transient errors).
        error: why a poison batch was quarantined, else None.
        failed_checks: failing rows per suite check.
        outputs: written files, relative to the curated root (None: not written).
        seconds: wall time for the batch.
        phase_seconds: where it went (last try) — ``read`` (the rows, the audio and its
            facts), ``validate`` (the GX suite), ``embed`` (the encoder) and ``write``
            (the Parquet outputs). Empty for a poison batch.
    """

    batch_id: str
    dt: str
    hour: int
    status: Literal["ingested", "poison"]
    records: int = Field(ge=0)
    requests: int = Field(ge=0)
    feedback: int = Field(ge=0)
    accepted: int = Field(ge=0)
    quarantined: int = Field(ge=0)
    attempts: int = Field(1, ge=1)
    error: str | None = None
    failed_checks: dict[str, int] = {}
    outputs: dict[str, str | None] = {}
    seconds: float = 0.0
    phase_seconds: dict[str, float] = {}

    def balanced(self) -> bool:
        return (self.records == self.requests + self.feedback
                and self.requests == self.accepted + self.quarantined)


class IngestReport(BaseModel):
    """One ingestion run.

    Attributes:
        run_id: unique id of the run (also in its ledger lines).
        started, finished: UTC times; ``seconds`` between them.
        traffic_root, curated_root: where it read and wrote.
        embedding_model: the version of the model that embedded the rows.
        committed: committed batches in the store; ``skipped`` of them were in the
            ledger already; ``batches`` are the ones this run ingested.
        records, requests, feedback, accepted, quarantined, poison_batches: totals of
            ``batches``.
        data_version: the DVC hash of ``curated/traffic`` (``<md5>.dir``) after this run,
            or the last recorded one when this run added nothing; None when never
            versioned. ``data_version_changed``: this run produced a new one.
        dvc_error: why versioning failed (it is retried by the next run), else None.
        report_path: where this report was written.
    """

    run_id: str
    started: datetime
    finished: datetime | None = None
    seconds: float = 0.0
    traffic_root: str
    curated_root: str
    embedding_model: str
    committed: int = 0
    skipped: int = 0
    batches: list[BatchOutcome] = []
    records: int = 0
    requests: int = 0
    feedback: int = 0
    accepted: int = 0
    quarantined: int = 0
    poison_batches: int = 0
    data_version: str | None = None
    data_version_changed: bool = False
    dvc_file: str | None = None
    dvc_error: str | None = None
    report_path: str | None = None

    def balanced(self) -> bool:
        """Every batch balances, the totals are their sums, and the totals balance."""
        sums = {k: sum(getattr(b, k) for b in self.batches)
                for k in ("records", "requests", "feedback", "accepted", "quarantined")}
        return (all(b.balanced() for b in self.batches)
                and all(getattr(self, k) == v for k, v in sums.items())
                and self.records == self.requests + self.feedback
                and self.requests == self.accepted + self.quarantined)


# --------------------------------------------------------------------------------------
# The ledger


class Ledger:
    """The append-only JSON Lines ledger of ingested batches and data versions.

    Args:
        path: the ledger file (created on the first append).
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def entries(self) -> list[dict[str, Any]]:
        """Every complete entry, in order. A line that is not a JSON object (a torn
        last line after a crash) is skipped with a warning."""
        if not self.path.exists():
            return []
        out: list[dict[str, Any]] = []
        with self.path.open(encoding="utf-8") as fh:
            for number, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    log.warning("ledger %s line %d is not JSON (torn write?): ignored",
                                self.path, number)
                    continue
                if isinstance(entry, dict):
                    out.append(entry)
        return out

    def batches(self) -> dict[str, dict[str, Any]]:
        """Batch id → its (last) batch entry."""
        return {e["batch_id"]: e for e in self.entries() if e.get("type") == "batch"}

    def last_version(self) -> dict[str, Any] | None:
        versions = [e for e in self.entries() if e.get("type") == "data_version"]
        return versions[-1] if versions else None

    def unversioned(self) -> list[str]:
        """Batch ids recorded after the last data version (to be versioned)."""
        pending: list[str] = []
        for entry in self.entries():
            if entry.get("type") == "data_version":
                pending = []
            elif entry.get("type") == "batch":
                pending.append(str(entry["batch_id"]))
        return pending

    def append(self, entry: Mapping[str, Any]) -> None:
        """Append one entry durably: one write of one line, flushed and fsynced. A
        torn previous line is first closed with a newline so it stays alone."""
        line = json.dumps(entry, ensure_ascii=False, sort_keys=True, default=str) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a+b") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell() > 0:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    line = "\n" + line
            fh.write(line.encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())


# --------------------------------------------------------------------------------------
# Files


def _write_parquet(root: Path, rel: str, table: pa.Table) -> None:
    """Write ``table`` to ``root/rel`` atomically: a temporary file outside the
    DVC-tracked folders, renamed into place (same filesystem)."""
    with atomic_path(root / rel, tmp_dir=root / _TMP) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def _remove(root: Path, rel: str) -> None:
    (root / rel).unlink(missing_ok=True)


def _outputs(info: BatchInfo) -> dict[str, str]:
    part = f"dt={info.dt}/hour={info.hour:02d}"
    return {
        _TRAFFIC: f"{_TRAFFIC}/{part}/{info.batch_id}.parquet",
        _QUARANTINE: f"{_QUARANTINE}/{info.batch_id}.parquet",
        _FEEDBACK: f"{_FEEDBACK}/{part}/{info.batch_id}.parquet",
    }


@contextlib.contextmanager
def _exclusive(root: Path, wait_s: float = 0.0) -> Iterator[None]:
    """One ingestion at a time per curated folder (two would race on the ledger). A run
    that finds another one running waits for it, up to ``wait_s`` seconds — a scheduled
    run and one started by hand (or by a flow) often meet — and then does what is left."""
    root.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    waited = False
    with (root / _LOCK_FILE).open("w") as fh:
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"another ingestion holds {root / _LOCK_FILE} (waited "
                                       f"{wait_s:g} s: monitoring.ingest.lock_wait_s)") from exc
                if not waited:
                    log.info("ingest: another ingestion is running on %s; waiting up to %g s",
                             root, wait_s)
                    waited = True
                time.sleep(0.25)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------
# One batch


def _read_audio(store: StoredAudio, row: Mapping[str, Any]) -> tuple[np.ndarray | None, int, str]:
    """The stored audio of one request row: ``(samples or None, rate, error)``.

    A missing or undecodable file is the row's problem (returned as ``error``); any other
    ``OSError`` is the store's and propagates, so that the batch is retried.
    """
    path = row.get("audio")
    if not isinstance(path, str) or not path:
        return None, -1, "no audio stored"
    try:
        samples, rate = store.read(AudioRef.of(row))
    except FileNotFoundError:
        return None, -1, f"audio file missing: {path}"
    except (sf.SoundFileError, RuntimeError, ValueError) as exc:
        return None, -1, f"{type(exc).__name__}: {exc}"
    if samples.ndim == 2:
        samples = samples.mean(axis=1)  # the writer stores mono; be lenient on input
    return np.ascontiguousarray(samples, dtype=np.float32), rate, ""


def _table(frame: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)


class _BatchIngestor:
    """Reads, validates and featurises batches of one run (shared suite, model, values)."""

    def __init__(self, traffic_root: str, curated: Path, settings: IngestSettings,
                 predictor: BatchPredictor, values: Mapping[str, Any]) -> None:
        self.traffic_root = traffic_root
        self.audio = StoredAudio(traffic_root)
        self.curated = curated
        self.settings = settings
        self.predictor = predictor
        self.values = values
        self.suite = TrafficSuite(settings)
        self.dim = predictor.embedding_dim
        self.version = predictor.version

    # -- a successful batch -----------------------------------------------------------

    def process(self, info: BatchInfo, seen: Mapping[str, str]) -> tuple[BatchOutcome, set[str]]:
        """Ingest one batch; returns its outcome and the request ids it brought."""
        start = time.monotonic()
        frame = read_batch_frame(self.traffic_root, info)
        is_feedback = (frame["kind"] == "feedback").to_numpy()
        feedback = frame[is_feedback].reset_index(drop=True)
        requests = frame[~is_feedback].reset_index(drop=True)

        waves: list[np.ndarray | None] = []
        facts: list[dict[str, Any]] = []
        for row in requests.to_dict("records"):
            samples, rate, error = _read_audio(self.audio, row)
            waves.append(samples)
            transcript = row.get("transcript") if isinstance(row.get("transcript"), str) else ""
            facts.append(audio_facts(samples, rate, error, transcript))
        joined = pd.concat(
            [requests, pd.DataFrame(facts, columns=list(AUDIO_FACT_COLUMNS))], axis=1)
        phases = {"read": time.monotonic() - start}

        start = time.monotonic()
        validation = self.suite.validate(joined, seen)
        reasons = [list(r) for r in validation.reasons]
        phases["validate"] = time.monotonic() - start

        start = time.monotonic()
        accepted = [i for i, ok in enumerate(validation.passed) if ok]
        if accepted:
            emb = self.predictor.embed_waveforms(
                [waves[i] for i in accepted],  # type: ignore[misc] - decoded when accepted
                [int(joined.at[i, "audio_sample_rate"]) for i in accepted])
            usable = np.isfinite(emb).all(axis=1)
            for j in np.flatnonzero(~usable):
                reasons[accepted[j]].append(
                    f"model {self.version} cannot embed the audio (too short or unusable)")
            emb = emb[usable]
            accepted = [i for i, ok in zip(accepted, usable, strict=True) if ok]
        else:
            emb = np.zeros((0, self.dim), dtype=np.float32)
        rejected = [i for i in range(len(joined)) if reasons[i]]
        phases["embed"] = time.monotonic() - start

        start = time.monotonic()
        paths = _outputs(info)
        written: dict[str, str | None] = {}
        tables = {
            _TRAFFIC: self._curated(joined.iloc[accepted].reset_index(drop=True), emb, info)
            if accepted else None,
            _QUARANTINE: self._quarantine(joined.iloc[rejected].reset_index(drop=True),
                                          [reasons[i] for i in rejected], info)
            if rejected else None,
            _FEEDBACK: _table(feedback.assign(batch_id=info.batch_id), _feedback_schema())
            if len(feedback) else None,
        }
        for kind, table in tables.items():
            if table is None:
                _remove(self.curated, paths[kind])  # a crashed earlier try may have left one
                written[kind] = None
            else:
                _write_parquet(self.curated, paths[kind], table)
                written[kind] = paths[kind]
        ids = {str(r) for r in requests["request_id"] if isinstance(r, str) and r}
        phases["write"] = time.monotonic() - start
        outcome = BatchOutcome(
            batch_id=info.batch_id, dt=info.dt, hour=info.hour, status="ingested",
            records=len(frame), requests=len(requests), feedback=len(feedback),
            accepted=len(accepted), quarantined=len(rejected),
            failed_checks=validation.failed_checks, outputs=written,
            phase_seconds={k: round(v, 4) for k, v in phases.items()},
        )
        return outcome, ids

    def _curated(self, rows: pd.DataFrame, emb: np.ndarray, info: BatchInfo) -> pa.Table:
        """Accepted rows ``(A, …)`` and their embeddings ``(A, D)`` → the curated table."""
        out = pd.DataFrame({name: rows[name] for name in IDENTITY_COLUMNS
                            if name in rows.columns})
        out["batch_id"] = info.batch_id
        out["embedding_model"] = self.version
        for name in SIGNAL_FEATURES:
            # Measured from the stored audio (the service's logged duration_s may differ
            # by its own decoding; the stored file is what the features describe).
            out[name] = rows[f"audio_{name}"].astype("float64")
        for name in PREDICTION_FEATURES:
            out[name] = rows[name].astype("float64")
        out["intent"] = rows["intent"]
        out["domain"] = [
            predicted_domain(intent, json.loads(slots) if slots else [], self.values)
            for intent, slots in zip(rows["intent"], rows["slots"], strict=True)
        ]
        out["clarify"] = rows["clarify"].astype(bool)
        emb_frame = pd.DataFrame(emb.astype(np.float32), columns=embedding_columns(self.dim))
        out = pd.concat([out.reset_index(drop=True), emb_frame], axis=1)
        return _table(out, curated_schema(self.dim))

    def _quarantine(self, rows: pd.DataFrame, reasons: list[list[str]],
                    info: BatchInfo) -> pa.Table:
        out = rows.copy()
        out["batch_id"] = info.batch_id
        out["rows"] = 1
        out["reasons"] = reasons
        out["source"] = info.path
        return _table(out, quarantine_schema())

    # -- a poison batch ---------------------------------------------------------------

    def poison(self, info: BatchInfo, error: str) -> tuple[BatchOutcome, set[str]]:
        """Quarantine the whole batch with ``error`` and remove any other output of it."""
        reason = f"poison batch: {error}"
        schema = quarantine_schema()
        table: pa.Table
        extra = {"batch_id": info.batch_id, "rows": 1, "reasons": [reason], "source": info.path}
        try:
            frame = read_batch_frame(self.traffic_root, info)
            # Rows as read, audio facts null (from_pylist: a missing key is a null).
            table = pa.Table.from_pylist(
                [row | extra for row in frame.to_dict("records")], schema=schema)
            records = len(frame)
            ids = {str(r) for r in frame["request_id"] if isinstance(r, str) and r}
        except Exception:  # noqa: BLE001 - unreadable (or unfit rows) is the case handled here
            # One line stands for the marker's record count: the rows cannot be read.
            table = pa.Table.from_pylist([extra | {"rows": info.records}], schema=schema)
            records = info.records
            ids = set()
        paths = _outputs(info)
        _remove(self.curated, paths[_TRAFFIC])
        _remove(self.curated, paths[_FEEDBACK])
        _write_parquet(self.curated, paths[_QUARANTINE], table)
        outcome = BatchOutcome(
            batch_id=info.batch_id, dt=info.dt, hour=info.hour, status="poison",
            records=records, requests=records, feedback=0, accepted=0, quarantined=records,
            error=error, outputs={_TRAFFIC: None, _QUARANTINE: paths[_QUARANTINE],
                                  _FEEDBACK: None},
        )
        return outcome, ids


def _seen_request_ids(curated: Path, ledger: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Request id → batch id, from the outputs of batches the ledger records (never from
    outputs of a batch without a ledger line: that batch is about to be redone)."""
    seen: dict[str, str] = {}
    for batch_id, entry in sorted(ledger.items()):
        for kind in (_TRAFFIC, _QUARANTINE):
            rel = (entry.get("outputs") or {}).get(kind)
            if not rel:
                continue
            path = curated / rel
            if not path.exists():
                log.warning("ledger names %s for batch %s but it is gone", rel, batch_id)
                continue
            for rid in pq.read_table(path, columns=["request_id"]).column(0).to_pylist():
                if rid:
                    seen.setdefault(rid, batch_id)
    return seen


# --------------------------------------------------------------------------------------
# DVC


def _version_with_dvc(curated: Path, workspace: Path) -> str:
    """``dvc add curated/traffic`` + ``dvc push`` in the DVC repository rooted at
    ``curated`` (created with ``no_scm`` when absent); returns the directory hash.

    Cache and remote are written as absolute paths on every call, so a moved workspace
    points at its own cache again on the next run.
    """
    from dvc.repo import Repo  # DVC costs ~0.7 s to import: only when versioning

    if not (curated / Repo.DVC_DIR).is_dir():
        Repo.init(root_dir=str(curated), no_scm=True).close()
    cache, remote = str(workspace / "dvc-cache"), str(workspace / "dvc-remote")
    with Repo(str(curated)) as repo:
        conf = repo.config.read("repo")
        current = (conf.get("cache", {}).get("dir"),
                   conf.get("remote", {}).get(_DVC_REMOTE, {}).get("url"),
                   conf.get("core", {}).get("remote"))
        if current != (cache, remote, _DVC_REMOTE):
            with repo.config.edit("repo") as edit:
                edit["core"]["analytics"] = False
                edit["core"]["remote"] = _DVC_REMOTE
                edit["cache"]["dir"] = cache
                edit["remote"][_DVC_REMOTE] = {"url": remote}
    (curated / _TRAFFIC).mkdir(parents=True, exist_ok=True)
    with Repo(str(curated)) as repo:  # reopened: the cache follows the config read at open
        repo.add([str(curated / _TRAFFIC)])
        repo.push()
    meta = yaml.safe_load((curated / _DVC_FILE).read_text(encoding="utf-8"))
    return str(meta["outs"][0]["md5"])


# --------------------------------------------------------------------------------------
# The run


def _utcnow() -> datetime:
    return datetime.now(UTC)


def ingest(
    settings: Settings,
    model: BatchPredictor | Path | str,
    progress: bool = False,
    *,
    traffic_root: str | None = None,
    clock: Callable[[], datetime] = _utcnow,
) -> IngestReport:
    """Ingest every committed traffic batch the ledger does not hold yet.

    Args:
        settings: parsed params (workspace, traffic store, ``monitoring.ingest``,
            ``corpus.language`` for the device-name lists of ``domain``).
        model: the predictor whose encoder embeds the rows, or a model folder for
            :func:`model.inference.onnx.load_predictor` (the production model's, so that
            embeddings compare with its drift reference).
        progress: show a tqdm bar over batches (a log line per batch is always written).
        traffic_root: the traffic store (default ``settings.traffic_root``).
        clock: UTC now (tests).

    Returns:
        The run's report, also written to ``<curated>/reports/ingest-<time>.json``.

    Raises:
        RuntimeError: another ingestion kept the same curated folder for longer than
            ``monitoring.ingest.lock_wait_s``.
        OSError: the ledger could not be written (the run stops; a rerun redoes the
            batch whose line is missing).
    """
    cfg = settings.monitoring.ingest
    root = traffic_root or settings.traffic_root
    curated = curated_root(settings)
    predictor = (model if isinstance(model, BatchPredictor)
                 else load_predictor(Path(model), batch_size=cfg.embed_batch_size, use_lm=False))
    started = clock()
    report = IngestReport(
        run_id=f"{started:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}", started=started,
        traffic_root=str(root), curated_root=str(curated), embedding_model=predictor.version,
    )
    t0 = time.monotonic()
    with _exclusive(curated, cfg.lock_wait_s):
        ledger = Ledger(curated / _LEDGER)
        done = ledger.batches()
        committed = list_batches(root)
        pending = [b for b in committed if b.batch_id not in done]
        report.committed, report.skipped = len(committed), len(committed) - len(pending)
        log.info("ingest: %d committed batches, %d already ingested, %d to do",
                 len(committed), report.skipped, len(pending))
        seen = _seen_request_ids(curated, done)
        worker = _BatchIngestor(str(root), curated, cfg, predictor,
                                load_values(settings.corpus.language))
        for info in tqdm(pending, desc="ingest", unit="batch", disable=not progress):
            outcome, ids = _ingest_one(worker, info, seen, cfg)
            # The ledger line comes last: until it exists the batch is not done.
            ledger.append({"type": "batch", **outcome.model_dump(
                include={"batch_id", "dt", "hour", "status", "records", "requests",
                         "feedback", "accepted", "quarantined", "outputs", "error"}),
                "embedding_model": predictor.version, "run_id": report.run_id,
                "at": clock().isoformat()})
            for rid in ids:
                seen.setdefault(rid, info.batch_id)
            report.batches.append(outcome)
            log.info("ingest %s: %s, %d records = %d accepted + %d quarantined + %d "
                     "feedback (%.2f s)", info.batch_id, outcome.status, outcome.records,
                     outcome.accepted, outcome.quarantined, outcome.feedback, outcome.seconds)
        for key in ("records", "requests", "feedback", "accepted", "quarantined"):
            setattr(report, key, sum(getattr(b, key) for b in report.batches))
        report.poison_batches = sum(b.status == "poison" for b in report.batches)

        last = ledger.last_version()
        report.data_version = last["data_version"] if last else None
        report.dvc_file = str(curated / _DVC_FILE) if last else None
        unversioned = ledger.unversioned()
        if cfg.dvc and unversioned:
            try:
                version = _version_with_dvc(curated, settings.workspace)
            except Exception as exc:  # any DVC failure: retried by the next run
                log.exception("ingest: DVC versioning failed; the next run retries it")
                report.dvc_error = f"{type(exc).__name__}: {exc}"
            else:
                ledger.append({"type": "data_version", "data_version": version,
                               "dvc_file": _DVC_FILE, "batches": unversioned,
                               "run_id": report.run_id, "at": clock().isoformat()})
                report.data_version_changed = version != report.data_version
                report.data_version = version
                report.dvc_file = str(curated / _DVC_FILE)
                log.info("ingest: curated/traffic is data version %s", version)

        report.finished = clock()
        report.seconds = round(time.monotonic() - t0, 3)
        path = curated / _REPORTS / f"ingest-{report.finished:%Y%m%dT%H%M%S%fZ}.json"
        report.report_path = str(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(report.model_dump_json(indent=1), encoding="utf-8")
    if not report.balanced():  # a bug, not bad data: say so loudly
        raise RuntimeError(f"ingest counts do not balance: {report.model_dump_json()}")
    return report


def _ingest_one(
    worker: _BatchIngestor, info: BatchInfo, seen: Mapping[str, str], cfg: IngestSettings
) -> tuple[BatchOutcome, set[str]]:
    """One batch with retries of transient errors; anything else makes it poison."""
    start = time.monotonic()
    attempts = 0
    while True:
        attempts += 1
        try:
            outcome, ids = worker.process(info, seen)
            break
        except OSError as exc:
            if attempts <= cfg.retries:
                delay = cfg.retry_backoff_s * 2 ** (attempts - 1)
                log.warning("ingest %s: %s (attempt %d of %d), retrying in %.1f s",
                            info.batch_id, exc, attempts, cfg.retries + 1, delay)
                time.sleep(delay)
                continue
            error = f"{type(exc).__name__} after {attempts} attempts: {exc}"
        except Exception as exc:  # noqa: BLE001 - a poison batch must not stop the run
            error = f"{type(exc).__name__}: {exc}"
        log.error("ingest %s: quarantined whole: %s", info.batch_id, error)
        outcome, ids = worker.poison(info, error)
        break
    outcome.attempts = attempts
    outcome.seconds = round(time.monotonic() - start, 3)
    return outcome, ids
