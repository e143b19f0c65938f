"""The annotation store: what simulated requests really meant, keyed by ``request_id``.

The traffic simulator knows the ground truth of every utterance it sends (transcript,
intent, slots, voice, room). In a real deployment that knowledge would come from human
annotators, later and for a sample of the traffic only; here the simulator stands in for
them and writes one :class:`~serving.contracts.Annotation` per answered request, keyed by
the ``request_id`` the service returned.

Separation from the traffic store is the point of this module:

- annotations are **never** written into the production-traffic store
  (``serving.traffic``, ``settings.traffic_root``): the service, monitoring and drift
  detection see traffic exactly as they would in production, without labels, and
  :class:`AnnotationStore` refuses a root inside the traffic store;
- only the labelling step of the retraining flow (and evaluations of the loop itself)
  read annotations, by ``request_id``.

Layout, under a root folder (default ``<workspace>/annotations``)::

    dt=YYYY-MM-DD/<run-id>.jsonl      one Annotation per line (JSON), UTC date

Writes are append-only: each :meth:`AnnotationStore.write` appends whole lines in one
``write`` call to the run's file of the day, under a lock, then flushes and fsyncs, so
concurrent writers of one store object never interleave and a crash leaves at most a
truncated last line, which :meth:`AnnotationStore.read` skips (with a warning). Two runs
never share a file (one file per run id).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
from pydantic import ValidationError

from model.data.manifest import ManifestRow
from serving.contracts import Annotation
from serving.traffic import extract_audio

__all__ = ["AnnotationStore", "labelled_rows"]

log = logging.getLogger(__name__)

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_PARTITION = re.compile(r"^dt=(\d{4}-\d{2}-\d{2})$")


def _is_within(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


class AnnotationStore:
    """Ground truth of simulated requests as date-partitioned JSON Lines.

    Args:
        root: the store's folder (created on first write).
        run_id: names this writer's files (``<run-id>.jsonl``); letters, digits, ``.``,
            ``_``, ``-``. Default: a UTC timestamp plus the process id.
        traffic_root: the production-traffic store's root; a ``root`` equal to or inside
            it is refused (annotations must never mix with the traffic). fsspec URLs
            (``s3://…``) cannot contain a local folder and are not compared.

    Raises:
        ValueError: a bad run id, or ``root`` inside ``traffic_root``.
    """

    def __init__(self, root: str | Path, run_id: str | None = None, *,
                 traffic_root: str | Path | None = None) -> None:
        self.root = Path(root)
        self.run_id = run_id or (datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
                                 + f"-{os.getpid()}")
        if not _RUN_ID.match(self.run_id):
            raise ValueError(f"run_id {self.run_id!r}: use letters, digits, '.', '_' or '-'")
        if traffic_root is not None and "://" not in str(traffic_root) \
                and _is_within(self.root, Path(traffic_root)):
            raise ValueError(f"annotation root {self.root} lies inside the traffic store "
                             f"{traffic_root}: ground truth must be stored apart from traffic")
        self._lock = threading.Lock()

    def path_for(self, day: str) -> Path:
        """This run's file for UTC date ``day`` (``YYYY-MM-DD``)."""
        return self.root / f"dt={day}" / f"{self.run_id}.jsonl"

    def write(self, annotations: Iterable[Annotation]) -> int:
        """Append ``annotations`` (a missing ``timestamp`` is set to now, UTC).

        Each annotation goes to the partition of its timestamp's UTC date.

        Returns:
            The number of annotations written.
        """
        now = datetime.now(UTC)
        by_day: dict[str, list[str]] = {}
        for annotation in annotations:
            if annotation.timestamp is None:
                annotation = annotation.model_copy(update={"timestamp": now})
            ts = annotation.timestamp
            assert ts is not None
            day = (ts.astimezone(UTC) if ts.tzinfo else ts).strftime("%Y-%m-%d")
            by_day.setdefault(day, []).append(annotation.model_dump_json() + "\n")
        with self._lock:
            for day, lines in by_day.items():
                path = self.path_for(day)
                path.parent.mkdir(parents=True, exist_ok=True)
                data = "".join(lines).encode("utf-8")
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                try:
                    view = memoryview(data)
                    while view:  # one write normally; loop only on a short write
                        view = view[os.write(fd, view):]
                    os.fsync(fd)
                finally:
                    os.close(fd)
        return sum(len(lines) for lines in by_day.values())

    def files(self, run_id: str | None = None) -> list[Path]:
        """Every annotation file of the store (all runs, or only ``run_id``'s), oldest
        partition first."""
        if not self.root.exists():
            return []
        parts = sorted(p for p in self.root.iterdir() if p.is_dir() and _PARTITION.match(p.name))
        pattern = f"{run_id}.jsonl" if run_id is not None else "*.jsonl"
        return [f for part in parts for f in sorted(part.glob(pattern))]

    def read(self, request_ids: Iterable[str] | None = None, *,
             run_id: str | None = None) -> dict[str, Annotation]:
        """Annotations of every run (or of run ``run_id`` only), by ``request_id``; only
        ``request_ids`` when given.

        A request annotated twice keeps its latest annotation (by timestamp, then by
        file order). Lines that do not parse are skipped with a warning (a crash can
        leave a truncated last line).
        """
        wanted = set(request_ids) if request_ids is not None else None
        out: dict[str, Annotation] = {}
        for path in self.files(run_id):
            with path.open(encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        annotation = Annotation.model_validate(json.loads(line))
                    except (json.JSONDecodeError, ValidationError) as exc:
                        log.warning("%s:%d: skipped an unreadable annotation (%s)", path,
                                    lineno, str(exc).splitlines()[0])
                        continue
                    if wanted is not None and annotation.request_id not in wanted:
                        continue
                    previous = out.get(annotation.request_id)
                    if previous is None or _later_or_equal(annotation, previous):
                        out[annotation.request_id] = annotation
        return out


def _later_or_equal(new: Annotation, old: Annotation) -> bool:
    if new.timestamp is None or old.timestamp is None:
        return True
    try:
        return new.timestamp >= old.timestamp
    except TypeError:  # naive vs aware timestamps: fall back to file order
        return True


def labelled_rows(traffic_root: str, rows: pd.DataFrame, labels: Mapping[str, Annotation],
                  dest: Path) -> list[ManifestRow]:
    """The annotated ones of traffic or curated ``rows`` (``request_id``, ``audio``,
    ``audio_offset``, ``audio_bytes``, ``duration_s``) as evaluation rows, in row order,
    their audio copied out of the traffic store into ``dest`` (rows whose audio cannot be
    read are left out, logged by :func:`serving.traffic.extract_audio`)."""
    rows = rows[rows["request_id"].isin(labels)]
    audio = extract_audio(traffic_root, rows, dest)
    return [labels[rid].manifest_row(str(local), duration)
            for rid, local, duration in zip(rows["request_id"], audio, rows["duration_s"],
                                            strict=True) if local is not None]
