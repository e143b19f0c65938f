"""``voiceloop demo`` — the whole loop, end to end, on one machine (``make demo``).

1. A fresh demo workspace; the base corpus (``retrain.base_profile``: replay data and
   the gate's golden set) is built while the servers start: a Prefect server, the flow
   deployments (``voiceloop flows serve``: the retraining flow listens for the drift
   event, the promotion flow for finished retrainings), the MLflow UI, and the inference
   service, whose first ``production`` model is the released one (seeded into the
   registry).
2. Baseline users (``simulate baseline``); ingestion; drift thresholds calibrated on the
   first baseline windows; a drift check on a later baseline window: no drift.
3. A drift scenario (``--scenario``, default ``accent_shift``: voices the seed model never
   heard); ingestion; the drift check raises an alert and the ``voiceloop.drift.detected``
   event; the event starts the retraining deployment, which registers a ``candidate``;
   its completion starts the promotion deployment: the offline gate, then canary steps
   on live traffic (the demo keeps simulated users talking), then promotion.
4. The same scenario again, now answered by the new production model: accuracy before
   and after.
5. A deliberately bad candidate (trained on shuffled labels) is caught by the gate (or
   the canary) and never becomes production.
6. When the drift-triggered candidate was promoted: the monitor on the new version,
   judged against its own first live rows once it has warmed up — the shift it was
   retrained for must not be found again.

It prints a short story with the figures, each decision and why, and the URLs of the
Prefect UI, the MLflow UI and the Evidently report; progress lines all along.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from voiceloop.settings import Settings

__all__ = ["DemoStory", "run_demo"]

log = logging.getLogger(__name__)


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _free_port(preferred: int) -> int:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])


@dataclass
class _Process:
    name: str
    proc: subprocess.Popen
    log: Path


class _Processes:
    """Background servers of the demo, stopped (SIGINT, then SIGKILL) on exit."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.items: list[_Process] = []

    def start(self, name: str, args: list[str], env: dict[str, str]) -> _Process:
        path = self.logs / f"{name}.log"
        out = path.open("w")
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        item = _Process(name, proc, path)
        self.items.append(item)
        return item

    def stop(self) -> None:
        for item in reversed(self.items):
            if item.proc.poll() is None:
                os.killpg(item.proc.pid, signal.SIGINT)
        deadline = time.monotonic() + 30
        for item in reversed(self.items):
            try:
                item.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(item.proc.pid, signal.SIGKILL)


def _wait_http(url: str, what: str, proc: _Process, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise RuntimeError(f"{what} exited: see {proc.log}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{what} did not answer at {url} within {timeout_s:g} s: see {proc.log}")


@dataclass
class DemoStory:
    """What happened, for the closing story (and a JSON record)."""

    events: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def add(self, line: str) -> None:
        self.events.append(line)
        _say(line)


DRIFT_CHECKS = 3
"""Drift checks on successive windows of the drifted users before the demo gives up."""


def paired_scores(settings: Settings, registry: Any, run_id: str, since: datetime,
                  versions: list[str]) -> dict[str, dict[str, float]]:
    """Each registry version's scores on the requests of simulator run ``run_id`` (sent
    at or after ``since``): their stored audio re-answered offline by every version,
    against the annotations of that run — the same utterances for every version.

    Raises:
        LookupError: the run left no annotated request in the traffic store.
    """
    from model.evaluation.report import evaluate
    from model.inference.onnx import load_predictor
    from monitoring.canary import collect_traffic
    from serving.annotations import AnnotationStore, labelled_rows
    from voiceloop.registry import VersionRef

    labels = AnnotationStore(settings.annotations_root).read(run_id=run_id)
    frame = collect_traffic(settings.traffic_root, since)
    rows = labelled_rows(settings.traffic_root, frame[frame["kind"] == "request"], labels,
                         settings.traffic_audio_cache)
    if not rows:
        raise LookupError(f"simulator run {run_id}: no annotated request in the traffic store")
    scores: dict[str, dict[str, float]] = {}
    for version in versions:
        folder = registry.model_folder(VersionRef(registry.name, version, None, ""))
        predictor = load_predictor(folder, batch_size=settings.decode.batch_size, threads=2)
        report = evaluate(rows, predictor.predict_files([r.id for r in rows],
                                                        [Path(r.audio) for r in rows]))
        m = report.overall
        scores[version] = {"n": len(rows), "intent": m.intent_accuracy,
                           "frame": m.exact_match, "semer": m.semer, "slot_f1": m.slot_f1}
    return scores


def background_seed(settings: Settings, round_: int) -> int:
    """The simulator seed of the background users' ``round_``-th round (distinct per
    round, and from the seeds of the demo's measured runs)."""
    return settings.seed + 10_000 + round_


@contextmanager
def _traffic(url: str, scenario: str, settings: Settings, story: DemoStory,
             until: Callable[[], bool], rate: float) -> Iterator[None]:
    """Simulated users talking in the background until ``until()`` holds (or the block
    ends)."""
    from serving.simulator import simulate

    stop = threading.Event()
    reports = []

    def talk() -> None:
        # A new seed every round: with one seed each round re-sent the same 40 utterances
        # from the same devices, so the few devices a canary share routes to spoke the
        # same three sentences over and over, and the canary's intent mix "differed".
        for round_ in itertools.count():
            if stop.is_set() or until():
                break
            reports.append(simulate(url, scenario, settings=settings, requests=40, rate=rate,
                                    concurrency=4, max_seconds=60, progress=False,
                                    seed=background_seed(settings, round_)))

    thread = threading.Thread(target=talk, name="demo-users", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=120)
        story.figures.setdefault("background_requests", 0)
        story.figures["background_requests"] += sum(r.sent for r in reports)


def _failed_runs(flow_name: str) -> list[str]:
    """Names of ``flow_name``'s failed or crashed runs on the demo's Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                any_=[StateType.FAILED, StateType.CRASHED]))))
    return [r.name for r in runs]


def drift_line(check: dict[str, Any]) -> str:
    """The story's line for a drifted monitor run (``flows.monitor.monitor_flow``'s result).

    An alert — and the ``voiceloop.drift.detected`` event that starts the retraining — is
    raised once per drift *episode*: when an earlier window (e.g. a false alarm on the
    baseline check) left an episode open, this window raises none, and the retraining
    awaited next is the one that episode's event started.
    """
    reasons = "; ".join(check.get("reasons") or [])
    if check.get("alert_id") is not None:
        return (f"drift detected (alert {check['alert_id']}): {reasons}; event "
                "voiceloop.drift.detected emitted → the retraining deployment starts")
    return (f"drift detected: {reasons}; the drift episode an earlier window opened is still "
            "open (one alert and one event per episode), so the retraining its event "
            "started is the one awaited")


def _wait_for(check: Callable[[], Any], what: str, timeout_s: float, every_s: float = 5,
              flow: str | None = None, logs: Path | None = None) -> Any:
    """Poll ``check`` until it returns something truthy; fail at once when a run of the
    deployment ``flow`` that should make it happen failed (its log is in ``logs``)."""
    deadline, last = time.monotonic() + timeout_s, 0.0
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if flow is not None and (failed := _failed_runs(flow)):
            raise RuntimeError(f"{what}: the {flow} run {failed[0]} failed; see {logs} and "
                               "the run in the Prefect UI")
        if time.monotonic() - last > 30:
            _say(f"  … waiting for {what}")
            last = time.monotonic()
        time.sleep(every_s)
    raise TimeoutError(f"{what} did not happen within {timeout_s:g} s")


SETTLE_CHECKS = 3
"""Monitor checks on the promoted version before the demo stops waiting for its warm-up."""


def _settled_check(url: str, scenario: str, settings: Settings, story: DemoStory,
                   version: str, check: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run the monitor on the promoted version until it has warmed up, then once more.

    A retrained version is judged against its own first ``monitoring.reference_rows``
    live rows (``monitoring.adapted_reference: live``): the drifted traffic it was
    retrained for becomes its normal, so the shift that started the retraining must not
    be found again. Until it has answered that many rows the monitor says "warming up";
    the users keep talking (``check`` ingests, then runs the monitor flow)."""
    from serving.simulator import simulate

    window = settings.monitoring.drift.window_rows
    result: dict[str, Any] = {}
    for attempt in range(1, SETTLE_CHECKS + 1):
        result = check()
        decided = not result.get("warming_up") and result.get("sufficient", True)
        if decided or attempt == SETTLE_CHECKS:
            break
        if result.get("warming_up"):
            live = int(result.get("live_rows", 0))
            missing = settings.monitoring.reference_rows - live + window
            story.add(f"drift check on version {version}: warming up ({live} of the "
                      f"{settings.monitoring.reference_rows} rows of its live reference); "
                      f"{missing} more {scenario} requests")
        else:  # warmed up, but too few rows after its reference for a decision
            seen = int(result.get("window") or 0)
            missing = window - seen
            story.add(f"drift check on version {version}: {seen} rows after its live "
                      f"reference, too few for a decision; {missing} more {scenario} requests")
        _say(f"{scenario} users: {missing} requests for version {version}'s warm-up …")
        # ~10 % more: quarantined or feedback rows do not count.
        simulate(url, scenario, settings=settings, requests=int(missing * 1.1) + 1, rate=0,
                 concurrency=4, progress=False, seed=settings.seed + 200 + attempt)
    story.figures["settled_check"] = {k: result.get(k) for k in
                                      ("drifted", "sufficient", "warming_up", "window",
                                       "reasons", "report_dir")}
    if result.get("warming_up") or not result.get("sufficient", True):
        story.add(f"version {version}: no drift decision after {SETTLE_CHECKS} checks "
                  "(warming up, or too few rows after its live reference)")
    elif result.get("drifted"):
        story.add(f"drift check on version {version} against its own live reference: DRIFT "
                  f"again on {result.get('window')} {scenario} requests: "
                  + "; ".join(result.get("reasons") or []))
    else:
        story.add(f"drift check on version {version} against its own first "
                  f"{settings.monitoring.reference_rows} live rows: no drift on the latest "
                  f"{result.get('window')} {scenario} requests — the shift it was retrained "
                  "for is its normal now")
    return result


def run_demo(settings: Settings, scenario: str = "accent_shift", keep_running: bool = False,
             requests: int = 300) -> DemoStory:
    """Run the loop end to end in ``settings.workspace`` (wiped first); see the module
    docstring. Returns the story; raises when a step fails (servers are stopped)."""
    from flows.common import monitored_model
    from flows.ingest import ingest_flow
    from flows.monitor import monitor_flow, reference_task
    from flows.retrain import retrain_flow
    from monitoring.drift import ReferenceStore, calibrate_thresholds, consecutive_windows
    from monitoring.ingest import curated_root
    from monitoring.reference import load_window
    from serving.simulator import simulate
    from voiceloop.registry import Registry
    from voiceloop.stages import corpus_stage, seed_production

    started = time.monotonic()
    story = DemoStory()
    ws = settings.workspace

    def ingest_and_check() -> dict[str, Any]:
        """Ingest the committed traffic, then run the drift monitor on it."""
        ingest_flow(settings.profile, str(ws))
        return monitor_flow(settings.profile, str(ws))

    if ws.exists():
        shutil.rmtree(ws)
    (ws / "logs").mkdir(parents=True)
    base = settings.model_copy(update={"profile": settings.retrain.base_profile})
    ports = {"prefect": _free_port(4200), "mlflow": _free_port(5000), "service": _free_port(8000)}
    prefect_url = f"http://127.0.0.1:{ports['prefect']}"
    env = {**os.environ, "PREFECT_API_URL": f"{prefect_url}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_HOME": str(ws / "prefect"),
           "PREFECT_UI_API_URL": f"{prefect_url}/api", "VOICELOOP_WORKSPACE": str(ws),
           "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "1"}
    os.environ.update({k: env[k] for k in ("PREFECT_API_URL", "PREFECT_SERVER_ANALYTICS_ENABLED",
                                           "PREFECT_HOME", "VOICELOOP_WORKSPACE")})
    py = sys.executable
    procs = _Processes(ws / "logs")
    # `kill` of the demo must stop its servers too: SIGTERM unwinds like Ctrl-C.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    # Prefect reads its settings once, at import: the in-process flow runs below would
    # otherwise start an ephemeral server of their own and their events (the drift event
    # that starts the retraining deployment) would never reach the demo's server.
    import prefect.settings as ps

    api_settings = ps.temporary_settings(updates={
        ps.PREFECT_API_URL: env["PREFECT_API_URL"], ps.PREFECT_HOME: env["PREFECT_HOME"],
        ps.PREFECT_SERVER_ANALYTICS_ENABLED: False})
    api_settings.__enter__()
    try:
        _say(f"demo workspace {ws}; starting the Prefect server, the MLflow UI and the base "
             f"corpus ({base.profile} profile)")
        prefect = procs.start("prefect-server", [py, "-m", "prefect", "server", "start", "--host",
                                                 "127.0.0.1", "--port", str(ports["prefect"])], env)
        mlflow_ui = procs.start("mlflow-ui", [py, "-m", "mlflow", "ui", "--backend-store-uri",
                                              settings.tracking_uri, "--host", "127.0.0.1",
                                              "--port", str(ports["mlflow"]), "--workers", "1"], env)
        corpus = corpus_stage(base, progress=True)  # minutes on a fresh clone: show the bars
        story.add(f"base corpus: {corpus.written} utterances (replay data, golden set, and the "
                  f"model's reference), validated by Great Expectations")
        _wait_http(f"{prefect_url}/api/health", "the Prefect server", prefect)
        version = seed_production(settings)
        registry = Registry(settings)
        story.add(f"registry seeded: the released model is version {version}, alias production")
        # The story runs ingestion and monitoring itself; a schedule firing mid-story
        # (the hourly drift check) would judge a model the story has not calibrated yet.
        procs.start("flows", [py, "-m", "voiceloop.cli", "flows", "serve", "--profile",
                              settings.profile, "--workspace", str(ws), "--no-schedules"], env)
        service = procs.start("service", [py, "-m", "voiceloop.cli", "serve", "--profile",
                                          settings.profile, "--workspace", str(ws), "--port",
                                          str(ports["service"]), "--quiet"], env)
        url = f"http://127.0.0.1:{ports['service']}"
        _wait_http(f"{url}/readyz", "the inference service", service)
        _wait_http(f"http://127.0.0.1:{ports['mlflow']}", "the MLflow UI", mlflow_ui)
        story.add(f"service ready at {url}; Prefect UI {prefect_url}; MLflow UI "
                  f"http://127.0.0.1:{ports['mlflow']}")

        # Baseline: calibration windows first, then a judged window held apart from them.
        _say(f"baseline users: {requests} requests …")
        calib = simulate(url, "baseline", settings=settings, requests=requests, rate=0,
                         concurrency=4, progress=False)
        _say("ingesting the traffic and building the model's drift reference …")
        ingest_flow(settings.profile, str(ws))
        prod = registry.alias("production")
        assert prod is not None
        # The reference only, not a drift check: judged with thresholds made for another
        # window size, this window would open a (false) drift episode and start a retraining.
        target = monitored_model(settings)
        reference = reference_task.fn(settings, target).frame
        assert reference is not None  # the seed model: its corpus split, never "warming up"
        store = ReferenceStore.for_workspace(ws)
        pool = load_window(curated_root(settings), target.version, 100_000)
        drift_settings = settings.monitoring.drift
        windows = consecutive_windows(pool, drift_settings.window_rows, 20)
        thresholds = calibrate_thresholds(reference, windows, drift_settings,
                                          seed=settings.seed)
        store.save_thresholds(target.version, thresholds)
        story.figures["baseline_before"] = {"intent": calib.intent_accuracy,
                                            "frame": calib.frame_accuracy}
        story.add(f"baseline users: {calib.sent} requests, intent accuracy "
                  f"{calib.intent_accuracy:.1%}, exact frame {calib.frame_accuracy:.1%}; drift "
                  f"thresholds calibrated on 20 baseline windows of {drift_settings.window_rows}")
        judged = simulate(url, "baseline", settings=settings, requests=drift_settings.window_rows,
                          rate=0, concurrency=4, progress=False)
        check = ingest_and_check()
        story.add(f"drift check on a new baseline window ({judged.sent} requests): "
                  + ("DRIFT (a false alarm)" if check["drifted"] else "no drift"))

        # The world changes.
        _say(f"{scenario} users: {requests} requests …")
        drift = simulate(url, scenario, settings=settings, requests=requests, rate=0,
                         concurrency=4, progress=False)
        story.figures["drift_before"] = {"intent": drift.intent_accuracy,
                                         "frame": drift.frame_accuracy,
                                         "version": prod.version}
        story.add(f"{scenario} users: {drift.sent} requests; production version {prod.version} "
                  f"answers intent {drift.intent_accuracy:.1%}, exact frame "
                  f"{drift.frame_accuracy:.1%}")
        # The monitor judges the latest window; a subtle shift (accent_shift: detection
        # delay ~100 samples at 200-row windows, benchmarks/drift_detection.py) may take
        # more than one window, as it would on the hourly schedule: the users keep talking.
        for attempt in range(1, DRIFT_CHECKS + 1):
            check = ingest_and_check()
            if check["drifted"] or attempt == DRIFT_CHECKS:
                break
            story.add(f"drift check {attempt} on the latest {drift_settings.window_rows} "
                      f"requests: no drift yet; the {scenario} users keep talking")
            simulate(url, scenario, settings=settings, requests=drift_settings.window_rows,
                     rate=0, concurrency=4, progress=False, seed=settings.seed + 100 + attempt)
        story.figures["evidently_report"] = f"{check.get('report_dir')}/drift.html"
        if not check["drifted"]:
            raise RuntimeError(f"{DRIFT_CHECKS} drift checks missed the {scenario} shift: {check}")
        story.add(drift_line(check))

        def candidate_done() -> str | None:
            cand = registry.alias("candidate") or registry.alias("canary")
            return cand.version if cand else None

        new = _wait_for(candidate_done, "the drift-triggered retraining", 1500,
                        flow="voiceloop-retrain", logs=ws / "logs" / "flows.log")
        tags = registry.version_tags(new)
        story.add(f"retraining registered candidate version {new}: labels used "
                  f"{tags.get('labels_used')} (budget), from parent version "
                  f"{tags.get('parent_version')}; the promotion deployment starts")

        def rolled_out(version: str) -> str | None:
            status = registry.version_tags(version).get("rollout.status")
            return status if status in ("promoted", "rolled_back", "rejected") else None

        with _traffic(url, scenario, settings, story, lambda: rolled_out(new) is not None, 8.0):
            status = _wait_for(lambda: rolled_out(new), "the gate and canary of the candidate",
                               1500, flow="voiceloop-promote", logs=ws / "logs" / "flows.log")
        tags = registry.version_tags(new)
        story.add(f"version {new}: gate {tags.get('gate.result')}; {status}: "
                  f"{tags.get('rollout.reason', '')}")
        _say(f"{scenario} users again: {requests} requests …")
        after_start = datetime.now(UTC)
        after = simulate(url, scenario, settings=settings, requests=requests, rate=0,
                         concurrency=4, progress=False, seed=settings.seed + 7)
        now = registry.alias("production")
        story.figures["drift_after"] = {"intent": after.intent_accuracy,
                                        "frame": after.frame_accuracy,
                                        "version": now.version if now else None}
        story.add(f"{scenario} users again (a fresh draw: the first one was trained on): "
                  f"production version {now.version if now else '-'} answers intent "
                  f"{after.intent_accuracy:.1%}, exact frame {after.frame_accuracy:.1%}")
        # Before/after on the same utterances: both versions re-answer this draw offline.
        paired = paired_scores(settings, registry, after.run_id, after_start,
                               sorted({prod.version, now.version if now else prod.version}))
        story.figures["drift_paired"] = paired
        story.add("on the same " + str(next(iter(paired.values()))["n"]) + " utterances: " + "; ".join(
            f"version {v} intent {s['intent']:.1%}, exact frame {s['frame']:.1%}, SemER "
            f"{s['semer']:.1%}" for v, s in paired.items()))

        # A deliberately bad candidate.
        story.add("a deliberately bad candidate: retraining on shuffled intent labels")
        ingest_flow(settings.profile, str(ws))
        bad = retrain_flow(settings.profile, str(ws), corrupt_labels=True, reason="demo: bad candidate")
        if bad.get("status") != "registered":
            raise RuntimeError(f"the bad candidate was not trained: {bad}")
        with _traffic(url, scenario, settings, story,
                      lambda: rolled_out(bad["version"]) is not None, 8.0):
            status = _wait_for(lambda: rolled_out(bad["version"]), "the bad candidate's rollout", 1500)
        tags = registry.version_tags(bad["version"])
        story.add(f"bad version {bad['version']}: {status}: {tags.get('rollout.reason', '')[:300]}")
        if now is not None and now.version != prod.version:
            # Last, because a drift found here would start a retraining of its own.
            _settled_check(url, scenario, settings, story, now.version, ingest_and_check)
        aliases = registry.aliases()
        production_count = sum(1 for a in aliases if a == "production")
        story.figures.update({"aliases": aliases, "production_count": production_count,
                              "minutes": round((time.monotonic() - started) / 60, 1),
                              "prefect_ui": prefect_url,
                              "mlflow_ui": f"http://127.0.0.1:{ports['mlflow']}"})
        story.add(f"registry: {aliases} — exactly {production_count} production alias; "
                  f"{story.figures['minutes']} min in all")
        if keep_running:
            _say("servers keep running; Ctrl-C to stop")
            while True:
                time.sleep(3600)
        return story
    finally:
        try:  # the in-process flows' last log lines, while the Prefect server still runs
            from prefect.logging.handlers import APILogHandler

            APILogHandler().flush()
        except Exception:
            log.debug("flushing Prefect's API logs failed", exc_info=True)
        procs.stop()
        api_settings.__exit__(None, None, None)
