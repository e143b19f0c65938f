"""The production-traffic store: a bounded background writer and the readers of what it
wrote.

The service submits one :class:`~serving.contracts.TrafficRecord` per request (and per
feedback call), optionally with the decoded audio; a background thread groups records
into batches and commits them. The ingestion flow lists committed batches and reads them
back as records or as a pandas DataFrame.

Layout under the store root (a local folder or any fsspec URL: ``memory://…``,
``s3://bucket/traffic``; only fsspec calls are used, so object storage works unchanged)::

    audio/dt=YYYY-MM-DD/hour=HH/<batch_id>.tar               the batch's audio: an uncompressed
                                                             tar of <request_id>.wav files, mono
                                                             16-bit PCM (``audio_format``: or
                                                             .flac at level 0)
    batches/dt=YYYY-MM-DD/hour=HH/<batch_id>.parquet         one row per TrafficRecord
    batches/dt=YYYY-MM-DD/hour=HH/<batch_id>.commit.json     the commit marker

- Partitions are the record's ``timestamp`` in UTC (a naive timestamp is taken as UTC).
  A flush whose records span an hour boundary commits one batch per partition, each with
  its own ``batch_id``; a batch is therefore one Parquet file in one partition.
- ``batch_id`` is ``YYYYmmddTHHMMSS-<8 hex>`` (the time the batch's first audio file was
  written, or its commit time if it has no audio, UTC, plus randomness), so ids sort by
  start second. Within one second, and across several writers (service replicas), the
  order is arbitrary: an ingestion flow must remember the *set* of batch ids it
  processed, not a high-water mark.
- Audio shards: one file per batch and partition, not one per request. Creating a file is
  the expensive part of a small write (measured on this project's 2-core VM: ~0.1–1 ms of
  CPU per create, ~0.05 ms to append the same 96 KB to an open file), and on object
  storage each file is a PUT. The shard is a standard tar (``tar -tf``, Python's
  ``tarfile`` and WebDataset-style loaders read it); a record's ``audio`` names the
  shard and ``audio_offset`` / ``audio_bytes`` locate its file inside, so one request's
  audio is one ranged read (:class:`StoredAudio`). Records written before shards have
  ``audio_bytes == 0``: ``audio`` is then a file of its own, and readers still read it.
- Commit protocol: the batch's audio is appended to its shard as the writer thread takes
  each record off the queue; at commit the shard is closed (or, after a failed append,
  written again whole under the same name); then the Parquet file is
  written as ``<batch_id>.parquet.tmp-<uuid>`` and renamed to ``<batch_id>.parquet``;
  last the marker is written (also through a temporary name and a rename). Readers see a
  batch only once its marker exists, so a crash at any step leaves nothing half-visible:
  :func:`uncommitted` lists the leftovers for a janitor (a shard without a marker among
  them).
- Marker (JSON): ``batch_id``, ``dt``, ``hour``, ``records``, ``request_ids`` (distinct
  request ids), ``created`` (ISO 8601 UTC), ``file`` (path relative to the root),
  ``bytes``, ``schema`` (:data:`SCHEMA_VERSION`).

Parquet schema (:data:`TRAFFIC_SCHEMA`): one column per ``TrafficRecord`` field.
``timestamp`` is ``timestamp[us, tz=UTC]`` (pandas: ``datetime64[us, UTC]``); ``slots`` is
a JSON string (``[{"type": "area", "value": "kitchen"}]``) because a flat string column is
what pandas, Great Expectations and Evidently handle without special cases (a
``list<struct>`` column arrives in pandas as arrays of dicts that they cannot compare or
hash); ``confidence``, ``latency_ms``, ``duration_s`` are float64; ``sample_rate`` int32;
``clarify`` bool; every other column is a string (nullable where the record's field is
optional).

Writer accounting (:class:`TrafficStats`), true at every snapshot::

    submitted = sampled_out + dropped + logged + failed + queue_depth

``submitted`` counts valid :meth:`TrafficWriter.submit` calls; ``sampled_out`` those the
``sample`` fraction skipped; ``dropped`` those refused because ``queue_max`` records were
waiting (or the writer was closed); ``logged`` records in committed batches; ``failed``
records whose batch could not be written twice in a row; ``queue_depth`` records accepted
but not yet committed or failed (queued or in the batch being written).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import struct
import tarfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf
from fsspec.spec import AbstractBufferedFile

from serving.contracts import TrafficRecord
from voiceloop.settings import TrafficSettings

__all__ = [
    "SCHEMA_VERSION",
    "TRAFFIC_SCHEMA",
    "AudioRef",
    "BatchInfo",
    "StoredAudio",
    "TrafficStats",
    "TrafficWriter",
    "extract_audio",
    "list_batches",
    "pcm16",
    "read_audio",
    "read_batch",
    "read_batch_frame",
    "uncommitted",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION = "traffic-v2"  # v2: audio shards (audio_offset, audio_bytes)

TRAFFIC_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("timestamp", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("device_id", pa.string()),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("route", pa.string()),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("registry_version", pa.string()),
        pa.field("transcript", pa.string(), nullable=False),
        pa.field("intent", pa.string(), nullable=False),
        pa.field("slots", pa.string(), nullable=False),
        pa.field("confidence", pa.float64(), nullable=False),
        pa.field("clarify", pa.bool_(), nullable=False),
        pa.field("latency_ms", pa.float64(), nullable=False),
        pa.field("duration_s", pa.float64(), nullable=False),
        pa.field("sample_rate", pa.int32(), nullable=False),
        pa.field("audio_format", pa.string(), nullable=False),
        pa.field("audio", pa.string(), nullable=False),
        pa.field("audio_offset", pa.int64(), nullable=False),
        pa.field("audio_bytes", pa.int64(), nullable=False),
        pa.field("feedback_kind", pa.string()),
        pa.field("feedback_text", pa.string()),
    ],
    metadata={"voiceloop.schema": SCHEMA_VERSION},
)

_BATCHES = "batches"
_AUDIO = "audio"
_PARQUET = ".parquet"
_MARKER = ".commit.json"
_TMP = ".tmp-"
_SHARD = ".tar"
_TAR_BLOCK = 512
# FLAC's format limit; soundfile fails on anything outside it, which would fail the whole
# batch in the writer thread, so submit() rejects it up front.
_MAX_SAMPLE_RATE = 655_350
# While a batch is open, the writer thread wakes when this many records wait or every
# _WAKE_S seconds, not on every submit (an idle writer sleeps until the next submit):
# each wake-up is a futex wake and a thread switch (on a VM an inter-processor
# interrupt), which cost the service more CPU per request than the append of the
# record's audio itself.
_WAKE_RECORDS = 8
_WAKE_S = 0.05
# Request ids become file names: keep them to characters every object store accepts.
_SAFE_ID = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _as_utc(ts: datetime) -> datetime:
    # The contract says timestamps are UTC; a naive one is taken at its word.
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def _partition(ts: datetime) -> tuple[str, int]:
    ts = _as_utc(ts)
    return ts.strftime("%Y-%m-%d"), ts.hour


def _partition_dir(kind: str, dt: str, hour: int) -> str:
    return f"{kind}/dt={dt}/hour={hour:02d}"


def _keep(request_id: str, sample: float) -> bool:
    """Whether ``request_id`` falls inside the ``sample`` fraction.

    A stable hash (not Python's per-process salted ``hash``) so that every replica and
    every restart keeps the same requests, and a request and its feedback agree.
    """
    if sample >= 1.0:
        return True
    if sample <= 0.0:
        return False
    digest = hashlib.blake2b(request_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < sample


def pcm16(audio: np.ndarray) -> np.ndarray:
    """Mono audio as int16 PCM (float input: full scale ±1.0, clipped, rounded), as
    :meth:`TrafficWriter.submit` stores it.

    :meth:`TrafficWriter.submit` quantises float audio itself, so the queue holds 2 bytes
    a sample instead of 4–8 and the caller may reuse its buffer as soon as submit returns;
    a caller with spare threads (the service's inference threads) can call this first and
    submit the int16 array, keeping the work off its own hot thread. Float32 input is
    computed in float32: scaling by 2**15 is exact there, so the result is the same as in
    float64.
    """
    arr = np.asarray(audio)
    if arr.ndim != 1:
        raise ValueError(f"audio must be mono, shape (samples,), got shape {arr.shape}")
    if arr.dtype == np.int16:
        return arr.copy()
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"audio must be float (±1.0 full scale) or int16, got {arr.dtype}")
    if arr.dtype != np.float32:
        arr = arr.astype(np.float64)
    # NaN/inf would turn into arbitrary integers; silence is the honest stand-in.
    arr = np.nan_to_num(arr, nan=0.0, posinf=1.0, neginf=-1.0)
    # x 32768 to match soundfile/libsndfile, which reads 16-bit PCM back as int / 32768.
    # (In float32 a huge finite sample overflows to inf here; the clip maps it to 32767,
    # as float64 would.)
    with np.errstate(over="ignore"):
        scaled = arr * arr.dtype.type(32768.0)
    return np.clip(np.round(scaled), -32768, 32767).astype(np.int16)


def _audio_bytes(pcm: np.ndarray, sample_rate: int, audio_format: str) -> bytes:
    """``pcm`` (int16 ``(N,)``) as a ``wav`` or ``flac`` file."""
    if audio_format == "flac":
        # Compression level 0 (libsndfile's default is 0.5): lossless all the same, ~3 %
        # larger on speech, ~25 % less CPU; the writer shares the cores with inference.
        buf = io.BytesIO()
        sf.write(buf, pcm, sample_rate, format="FLAC", subtype="PCM_16", compression_level=0.0)
        return buf.getvalue()
    # The canonical 44-byte RIFF header by hand: a tenth of libsndfile's cost per file,
    # and the writer shares the GIL with the request path.
    data = pcm.astype("<i2", copy=False).tobytes()
    header = struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + len(data), b"WAVE", b"fmt ", 16,
                         1, 1, sample_rate, sample_rate * 2, 2, 16, b"data", len(data))
    return header + data


def _table(records: Iterable[TrafficRecord]) -> pa.Table:
    """Records → an Arrow table with :data:`TRAFFIC_SCHEMA` (slots as a JSON string)."""
    columns: dict[str, list[Any]] = {name: [] for name in TRAFFIC_SCHEMA.names}
    for rec in records:
        row = rec.model_dump(mode="python")
        row["timestamp"] = _as_utc(rec.timestamp)
        row["slots"] = json.dumps(row["slots"], ensure_ascii=False, separators=(",", ":"))
        for name in TRAFFIC_SCHEMA.names:
            columns[name].append(row[name])
    return pa.table(columns, schema=TRAFFIC_SCHEMA)


def _parquet_bytes(table: pa.Table, batch_id: str) -> bytes:
    # Encoded in memory: the marker needs the size, and one write call is one PUT on
    # object storage.
    table = table.replace_schema_metadata(
        {**(table.schema.metadata or {}), b"voiceloop.batch_id": batch_id.encode()}
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


class _Store:
    """An fsspec filesystem plus the store's root path on it."""

    def __init__(self, root: str) -> None:
        if not isinstance(root, str) or not root.strip():
            raise ValueError(f"traffic store root must be a non-empty path or URL, got {root!r}")
        self.fs, base = fsspec.core.url_to_fs(root)
        self.base = base.rstrip("/") or base

    def path(self, rel: str) -> str:
        return f"{self.base}/{rel}"

    def rel(self, path: str) -> str:
        prefix = self.base.rstrip("/") + "/"
        return path.removeprefix(prefix)

    def write_atomic(self, rel: str, data: bytes) -> None:
        """Write ``data`` to a temporary sibling of ``rel``, then rename it into place:
        a crash never leaves a truncated file under the final name."""
        final = self.path(rel)
        tmp = f"{final}{_TMP}{uuid.uuid4().hex}"
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
        try:
            self.fs.mv(tmp, final)
        except Exception:
            self._discard(tmp)
            raise

    def makedirs(self, rel: str) -> None:
        self.fs.makedirs(self.path(rel), exist_ok=True)

    def glob(self, pattern: str) -> list[str]:
        return sorted(self.rel(p) for p in self.fs.glob(self.path(pattern)))

    def read(self, rel: str) -> bytes:
        with self.fs.open(self.path(rel), "rb") as f:
            return f.read()

    def _discard(self, path: str) -> None:
        try:
            if self.fs.exists(path):
                self.fs.rm(path)
        except Exception:  # best effort: uncommitted() still shows it
            log.warning("could not remove temporary file %s", path, exc_info=True)


class _AudioShard:
    """The audio files of one batch (one partition), appended to one uncompressed tar as
    the writer takes their records: a POSIX pax archive that ``tar`` and ``tarfile`` read.

    Members are ``<request_id>.<audio_format>``; :meth:`add` returns where a member's
    file starts, so a reader can fetch it with one ranged read without the tar index.
    """

    def __init__(self, store: _Store, rel: str, batch_id: str) -> None:
        self.rel = rel
        self.batch_id = batch_id
        self.broken = False  # an append failed: the commit writes the shard again, whole
        self.sealed = False  # closed, whole: a retry of the same commit keeps it
        self._size = 0
        self._file = store.fs.open(store.path(rel), "wb")

    def add(self, name: str, data: bytes) -> int:
        """Append ``data`` as the member ``name``; returns the offset of its first byte."""
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
        header = info.tobuf(format=tarfile.PAX_FORMAT)
        pad = -len(data) % _TAR_BLOCK
        self._file.write(header)
        self._file.write(data)
        if pad:
            self._file.write(b"\0" * pad)
        offset = self._size + len(header)
        self._size = offset + len(data) + pad
        return offset

    def close(self) -> None:
        """End the archive (two zero blocks, padded to tar's record size) and close it."""
        end = self._size + 2 * _TAR_BLOCK
        end += -end % tarfile.RECORDSIZE
        self._file.write(b"\0" * (end - self._size))
        self._file.close()
        self.sealed = True

    def discard(self) -> None:
        """Close without ending the archive (it is about to be written again, or left
        for :func:`uncommitted`); on object storage the pending upload is abandoned
        instead of completed."""
        try:
            if isinstance(self._file, AbstractBufferedFile):
                self._file.discard()  # e.g. s3: abort the multipart upload
                self._file.closed = True
            else:
                self._file.close()
        except Exception:  # best effort: the shard is not used
            log.warning("could not close audio shard %s", self.rel, exc_info=True)


@dataclass(frozen=True)
class AudioRef:
    """Where one request's stored audio is: ``path`` relative to the store root, and
    inside it ``size`` bytes from ``offset`` (``size == 0``: the whole file)."""

    path: str
    offset: int = 0
    size: int = 0

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("no stored audio path (audio='')")
        if self.offset < 0 or self.size < 0:
            raise ValueError(f"audio offset and size must be >= 0, got {self.offset}, {self.size}")

    @classmethod
    def of(cls, row: TrafficRecord | Mapping[str, Any]) -> AudioRef:
        """The reference in a record or a traffic/curated row (``audio``, ``audio_offset``,
        ``audio_bytes``; the last two may be missing in rows from before audio shards).

        Raises:
            ValueError: the row has no stored audio.
        """
        if isinstance(row, TrafficRecord):
            return cls(row.audio, row.audio_offset, row.audio_bytes)
        path = row.get("audio")

        def count(key: str) -> int:
            # Frames that join older rows with newer ones hold NaN where a column was missing.
            value = row.get(key)
            return 0 if value is None or pd.isna(value) else int(value)

        return cls(path if isinstance(path, str) else "", count("audio_offset"),
                   count("audio_bytes"))


@dataclass(frozen=True)
class TrafficStats:
    """A consistent snapshot of a writer's counters.

    ``submitted = sampled_out + dropped + logged + failed + queue_depth`` always holds.
    ``batches`` counts committed batch files; ``write_errors`` counts failed write
    attempts (a batch that fails and then succeeds on its retry adds one).
    """

    submitted: int
    sampled_out: int
    dropped: int
    logged: int
    failed: int
    batches: int
    queue_depth: int
    write_errors: int


@dataclass(frozen=True)
class BatchInfo:
    """One committed batch, as its marker describes it.

    ``path`` and ``marker`` are relative to the store root (so a listing stays valid when
    the store is copied or mounted elsewhere); ``dt`` is ``YYYY-MM-DD`` and ``hour`` 0–23,
    UTC.
    """

    batch_id: str
    dt: str
    hour: int
    path: str
    marker: str
    records: int
    created: datetime
    bytes: int


@dataclass
class _Item:
    record: TrafficRecord
    pcm: np.ndarray | None
    sample_rate: int
    enqueued_at: float
    # Set once the audio is in a shard; the samples stay until the batch commits, because
    # a shard whose append failed is written again, whole, at the commit.
    audio_rel: str | None = None
    audio_offset: int = 0
    audio_bytes: int = 0


class TrafficWriter:
    """Logs traffic records to the store from a background thread, off the request path.

    Args:
        root: the store root, a folder or an fsspec URL (``Settings.traffic_root``).
        settings: sampling, batching and queue bounds (``Settings.serving.traffic``).
        clock: returns the current time; names batches and dates their markers (tests
            pass a fixed clock). Batch timing uses the monotonic clock regardless.

    A batch commits when it holds ``settings.batch_max_records`` records or
    ``settings.batch_max_seconds`` after its first record was submitted, whichever comes
    first, and on :meth:`flush` / :meth:`close`. A batch whose write fails (disk full, a
    storage error) is logged, counted in ``write_errors`` and retried once under the same
    ``batch_id``; if the retry fails too its records are counted as ``failed`` and the
    thread carries on. The thread is a daemon: call :meth:`close` on shutdown or records
    still queued are lost.
    """

    def __init__(
        self,
        root: str,
        settings: TrafficSettings,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self._store = _Store(root)
        self._settings = settings
        self._clock = clock
        self._audio_dirs: set[str] = set()  # partition folders already made
        # The audio shard of each partition of the batch being gathered, open until its
        # commit seals it (writer thread only).
        self._shards: dict[tuple[str, int], _AudioShard] = {}
        self._cond = threading.Condition()
        self._queue: deque[_Item] = deque()
        self._in_flight = 0
        self._submitted = 0
        self._sampled_out = 0
        self._dropped = 0
        self._logged = 0
        self._failed = 0
        self._batches = 0
        self._write_errors = 0
        self._flush_waiters = 0
        self._idle = False  # the writer waits with no batch open: the next submit wakes it
        self._closing = False
        self._thread: threading.Thread | None = None

    @property
    def root(self) -> str:
        """The store root as the filesystem sees it (protocol stripped)."""
        return self._store.base

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Start the writer thread (a no-op when it is already running).

        Raises:
            RuntimeError: the writer was closed.
        """
        with self._cond:
            if self._closing:
                raise RuntimeError("traffic writer is closed")
            if self._thread is not None:
                return
            self._thread = threading.Thread(
                target=self._run, name="voiceloop-traffic-writer", daemon=True
            )
            self._thread.start()

    def submit(
        self,
        record: TrafficRecord,
        audio: np.ndarray | None = None,
        sample_rate: int | None = None,
    ) -> bool:
        """Queue one record (and its audio) for the store; thread-safe, never blocks.

        Args:
            record: the logged request; feedback records (``kind == "feedback"``) are
                always kept, requests only if their id falls in the ``sample`` fraction.
            audio: mono samples, shape ``(samples,)``, float (±1.0 full scale) or int16;
                stored as 16-bit PCM (``audio_format``) in the batch's audio shard, and
                ``record.audio`` / ``audio_offset`` / ``audio_bytes`` set to where. None or
                empty: no audio stored (``record.audio`` is kept as given).
            sample_rate: the audio's rate in Hz; defaults to ``record.sample_rate``.

        Returns:
            True if the record was queued; False if it was sampled out, dropped because
            ``queue_max`` records are waiting, or the writer is closed.

        Raises:
            TypeError: ``record`` is not a ``TrafficRecord``.
            ValueError: the audio is not mono float/int16, the sample rate is not a valid
                supported rate, or the request id is not usable as a file name.
        """
        if not isinstance(record, TrafficRecord):
            raise TypeError(f"record must be a TrafficRecord, got {type(record).__name__}")
        pcm: np.ndarray | None = None
        rate = 0
        if audio is not None and np.size(audio) > 0:
            rate = int(sample_rate if sample_rate is not None else record.sample_rate)
            if not 1 <= rate <= _MAX_SAMPLE_RATE:
                raise ValueError(f"sample_rate must be 1..{_MAX_SAMPLE_RATE} Hz, got {rate}")
            rid = record.request_id
            if not rid or rid.startswith(".") or not set(rid) <= _SAFE_ID:
                raise ValueError(f"request_id {rid!r} cannot name an audio file "
                                 "(letters, digits, '-', '_', '.' only)")
            pcm = pcm16(audio)
        keep = record.kind == "feedback" or _keep(record.request_id, self._settings.sample)
        with self._cond:
            self._submitted += 1
            if not keep:
                self._sampled_out += 1
                return False
            if self._closing or len(self._queue) + self._in_flight >= self._settings.queue_max:
                self._dropped += 1
                return False
            self._queue.append(_Item(record, pcm, rate, time.monotonic()))
            if self._idle or len(self._queue) == _WAKE_RECORDS:
                self._cond.notify_all()
            return True

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Commit everything submitted so far, without waiting for the batch triggers.

        Args:
            timeout: seconds to wait at most (None: no limit).

        Returns:
            True when every record accepted before the call is committed (or failed);
            False on timeout, or at once when the thread was never started.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            target = self._logged + self._failed + len(self._queue) + self._in_flight
            if self._thread is None or not self._thread.is_alive():
                return self._logged + self._failed >= target
            self._flush_waiters += 1
            self._cond.notify_all()
            try:
                while self._logged + self._failed < target:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return False
                    self._cond.wait(left)
                return True
            finally:
                self._flush_waiters -= 1

    def close(self, timeout: float | None = 30.0) -> bool:
        """Flush everything queued, then stop the thread; later calls do the same wait
        again and later submits are counted as dropped.

        A writer that was never started is started here if records are queued, so that
        nothing accepted is lost.

        Args:
            timeout: seconds to wait for the thread at most (None: no limit).

        Returns:
            True when the thread has stopped (everything queued was written or failed).
        """
        with self._cond:
            self._closing = True
            if self._thread is None:
                if not self._queue:
                    return True
                self._thread = threading.Thread(
                    target=self._run, name="voiceloop-traffic-writer", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()
            thread = self._thread
        thread.join(timeout)
        return not thread.is_alive()

    def stats(self) -> TrafficStats:
        """A consistent snapshot of the counters (see :class:`TrafficStats`)."""
        with self._cond:
            return TrafficStats(
                submitted=self._submitted,
                sampled_out=self._sampled_out,
                dropped=self._dropped,
                logged=self._logged,
                failed=self._failed,
                batches=self._batches,
                queue_depth=len(self._queue) + self._in_flight,
                write_errors=self._write_errors,
            )

    # -- the writer thread ------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                self._write_batch(batch)
        except BaseException:
            # Only a bug gets here (write errors are caught per batch); say so loudly.
            # Submits keep queueing until queue_max and then count drops, so the
            # accounting still balances.
            log.exception("traffic writer thread died")
            raise

    def _next_batch(self) -> list[_Item] | None:
        """Wait until a batch is due and take it from the queue, appending each record's
        audio to its shard as soon as it is taken; None when closed and drained.

        Writing the audio as records arrive, not all at once when the batch commits,
        spreads the writer's work: a commit of a few hundred files at once held the GIL
        for tens of milliseconds and delayed every request in flight in this process
        (the service's p99 latency under load)."""
        max_records = self._settings.batch_max_records
        max_seconds = self._settings.batch_max_seconds
        batch: list[_Item] = []
        while True:
            fresh: list[_Item] = []
            with self._cond:
                while self._queue and len(batch) + len(fresh) < max_records:
                    fresh.append(self._queue.popleft())
                    self._in_flight += 1
                if not fresh:  # everything queued is in the batch: commit it, or wait
                    if not batch:
                        if self._closing:
                            return None
                        self._idle = True
                        self._cond.wait()
                        self._idle = False
                        continue
                    left = batch[0].enqueued_at + max_seconds - time.monotonic()
                    if (len(batch) >= max_records or left <= 0 or self._closing
                            or self._flush_waiters):
                        return batch
                    self._cond.wait(min(left, _WAKE_S))
                    continue
            for item in fresh:  # outside the lock: submit() never waits for a write
                self._write_audio(item)
            batch.extend(fresh)
            # A steady backlog must not keep an old batch growing (flush and close drain
            # the queue first, on the next turn, so what they wait for is in it).
            if len(batch) >= max_records or (
                    batch[0].enqueued_at + max_seconds <= time.monotonic()):
                return batch

    def _write_audio(self, item: _Item) -> None:
        """Append ``item``'s audio to its partition's shard now; on failure leave it to the
        commit (which writes the shard again, whole)."""
        if item.pcm is None:
            return
        key = _partition(item.record.timestamp)
        shard = self._shards.get(key)
        try:
            if shard is None:
                shard = self._shards[key] = self._open_shard(*key, self._new_batch_id())
            if not shard.broken:
                self._append(shard, item)
        except Exception:
            log.warning("writing the audio of %s failed; the batch commit writes its shard "
                        "again", item.record.request_id, exc_info=True)
            if shard is not None:
                shard.broken = True

    def _open_shard(self, dt: str, hour: int, batch_id: str) -> _AudioShard:
        audio_dir = _partition_dir(_AUDIO, dt, hour)
        if audio_dir not in self._audio_dirs:
            self._store.makedirs(audio_dir)
            self._audio_dirs.add(audio_dir)
        try:
            return _AudioShard(self._store, f"{audio_dir}/{batch_id}{_SHARD}", batch_id)
        except Exception:
            self._audio_dirs.discard(audio_dir)  # made again on the retry
            raise

    def _append(self, shard: _AudioShard, item: _Item) -> None:
        assert item.pcm is not None
        fmt = self._settings.audio_format
        data = _audio_bytes(item.pcm, item.sample_rate, fmt)
        offset = shard.add(f"{item.record.request_id}.{fmt}", data)
        item.audio_rel, item.audio_offset, item.audio_bytes = shard.rel, offset, len(data)

    def _seal_audio(self, batch_id: str, dt: str, hour: int, items: list[_Item]) -> None:
        """Leave every item's audio in the partition's shard ``<batch_id>.tar``, closed:
        the shard gathered as records arrived when every append went through, else the
        shard written again, whole, under the same name. Raises what the store raised."""
        with_audio = [item for item in items if item.pcm is not None]
        key = (dt, hour)
        shard = self._shards.get(key)
        if shard is not None and shard.batch_id == batch_id and not shard.broken and all(
                item.audio_rel == shard.rel for item in with_audio):
            if shard.sealed:  # by an earlier attempt whose Parquet or marker write failed
                return
            try:
                shard.close()
                return
            except Exception:
                log.warning("closing audio shard %s failed; writing it again", shard.rel,
                            exc_info=True)
        elif shard is not None:
            shard.discard()
        self._shards.pop(key, None)
        if not with_audio:
            return
        shard = self._open_shard(dt, hour, batch_id)
        try:
            for item in with_audio:
                self._append(shard, item)
            shard.close()
        except BaseException:
            shard.discard()
            raise
        self._shards[key] = shard

    def _write_batch(self, batch: list[_Item]) -> None:
        groups: dict[tuple[str, int], list[_Item]] = {}
        for item in batch:
            groups.setdefault(_partition(item.record.timestamp), []).append(item)
        for (dt, hour), items in sorted(groups.items()):
            shard = self._shards.get((dt, hour))
            batch_id = shard.batch_id if shard is not None else self._new_batch_id()
            ok = False
            for attempt in (1, 2):
                try:
                    self._commit(batch_id, dt, hour, items)
                    ok = True
                    break
                except Exception:
                    log.exception("traffic batch %s (%d records, dt=%s hour=%02d) failed "
                                  "on attempt %d of 2", batch_id, len(items), dt, hour, attempt)
                    with self._cond:
                        self._write_errors += 1
            self._shards.pop((dt, hour), None)  # sealed, or discarded by a failed commit
            with self._cond:
                self._in_flight -= len(items)
                if ok:
                    self._logged += len(items)
                    self._batches += 1
                else:
                    self._failed += len(items)
                self._cond.notify_all()

    def _new_batch_id(self) -> str:
        return f"{_as_utc(self._clock()):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"

    def _commit(self, batch_id: str, dt: str, hour: int, items: list[_Item]) -> None:
        """Write one partition's batch: its audio shard, then Parquet (temp + rename), then
        the marker.
        Idempotent for one ``batch_id``, which is why a retry reuses it."""
        store = self._store
        self._seal_audio(batch_id, dt, hour, items)
        records: list[TrafficRecord] = []
        for item in items:
            update: dict[str, Any] = {"timestamp": _as_utc(item.record.timestamp)}
            if item.audio_rel is not None:
                update |= {"audio": item.audio_rel, "audio_offset": item.audio_offset,
                           "audio_bytes": item.audio_bytes}
            records.append(item.record.model_copy(update=update))
        data = _parquet_bytes(_table(records), batch_id)
        batch_dir = _partition_dir(_BATCHES, dt, hour)
        store.makedirs(batch_dir)
        rel = f"{batch_dir}/{batch_id}{_PARQUET}"
        store.write_atomic(rel, data)
        marker = {
            "batch_id": batch_id,
            "dt": dt,
            "hour": hour,
            "records": len(records),
            "request_ids": len({r.request_id for r in records}),
            "created": _as_utc(self._clock()).isoformat(),
            "file": rel,
            "bytes": len(data),
            "schema": SCHEMA_VERSION,
        }
        store.write_atomic(f"{batch_dir}/{batch_id}{_MARKER}",
                           json.dumps(marker, indent=1).encode("utf-8"))


# -- reading ------------------------------------------------------------------------------


def list_batches(root: str) -> list[BatchInfo]:
    """Every committed batch under ``root`` (those with a marker), sorted by batch id.

    An unreadable marker is logged and skipped rather than failing the whole listing.
    """
    store = _Store(root)
    infos: list[BatchInfo] = []
    for marker_rel in store.glob(f"{_BATCHES}/dt=*/hour=*/*{_MARKER}"):
        try:
            meta = json.loads(store.read(marker_rel))
            infos.append(
                BatchInfo(
                    batch_id=str(meta["batch_id"]),
                    dt=str(meta["dt"]),
                    hour=int(meta["hour"]),
                    path=str(meta["file"]),
                    marker=marker_rel,
                    records=int(meta["records"]),
                    created=datetime.fromisoformat(meta["created"]),
                    bytes=int(meta["bytes"]),
                )
            )
        except (ValueError, KeyError, TypeError):
            log.warning("skipping unreadable commit marker %s", marker_rel, exc_info=True)
    return sorted(infos, key=lambda info: (info.batch_id, info.path))


def _read_table(root: str, info: BatchInfo) -> pa.Table:
    store = _Store(root)
    with store.fs.open(store.path(info.path), "rb") as f:
        table = pq.read_table(f)
    # A batch of an older writer lacks the newer columns: add them with the record's
    # defaults, so that every reader sees one schema.
    fields = TrafficRecord.model_fields
    for index, field in enumerate(TRAFFIC_SCHEMA):
        if field.name not in table.column_names and field.name in fields:
            default = fields[field.name].get_default(call_default_factory=True)
            table = table.add_column(min(index, table.num_columns), field,
                                     pa.array([default] * table.num_rows, type=field.type))
    return table


def read_batch_frame(root: str, info: BatchInfo) -> pd.DataFrame:
    """One batch as a DataFrame: the :data:`TRAFFIC_SCHEMA` columns, ``timestamp`` as
    ``datetime64[us, UTC]``, ``slots`` as a JSON string."""
    return _read_table(root, info).to_pandas()


def read_batch(root: str, info: BatchInfo) -> list[TrafficRecord]:
    """One batch as records, in the order they were written.

    Columns a record does not know (a newer writer) are ignored and missing ones (an
    older writer) take the record's defaults, so readers survive schema additions.
    """
    fields = TrafficRecord.model_fields
    records: list[TrafficRecord] = []
    for row in _read_table(root, info).to_pylist():
        data = {k: v for k, v in row.items() if k in fields}
        if isinstance(data.get("slots"), str):
            data["slots"] = json.loads(data["slots"])
        records.append(TrafficRecord(**data))
    return records


_MAGIC_SUFFIX = ((b"RIFF", ".wav"), (b"fLaC", ".flac"), (b"OggS", ".ogg"))


class StoredAudio:
    """Reads the stored audio of one traffic store through one filesystem handle (for
    readers of many files, e.g. ingestion; :func:`read_audio` reads one).

    Args:
        root: the traffic store (a path or fsspec URL).
    """

    def __init__(self, root: str) -> None:
        self._store = _Store(root)

    def read_bytes(self, ref: AudioRef | str) -> bytes:
        """The audio file ``ref`` points at (a record's :class:`AudioRef`, or a path
        relative to the store for a whole file), as stored.

        Raises:
            FileNotFoundError: no such shard or file.
            ValueError: the shard ends before the file does (a truncated shard).
        """
        if isinstance(ref, str):
            ref = AudioRef(ref)
        if ref.size == 0:
            return self._store.read(ref.path)
        data = self._store.fs.cat_file(self._store.path(ref.path), start=ref.offset,
                                       end=ref.offset + ref.size)
        if len(data) != ref.size:
            raise ValueError(f"{ref.path} holds {len(data)} of the {ref.size} bytes at offset "
                             f"{ref.offset}: the shard is truncated")
        return data

    def read(self, ref: AudioRef | str) -> tuple[np.ndarray, int]:
        """The audio ``ref`` points at: float32 samples (±1.0 full scale; ``(N,)`` mono or
        ``(N, C)``) and the rate in Hz.

        Raises:
            ValueError: an empty path, or a truncated shard.
            FileNotFoundError: no such shard or file.
            soundfile.SoundFileError: it does not decode.
        """
        samples, rate = sf.read(io.BytesIO(self.read_bytes(ref)), dtype="float32")
        return samples, int(rate)

    def extract(self, refs: Sequence[tuple[str, AudioRef | None]],
                dest: Path) -> list[Path | None]:
        """Copy each ``(name, ref)``'s audio file to ``dest/<name><suffix>`` — ``.wav``,
        ``.flac`` or ``.ogg`` by its content, else the stored file's own suffix, else
        ``.bin`` (a file already there with the same size is kept) — for readers that need
        local files (training manifests, evaluation); returns the paths in order, None
        (logged) where ``ref`` is None or its audio is missing or truncated: one bad row
        must not stop a retraining or a gate.

        Raises:
            ValueError: a name that is not a plain file name.
        """
        dest.mkdir(parents=True, exist_ok=True)
        local = _Store(str(dest))
        paths: list[Path | None] = []
        for name, ref in refs:
            if not name or name.startswith(".") or not set(name) <= _SAFE_ID:
                raise ValueError(f"{name!r} cannot name an audio file")
            if ref is None:
                log.warning("no stored audio for %s", name)
                paths.append(None)
                continue
            try:
                data = self.read_bytes(ref)
            except (FileNotFoundError, ValueError) as exc:
                log.warning("no local copy of the audio of %s: %s", name, exc)
                paths.append(None)
                continue
            suffix = next((sfx for magic, sfx in _MAGIC_SUFFIX if data.startswith(magic)),
                          Path(ref.path).suffix if ref.size == 0 else ".bin")
            path = dest / f"{name}{suffix}"
            if not (path.is_file() and path.stat().st_size == len(data)):
                local.write_atomic(path.name, data)
            paths.append(path)
        return paths


def read_audio(root: str, record: TrafficRecord) -> tuple[np.ndarray, int]:
    """The stored audio of ``record``: float32 samples (±1.0 full scale) and the rate.

    Raises:
        ValueError: the record has no stored audio.
    """
    if not record.audio:
        raise ValueError(f"record {record.request_id!r} has no stored audio (audio='')")
    return StoredAudio(root).read(AudioRef.of(record))


def extract_audio(root: str, rows: pd.DataFrame, dest: Path) -> list[Path | None]:
    """The stored audio of traffic or curated ``rows`` (``request_id``, ``audio`` and, from
    audio shards on, ``audio_offset`` / ``audio_bytes``) as local files
    ``dest/<request_id>.wav`` (or ``.flac``; see :meth:`StoredAudio.extract`), in row
    order; None for a row without readable audio (logged)."""

    def ref(row: Mapping[str, Any]) -> AudioRef | None:
        try:
            return AudioRef.of(row)
        except ValueError:  # no audio stored (audio == "")
            return None

    refs = [(str(row["request_id"]), ref(row)) for row in rows.to_dict("records")]
    return StoredAudio(root).extract(refs, dest)


def uncommitted(root: str) -> list[str]:
    """Leftovers of interrupted commits, as paths relative to ``root``: temporary files,
    and Parquet files and audio shards without a marker.

    A running writer has such files for a moment (the shard of the batch it gathers, a
    commit in progress), so a janitor should only remove entries older than a few
    minutes.
    """
    store = _Store(root)
    leftovers = store.glob(f"{_BATCHES}/dt=*/hour=*/*{_TMP}*")
    markers = set(store.glob(f"{_BATCHES}/dt=*/hour=*/*{_MARKER}"))
    for rel in store.glob(f"{_BATCHES}/dt=*/hour=*/*{_PARQUET}"):
        if rel[: -len(_PARQUET)] + _MARKER not in markers:
            leftovers.append(rel)
    committed = {rel.rsplit("/", 1)[-1][: -len(_MARKER)] for rel in markers}
    for rel in store.glob(f"{_AUDIO}/dt=*/hour=*/*{_SHARD}"):
        if rel.rsplit("/", 1)[-1][: -len(_SHARD)] not in committed:
            leftovers.append(rel)
    return sorted(leftovers)
