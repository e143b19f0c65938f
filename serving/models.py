"""The models a running service answers with, and how they change under it.

A :class:`ModelSet` is an immutable snapshot: the ``production`` model, an optional
``canary`` model and the canary share. The service reads the current snapshot once per
request, so a swap (a new snapshot assigned in one step) never changes a request
half-way, and an in-flight request keeps the predictors it started with: a model swap
drops and fails nothing.

:class:`RegistryModels` builds snapshots from the MLflow registry (the ``production``
and ``canary`` aliases and the canary-share tag, via :class:`voiceloop.registry.Registry`)
and re-reads them every ``serving.poll_seconds`` in a background thread, loading a new
version *before* it is swapped in. :class:`FixedModel` serves one model folder (any form
``voiceloop predict`` takes), no canary.

Each model version is a :class:`PredictorPool` of ``workers`` predictors: the lexicon
beam search keeps state while it decodes, so a batch runs on a predictor of its own;
under load, requests waiting together run as one batch (``serving.max_batch``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from model.inference.batch import BatchPredictor
from model.inference.onnx import load_predictor
from model.inference.prediction import Prediction
from serving.contracts import Route
from voiceloop.registry import Registry, VersionRef

__all__ = ["FixedModel", "ModelSet", "ModelSource", "PredictorPool", "RegistryModels", "ServedModel"]

log = logging.getLogger(__name__)

PredictorFactory = Callable[[Path], BatchPredictor]


@dataclass
class _Job:
    """One waveform waiting for a prediction."""

    request_id: str
    waveform: np.ndarray
    rate: int
    taken: bool = False
    done: bool = False
    result: Prediction | None = None
    error: BaseException | None = None


class PredictorPool:
    """``size`` predictors of one model folder.

    :meth:`predict` answers one waveform and batches under load: callers queue their
    job, and a caller that finds a predictor free takes up to ``max_batch`` queued jobs
    (oldest first, its own among them or not) and runs them as one batch, then hands
    each result to its caller. Alone, a job runs at once as a batch of one (no waiting
    for batch-mates); under load, jobs that arrived while the predictors were busy run
    together — fewer, larger model calls (the released student: 12.2 → 9.2 ms of CPU
    per 3-s utterance at batches of 8). The price: an int8 model quantises each
    activation tensor with one scale over the batch, so an answer can differ slightly
    with its batch-mates (``max_batch: 1`` keeps every answer independent of others).
    """

    def __init__(self, folder: Path, size: int, factory: PredictorFactory,
                 max_batch: int = 1) -> None:
        if size < 1:
            raise ValueError(f"a predictor pool needs at least one predictor, got {size}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.folder = folder
        self.max_batch = max_batch
        self._cond = threading.Condition()
        self._idle: list[BatchPredictor] = []
        self._pending: deque[_Job] = deque()
        first = factory(folder)
        self.version = first.version
        self.min_samples = first.min_samples
        self.sample_rate = first.feature_config.sample_rate
        self._idle.append(first)
        for _ in range(size - 1):
            self._idle.append(factory(folder))
        self.warm_up_ms = self._warm_up()

    def _warm_up(self, calls: int = 3, seconds: float = 2.0) -> float:
        """Run every predictor ``calls`` times on ``seconds`` of quiet noise before the
        pool serves; returns the first call's milliseconds.

        A fresh ONNX Runtime session (and the beam search) is several times slower on its
        first calls — memory arenas grow, kernels are picked — and a canary's first
        requests would carry that into its latency analysis against a production model
        that has been warm for hours (a demo run's canary was rolled back at 10 % for a
        p95 of 46.6 ms against production's 20.8 ms)."""
        noise = np.random.default_rng(0).normal(0.0, 0.01, int(seconds * self.sample_rate))
        waveform = noise.astype(np.float32)
        first_ms = 0.0
        for predictor in self._idle:
            for call in range(calls):
                start = time.perf_counter()
                predictor.predict_waveforms(["warm-up"], [waveform], [self.sample_rate])
                if call == 0:
                    first_ms = max(first_ms, (time.perf_counter() - start) * 1000)
        log.info("model %s warmed up (%d calls per predictor; first %.1f ms)", self.version,
                 calls, first_ms)
        return first_ms

    def predict(self, request_id: str, waveform: np.ndarray, rate: int) -> Prediction:
        """The prediction for one mono float32 ``waveform`` ``(N,)`` at ``rate`` Hz (the
        model's rate), batched with other callers' under load (see the class docstring).

        Raises:
            Exception: whatever the predictor raised for the batch this job ran in.
        """
        job = _Job(request_id, waveform, rate)
        with self._cond:
            self._pending.append(job)
            while not job.done:
                # Lead a batch only while this job still waits: a caller whose job already
                # runs in another's batch just waits for it (not for a batch of its own).
                if not job.taken and self._idle:
                    predictor = self._idle.pop()
                    batch = [self._pending.popleft()
                             for _ in range(min(self.max_batch, len(self._pending)))]
                    for taken in batch:
                        taken.taken = True
                    self._cond.release()
                    try:
                        self._run(predictor, batch)
                    finally:
                        self._cond.acquire()
                        self._idle.append(predictor)
                        for done in batch:
                            done.done = True
                        self._cond.notify_all()
                else:
                    self._cond.wait()
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    @staticmethod
    def _run(predictor: BatchPredictor, batch: list[_Job]) -> None:
        try:
            results = predictor.predict_waveforms([j.request_id for j in batch],
                                                  [j.waveform for j in batch],
                                                  [j.rate for j in batch])
            for j, result in zip(batch, results, strict=True):
                j.result = result
        except Exception as exc:  # noqa: BLE001 - each caller raises it (its own copy)
            for j in batch:
                j.error = RuntimeError(f"the model failed on a batch of {len(batch)}: "
                                       f"{type(exc).__name__}: {exc}")
                j.error.__cause__ = exc


@dataclass(frozen=True)
class ServedModel:
    """One loaded model: its predictors, version string and registry version (None for a
    model served from a folder)."""

    pool: PredictorPool
    registry_version: str | None

    @property
    def version(self) -> str:
        return self.pool.version


@dataclass(frozen=True)
class ModelSet:
    """What answers right now."""

    production: ServedModel | None
    canary: ServedModel | None = None
    share: float = 0.0

    def model(self, route: Route) -> ServedModel:
        chosen = self.canary if route == "canary" else self.production
        if chosen is None:
            raise LookupError(f"no {route} model loaded")
        return chosen

    def describe(self) -> dict[str, object]:
        def one(m: ServedModel | None) -> dict[str, str | None] | None:
            return None if m is None else {"version": m.version,
                                           "registry_version": m.registry_version}
        return {"production": one(self.production), "canary": one(self.canary),
                "canary_share": self.share}


class ModelSource:
    """Where the service's :class:`ModelSet` comes from."""

    def __init__(self) -> None:
        self._current = ModelSet(None)
        self._listeners: list[Callable[[ModelSet], None]] = []

    @property
    def current(self) -> ModelSet:
        return self._current

    def on_change(self, listener: Callable[[ModelSet], None]) -> None:
        """Call ``listener`` with each new snapshot (metrics gauges)."""
        self._listeners.append(listener)

    def _publish(self, models: ModelSet) -> None:
        self._current = models  # one reference assignment: requests see old or new, whole
        for listener in self._listeners:
            listener(models)

    @property
    def uses_registry(self) -> bool:
        return False

    def start(self) -> None:
        """Load the first snapshot (may raise) and start watching, if the source watches."""

    def stop(self) -> None:
        """Stop watching."""

    def refresh(self) -> ModelSet:
        """Re-read the source now; returns the snapshot in force afterwards."""
        return self._current

    def set_share(self, share: float) -> ModelSet:
        raise NotImplementedError("this service serves one model: there is no canary")


class FixedModel(ModelSource):
    """One model folder (torch package, deploy bundle or pyfunc folder), no canary."""

    def __init__(self, folder: Path, workers: int, factory: PredictorFactory,
                 max_batch: int = 1) -> None:
        super().__init__()
        self.folder, self.workers, self.factory, self.max_batch = (
            folder, workers, factory, max_batch)

    def start(self) -> None:
        self._publish(ModelSet(ServedModel(
            PredictorPool(self.folder, self.workers, self.factory, self.max_batch), None)))


class RegistryModels(ModelSource):
    """The registry's ``production`` and ``canary`` aliases and the canary share, polled.

    A version that fails to load is logged and retried at the next poll while the
    previous snapshot keeps serving (a broken candidate never takes the service down).
    """

    def __init__(self, registry: Registry, workers: int, poll_seconds: float,
                 factory: PredictorFactory, max_batch: int = 1) -> None:
        super().__init__()
        self.registry, self.workers, self.poll_seconds, self.factory = (
            registry, workers, poll_seconds, factory)
        self.max_batch = max_batch
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loaded: dict[str, ServedModel] = {}  # registry version -> model
        self.last_error: str | None = None
        self.last_poll: float | None = None

    @property
    def uses_registry(self) -> bool:
        return True

    def start(self) -> None:
        self.refresh()
        self._thread = threading.Thread(target=self._watch, name="registry-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.refresh()
            except Exception as exc:  # noqa: BLE001 - keep serving what is loaded
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("registry poll failed, still serving %s: %s",
                            self.current.describe(), exc)

    def _load(self, ref: VersionRef | None) -> ServedModel | None:
        if ref is None:
            return None
        if ref.version not in self._loaded:
            folder = self.registry.model_folder(ref)
            log.info("loading %s version %s from %s", ref.name, ref.version, folder)
            self._loaded[ref.version] = ServedModel(
                PredictorPool(folder, self.workers, self.factory, self.max_batch), ref.version)
        return self._loaded[ref.version]

    def refresh(self) -> ModelSet:
        with self._lock:
            production = self.registry.alias("production")
            canary = self.registry.alias("canary")
            share = self.registry.canary_share()
            models = ModelSet(self._load(production), self._load(canary), share)
            if models != self.current:
                log.info("serving %s", models.describe())
                self._publish(models)
            keep = {m.registry_version for m in (models.production, models.canary) if m}
            self._loaded = {v: m for v, m in self._loaded.items() if v in keep}
            self.last_poll, self.last_error = time.time(), None
            return models

    def set_share(self, share: float) -> ModelSet:
        """Write the share to the registry tag (the truth) and apply it at once."""
        self.registry.set_canary_share(share)
        with self._lock:
            models = replace(self.current, share=share)
            self._publish(models)
            return models


def default_factory(model_threads: int, max_batch: int = 1) -> PredictorFactory:
    """Predictors for a folder: batches of up to ``max_batch`` requests,
    ``model_threads`` ORT threads."""

    def factory(folder: Path) -> BatchPredictor:
        return load_predictor(folder, batch_size=max_batch, threads=model_threads)

    return factory
