"""Fixtures shared across test kinds, and the parallel run's rules.

``make test`` runs the suite in pytest-xdist workers (``-n auto --dist loadgroup``). Each
worker gets ``OMP_NUM_THREADS=1`` before torch is imported — set here, at the first
import in the worker, so the DVC stages, servers and CLI subprocesses it starts inherit it
too (``model.training.fit.capped_threads`` lowers the profiles' ``threads`` to it): two
processes spinning 2 OpenMP threads each on 2 cores slow each other tenfold. Each test
module is one xdist group (its module fixtures are built once), and the e2e modules are
one group together (they share the session's tiny corpus and teacher).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest

_E2E = Path(__file__).parent / "e2e"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        path = Path(item.path)
        group = "e2e" if _E2E in path.parents else path.stem
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One Prefect API server (temporary SQLite) for the whole session: a server's first
    start costs 12–18 s, so every flow test shares it."""
    import prefect.settings as ps
    from prefect.testing.utilities import prefect_test_harness

    with ps.temporary_settings(updates={
            ps.PREFECT_SERVER_ANALYTICS_ENABLED: False,
            ps.PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 300}), \
            prefect_test_harness(server_startup_timeout=300):
        yield
