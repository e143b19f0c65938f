"""One ingestion at a time per curated folder: a second run waits for the first (a
scheduled run and one started by a flow or by hand meet in practice), and gives up with a
clear error only after ``monitoring.ingest.lock_wait_s``."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from monitoring.ingest import _exclusive


def _hold(root: Path, seconds: float, held: threading.Event) -> None:
    with _exclusive(root):
        held.set()
        time.sleep(seconds)


def test_a_second_ingestion_waits_for_the_first_then_runs(tmp_path: Path) -> None:
    held = threading.Event()
    first = threading.Thread(target=_hold, args=(tmp_path, 0.8, held))
    first.start()
    assert held.wait(5)
    start = time.monotonic()
    with _exclusive(tmp_path, wait_s=10):
        waited = time.monotonic() - start
    first.join()
    assert 0.4 < waited < 5  # it waited for the first run to let go, not for the limit


def test_a_second_ingestion_gives_up_after_the_wait_and_says_why(tmp_path: Path) -> None:
    held = threading.Event()
    first = threading.Thread(target=_hold, args=(tmp_path, 1.5, held))
    first.start()
    assert held.wait(5)
    with (pytest.raises(RuntimeError, match=r"another ingestion holds .*lock_wait_s"),
          _exclusive(tmp_path, wait_s=0.3)):
        pass
    first.join()
    with _exclusive(tmp_path):  # free again: no wait needed
        pass
