"""Drift alerts: one alert per drift episode in a real SQLite file, acknowledgement, the
CLI, and delivery through the log and a webhook to a real HTTP receiver on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from monitoring.alerts import AlertStore, LogSink, WebhookSink, build_sinks
from monitoring.drift import DriftDecision, Signal, Window
from voiceloop.cli import app
from voiceloop.settings import AlertSettings

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def decision(i: int, drifted: bool, *, version: str = "v1", n: int = 2000,
             sufficient: bool = True) -> DriftDecision:
    """The decision on window ``i`` (one hour each) of model ``version``."""
    signals = [
        Signal(name="snr_db", kind="data", method="wasserstein", score=0.4 if drifted else 0.02,
               threshold=0.1, drifted=drifted),
        Signal(name="intent", kind="prediction", method="jensenshannon", score=0.03,
               threshold=0.1, drifted=False),
    ]
    return DriftDecision(
        drifted=drifted and sufficient, sufficient=sufficient, signals=signals,
        window=Window(start=T0 + timedelta(hours=i), end=T0 + timedelta(hours=i + 1), n=n),
        model_version=version, reasons=["data drift: snr_db"] if drifted else [],
    )


def store_at(tmp_path: Path, close_after: int = 3, sinks: list | None = None) -> AlertStore:
    return AlertStore.for_workspace(tmp_path, AlertSettings(close_after=close_after),
                                    sinks=sinks if sinks is not None else [])


# --------------------------------------------------------------------------- episodes


def test_drift_drift_clean_clean_clean_drift_raises_two_alerts(tmp_path: Path) -> None:
    store = store_at(tmp_path, close_after=3)
    pattern = [True, True, False, False, False, True]
    raised = [store.record(decision(i, d)) for i, d in enumerate(pattern)]

    assert [a is not None for a in raised] == [True, False, False, False, False, True]
    alerts = store.list()
    assert [a.id for a in alerts] == [raised[5].id, raised[0].id]  # newest first
    first, second = store.get(raised[0].id), store.get(raised[5].id)
    assert first.episode_id != second.episode_id
    assert first.status == "closed" and first.closed_at is not None
    assert first.drifted_windows == 2 and first.clean_streak == 3
    assert first.window.start == T0 and first.last_window.start == T0 + timedelta(hours=1)
    assert second.status == "open" and second.drifted_windows == 1
    assert second.drifted_signal_names == ["snr_db"]
    assert (tmp_path / "monitoring" / "alerts.db").is_file()


def test_a_drifted_window_resets_the_clean_streak(tmp_path: Path) -> None:
    store = store_at(tmp_path, close_after=3)
    # drift, clean, clean, drift, clean, clean: never 3 clean in a row → one open alert
    for i, d in enumerate([True, False, False, True, False, False]):
        store.record(decision(i, d))
    (alert,) = store.list()
    assert alert.status == "open" and alert.drifted_windows == 2 and alert.clean_streak == 2


def test_insufficient_windows_count_neither_as_drift_nor_as_clean(tmp_path: Path) -> None:
    store = store_at(tmp_path, close_after=2)
    assert store.record(decision(0, True, sufficient=False, n=10)) is None  # opens nothing
    assert store.list() == []
    store.record(decision(1, True))
    store.record(decision(2, False))
    for i in range(3, 8):
        store.record(decision(i, False, sufficient=False, n=10))
    assert store.list()[0].status == "open"  # one clean window so far
    store.record(decision(8, False))
    assert store.list()[0].status == "closed"


def test_a_window_recorded_twice_counts_once(tmp_path: Path) -> None:
    store = store_at(tmp_path, close_after=2)
    assert store.record(decision(0, True)) is not None
    assert store.record(decision(0, True)) is None  # a retried flow task
    assert store.list()[0].drifted_windows == 1
    store.record(decision(1, False))
    store.record(decision(1, False))  # the same clean window again: still one
    assert store.list()[0].status == "open"
    store.record(decision(2, False))
    assert store.list()[0].status == "closed"


def test_episodes_are_per_model_version_and_supersede_closes_the_old(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    a = store.record(decision(0, True, version="v1"))
    b = store.record(decision(0, True, version="v2"))
    assert a is not None and b is not None and a.episode_id != b.episode_id
    assert store.record(decision(1, True, version="v2")) is None
    assert store.supersede("v2") == 1
    assert store.get(a.id).status == "closed" and store.get(b.id).status == "open"


def test_close_after_one_closes_on_the_first_clean_window(tmp_path: Path) -> None:
    store = store_at(tmp_path, close_after=1)
    store.record(decision(0, True))
    store.record(decision(1, False))
    assert store.list()[0].status == "closed"
    assert store.record(decision(2, True)) is not None
    assert len(store.list()) == 2


# --------------------------------------------------------------------------- acknowledge


def test_acknowledge(tmp_path: Path) -> None:
    store = store_at(tmp_path, close_after=2)
    alert = store.record(decision(0, True))
    assert alert is not None

    acked = store.acknowledge(alert.id, "alice")
    assert acked.status == "acknowledged" and acked.acknowledged_by == "alice"
    assert acked.acknowledged_at is not None
    assert store.list("open") == [] and [a.id for a in store.list("acknowledged")] == [alert.id]
    again = store.acknowledge(alert.id, "bob")  # the first acknowledgement stands
    assert again.acknowledged_by == "alice" and again.acknowledged_at == acked.acknowledged_at

    # the episode goes on after the acknowledgement, then closes
    assert store.record(decision(1, True)) is None
    store.record(decision(2, False))
    store.record(decision(3, False))
    closed = store.get(alert.id)
    assert closed.status == "closed" and closed.acknowledged_by == "alice"
    assert closed.drifted_windows == 2

    with pytest.raises(ValueError, match="closed"):
        store.acknowledge(alert.id, "alice")
    with pytest.raises(LookupError, match="999"):
        store.acknowledge(999, "alice")
    with pytest.raises(ValueError, match="name someone"):
        store.acknowledge(alert.id, "  ")
    with pytest.raises(ValueError, match="status must be one of"):
        store.list("pending")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- CLI


def test_cli_list_json_table_all_and_ack(tmp_path: Path) -> None:
    store = store_at(tmp_path, close_after=1)
    old = store.record(decision(0, True))
    store.record(decision(1, False))  # closes the first episode
    new = store.record(decision(2, True, version="v7"))
    assert old is not None and new is not None
    runner = CliRunner()
    ws = ["--workspace", str(tmp_path), "--profile", "tiny"]

    result = runner.invoke(app, ["alerts", "list", "--json", *ws])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.output)
    assert [a["id"] for a in listed] == [new.id]  # open alerts only
    assert listed[0]["model_version"] == "v7" and listed[0]["status"] == "open"
    assert listed[0]["signals"][0]["name"] == "snr_db"

    result = runner.invoke(app, ["alerts", "list", "--all", "--json", *ws])
    assert {a["id"] for a in json.loads(result.output)} == {old.id, new.id}

    result = runner.invoke(app, ["alerts", "list", *ws])
    assert result.exit_code == 0 and "snr_db" in result.output and "v7" in result.output

    result = runner.invoke(app, ["alerts", "ack", str(new.id), "--by", "carol", *ws])
    assert result.exit_code == 0, result.output
    assert "acknowledged by carol" in result.output
    assert store.get(new.id).acknowledged_by == "carol"
    result = runner.invoke(app, ["alerts", "list", *ws])
    assert "no open alerts" in result.output

    result = runner.invoke(app, ["alerts", "ack", "999", *ws])
    assert result.exit_code == 1 and "no alert with id 999" in result.output


# --------------------------------------------------------------------------- sinks


@contextmanager
def receiver(fail_first: int = 0, delay_s: float = 0.0) -> Iterator[tuple[str, list[dict]]]:
    """A real HTTP server on 127.0.0.1 recording each POSTed JSON body; answers 500 to
    the first ``fail_first`` requests and waits ``delay_s`` before answering."""
    bodies: list[dict] = []
    seen = [0]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen[0] += 1
            time.sleep(delay_s)
            if seen[0] <= fail_first:
                self.send_response(500)
                self.end_headers()
                return
            bodies.append(json.loads(body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:  # keep pytest output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", bodies
    finally:
        server.shutdown()
        server.server_close()


def dead_url() -> str:
    """A loopback URL nobody listens on (connection refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"


def test_webhook_gets_exactly_one_post_per_new_alert(tmp_path: Path) -> None:
    with receiver() as (url, bodies):
        settings = AlertSettings(close_after=2, sinks=["log", "webhook"],
                                 webhook={"url": url, "timeout_s": 5, "retries": 0})
        store = AlertStore.for_workspace(tmp_path, settings)
        assert [type(s) for s in store.sinks] == [LogSink, WebhookSink]
        pattern = [True, True, True, False, False, True, True]
        raised = [store.record(decision(i, d)) for i, d in enumerate(pattern)]
    new = [a for a in raised if a is not None]
    assert len(new) == 2 and len(bodies) == 2
    assert [b["id"] for b in bodies] == [a.id for a in new]
    assert bodies[0]["episode_id"] == new[0].episode_id and bodies[0]["status"] == "open"
    assert bodies[0]["signals"][0]["name"] == "snr_db"
    assert all(store.get(a.id).deliveries == {"log": "ok", "webhook": "ok"} for a in new)
    assert store.delivery_failures == 0


def test_webhook_retries_a_failed_attempt(tmp_path: Path) -> None:
    with receiver(fail_first=1) as (url, bodies):
        sink = WebhookSink(url, timeout_s=5, retries=2, backoff_s=0.01)
        store = store_at(tmp_path, sinks=[sink])
        alert = store.record(decision(0, True))
    assert alert is not None and alert.deliveries == {"webhook": "ok"}
    assert sink.attempts == 2 and sink.delivered == 1 and sink.failures == 0
    assert len(bodies) == 1


def test_dead_or_slow_webhook_never_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                           ) -> None:
    dead = WebhookSink(dead_url(), timeout_s=1, retries=2, backoff_s=0.01)
    store = store_at(tmp_path, sinks=[dead, LogSink("warning")])
    with caplog.at_level(logging.WARNING, logger="monitoring.alerts"):
        alert = store.record(decision(0, True))
    assert alert is not None  # the alert is raised and stored all the same
    assert alert.deliveries["webhook"].startswith("failed:")
    assert alert.deliveries["log"] == "ok"
    assert store.get(alert.id).deliveries == alert.deliveries
    assert dead.attempts == 3 and dead.failures == 1 and store.delivery_failures == 1
    assert any("DRIFT ALERT" in r.getMessage() for r in caplog.records)
    assert any("delivery to webhook failed" in r.getMessage() for r in caplog.records)

    with receiver(delay_s=1.5) as (url, _):
        slow = WebhookSink(url, timeout_s=0.2, retries=1, backoff_s=0.0)
        store = AlertStore(tmp_path / "other.db", sinks=[slow])
        start = time.perf_counter()
        alert = store.record(decision(0, True))
        elapsed = time.perf_counter() - start
    assert alert is not None and alert.deliveries["webhook"].startswith("failed:")
    assert elapsed < 1.5  # two attempts of 0.2 s, not the receiver's 1.5 s each


def test_sink_settings() -> None:
    with pytest.raises(ValidationError, match="webhook.url is empty"):
        AlertSettings(sinks=["webhook"])
    with pytest.raises(ValidationError, match="http"):
        AlertSettings(webhook={"url": "ftp://example"})
    sinks = build_sinks(AlertSettings(sinks=["log", "log"], log={"level": "error"}))
    assert len(sinks) == 1 and isinstance(sinks[0], LogSink)
    assert sinks[0].level == logging.ERROR
    with pytest.raises(ValueError, match="http"):
        WebhookSink("localhost:80")
