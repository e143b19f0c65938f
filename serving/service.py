"""Assembling a service: its model source, traffic writer and app, from settings; and
running it in one or several server processes.

Used by ``voiceloop serve``, the integration tests and ``benchmarks/serving_load.py``, so
all three run the same thing.

Several processes (``serving.processes``) share one port the way uvicorn's ``--workers``
does: a supervisor process binds the socket and spawns the workers, each of which
builds its own app from the :class:`ServeSpec` in ``$VOICELOOP_SERVE`` — its own
predictors, registry watcher and traffic writer (batch ids are unique per writer, so the
processes' batches never collide). Prometheus counters are then summed over the
processes (``prometheus_client``'s multiprocess mode, in a temporary folder named by
``$PROMETHEUS_MULTIPROC_DIR``). A canary share changed through ``PUT /admin/canary``
reaches the process that answered at once and the others at their next registry poll
(``serving.poll_seconds``), as a change made in the MLflow UI does.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from fastapi import FastAPI
from pydantic import BaseModel

from serving.app import ServiceState, create_app
from serving.models import FixedModel, ModelSource, RegistryModels, default_factory
from serving.traffic import TrafficWriter
from voiceloop.registry import Registry
from voiceloop.settings import Settings, load_settings

__all__ = ["SERVE_ENV", "ServeSpec", "app_from_environment", "app_from_spec", "build_app",
           "build_state", "run_server", "server_processes"]

log = logging.getLogger(__name__)

SERVE_ENV = "VOICELOOP_SERVE"
"""The environment variable through which each server process gets its :class:`ServeSpec`."""

_METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"


class ServeSpec(BaseModel):
    """What a server process builds its app from: the arguments ``voiceloop serve`` got.

    Attributes:
        params, profile, workspace, overrides: as :func:`voiceloop.settings.load_settings`
            takes them.
        model_dir: the one model folder to serve (None: the registry's aliases).
        log_traffic: whether requests go to the traffic store.
        workers: inference threads per process (None: ``serving.workers``).
        processes: server processes in all.
    """

    params: str | None = None
    profile: str | None = None
    workspace: str | None = None
    overrides: list[str] = []
    model_dir: str | None = None
    log_traffic: bool = True
    workers: int | None = None
    processes: int = 1

    def settings(self) -> Settings:
        return load_settings(Path(self.params) if self.params else None, self.profile,
                             Path(self.workspace) if self.workspace else None, self.overrides)


def server_processes(settings: Settings, processes: int | None = None) -> int:
    """Server processes to run: ``processes``, else ``serving.processes``; 0 = one per core.

    Raises:
        ValueError: a negative count.
    """
    n = settings.serving.processes if processes is None else processes
    if n < 0:
        raise ValueError(f"processes must be >= 0, got {n}")
    return n or os.cpu_count() or 1


def build_state(settings: Settings, model_dir: Path | None = None, log_traffic: bool = True,
                workers: int | None = None, processes: int = 1) -> ServiceState:
    """The service's state: ``model_dir`` served alone (no canary), else the registry's
    ``production`` and ``canary`` aliases; the traffic store at ``settings.traffic_root``
    unless ``log_traffic`` is off. Inference threads: ``workers``, else
    ``serving.workers``, else the cores divided among ``processes`` (at least one).

    Sets this process's torch intra-op threads to ``serving.model_threads`` (a process-wide
    setting: the service should own its process)."""
    s = settings.serving
    n = workers or s.workers or max(1, (os.cpu_count() or 1) // max(1, processes))
    # Torch computes the features (and tensors around the beam search) in the inference
    # threads. Its intra-op pool defaults to one thread per core for *each* calling
    # thread (an OpenMP team per thread, spinning while it waits), so `n` inference
    # threads would run n × cores busy threads on `cores` cores: cap it like ONNX Runtime.
    torch.set_num_threads(s.model_threads)
    factory = default_factory(s.model_threads, s.max_batch)
    models: ModelSource = (
        FixedModel(model_dir, n, factory, s.max_batch) if model_dir is not None
        else RegistryModels(Registry(settings), n, s.poll_seconds, factory, s.max_batch))
    traffic = TrafficWriter(settings.traffic_root, s.traffic) if log_traffic else None
    return ServiceState(settings=s, models=models, traffic=traffic, workers=n)


def build_app(settings: Settings, model_dir: Path | None = None, log_traffic: bool = True,
              workers: int | None = None, processes: int = 1) -> FastAPI:
    """:func:`build_state` wrapped in the FastAPI app."""
    return create_app(build_state(settings, model_dir, log_traffic, workers, processes))


def app_from_environment() -> FastAPI:
    """The app of one server process, from the :class:`ServeSpec` in ``$VOICELOOP_SERVE``
    (uvicorn's app factory in each worker process).

    Raises:
        RuntimeError: the variable is not set.
    """
    raw = os.environ.get(SERVE_ENV)
    if not raw:
        raise RuntimeError(f"${SERVE_ENV} is not set: start the service with `voiceloop serve`")
    return app_from_spec(ServeSpec.model_validate_json(raw))


def run_server(spec: ServeSpec, host: str, port: int, *, quiet: bool = False) -> None:
    """Serve until interrupted: in this process when ``spec.processes`` is 1, else in
    ``spec.processes`` uvicorn worker processes on one socket (see the module docstring).
    Each process flushes its traffic writer on shutdown (SIGINT/SIGTERM)."""
    import uvicorn

    options = {"host": host, "port": port, "log_level": "warning" if quiet else "info",
               "access_log": not quiet}
    if spec.processes == 1:
        uvicorn.run(app_from_spec(spec), **options)
        return
    metrics_dir = tempfile.mkdtemp(prefix="voiceloop-metrics-")
    os.environ[SERVE_ENV] = spec.model_dump_json()
    os.environ[_METRICS_ENV] = metrics_dir  # before any worker imports prometheus_client
    log.info("serving with %d processes on %s:%d", spec.processes, host, port)
    try:
        uvicorn.run("serving.service:app_from_environment", factory=True,
                    workers=spec.processes, **options)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def app_from_spec(spec: ServeSpec) -> FastAPI:
    """The app ``spec`` describes, built in this process."""
    return build_app(spec.settings(), Path(spec.model_dir) if spec.model_dir else None,
                     spec.log_traffic, spec.workers, spec.processes)
