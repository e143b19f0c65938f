"""The inference service: FastAPI over the production (and canary) model.

Endpoints:

- ``POST /v1/understand`` — body: a WAV, FLAC or OGG file (``audio/*`` or
  ``application/octet-stream``), or multipart form data with the file in field ``file``;
  optional header ``X-Device-Id`` (sticky canary routing). Answer: the prediction
  contract plus ``request_id``, ``route`` and ``latency_ms``
  (:class:`serving.contracts.UnderstandResponse`). Silence (RMS below
  ``serving.silence_dbfs``) is answered **200 with ``clarify: true``** and an empty
  transcript and intent, without running the model: "I didn't catch that" is a valid
  answer, not a client error.
- ``POST /v1/feedback`` — implicit feedback on an earlier request (202).
- ``GET /healthz`` (the process is up), ``GET /readyz`` (a production model is loaded;
  503 otherwise), ``GET /metrics`` (Prometheus text format).
- ``PUT /admin/canary`` (``{"share": 20}``) and ``POST /admin/reload`` — need
  ``Authorization: Bearer $VOICELOOP_ADMIN_TOKEN``; 401 without or with a wrong token;
  when the variable is unset the admin routes do not exist (404).

Errors are ``{"error": {"code", "message"}}`` with a 4xx status for bad input (see
``serving.audio_input``); the byte cap is enforced from ``Content-Length`` before the
body is read, and again while it streams. Everything CPU-bound about a request (decoding
and checking the audio, the model, quantising the audio for the traffic store) runs in
one hop on a pool of inference threads; the model runs on ``workers`` predictors, in
batches of up to ``serving.max_batch`` requests that waited together
(:meth:`serving.models.PredictorPool.predict`); the event loop only moves bytes, parses
and routes. (ONNX Runtime and torch release
the GIL; the LM beam search does not, so Python work on the event loop competes with
it: keep the loop's share small.)
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import random
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from model.frontend.audio import prepare_waveform
from model.inference.prediction import Prediction
from serving.audio_input import AudioRejected, DecodedAudio, decode_upload, level_dbfs
from serving.contracts import (
    CanaryShare,
    ErrorBody,
    ErrorDetail,
    FeedbackRequest,
    Route,
    TrafficRecord,
    UnderstandResponse,
)
from serving.models import ModelSet, ModelSource, ServedModel
from serving.routing import choose_route
from serving.traffic import TrafficWriter, pcm16
from voiceloop.settings import ServingSettings

__all__ = ["ADMIN_TOKEN_ENV", "METRICS_DIR_ENV", "ServiceState", "create_app"]

log = logging.getLogger(__name__)

ADMIN_TOKEN_ENV = "VOICELOOP_ADMIN_TOKEN"
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""Set (by :func:`serving.service.run_server`) when several processes serve: Prometheus
values go to files in that folder and ``/metrics`` sums them."""
_AUDIO_TYPES = ("audio/", "application/octet-stream")
_LATENCY_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


class _Metrics:
    """The service's Prometheus metrics, in a registry of its own (one app, one set).

    With ``$PROMETHEUS_MULTIPROC_DIR`` set (several server processes, see
    :mod:`serving.service`) every process writes its values to files there and
    ``/metrics`` — whichever process answers — reports them summed over the live
    processes (counters, histograms, queue depths, traffic counts) or as their maximum
    (canary share, loaded models)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.multiprocess = bool(os.environ.get(METRICS_DIR_ENV))
        r = self.registry
        self.requests = Counter("voiceloop_requests", "Understand requests answered",
                                ["route", "model_version", "status"], registry=r)
        self.errors = Counter("voiceloop_request_errors", "Requests answered with an error",
                              ["code"], registry=r)
        self.latency = Histogram("voiceloop_request_latency_seconds",
                                 "Server-side time to answer an understand request",
                                 ["route", "model_version"], buckets=_LATENCY_BUCKETS, registry=r)
        self.inflight = Gauge("voiceloop_inference_queue_depth",
                              "Requests waiting for or running inference", registry=r,
                              multiprocess_mode="livesum")
        self.feedback = Counter("voiceloop_feedback", "Feedback received", ["kind"], registry=r)
        self.logged = Gauge("voiceloop_traffic_logged", "Requests in committed traffic batches",
                            registry=r, multiprocess_mode="livesum")
        self.dropped = Gauge("voiceloop_traffic_dropped",
                             "Requests not logged because the traffic queue was full", registry=r,
                             multiprocess_mode="livesum")
        self.traffic_queue = Gauge("voiceloop_traffic_queue_depth",
                                   "Records waiting for the traffic writer", registry=r,
                                   multiprocess_mode="livesum")
        self.share = Gauge("voiceloop_canary_share_percent", "Canary share of traffic", registry=r,
                           multiprocess_mode="livemax")
        self.model = Gauge("voiceloop_model_info", "Loaded models (value 1)",
                           ["route", "model_version", "registry_version"], registry=r,
                           multiprocess_mode="livemax")
        self._model_labels: set[tuple[str, str, str]] = set()

    def models_changed(self, models: ModelSet) -> None:
        self.share.set(models.share)
        now = {(route, m.version, m.registry_version or "")
               for route, m in (("production", models.production), ("canary", models.canary))
               if m is not None}
        # Set to 0, not removed: a multiprocess gauge's value lives on in its file.
        for labels in self._model_labels - now:
            self.model.labels(*labels).set(0)
        for labels in now:
            self.model.labels(*labels).set(1)
        self._model_labels = now

    def exposition(self) -> bytes:
        """The metrics in Prometheus text format (of all processes in multiprocess mode)."""
        if not self.multiprocess:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        return generate_latest(merged)

    def process_exit(self) -> None:
        """Forget this process's live gauges (multiprocess mode)."""
        if self.multiprocess:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid())


@dataclass(frozen=True)
class _Answer:
    """What an inference thread hands back for one upload: the request id, the decoded
    audio, the prediction, and the audio as 16-bit PCM for the traffic store (None
    when traffic is not logged)."""

    request_id: str
    audio: DecodedAudio
    prediction: Prediction
    pcm: np.ndarray | None


@dataclass
class ServiceState:
    """What the app runs on; built by ``voiceloop serve`` (or a test) and handed in."""

    settings: ServingSettings
    models: ModelSource
    traffic: TrafficWriter | None
    workers: int


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(ErrorBody(error=ErrorDetail(code=code, message=message)).model_dump(),
                        status_code=status)


async def _read_body(request: Request, cap: int) -> bytes:
    """The request body, refusing (413) before reading when ``Content-Length`` exceeds
    ``cap`` and while streaming when a body without one grows past it."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > cap:
                raise AudioRejected(413, "body_too_large",
                                    f"{int(declared)} bytes; the limit is {cap} bytes")
        except ValueError as exc:
            raise AudioRejected(400, "bad_content_length", f"Content-Length {declared!r}") from exc
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise AudioRejected(413, "body_too_large", f"more than {cap} bytes; the limit is {cap}")
        chunks.append(chunk)
    return b"".join(chunks)


async def _audio_bytes(request: Request, cap: int) -> bytes:
    """The uploaded file: the raw body, or the ``file`` field of a multipart form."""
    ctype = request.headers.get("content-type", "application/octet-stream").lower()
    if ctype.startswith("multipart/form-data"):
        body = await _read_body(request, cap)  # the cap holds for forms too

        async def replay() -> AsyncIterator[bytes]:
            yield body

        try:
            form = await MultiPartParser(request.headers, replay()).parse()
        except MultiPartException as exc:
            raise AudioRejected(400, "bad_multipart", f"unreadable multipart body: {exc}") from exc
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise AudioRejected(400, "missing_file", "multipart upload without a 'file' field")
        return await upload.read()
    if not ctype.startswith(_AUDIO_TYPES):
        raise AudioRejected(415, "unsupported_media_type",
                            f"Content-Type {ctype!r}: send audio/* (WAV, FLAC or OGG), "
                            "application/octet-stream, or multipart/form-data with 'file'")
    return await _read_body(request, cap)


def create_app(state: ServiceState) -> FastAPI:
    """The FastAPI app over ``state`` (its model source is started with the app)."""
    metrics = _Metrics()
    # Each thread decodes its upload, then waits in PredictorPool.predict: enough threads
    # for a running batch per predictor plus a full one queueing behind it.
    batch = state.settings.max_batch
    pool = ThreadPoolExecutor(max_workers=state.workers * (1 if batch == 1 else 2 * batch),
                              thread_name_prefix="inference")
    rng = random.Random()
    admin_token = os.environ.get(ADMIN_TOKEN_ENV) or None
    s = state.settings

    def traffic_gauges() -> None:
        if state.traffic is not None:
            stats = state.traffic.stats()
            metrics.logged.set(stats.logged)
            metrics.dropped.set(stats.dropped)
            metrics.traffic_queue.set(stats.queue_depth)

    async def refresh_traffic_gauges() -> None:
        # Several processes: /metrics is answered by one of them, so each keeps its own
        # traffic counts current in the shared files.
        while True:
            await asyncio.sleep(1.0)
            try:
                traffic_gauges()
            except Exception:  # a gauge is not worth the refresher
                log.exception("refreshing the traffic gauges failed")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.models.on_change(metrics.models_changed)
        try:
            state.models.start()
        except Exception as exc:  # noqa: BLE001 - alive but not ready: /readyz says why
            log.error("no model loaded at start-up: %s", exc)
        metrics.models_changed(state.models.current)
        if state.traffic is not None:
            state.traffic.start()
        refresher = (asyncio.create_task(refresh_traffic_gauges())
                     if metrics.multiprocess and state.traffic is not None else None)
        yield
        if refresher is not None:
            refresher.cancel()
        state.models.stop()
        pool.shutdown(wait=True)
        if state.traffic is not None:
            state.traffic.close(timeout=30)
        metrics.process_exit()

    app = FastAPI(title="voiceloop", version="1", lifespan=lifespan,
                  description="Spoken-command understanding: audio in; transcript, intent, "
                              "slots out.")

    @app.exception_handler(AudioRejected)
    async def _rejected(_: Request, exc: AudioRejected) -> JSONResponse:
        metrics.errors.labels(exc.code).inc()
        return _error(exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.errors.labels("invalid_request").inc()
        return _error(422, "invalid_request", "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        metrics.errors.labels("internal").inc()
        return _error(500, "internal", f"{type(exc).__name__}: the service failed on this request")

    def _understand(model: ServedModel, body: bytes) -> _Answer:
        """Everything CPU-bound about one upload, run in an inference thread so that the
        event loop only moves bytes: decode and check the audio, run the model (unless
        it is silence), and quantise the audio for the traffic store."""
        request_id = uuid.uuid4().hex
        audio = decode_upload(body, s.max_duration_s)
        if level_dbfs(audio.samples) < s.silence_dbfs:
            prediction = Prediction(id=request_id, model_version=model.version, clarify=True)
        else:
            rate = model.pool.sample_rate
            resampled = prepare_waveform(audio.samples, audio.sample_rate, rate)
            if resampled.size < model.pool.min_samples:
                raise AudioRejected(400, "audio_too_short",
                                    f"{audio.duration_s * 1000:.0f} ms of audio is too short "
                                    "to understand")
            prediction = model.pool.predict(request_id, resampled, rate)
            if prediction.error:
                raise AudioRejected(400, "unusable_audio", prediction.error)
        pcm = None
        if state.traffic is not None:
            pcm = audio.pcm16 if audio.pcm16 is not None else pcm16(audio.samples)
        return _Answer(request_id, audio, prediction, pcm)

    def _log(record: TrafficRecord, pcm: np.ndarray | None = None,
             rate: int | None = None) -> None:
        if state.traffic is None:
            return
        state.traffic.submit(record, pcm, rate)

    @app.post("/v1/understand", response_model=UnderstandResponse,
              responses={400: {"model": ErrorBody}, 413: {"model": ErrorBody},
                         415: {"model": ErrorBody}, 503: {"model": ErrorBody}})
    async def understand(request: Request) -> Response:
        start = time.perf_counter()
        received = datetime.now(UTC)
        device = request.headers.get("x-device-id") or None
        models = state.models.current
        if models.production is None:
            metrics.errors.labels("not_ready").inc()
            return _error(503, "not_ready", "no production model is loaded yet")
        body = await _audio_bytes(request, s.max_audio_bytes)
        route: Route = choose_route(device, models.share, models.canary is not None, rng)
        model = models.model(route)
        metrics.inflight.inc()
        try:
            answer = await asyncio.get_running_loop().run_in_executor(
                pool, _understand, model, body)
        finally:
            metrics.inflight.dec()
        request_id, audio, prediction = answer.request_id, answer.audio, answer.prediction
        latency = time.perf_counter() - start
        response = UnderstandResponse(
            request_id=request_id, id=request_id, transcript=prediction.transcript,
            intent=prediction.intent, slots=prediction.slots, confidence=prediction.confidence,
            model_version=prediction.model_version or model.version, clarify=prediction.clarify,
            route=route, latency_ms=latency * 1000)
        metrics.requests.labels(route, response.model_version, "200").inc()
        metrics.latency.labels(route, response.model_version).observe(latency)
        _log(TrafficRecord(
            request_id=request_id, timestamp=received, device_id=device, route=route,
            model_version=response.model_version, registry_version=model.registry_version,
            transcript=response.transcript, intent=response.intent, slots=response.slots,
            confidence=response.confidence, clarify=response.clarify,
            latency_ms=response.latency_ms, duration_s=audio.duration_s,
            sample_rate=audio.sample_rate, audio_format=audio.audio_format),
            answer.pcm, audio.sample_rate)
        return JSONResponse(response.model_dump(mode="json"))

    @app.post("/v1/feedback", status_code=202)
    async def feedback(body: FeedbackRequest, request: Request) -> dict[str, str]:
        metrics.feedback.labels(body.kind).inc()
        _log(TrafficRecord(request_id=body.request_id, timestamp=datetime.now(UTC),
                           device_id=request.headers.get("x-device-id") or None,
                           kind="feedback", feedback_kind=body.kind,
                           feedback_text=body.text))
        return {"status": "accepted", "request_id": body.request_id}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        models = state.models.current
        if models.production is None:
            return _error(503, "not_ready", "no production model is loaded")
        return JSONResponse({"status": "ready", **models.describe()})

    @app.get("/metrics")
    async def prometheus() -> Response:
        traffic_gauges()
        return PlainTextResponse(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    if admin_token is not None:
        def _authorised(request: Request) -> JSONResponse | None:
            header = request.headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), admin_token):
                metrics.errors.labels("unauthorized").inc()
                return _error(401, "unauthorized", "admin routes need 'Authorization: Bearer "
                              f"<token>' with the token from ${ADMIN_TOKEN_ENV}")
            return None

        @app.put("/admin/canary")
        async def set_canary(body: CanaryShare, request: Request) -> Response:
            denied = _authorised(request)
            if denied is not None:
                return denied
            if not state.models.uses_registry:
                return _error(409, "no_registry", "this service serves one model (--model): "
                              "there is no canary to share traffic with")
            loop = asyncio.get_running_loop()
            models = await loop.run_in_executor(None, state.models.set_share, body.share)
            return JSONResponse(models.describe())

        @app.post("/admin/reload")
        async def reload(request: Request) -> Response:
            denied = _authorised(request)
            if denied is not None:
                return denied
            loop = asyncio.get_running_loop()
            models = await loop.run_in_executor(None, state.models.refresh)
            return JSONResponse(models.describe())

    return app

