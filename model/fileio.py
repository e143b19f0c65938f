"""Local files written atomically: readers see the old content or the new, never half.

One mechanism for every local writer of the model, the corpus and the monitoring
(manifests, audio, features, checkpoints, packages, parquet, reports). Remote stores
(fsspec URLs) have their own in ``serving.traffic``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path"]


@contextmanager
def atomic_path(path: str | Path, *, tmp_dir: str | Path | None = None,
                durable: bool = False) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to: on a clean exit it replaces
    ``path`` in one rename; on an error it is deleted and ``path`` is left as it was.

    The temporary file is named ``.<name>.<pid>.<random>.tmp<suffix>``: unique per writer
    (two processes filling one cache must not interleave) and ending in ``path``'s
    suffix (soundfile and pyarrow choose formats by it). It lies in ``tmp_dir`` (which
    must be on ``path``'s filesystem; default: ``path``'s folder), e.g. outside a folder
    that DVC tracks. ``durable``: fsync the file before the rename, so that a power cut
    cannot leave a renamed but empty file (reports read by other machines). The file
    gets the process's default permissions (umask), not ``mkstemp``'s private 0600:
    reports and manifests are for every user to read.

    Example::

        with atomic_path(out / "train.jsonl") as tmp:
            tmp.write_text(text)
    """
    path = Path(path)
    folder = Path(tmp_dir) if tmp_dir is not None else path.parent
    path.parent.mkdir(parents=True, exist_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}"
    try:
        yield tmp
        if durable:
            with tmp.open("rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
