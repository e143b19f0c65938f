"""Helpers of the browser test (``tests/integration/test_ui.py``): real servers as
subprocesses on loopback, a static file server in a thread, headless Debian Chromium
driven by Selenium with Debian's ChromeDriver, and small real inputs (gate tags from the
real gate, traffic frames with the ``monitoring.schema`` columns).

Nothing is downloaded at run time: Selenium is given the driver and browser paths, so
Selenium Manager never runs (``SE_OFFLINE`` is set as well)."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "CHROMEDRIVER", "CHROMIUM", "ServerProcess", "chromium_driver", "gate_tags",
    "serve_folder", "wait_http",
]

CHROMIUM = Path(os.environ.get("VOICELOOP_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("VOICELOOP_CHROMEDRIVER", "/usr/bin/chromedriver"))

# As the machine's probe ran Chromium: no sandbox (root), no GPU, and none of the
# background connections a closed network refuses (sync, component updates, ...).
CHROMIUM_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-quic", "--no-first-run", "--no-default-browser-check",
    "--disable-extensions", "--window-size=1440,1100", "--lang=en-US",
)


def wait_http(url: str, timeout_s: float, *, expect: str | None = None,
              alive: ServerProcess | None = None) -> str:
    """GET ``url`` until it answers 200 (and contains ``expect``); returns the body.

    Raises:
        RuntimeError: ``alive``'s process exited, or ``timeout_s`` passed (with the
            server's log tail).
    """
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        if alive is not None and alive.proc is not None and alive.proc.poll() is not None:
            raise RuntimeError(f"{alive.name} exited with {alive.proc.returncode} before "
                               f"{url} answered:\n{alive.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                body = resp.read().decode("utf-8", "replace")
                if resp.status == 200 and (expect is None or expect in body):
                    return body
                last = f"HTTP {resp.status}: {body[:200]}"
        except (urllib.error.URLError, OSError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            tail = alive.log_tail() if alive is not None else ""
            raise RuntimeError(f"{url} did not answer within {timeout_s:g} s ({last})\n{tail}")
        time.sleep(0.5)


class ServerProcess:
    """A server started as a subprocess in its own process group, its output in a log
    file; :meth:`stop` ends the whole group (SIGTERM, then SIGKILL)."""

    def __init__(self, name: str, argv: Sequence[str], log: Path,
                 env: Mapping[str, str] | None = None, cwd: Path | None = None) -> None:
        self.name, self.argv, self.log = name, list(argv), log
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServerProcess:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env, cwd=self.cwd, start_new_session=True)
        return self

    def log_tail(self, chars: int = 3000) -> str:
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return f"--- {self.name} log ({self.log}) ---\n{text[-chars:]}"

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM to the group, the leader awaited; then whatever is left of the group
        (workers still shutting down, or a leader that ignored SIGTERM) is killed."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        pgid = proc.pid  # start_new_session: the group id is the leader's pid
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def serve_folder(folder: Path) -> Iterator[str]:
    """Serve ``folder`` over HTTP on 127.0.0.1 (a free port) in a thread; yields the URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="report-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def chromium_missing() -> str | None:
    """Why the browser cannot run here (None when it can)."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not path.is_file() or not os.access(path, os.X_OK):
            return (f"{path} is missing: install Debian's `{package}` "
                    "(`make system-packages` does)")
    return None


@contextmanager
def chromium_driver(profile_dir: Path, log: Path) -> Iterator[Any]:
    """Headless Debian Chromium under Debian's ChromeDriver; quit on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}"):
        options.add_argument(flag)
    # Both paths given: Selenium Manager (which may download drivers) is skipped;
    # SE_OFFLINE would stop it from downloading anything if it ever ran.
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(log),
                      env={**os.environ, "SE_OFFLINE": "true"})
    driver = webdriver.Chrome(service=service, options=options)
    try:
        driver.set_page_load_timeout(120)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile_dir, ignore_errors=True)


# --------------------------------------------------------------------------- inputs



def gate_tags(candidate: str, production: str, gate_settings: Any,
              candidate_wrong: int = 10, production_wrong: int = 20) -> dict[str, str]:
    """The ``gate.*`` version tags the real offline gate writes for a candidate that gets
    ``candidate_wrong`` of 200 golden utterances wrong (a subset of production's
    ``production_wrong``: no negative flips) — so the UI shows what the gate writes."""
    from model.data.manifest import ManifestRow, Slot
    from model.inference.prediction import Prediction
    from monitoring.gate import GateInputs, GateSet, ModelCost, evaluate_gate

    rows = [ManifestRow(
        id=f"g{i:03d}", audio=f"audio/g{i:03d}.wav", duration_s=2.0,
        transcript="turn on the kitchen light", intent="HassTurnOn",
        slots=[Slot(type="area", value="kitchen")], engine="espeak-ng", voice="en-us",
        split="test", template_id="t0", domain=("lights", "climate")[i % 2],
    ) for i in range(200)]

    def predictions(wrong: int, version: str) -> list[Prediction]:
        return [Prediction(id=r.id, transcript=r.transcript,
                           intent="HassTurnOff" if i < wrong else r.intent, slots=r.slots,
                           confidence=0.9, model_version=version) for i, r in enumerate(rows)]

    golden = GateSet.from_predictions("golden", rows, predictions(candidate_wrong, candidate),
                                      predictions(production_wrong, production))
    cost = ModelCost(latency_p50_ms=10.0, size_bytes=1_000_000)
    result = evaluate_gate(GateInputs(sets=[golden], candidate=cost, production=cost,
                                      candidate_version=candidate,
                                      production_version=production), gate_settings)
    if not result.passed:
        raise AssertionError(f"the crafted candidate should pass the gate: {result.failed}")
    return result.to_tags()
