"""Fixtures shared across test kinds."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


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
