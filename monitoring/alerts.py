"""Drift alerts: persisted in SQLite, deduplicated per drift episode, delivered to sinks.

A monitor judges one window after another (:class:`~monitoring.drift.DriftDecision`).
Alerting on every drifted window would page people once per window for one problem, so
:meth:`AlertStore.record` groups windows into **episodes**, per model version:

- the first drifted window (no open episode) opens an episode and raises **one** alert,
  delivered to the configured sinks;
- further drifted windows join the open episode: its last-seen window, signals and
  reasons are updated, and no new alert is raised;
- a clean window adds one to the episode's clean streak (a drifted window resets it);
  ``close_after`` consecutive clean windows close the episode and its alert;
- a drifted window after that opens a new episode and a new alert;
- a window with too few rows (``decision.sufficient`` false) counts as neither;
- a window recorded twice (same model version, start, end and size, e.g. a retried
  flow task) is ignored the second time.

Alert status: ``open`` → ``acknowledged`` (a person saw it: ``acknowledge``) →
``closed`` (its episode closed). Sinks: ``log`` (one log record) and ``webhook`` (HTTP
POST of the alert's JSON, with timeout and retries). A failed delivery is logged,
counted and stored on the alert (``deliveries``), never raised into the flow.

Layout: one SQLite file, ``<workspace>/monitoring/alerts.db`` (tables ``episodes``,
``alerts``, ``windows``), in WAL mode so that the CLI can read while a flow writes.
"""

from __future__ import annotations

import builtins
import json
import logging
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel

from monitoring.drift import DriftDecision, Signal, Window
from voiceloop.settings import AlertSettings, WebhookSinkSettings

__all__ = [
    "Alert",
    "AlertDeliveryError",
    "AlertSink",
    "AlertStatus",
    "AlertStore",
    "LogSink",
    "WebhookSink",
    "build_sinks",
]

log = logging.getLogger(__name__)

AlertStatus = Literal["open", "acknowledged", "closed"]
ALERT_STATUSES: tuple[AlertStatus, ...] = ("open", "acknowledged", "closed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS episodes (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    model_version   TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('open', 'closed')),
    opened_at       TEXT NOT NULL,
    closed_at       TEXT,
    first_window    TEXT NOT NULL,
    last_window     TEXT NOT NULL,
    last_seen_at    TEXT NOT NULL,
    drifted_windows INTEGER NOT NULL,
    clean_streak    INTEGER NOT NULL DEFAULT 0,
    signals         TEXT NOT NULL,
    reasons         TEXT NOT NULL
);
-- At most one open episode per model version: the invariant deduplication rests on.
CREATE UNIQUE INDEX IF NOT EXISTS episodes_one_open
    ON episodes (model_version) WHERE status = 'open';
CREATE TABLE IF NOT EXISTS alerts (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    episode_id      INTEGER NOT NULL UNIQUE REFERENCES episodes (id),
    created         TEXT NOT NULL,
    model_version   TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('open', 'acknowledged', 'closed')),
    signals         TEXT NOT NULL,
    reasons         TEXT NOT NULL,
    window          TEXT NOT NULL,
    report_paths    TEXT NOT NULL,
    acknowledged_by TEXT,
    acknowledged_at TEXT,
    closed_at       TEXT,
    deliveries      TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS windows (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    model_version TEXT NOT NULL,
    window_start  TEXT,
    window_end    TEXT,
    n             INTEGER NOT NULL,
    drifted       INTEGER NOT NULL,
    sufficient    INTEGER NOT NULL,
    episode_id    INTEGER,
    recorded_at   TEXT NOT NULL,
    reasons       TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS windows_once
    ON windows (model_version, window_start, window_end, n)
    WHERE window_start IS NOT NULL AND window_end IS NOT NULL;
"""


class AlertDeliveryError(RuntimeError):
    """A sink could not deliver an alert (raised by sinks, caught by the store)."""


class Alert(BaseModel):
    """One alert = one drift episode.

    Attributes:
        id: the alert's id (what ``voiceloop alerts ack`` takes).
        episode_id: the drift episode it stands for.
        created: when it was raised (UTC).
        model_version: the production model whose reference the windows were judged by
            (empty if unknown).
        status: ``open``, ``acknowledged`` or ``closed``.
        signals: the signals of the episode's latest drifted window.
        reasons: the rules that fired in that window.
        window: the window that opened the episode.
        last_window: the episode's latest drifted window.
        drifted_windows: drifted windows in the episode so far.
        clean_streak: consecutive clean windows since the last drifted one.
        report_paths: the latest drifted window's reports.
        acknowledged_by, acknowledged_at: who acknowledged it, when (UTC).
        closed_at: when its episode closed (UTC).
        deliveries: per sink, ``ok`` or ``failed: <why>``.
    """

    id: int
    episode_id: int
    created: datetime
    model_version: str
    status: AlertStatus
    signals: list[Signal]
    reasons: list[str]
    window: Window
    last_window: Window
    drifted_windows: int
    clean_streak: int
    report_paths: list[str] = []
    acknowledged_by: str | None = None
    acknowledged_at: datetime | None = None
    closed_at: datetime | None = None
    deliveries: dict[str, str] = {}

    @property
    def drifted_signal_names(self) -> list[str]:
        """Names of the signals that crossed their thresholds."""
        return [s.name for s in self.signals if s.drifted]


# --------------------------------------------------------------------------- sinks


class AlertSink(Protocol):
    """Somewhere a new alert goes. ``send`` raises on failure; the store catches."""

    name: str

    def send(self, alert: Alert) -> None: ...


class LogSink:
    """Logs one record per new alert (logger ``monitoring.alerts``) at ``level``."""

    name = "log"

    def __init__(self, level: str = "warning") -> None:
        levels = logging.getLevelNamesMapping()
        if level.upper() not in levels:
            raise ValueError(f"unknown log level {level!r}")
        self.level = levels[level.upper()]

    def send(self, alert: Alert) -> None:
        log.log(self.level, "DRIFT ALERT %d (episode %d, model %s): %s; window %s – %s, "
                "%d rows", alert.id, alert.episode_id, alert.model_version or "?",
                "; ".join(alert.reasons) or "drift", alert.window.start, alert.window.end,
                alert.window.n)


class WebhookSink:
    """HTTP POST of the alert's JSON (``Content-Type: application/json``) to ``url``.

    Each attempt waits at most ``timeout_s`` seconds; connection errors, timeouts and
    non-2xx answers are retried ``retries`` more times, ``backoff_s`` seconds apart,
    doubling. ``attempts``, ``delivered`` and ``failures`` count what happened.

    Raises (from :meth:`send`):
        AlertDeliveryError: every attempt failed.
    """

    name = "webhook"

    def __init__(self, url: str, *, timeout_s: float = 5.0, retries: int = 2,
                 backoff_s: float = 0.5, headers: dict[str, str] | None = None) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"webhook url must start with http:// or https://, got {url!r}")
        if timeout_s <= 0 or retries < 0 or backoff_s < 0:
            raise ValueError(f"bad webhook timing: timeout_s={timeout_s}, retries={retries}, "
                             f"backoff_s={backoff_s}")
        self.url, self.timeout_s, self.retries, self.backoff_s = url, timeout_s, retries, backoff_s
        self.headers = dict(headers or {})
        self.attempts = self.delivered = self.failures = 0

    @classmethod
    def from_settings(cls, settings: WebhookSinkSettings) -> WebhookSink:
        if not settings.url:
            raise ValueError("alerts.webhook.url is empty")
        return cls(settings.url, timeout_s=settings.timeout_s, retries=settings.retries,
                   backoff_s=settings.backoff_s, headers=settings.headers)

    def send(self, alert: Alert) -> None:
        body = alert.model_dump_json().encode("utf-8")
        headers = {"Content-Type": "application/json", "User-Agent": "voiceloop-alerts",
                   **self.headers}
        delay, last = self.backoff_s, ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(delay)
                delay *= 2
            self.attempts += 1
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    if 200 <= response.status < 300:
                        self.delivered += 1
                        return
                    last = f"HTTP {response.status}"
            except urllib.error.HTTPError as exc:  # non-2xx answers raise here
                last = f"HTTP {exc.code}"
            except (urllib.error.URLError, TimeoutError, OSError) as exc:
                last = str(getattr(exc, "reason", exc))
            log.info("webhook attempt %d/%d for alert %d failed: %s", attempt + 1,
                     self.retries + 1, alert.id, last)
        self.failures += 1
        raise AlertDeliveryError(f"POST {self.url} failed after {self.retries + 1} "
                                 f"attempts: {last}")


def build_sinks(settings: AlertSettings) -> list[AlertSink]:
    """The sinks ``settings.sinks`` names, configured from ``settings``."""
    sinks: list[AlertSink] = []
    for name in dict.fromkeys(settings.sinks):  # each sink once, in order
        if name == "log":
            sinks.append(LogSink(settings.log.level))
        else:
            sinks.append(WebhookSink.from_settings(settings.webhook))
    return sinks


# --------------------------------------------------------------------------- the store


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC).isoformat()


class AlertStore:
    """Alerts and drift episodes in SQLite (see the module docstring for the rules).

    Args:
        path: the database file (created with its folder).
        settings: ``monitoring.alerts`` (``close_after``, sinks); defaults apply if None.
        sinks: the sinks to deliver new alerts to; default: built from ``settings``.

    Attributes:
        delivery_failures: failed deliveries since this object was made.
    """

    def __init__(self, path: str | Path, settings: AlertSettings | None = None, *,
                 sinks: Sequence[AlertSink] | None = None) -> None:
        self.path = Path(path)
        self.settings = settings or AlertSettings()
        self.sinks = list(sinks) if sinks is not None else build_sinks(self.settings)
        self.delivery_failures = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript(_SCHEMA)

    @classmethod
    def for_workspace(cls, workspace: str | Path, settings: AlertSettings | None = None, *,
                      sinks: Sequence[AlertSink] | None = None) -> AlertStore:
        """The store of a workspace: ``<workspace>/monitoring/alerts.db``."""
        return cls(Path(workspace) / "monitoring" / "alerts.db", settings, sinks=sinks)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        con.row_factory = sqlite3.Row
        try:
            yield con
        finally:
            con.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; IMMEDIATE takes the write lock up front, so two
        monitors recording at once serialise instead of both opening an episode."""
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    # ------------------------------------------------------------------ recording

    def record(self, decision: DriftDecision) -> Alert | None:
        """Record one judged window; returns the alert if it raised a **new** one.

        A new alert is delivered to every sink after the transaction commits (a slow
        webhook never holds the database lock); delivery failures are logged, counted
        in ``delivery_failures`` and stored in the alert's ``deliveries``.
        """
        version = decision.model_version or ""
        w = decision.window
        signals = json.dumps([s.model_dump(mode="json") for s in decision.signals])
        reasons = json.dumps(decision.reasons)
        window_json = w.model_dump_json()
        now = _now()
        new_alert: int | None = None
        with self._transaction() as con:
            try:
                cursor = con.execute(
                    "INSERT INTO windows (model_version, window_start, window_end, n, drifted,"
                    " sufficient, recorded_at, reasons) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (version, _iso(w.start), _iso(w.end), w.n, int(decision.drifted),
                     int(decision.sufficient), now, reasons))
            except sqlite3.IntegrityError:
                log.info("window %s – %s (%d rows, model %s) was already recorded: ignored",
                         w.start, w.end, w.n, version or "?")
                return None
            window_id = cursor.lastrowid
            episode = con.execute(
                "SELECT * FROM episodes WHERE model_version = ? AND status = 'open'",
                (version,)).fetchone()
            if not decision.sufficient:
                return None
            if decision.drifted and episode is not None:
                con.execute(
                    "UPDATE episodes SET last_window = ?, last_seen_at = ?, drifted_windows ="
                    " drifted_windows + 1, clean_streak = 0, signals = ?, reasons = ?"
                    " WHERE id = ?", (window_json, now, signals, reasons, episode["id"]))
                con.execute("UPDATE alerts SET signals = ?, reasons = ?, report_paths = ?"
                            " WHERE episode_id = ?",
                            (signals, reasons, json.dumps(decision.report_paths), episode["id"]))
                episode_id = episode["id"]
            elif decision.drifted:
                episode_id = con.execute(
                    "INSERT INTO episodes (model_version, status, opened_at, first_window,"
                    " last_window, last_seen_at, drifted_windows, signals, reasons)"
                    " VALUES (?, 'open', ?, ?, ?, ?, 1, ?, ?)",
                    (version, now, window_json, window_json, now, signals, reasons)).lastrowid
                new_alert = con.execute(
                    "INSERT INTO alerts (episode_id, created, model_version, status, signals,"
                    " reasons, window, report_paths) VALUES (?, ?, ?, 'open', ?, ?, ?, ?)",
                    (episode_id, now, version, signals, reasons, window_json,
                     json.dumps(decision.report_paths))).lastrowid
            elif episode is not None:
                episode_id = episode["id"]
                streak = episode["clean_streak"] + 1
                con.execute("UPDATE episodes SET clean_streak = ? WHERE id = ?",
                            (streak, episode_id))
                if streak >= self.settings.close_after:
                    self._close(con, episode_id, now)
                    log.info("drift episode %d (model %s) closed after %d clean windows",
                             episode_id, version or "?", streak)
            else:
                episode_id = None
            con.execute("UPDATE windows SET episode_id = ? WHERE id = ?", (episode_id, window_id))
        if new_alert is None:
            return None
        alert = self.get(new_alert)
        return self._deliver(alert)

    @staticmethod
    def _close(con: sqlite3.Connection, episode_id: int, now: str) -> None:
        con.execute("UPDATE episodes SET status = 'closed', closed_at = ? WHERE id = ?",
                    (now, episode_id))
        con.execute("UPDATE alerts SET status = 'closed', closed_at = ? WHERE episode_id = ?",
                    (now, episode_id))

    def _deliver(self, alert: Alert) -> Alert:
        deliveries: dict[str, str] = {}
        for sink in self.sinks:
            try:
                sink.send(alert)
                deliveries[sink.name] = "ok"
            except Exception as exc:  # noqa: BLE001 - a sink must never break the flow
                self.delivery_failures += 1
                deliveries[sink.name] = f"failed: {exc}"
                log.error("alert %d: delivery to %s failed: %s", alert.id, sink.name, exc)
        with self._transaction() as con:
            con.execute("UPDATE alerts SET deliveries = ? WHERE id = ?",
                        (json.dumps(deliveries), alert.id))
        return alert.model_copy(update={"deliveries": deliveries})

    def supersede(self, model_version: str) -> int:
        """Close the open episodes (and alerts) of every model version but
        ``model_version``: once a new version serves, drift against the old one's
        reference is moot. Returns how many episodes were closed."""
        now = _now()
        with self._transaction() as con:
            rows = con.execute("SELECT id FROM episodes WHERE status = 'open' AND"
                               " model_version != ?", (model_version,)).fetchall()
            for row in rows:
                self._close(con, row["id"], now)
        return len(rows)

    # ------------------------------------------------------------------ reading

    _SELECT = ("SELECT a.*, e.last_window, e.drifted_windows, e.clean_streak FROM alerts a"
               " JOIN episodes e ON e.id = a.episode_id")

    @staticmethod
    def _alert(row: sqlite3.Row) -> Alert:
        return Alert(
            id=row["id"], episode_id=row["episode_id"], created=row["created"],
            model_version=row["model_version"], status=row["status"],
            signals=json.loads(row["signals"]), reasons=json.loads(row["reasons"]),
            window=Window.model_validate_json(row["window"]),
            last_window=Window.model_validate_json(row["last_window"]),
            drifted_windows=row["drifted_windows"], clean_streak=row["clean_streak"],
            report_paths=json.loads(row["report_paths"]),
            acknowledged_by=row["acknowledged_by"], acknowledged_at=row["acknowledged_at"],
            closed_at=row["closed_at"], deliveries=json.loads(row["deliveries"]),
        )

    def get(self, alert_id: int) -> Alert:
        """The alert ``alert_id``; ``LookupError`` if there is none."""
        with self._connect() as con:
            row = con.execute(self._SELECT + " WHERE a.id = ?", (alert_id,)).fetchone()
        if row is None:
            raise LookupError(f"no alert with id {alert_id}")
        return self._alert(row)

    def list(self, status: AlertStatus | None = None) -> builtins.list[Alert]:
        """Alerts, newest first; only those with ``status`` when given.

        Raises:
            ValueError: an unknown status.
        """
        if status is not None and status not in ALERT_STATUSES:
            raise ValueError(f"status must be one of {ALERT_STATUSES}, got {status!r}")
        where = " WHERE a.status = ?" if status is not None else ""
        args: tuple[Any, ...] = (status,) if status is not None else ()
        with self._connect() as con:
            rows = con.execute(self._SELECT + where + " ORDER BY a.id DESC", args).fetchall()
        return [self._alert(r) for r in rows]

    def acknowledge(self, alert_id: int, by: str) -> Alert:
        """Mark alert ``alert_id`` as seen by ``by``; an acknowledged alert is returned
        unchanged (the first acknowledgement stands).

        Raises:
            ValueError: an empty ``by``, or a closed alert.
            LookupError: no such alert.
        """
        if not by or not by.strip():
            raise ValueError("acknowledged_by must name someone")
        with self._transaction() as con:
            row = con.execute("SELECT status FROM alerts WHERE id = ?", (alert_id,)).fetchone()
            if row is None:
                raise LookupError(f"no alert with id {alert_id}")
            if row["status"] == "closed":
                raise ValueError(f"alert {alert_id} is closed (its drift episode ended)")
            if row["status"] == "open":
                con.execute("UPDATE alerts SET status = 'acknowledged', acknowledged_by = ?,"
                            " acknowledged_at = ? WHERE id = ?", (by.strip(), _now(), alert_id))
        return self.get(alert_id)
