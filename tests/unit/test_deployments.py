"""The flow deployments: schedules from params.yaml, or none (the demo), triggers always."""

from __future__ import annotations

import pytest

from flows.deploy import deployments
from voiceloop.settings import load_settings


@pytest.mark.parametrize("schedules", [True, False])
def test_schedules_can_be_left_off_while_the_event_triggers_stay(schedules: bool) -> None:
    settings = load_settings(profile="tiny")
    built = {d.name: d for d in deployments(settings, {"profile": "tiny"}, schedules=schedules)}
    assert set(built) == {"ingest", "monitor", "retrain", "promote"}
    scheduled = {name for name, d in built.items() if d.schedules}
    assert scheduled == ({"ingest", "monitor", "retrain"} if schedules else set())
    assert [t.expect for t in built["retrain"].triggers] == [{settings.flows.drift_event}]
    assert len(built["promote"].triggers) == 1
