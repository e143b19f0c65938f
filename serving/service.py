"""Assembling a service: its model source, traffic writer and app, from settings; and
running it in one or several server processes.

Used by ``voiceloop serve``, the integration tests and ``benchmarks/serving_load.py``, so
all three run the same thing.

Several processes (``serving.processes``) share one port: a supervisor listens on it,
spawns the worker processes and hands each accepted connection to the worker with the
fewest open connections (the file descriptor over a Unix socket; see :class:`_Supervisor`
for why neither uvicorn's ``--workers`` nor ``SO_REUSEPORT``). Each worker builds its own
app from the :class:`ServeSpec` in ``$VOICELOOP_SERVE`` — its own predictors, registry
watcher and traffic writer (batch ids are unique per writer, so the processes' batches
never collide). Prometheus counters
are then summed over the processes (``prometheus_client``'s multiprocess mode, in a
temporary folder named by ``$PROMETHEUS_MULTIPROC_DIR``). A canary share changed through
``PUT /admin/canary`` reaches the process that answered at once and the others at their
next registry poll (``serving.poll_seconds``), as a change made in the MLflow UI does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from serving.app import METRICS_DIR_ENV, ServiceState, create_app
from serving.models import FixedModel, ModelSource, RegistryModels, default_factory
from serving.traffic import TrafficWriter
from voiceloop.registry import Registry
from voiceloop.settings import Settings, load_settings

__all__ = ["SERVE_ENV", "ServeSpec", "app_from_environment", "app_from_spec", "build_app",
           "build_state", "inference_threads", "run_server", "server_processes"]

log = logging.getLogger(__name__)

SERVE_ENV = "VOICELOOP_SERVE"
"""The environment variable through which each server process gets its :class:`ServeSpec`."""

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


def inference_threads(settings: Settings, processes: int = 1, workers: int | None = None
                      ) -> int:
    """Inference threads per server process: ``workers``, else ``serving.workers``, else
    the cores divided among ``processes`` (at least one)."""
    cores = os.cpu_count() or 1
    return workers or settings.serving.workers or max(1, cores // max(1, processes))


def build_state(settings: Settings, model_dir: Path | None = None, log_traffic: bool = True,
                workers: int | None = None, processes: int = 1) -> ServiceState:
    """The service's state: ``model_dir`` served alone (no canary), else the registry's
    ``production`` and ``canary`` aliases; the traffic store at ``settings.traffic_root``
    unless ``log_traffic`` is off; :func:`inference_threads` of ``processes`` and ``workers``.

    Sets this process's torch intra-op threads to ``serving.model_threads`` (a process-wide
    setting: the service should own its process)."""
    s = settings.serving
    n = inference_threads(settings, processes, workers)
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
    return app_from_spec(ServeSpec.model_validate_json(raw), ready=_READY)


_READY: Any = None
"""In a worker process: its shared readiness flag (see :class:`_Slot`)."""


def run_server(spec: ServeSpec, host: str, port: int, *, quiet: bool = False) -> None:
    """Serve until interrupted: in this process when ``spec.processes`` is 1, else in
    ``spec.processes`` worker processes behind a supervisor that listens on the port (see
    the module docstring). Each process flushes its traffic writer on shutdown
    (SIGINT/SIGTERM).

    Raises:
        ValueError: port 0 with several processes.
        RuntimeError: the port is taken, or a worker process exited while starting.
    """
    options = {"host": host, "port": port, "log_level": "warning" if quiet else "info",
               "access_log": not quiet}
    if spec.processes == 1:
        uvicorn.run(app_from_spec(spec), **options)
        return
    if port == 0:
        raise ValueError("port 0 (any free port) cannot be shared by several processes: "
                         "give a port, or serve with one process")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        raise RuntimeError(f"cannot listen on {host}:{port}: {exc}") from exc
    listener.listen(2048)
    metrics_dir = tempfile.mkdtemp(prefix="voiceloop-metrics-")
    saved = {k: os.environ.get(k) for k in (SERVE_ENV, METRICS_DIR_ENV)}
    os.environ[SERVE_ENV] = spec.model_dump_json()
    os.environ[METRICS_DIR_ENV] = metrics_dir  # before any worker imports prometheus_client
    log.info("serving with %d processes on %s:%d", spec.processes, host, port)
    try:
        _Supervisor(spec.processes, options, metrics_dir, listener).run()
    finally:
        listener.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class _HandedServer(uvicorn.Server):
    """A uvicorn server without a listening socket: it serves the connections the
    supervisor hands over ``channel`` (one file descriptor per ``SCM_RIGHTS`` message)
    and counts each one that closes in ``closed``. (``ready`` is set by the app's model
    source, see :func:`app_from_environment`, and cleared at shutdown.)"""

    def __init__(self, config: uvicorn.Config, channel: socket.socket, closed: Any,
                 ready: Any) -> None:
        super().__init__(config)
        self.channel, self.closed, self.ready = channel, closed, ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=[])
        loop = asyncio.get_running_loop()
        closed = self.closed

        class Counted(self.config.http_protocol_class):  # type: ignore[misc, name-defined]
            def connection_lost(self, exc: Exception | None) -> None:
                try:
                    super().connection_lost(exc)
                finally:
                    closed.value += 1  # this process is its only writer

        def protocol() -> asyncio.Protocol:
            return Counted(config=self.config, server_state=self.server_state,
                           app_state=self.lifespan.state)

        def receive() -> None:
            while True:
                try:
                    msg, fds, _, _ = socket.recv_fds(self.channel, 16, 4)
                except (BlockingIOError, InterruptedError):
                    return
                if not msg:  # the supervisor closed the channel
                    loop.remove_reader(self.channel.fileno())
                    return
                for fd in fds:
                    task = loop.create_task(connect(socket.socket(fileno=fd)))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)

        async def connect(sock: socket.socket) -> None:
            try:
                await loop.connect_accepted_socket(protocol, sock)
            except OSError:  # the client went away before the hand-off completed
                sock.close()
                closed.value += 1

        self._tasks: set[asyncio.Task[None]] = set()
        self.channel.setblocking(False)
        loop.add_reader(self.channel.fileno(), receive)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.ready.value = 0
        with contextlib.suppress(ValueError, OSError):  # not added, or already closed
            asyncio.get_running_loop().remove_reader(self.channel.fileno())
        await super().shutdown(sockets=sockets)


def _worker(options: dict[str, Any], supervisor: int, channel: socket.socket, closed: Any,
            ready: Any) -> None:
    """One server process: serves the connections the supervisor hands it (see
    :class:`_HandedServer`) with its app from ``$VOICELOOP_SERVE``; uvicorn shuts it down
    gracefully on SIGINT/SIGTERM. ``supervisor``: the pid whose death means this process
    must stop too."""
    # Signals come from the supervisor, once: in a process group of its own, a Ctrl-C at
    # the terminal does not reach this process directly — a second SIGINT would make
    # uvicorn skip the app's shutdown, i.e. the traffic writer's last flush.
    os.setpgrp()

    def orphaned() -> None:  # the supervisor was killed outright: shut down, not linger
        while os.getppid() == supervisor:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=orphaned, name="supervisor-watch", daemon=True).start()
    global _READY
    _READY = ready
    # No WebSocket upgrades: a connection that switched protocols would never be counted
    # as closed (the service has no WebSocket route anyway).
    config = uvicorn.Config(app_from_environment, factory=True, ws="none", **options)
    # uvicorn re-raises the SIGINT it shut down on (after the app's shutdown ran).
    with contextlib.suppress(KeyboardInterrupt):
        _HandedServer(config, channel, closed, ready).run()


_START_GRACE_S = 60.0
"""A worker that exits sooner than this after it started failed to start: fatal (no
restart loop on a port in use or a broken model); one that exits later is restarted."""


class _Slot:
    """One worker process and what the supervisor knows of it."""

    def __init__(self, ctx: Any) -> None:
        self.closed = ctx.RawValue("q", 0)  # connections the worker saw close
        self.ready = ctx.RawValue("b", 0)   # 1 while the worker serves
        self.handed = 0                     # connections handed to it
        self.last = 0                       # sequence number of its latest hand-off
        self.channel: socket.socket | None = None
        self.proc: multiprocessing.process.BaseProcess | None = None
        self.started = 0.0

    def open_connections(self) -> int:
        return self.handed - int(self.closed.value)


class _Supervisor:
    """Listens on the port, starts ``count`` :func:`_worker` processes, hands each
    accepted connection to the ready worker with the fewest open connections, restarts a
    worker that dies after it had started, and on SIGINT or SIGTERM stops accepting, asks
    each worker once to shut down gracefully and waits.

    Why the supervisor accepts: a keep-alive connection stays with the process that
    accepted it, so its requests queue behind that process's other connections. With
    uvicorn's ``--workers`` (one shared socket) the first process to wake took every
    pending connection (in the load benchmark, 4 clients all on one of two processes);
    with ``SO_REUSEPORT`` the kernel hashes connections over the processes, and 16
    clients split 9/7 or 10/6 as often as 8/8 — the busier process's clients then waited
    up to 60 % longer (p99 200 vs 130 ms). Least-connections keeps the split even.
    """

    def __init__(self, count: int, options: dict[str, Any], metrics_dir: str,
                 listener: socket.socket) -> None:
        self.count, self.options, self.metrics_dir = count, options, metrics_dir
        self.listener = listener
        self._ctx = multiprocessing.get_context("spawn")
        self._stop_signal: int | None = None
        self._slots = [_Slot(self._ctx) for _ in range(count)]
        self._lock = threading.Lock()  # slots' channel / handed, between the two threads
        self._sequence = 0
        self._stopping = threading.Event()
        self._signalled: set[int] = set()

    def _start(self, slot: _Slot) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        parent.setblocking(False)
        slot.closed.value, slot.ready.value = 0, 0
        proc = self._ctx.Process(target=_worker, name="voiceloop-serve", args=(
            self.options, os.getpid(), child, slot.closed, slot.ready))
        proc.start()
        child.close()
        with self._lock:
            slot.proc, slot.started, slot.channel, slot.handed = proc, time.monotonic(), parent, 0

    def _hand(self, conn: socket.socket) -> None:
        """Give ``conn`` to the ready worker with the fewest open connections, the one
        served longest ago among equals (any live one while none is ready: it waits in
        the channel until that worker serves). A worker whose channel is full (its loop
        stalls) is skipped; while every one is, accepting waits (backpressure)."""
        while not self._stopping.is_set():
            with self._lock:
                live = [(s, s.channel) for s in self._slots if s.channel is not None]
                ready = [(s, c) for s, c in live if s.ready.value] or live
                order = sorted(ready, key=lambda sc: (sc[0].open_connections(), sc[0].last))
            for slot, channel in order:
                try:
                    socket.send_fds(channel, [b"c"], [conn.fileno()], socket.MSG_DONTWAIT)
                except BlockingIOError:  # its queue of hand-offs is full: the next one
                    continue
                except OSError:  # that worker just died (its channel closed)
                    continue
                with self._lock:
                    self._sequence += 1
                    slot.handed, slot.last = slot.handed + 1, self._sequence
                return
            if not order:
                log.warning("no server process to take a connection: closing it")
                return
            time.sleep(0.01)

    def _accept(self) -> None:
        self.listener.settimeout(0.5)  # to notice a stop without closing the socket here
        while not self._stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                log.exception("accepting a connection failed")
                time.sleep(0.1)
                continue
            with conn:
                self._hand(conn)

    def _signal_all(self, signum: int) -> None:
        for slot in self._slots:
            proc = slot.proc
            if (proc is not None and proc.pid is not None and proc.pid not in self._signalled
                    and proc.is_alive()):
                self._signalled.add(proc.pid)
                os.kill(proc.pid, signum)

    def _forget(self, pid: int | None) -> None:
        """Drop a dead worker's live gauges from the summed metrics."""
        if pid is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid, self.metrics_dir)

    def _retire(self, slot: _Slot) -> None:
        with self._lock:
            if slot.channel is not None:
                slot.channel.close()
                slot.channel = None

    def run(self) -> None:
        def stop(signum: int, _frame: Any) -> None:
            if self._stop_signal is None:  # repeats ignored: see _worker
                self._stop_signal = signum
                self._stopping.set()
                self._signal_all(signum)

        # Handlers first: a signal while the workers start is then still forwarded.
        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        acceptor = threading.Thread(target=self._accept, name="voiceloop-accept", daemon=True)
        try:
            for slot in self._slots:
                if self._stop_signal is None:
                    self._start(slot)
            acceptor.start()
            while self._stop_signal is None:
                time.sleep(0.5)
                for slot in self._slots:
                    proc = slot.proc
                    if proc is None or proc.is_alive() or self._stop_signal is not None:
                        continue
                    self._retire(slot)
                    self._forget(proc.pid)
                    if time.monotonic() - slot.started < _START_GRACE_S:
                        raise RuntimeError(f"server process {proc.pid} exited with code "
                                           f"{proc.exitcode} while starting (see the log "
                                           "above)")
                    log.error("server process %s exited with code %s; starting another",
                              proc.pid, proc.exitcode)
                    self._start(slot)
        finally:
            # No new connections first; then every live worker gets one signal — also one
            # started while a stop arrived, and all of them when a failure ends the loop.
            self._stopping.set()
            if acceptor.is_alive():
                acceptor.join(5)
            # Refuse new clients at once (they would wait in the backlog for workers that
            # are shutting down), and free the port for a successor.
            self.listener.close()
            self._signal_all(self._stop_signal or signal.SIGTERM)
            for slot in self._slots:
                proc = slot.proc
                if proc is None:
                    continue
                proc.join(60)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
                self._retire(slot)
                self._forget(proc.pid)
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def app_from_spec(spec: ServeSpec, ready: Any = None) -> FastAPI:
    """The app ``spec`` describes, built in this process. ``ready``: a worker's shared
    readiness flag (see :class:`_Slot`), set while its production model is loaded."""
    state = build_state(spec.settings(), Path(spec.model_dir) if spec.model_dir else None,
                        spec.log_traffic, spec.workers, spec.processes)
    if ready is not None:
        # The supervisor hands connections to processes that can answer them: a process
        # is ready once its production model is loaded (a load that fails at start-up is
        # retried at the next registry poll).
        state.models.on_change(lambda models: setattr(ready, "value", int(
            models.production is not None)))
    return create_app(state)
