"""The traffic simulator: synthetic users speaking to the service, with ground truth.

:func:`simulate` renders a scenario's utterances (:mod:`serving.scenarios`: grammar →
TTS → augmentation, in a worker pool ahead of the clients) and sends them as WAV uploads
to ``POST {url}/v1/understand`` from ``concurrency`` client threads, at a target overall
rate. Each request comes from one of ``devices`` simulated users (a stable
``X-Device-Id``). After each answer the user compares it with what they meant (intent
and slots) and, with probability ``p_wrong`` when it was wrong (``p_right`` when right),
sends implicit feedback (``POST {url}/v1/feedback``: ``repeat``, or ``correction`` with
the true transcript). The ground truth of every answered request goes to the annotation
store (:mod:`serving.annotations`), keyed by the ``request_id`` the service returned —
never to the traffic store.

A run is bounded twice: at most ``requests`` requests, and no request starts after
``max_seconds`` (counted from the call, setup included); requests in flight then finish
or time out (``timeout_s``), so a run lasts at most about ``max_seconds + timeout_s``.

The run's :class:`SimulationReport` balances: ``sent == answered + sum(errors)``, and
``requests == sent + render_failed + not_sent``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import httpx
import numpy as np
from pydantic import BaseModel, ValidationError
from tqdm import tqdm

from model.data.manifest import Slot
from model.data.seeding import stable_rng
from serving.annotations import AnnotationStore
from serving.contracts import Annotation, ErrorBody, FeedbackRequest, UnderstandResponse
from serving.scenarios import (
    RenderFailure,
    Scenario,
    ScenarioSampler,
    SimUtterance,
    load_scenario,
    render_utterances,
)
from voiceloop.settings import FeedbackSettings, Settings

__all__ = [
    "LatencySummary",
    "PopulationStats",
    "SimulationReport",
    "device_ids",
    "feedback_kind",
    "frame_correct",
    "simulate",
]

log = logging.getLogger(__name__)

_DONE = object()  # end of the rendered stream
StopReason = Literal["count", "time", "interrupted", "render_error"]
_POLL_S = 0.1


# -- report -------------------------------------------------------------------------------


class LatencySummary(BaseModel):
    """Latency percentiles in milliseconds over ``count`` answers."""

    count: int
    p50: float
    p95: float
    p99: float
    mean: float
    max: float

    @classmethod
    def of(cls, values: Iterable[float]) -> LatencySummary | None:
        arr = np.asarray(list(values), dtype=float)
        if arr.size == 0:
            return None
        p50, p95, p99 = np.percentile(arr, [50, 95, 99])
        return cls(count=int(arr.size), p50=round(float(p50), 2), p95=round(float(p95), 2),
                   p99=round(float(p99), 2), mean=round(float(arr.mean()), 2),
                   max=round(float(arr.max()), 2))


class PopulationStats(BaseModel):
    """What one population of the scenario did in the run."""

    rendered: int = 0
    sent: int = 0
    answered: int = 0
    intent_accuracy: float | None = None
    frame_accuracy: float | None = None


class SimulationReport(BaseModel):
    """One simulated run.

    Attributes:
        run_id: names the run's annotation files.
        scenario, url, seed: what was run against what.
        requests: the count bound; ``max_seconds`` the time bound; ``rate`` the target
            rate (0 = unpaced); ``concurrency`` the client threads.
        stopped_by: ``count`` (every request handled), ``time`` (the time bound hit
            first), ``interrupted`` (Ctrl-C) or ``render_error`` (rendering died; logged).
        rendered / render_failed: utterances rendered / that could not be (not sent).
        not_sent: rendered or planned but never sent (time bound or interruption).
        sent: requests sent; ``answered`` got a valid 2xx answer; ``errors`` counts the
            rest by ``"<status> <code>"`` (``"503 overloaded"``), ``timeout``,
            ``transport <Error>`` or ``"<status> bad_response"``.
        latency_ms: client-side round trip; ``server_latency_ms`` the answers'
            ``latency_ms``.
        intent_accuracy / frame_accuracy: share of answers with the right intent / the
            right intent and exactly the right slots.
        wrong: answers whose frame was wrong; ``clarified`` answers with ``clarify``.
        feedback: feedback accepted by kind (``repeat``, ``correction``);
            ``feedback_errors`` feedback the service refused or did not answer.
        routes: answers per route (``production``, ``canary``);
            ``frame_accuracy_by_route`` their accuracy; ``model_versions`` answers per
            model version.
        devices: distinct device ids that sent requests.
        mixture: per population of the scenario (the mixture actually used).
        annotations_written: annotations written (one per answered request) under
            ``annotations_root``.
        setup_s: time before the first request was sent; ``wall_s`` the whole run;
            ``achieved_rate`` requests/s while sending.
    """

    run_id: str
    scenario: str
    url: str
    seed: int
    started_at: datetime
    requests: int
    max_seconds: float
    rate: float
    concurrency: int
    stopped_by: StopReason
    rendered: int
    render_failed: int
    not_sent: int
    sent: int
    answered: int
    errors: dict[str, int]
    latency_ms: LatencySummary | None
    server_latency_ms: LatencySummary | None
    intent_accuracy: float | None
    frame_accuracy: float | None
    wrong: int
    clarified: int
    feedback: dict[str, int]
    feedback_errors: dict[str, int]
    routes: dict[str, int]
    frame_accuracy_by_route: dict[str, float]
    model_versions: dict[str, int]
    devices: int
    mixture: dict[str, PopulationStats]
    annotations_written: int
    annotations_root: str
    setup_s: float
    wall_s: float
    achieved_rate: float

    def to_table(self) -> str:
        """The report as a small plain-text table."""

        def pct(value: float | None) -> str:
            return "-" if value is None else f"{100 * value:.1f} %"

        def lat(s: LatencySummary | None) -> str:
            return "-" if s is None else f"p50 {s.p50:.0f} / p95 {s.p95:.0f} / p99 {s.p99:.0f} ms"

        rows = [
            ("scenario", f"{self.scenario} (seed {self.seed}) → {self.url}"),
            ("stopped by", (f"{self.stopped_by} after {self.wall_s:.1f} s "
                            f"(setup {self.setup_s:.1f} s)")),
            ("requests", (f"{self.sent} sent of {self.requests}; {self.answered} answered, "
                          f"{sum(self.errors.values())} errors, {self.render_failed} not "
                          f"rendered, {self.not_sent} not sent")),
            ("rate", (f"{self.achieved_rate:.2f} req/s (target "
                      f"{self.rate or 'unpaced'}, {self.concurrency} clients)")),
            ("errors", ", ".join(f"{k}: {v}" for k, v in sorted(self.errors.items())) or "-"),
            ("latency (client)", lat(self.latency_ms)),
            ("latency (server)", lat(self.server_latency_ms)),
            ("intent accuracy", pct(self.intent_accuracy)),
            ("frame accuracy", pct(self.frame_accuracy)),
            ("clarified", str(self.clarified)),
            ("feedback", ", ".join(f"{k}: {v}" for k, v in sorted(self.feedback.items()))
             or "-"),
            ("routes", ", ".join(
                f"{k}: {v} ({pct(self.frame_accuracy_by_route.get(k))} frame)"
                for k, v in sorted(self.routes.items())) or "-"),
            ("devices", str(self.devices)),
            ("mixture", ", ".join(
                f"{k}: {v.sent} sent ({pct(v.frame_accuracy)} frame)"
                for k, v in self.mixture.items())),
            ("annotations", f"{self.annotations_written} → {self.annotations_root}"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# -- helpers -------------------------------------------------------------------------------


def device_ids(count: int) -> list[str]:
    """The simulated users' device ids: ``sim-device-000`` … (stable across runs)."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    return [f"sim-device-{k:03d}" for k in range(count)]


def frame_correct(answer_intent: str, answer_slots: Iterable[Slot], intent: str,
                  slots: Iterable[Slot]) -> bool:
    """True when the answer's intent and its slots (as a multiset of type/value pairs,
    order ignored) are exactly the truth's."""
    def key(items: Iterable[Slot]) -> list[tuple[str, str]]:
        return sorted((s.type, s.value) for s in items)

    return answer_intent == intent and key(answer_slots) == key(slots)


def feedback_kind(seed: int, index: int, frame_ok: bool, settings: FeedbackSettings
                  ) -> Literal["repeat", "correction"] | None:
    """The implicit feedback the user of request ``index`` gives, or None: with
    probability ``p_right`` / ``p_wrong`` (answer right / wrong), a ``correction`` with
    probability ``correction_share``, else a ``repeat``. Deterministic by
    ``(seed, index)``."""
    rng = stable_rng(seed, "sim-feedback", index)
    if rng.random() >= (settings.p_right if frame_ok else settings.p_wrong):
        return None
    return "correction" if rng.random() < settings.correction_share else "repeat"


def _error_key(response: httpx.Response) -> str:
    try:
        code = ErrorBody.model_validate_json(response.content).error.code
    except ValidationError:
        code = "no_error_body"
    return f"{response.status_code} {code}"


def _transport_key(exc: httpx.HTTPError) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    return f"transport {type(exc).__name__}"


class _Refused(Exception):
    """A request that got no valid answer; the message is its error key."""


@dataclass
class _Answered:
    population: str
    intent_ok: bool
    frame_ok: bool
    route: str
    model_version: str
    clarify: bool
    latency_ms: float
    server_latency_ms: float


class _Pacer:
    """Spaces request starts ``1 / rate`` apart over all clients (no catch-up bursts)."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self._next: float | None = None
        self._lock = threading.Lock()

    def wait(self, stop: threading.Event, deadline: float) -> bool:
        """Wait for this client's slot; False when the run stops or ends first."""
        if not self.interval:
            return time.monotonic() < deadline
        with self._lock:
            now = time.monotonic()
            slot = max(self._next if self._next is not None else now, now)
            self._next = slot + self.interval
        if slot >= deadline:
            return False
        delay = slot - time.monotonic()
        return not (delay > 0 and stop.wait(delay))


class _Run:
    """Shared state of one run (every mutation under ``lock``)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rendered: Counter[str] = Counter()
        self.render_failed = 0
        self.render_reasons: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.answers: list[_Answered] = []
        self.latencies: list[float] = []
        self.feedback: Counter[str] = Counter()
        self.feedback_errors: Counter[str] = Counter()
        self.devices: set[str] = set()
        self.annotations: list[Annotation] = []
        self.first_send: float | None = None
        self.last_done: float | None = None
        self.produced_all = False
        self.producer_failed = False
        self.time_up = False


# -- the run -------------------------------------------------------------------------------


def simulate(
    url: str,
    scenario: str | Scenario,
    *,
    settings: Settings,
    requests: int | None = None,
    rate: float | None = None,
    seed: int | None = None,
    concurrency: int | None = None,
    max_seconds: float | None = None,
    timeout_s: float | None = None,
    feedback: FeedbackSettings | None = None,
    annotations_root: str | Path | None = None,
    render_workers: int | None = None,
    devices: int | None = None,
    ramp_to: str | None = None,
    run_id: str | None = None,
    progress: bool = True,
) -> SimulationReport:
    """Drive the service at ``url`` with simulated users of ``scenario``.

    Every argument left None takes its value from ``settings.simulator``.

    Args:
        url: the service's base URL (``http://127.0.0.1:8000``).
        scenario: a scenario name of ``settings.simulator.scenarios`` or a resolved
            :class:`~serving.scenarios.Scenario`.
        settings: the profile's settings (corpus distribution, simulator defaults,
            workspace).
        requests: count bound: requests to send at most.
        rate: target requests/s over all clients; 0 = as fast as the clients go.
        seed: seed of the run (non-negative); default ``settings.seed``.
        concurrency: client threads (= requests in flight at most).
        max_seconds: time bound: no request starts later than this after the call.
        timeout_s: per HTTP request.
        feedback: implicit-feedback probabilities.
        annotations_root: the annotation store; default ``settings.annotations_root``.
        render_workers: TTS + augmentation processes (0 = one per core, 1 = a thread).
        devices: simulated users (device ids ``sim-device-000`` …).
        ramp_to: for a ramp scenario, the population it ramps to.
        run_id: names the annotation files; default timestamp + scenario + seed.
        progress: show a tqdm bar (a log line every ``log_every_s`` is always written).

    Returns:
        The run's :class:`SimulationReport`.

    Raises:
        ValueError: a bad URL, scenario or argument.
        ConnectionError: nothing answers ``GET {url}/healthz``.
    """
    started = time.monotonic()
    started_at = datetime.now(UTC)
    sim = settings.simulator
    requests = sim.requests if requests is None else requests
    rate = sim.rate if rate is None else rate
    seed = settings.seed if seed is None else seed
    concurrency = sim.concurrency if concurrency is None else concurrency
    max_seconds = sim.max_seconds if max_seconds is None else max_seconds
    timeout_s = sim.timeout_s if timeout_s is None else timeout_s
    feedback = feedback or sim.feedback
    render_workers = sim.render_workers if render_workers is None else render_workers
    n_devices = sim.devices if devices is None else devices
    for name, value, low in (("requests", requests, 1), ("concurrency", concurrency, 1),
                             ("devices", n_devices, 1), ("seed", seed, 0),
                             ("rate", rate, 0), ("render_workers", render_workers, 0)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    for name, value in (("max_seconds", max_seconds), ("timeout_s", timeout_s)):
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    base_url = _check_url(url)
    if isinstance(scenario, str):
        scenario = load_scenario(settings, scenario, ramp_to=ramp_to)
    elif ramp_to is not None:
        raise ValueError("ramp_to applies to a scenario given by name")
    run_id = run_id or (f"{started_at:%Y%m%dT%H%M%SZ}-{scenario.name}-{seed}-"
                        f"{uuid.uuid4().hex[:6]}")
    store = AnnotationStore(annotations_root or settings.annotations_root, run_id,
                            traffic_root=settings.traffic_root)
    deadline = started + max_seconds
    pool = device_ids(n_devices)

    client = httpx.Client(
        base_url=base_url, timeout=timeout_s, trust_env=False,
        limits=httpx.Limits(max_connections=concurrency + 1,
                            max_keepalive_connections=concurrency + 1),
    )
    with client:
        _check_health(client, base_url, min(timeout_s, 10.0))
        log.info("simulate %s (%s): %d requests at %s req/s, %d clients, <= %.0f s → %s",
                 scenario.name, scenario.description or scenario.kind, requests,
                 rate or "max", concurrency, max_seconds, base_url)
        sampler = ScenarioSampler(settings, scenario, seed, requests)
        run = _Run()
        stop = threading.Event()
        rendered_q: queue.Queue = queue.Queue(maxsize=sim.prefetch)
        pacer = _Pacer(rate)
        bar = tqdm(total=requests, desc=f"simulate {scenario.name}", unit="req",
                   disable=not progress)

        def produce() -> None:
            stream = render_utterances(
                settings, scenario, count=requests, seed=seed,
                cache_dir=settings.simulations_dir, workers=render_workers,
                prefetch=sim.prefetch, babble_utterances=sim.babble_utterances,
                sampler=sampler,
            )
            try:
                with closing(stream):
                    for item in stream:
                        if stop.is_set():
                            return
                        if isinstance(item, RenderFailure):
                            with run.lock:
                                run.render_failed += 1
                                run.render_reasons[item.reason.split(":")[0]] += 1
                            bar.update()
                            continue
                        with run.lock:
                            run.rendered[item.scenario] += 1
                        while not stop.is_set():
                            try:
                                rendered_q.put(item, timeout=_POLL_S)
                                break
                            except queue.Full:
                                continue
                run.produced_all = True
            except Exception:  # a dying producer must end the run, loudly
                log.exception("rendering failed; stopping the run")
                run.producer_failed = True
            finally:
                _put_done(rendered_q, stop)

        def consume() -> None:
            while not stop.is_set():
                try:
                    item = rendered_q.get(timeout=_POLL_S)
                except queue.Empty:
                    continue
                if item is _DONE:
                    _put_done(rendered_q, stop)
                    return
                if time.monotonic() >= deadline or not pacer.wait(stop, deadline):
                    if not stop.is_set():
                        run.time_up = True
                    stop.set()
                    return
                _send(client, item, pool, seed, feedback, deadline, run)
                bar.update()

        producer = threading.Thread(target=produce, name="sim-render", daemon=True)
        clients = [threading.Thread(target=consume, name=f"sim-client-{k}", daemon=True)
                   for k in range(concurrency)]
        producer.start()
        for thread in clients:
            thread.start()
        interrupted = False
        written = 0
        last_log = time.monotonic()
        try:
            while alive := [t for t in clients if t.is_alive()]:
                alive[0].join(timeout=0.25)
                if time.monotonic() >= deadline and not stop.is_set():
                    run.time_up = True
                    stop.set()
                written += _flush(store, run)
                if time.monotonic() - last_log >= sim.log_every_s:
                    last_log = time.monotonic()
                    _log_progress(scenario.name, run, requests, started)
        except KeyboardInterrupt:
            interrupted = True
            stop.set()
            for thread in clients:
                thread.join(timeout=timeout_s)
        finally:
            stop.set()
            bar.close()
            producer.join(timeout=10.0)
            if producer.is_alive():
                log.warning("the render thread is still busy; it will clean up when done")
            written += _flush(store, run)

    wall = time.monotonic() - started
    stopped_by: StopReason = (
        "interrupted" if interrupted else "render_error" if run.producer_failed
        else "time" if run.time_up or not run.produced_all else "count")
    return _report(run, scenario, base_url, seed, started_at, requests, max_seconds, rate,
                   concurrency, stopped_by, written, store, started, wall)


def _check_url(url: str) -> str:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ValueError(f"invalid service URL {url!r}: {exc}") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"service URL must be http(s)://host[:port], got {url!r}")
    return str(parsed).rstrip("/")


def _check_health(client: httpx.Client, url: str, timeout: float) -> None:
    try:
        response = client.get("/healthz", timeout=timeout)
    except httpx.HTTPError as exc:
        raise ConnectionError(f"no service answers {url}/healthz: {exc!r}") from exc
    if response.status_code != 200:
        log.warning("%s/healthz answered %d; simulating anyway", url, response.status_code)


def _put_done(q: queue.Queue, stop: threading.Event) -> None:
    while True:
        try:
            q.put(_DONE, timeout=_POLL_S)
            return
        except queue.Full:
            if stop.is_set():
                return


def _send(client: httpx.Client, item: SimUtterance, pool: list[str], seed: int,
          feedback: FeedbackSettings, deadline: float, run: _Run) -> None:
    """Send one utterance, judge the answer, annotate it and maybe give feedback."""
    device = pool[int(stable_rng(seed, "sim-device", item.index).integers(len(pool)))]
    body = item.wav_bytes()
    with run.lock:
        run.sent[item.scenario] += 1
        run.devices.add(device)
        if run.first_send is None:
            run.first_send = time.monotonic()
    t0 = time.perf_counter()
    try:
        response = client.post("/v1/understand", content=body,
                               headers={"Content-Type": "audio/wav", "X-Device-Id": device})
    except httpx.HTTPError as exc:
        with run.lock:
            run.errors[_transport_key(exc)] += 1
            run.last_done = time.monotonic()
        return
    elapsed_ms = (time.perf_counter() - t0) * 1000.0
    try:
        if not 200 <= response.status_code < 300:
            raise _Refused(_error_key(response))
        try:
            answer = UnderstandResponse.model_validate_json(response.content)
        except ValidationError as exc:
            raise _Refused(f"{response.status_code} bad_response") from exc
    except _Refused as refused:
        with run.lock:
            run.errors[str(refused)] += 1
            run.last_done = time.monotonic()
        return
    frame_ok = frame_correct(answer.intent, answer.slots, item.intent, item.slots)
    with run.lock:
        run.latencies.append(elapsed_ms)
        run.answers.append(_Answered(
            population=item.scenario, intent_ok=answer.intent == item.intent,
            frame_ok=frame_ok, route=answer.route, model_version=answer.model_version,
            clarify=answer.clarify, latency_ms=elapsed_ms, server_latency_ms=answer.latency_ms,
        ))
        run.annotations.append(item.annotation(answer.request_id, datetime.now(UTC)))
        run.last_done = time.monotonic()
    kind = feedback_kind(seed, item.index, frame_ok, feedback)
    if kind is None or time.monotonic() >= deadline:
        return  # no feedback, or the run is over: no new calls
    request = FeedbackRequest(request_id=answer.request_id, kind=kind,
                              text=item.transcript if kind == "correction" else None)
    try:
        fb = client.post("/v1/feedback", json=request.model_dump(exclude_none=True))
    except httpx.HTTPError as exc:
        with run.lock:
            run.feedback_errors[_transport_key(exc)] += 1
        return
    with run.lock:
        if 200 <= fb.status_code < 300:
            run.feedback[kind] += 1
        else:
            run.feedback_errors[_error_key(fb)] += 1


def _flush(store: AnnotationStore, run: _Run) -> int:
    with run.lock:
        pending, run.annotations = run.annotations, []
    return store.write(pending) if pending else 0


def _log_progress(name: str, run: _Run, requests: int, started: float) -> None:
    with run.lock:
        sent = sum(run.sent.values())
        answered = len(run.answers)
        errors = sum(run.errors.values())
        ok = sum(a.frame_ok for a in run.answers)
    elapsed = time.monotonic() - started
    log.info("simulate %s: %d/%d sent, %d answered (frame %.0f %%), %d errors, %.1f s",
             name, sent, requests, answered, 100 * ok / answered if answered else 0.0,
             errors, elapsed)


def _share(flags: list[bool]) -> float | None:
    return round(sum(flags) / len(flags), 4) if flags else None


def _report(run: _Run, scenario: Scenario, url: str, seed: int, started_at: datetime,
            requests: int, max_seconds: float, rate: float, concurrency: int,
            stopped_by: StopReason, written: int,
            store: AnnotationStore, started: float, wall: float) -> SimulationReport:
    answers = run.answers
    sent = sum(run.sent.values())
    mixture: dict[str, PopulationStats] = {}
    for population in scenario.populations:
        mine = [a for a in answers if a.population == population.name]
        mixture[population.name] = PopulationStats(
            rendered=run.rendered[population.name], sent=run.sent[population.name],
            answered=len(mine), intent_accuracy=_share([a.intent_ok for a in mine]),
            frame_accuracy=_share([a.frame_ok for a in mine]),
        )
    routes = Counter(a.route for a in answers)
    sending = ((run.last_done or 0.0) - run.first_send) if run.first_send else 0.0
    return SimulationReport(
        run_id=store.run_id,
        scenario=scenario.name,
        url=url,
        seed=seed,
        started_at=started_at,
        requests=requests,
        max_seconds=max_seconds,
        rate=rate,
        concurrency=concurrency,
        stopped_by=stopped_by,
        rendered=sum(run.rendered.values()),
        render_failed=run.render_failed,
        not_sent=requests - sent - run.render_failed,
        sent=sent,
        answered=len(answers),
        errors=dict(run.errors),
        latency_ms=LatencySummary.of(run.latencies),
        server_latency_ms=LatencySummary.of(a.server_latency_ms for a in answers),
        intent_accuracy=_share([a.intent_ok for a in answers]),
        frame_accuracy=_share([a.frame_ok for a in answers]),
        wrong=sum(not a.frame_ok for a in answers),
        clarified=sum(a.clarify for a in answers),
        feedback=dict(run.feedback),
        feedback_errors=dict(run.feedback_errors),
        routes=dict(routes),
        frame_accuracy_by_route={
            r: _share([a.frame_ok for a in answers if a.route == r]) or 0.0 for r in routes},
        model_versions=dict(Counter(a.model_version for a in answers)),
        devices=len(run.devices),
        mixture=mixture,
        annotations_written=written,
        annotations_root=str(store.root),
        setup_s=round((run.first_send or time.monotonic()) - started, 3),
        wall_s=round(wall, 3),
        achieved_rate=round(sent / sending, 3) if sending > 0 else 0.0,
    )
