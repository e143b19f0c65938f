"""The demo's background users (voiceloop/demo.py), with the simulator stood in for."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest

from voiceloop import demo
from voiceloop.settings import load_settings


def test_background_users_draw_new_utterances_every_round(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each round of background traffic uses its own simulator seed: with one seed every
    round re-sent the same utterances from the same devices, and a canary share saw the
    same three sentences over and over (its intent mix then "differed" from production's)."""
    import serving.simulator

    seeds: list[int] = []

    def fake_simulate(url: str, scenario: str, **kw: Any) -> SimpleNamespace:
        seeds.append(kw["seed"])
        return SimpleNamespace(sent=kw["requests"])

    monkeypatch.setattr(serving.simulator, "simulate", fake_simulate)
    settings = load_settings(profile="tiny")
    story = demo.DemoStory()
    with demo._traffic("http://127.0.0.1:9", "baseline", settings, story,
                       lambda: len(seeds) >= 4, rate=1.0):
        deadline = time.monotonic() + 10
        while len(seeds) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert len(seeds) >= 4 and len(set(seeds)) == len(seeds), seeds
    assert settings.seed not in seeds  # nor the measured runs' default seed
    assert story.figures["background_requests"] == 40 * len(seeds)


def test_the_drift_line_claims_an_event_only_when_an_alert_was_raised() -> None:
    raised = demo.drift_line({"alert_id": 3, "reasons": ["data drift: snr_db, level_dbfs"]})
    assert "alert 3" in raised and "event voiceloop.drift.detected emitted" in raised
    # a window inside an episode that is already open raises no alert and emits no event
    quiet = demo.drift_line({"alert_id": None, "reasons": ["data drift: snr_db"]})
    assert "emitted" not in quiet and "still open" in quiet and "snr_db" in quiet


def test_the_settled_check_feeds_the_warm_up_then_reports_the_decision(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The promoted version warms up on its own live rows: the demo sends what is missing
    (reference_rows - live_rows + one window, ~10 % spare; then what a window lacks), and
    reports only a decided check as one."""
    import serving.simulator

    sent: list[int] = []
    monkeypatch.setattr(serving.simulator, "simulate",
                        lambda url, scenario, **kw: sent.append(kw["requests"]))
    settings = load_settings(profile="tiny")
    need, window = settings.monitoring.reference_rows, settings.monitoring.drift.window_rows
    answers = iter([{"drifted": False, "warming_up": True, "live_rows": 10},
                    {"drifted": False, "sufficient": False, "window": 3, "reasons": []},
                    {"drifted": False, "sufficient": True, "window": window, "reasons": []}])
    story = demo.DemoStory()
    result = demo._settled_check("http://127.0.0.1:9", "accent_shift", settings, story, "2",
                                 lambda: next(answers))
    # warming up: the rest of the reference and a window; then a window's missing rows
    assert sent == [int((need - 10 + window) * 1.1) + 1, int((window - 3) * 1.1) + 1]
    assert "too few for a decision" in story.events[1]
    assert result["drifted"] is False and story.figures["settled_check"]["warming_up"] is None
    assert "warming up (10 of" in story.events[0] and "no drift" in story.events[-1]

    undecided = iter([{"drifted": False, "sufficient": False, "window": 3}] * 3)
    story = demo.DemoStory()
    demo._settled_check("http://127.0.0.1:9", "accent_shift", settings, story, "2",
                        lambda: next(undecided))
    assert "no drift decision" in story.events[-1] and len(sent) == 4  # none after the last

    again = iter([{"drifted": True, "sufficient": True, "window": window,
                   "reasons": ["data drift: snr_db"]}])
    story = demo.DemoStory()
    demo._settled_check("http://127.0.0.1:9", "accent_shift", settings, story, "2",
                        lambda: next(again))
    assert "DRIFT again" in story.events[-1] and "snr_db" in story.events[-1]
