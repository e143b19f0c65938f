"""What a person sees in the three UIs of the loop, in a real browser (headless Debian
Chromium under Selenium and Debian's ChromeDriver; nothing downloaded at run time).

Real state in a temporary workspace, every server on 127.0.0.1:

- **MLflow**: a SQLite registry with ``voiceloop-slu``: version 1 (tiny real model) the
  seed production, version 2 (tiny real model) gated by the real offline gate, canaried
  and promoted (so 1 is ``previous``), version 3 (re-registered from version 2's run)
  gated and in canary at 25 %; shown by the real ``mlflow ui`` as a subprocess.
- **Prefect**: a real ``prefect server start`` subprocess and one real run of the
  project's ``voiceloop-ingest`` flow against it (an empty traffic store: zero batches).
- **Evidently**: the real drift report (``run_drift_report``) of a window whose SNR and
  level moved, served by a stdlib HTTP server.

Screenshots of every page are written to ``<tmp>/ui/screenshots`` (the path is printed:
run with ``-s`` to see it) and copied to ``$VOICELOOP_ARTIFACTS`` when that is set, also
when a test fails. Run it alone:

    uv run pytest tests/integration/test_ui.py -s
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support import free_port, register_tiny
from tests.traffic_support import synthetic_traffic
from tests.ui_support import (
    ServerProcess,
    chromium_driver,
    chromium_missing,
    gate_tags,
    serve_folder,
    wait_http,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

MODEL = "voiceloop-slu"
CANARY_SHARE = 25.0
SERVER_START_S = 240.0  # first start of the MLflow UI on a busy 2-core machine: ~40 s
PAGE_WAIT_S = 90.0      # single-page apps: the first render fetches and builds a lot


@dataclass
class LoopUI:
    """The state the UIs show, and where they are."""

    mlflow_url: str
    prefect_url: str
    report_url: str
    aliases: dict[str, str]
    gate: dict[str, str]  # the canary version's gate tags
    flow_run_id: str
    flow_run_name: str
    drift: Any  # monitoring.drift.DriftResult
    screenshots: Path
    timings: dict[str, float] = field(default_factory=dict)


def _drain_prefect_workers() -> None:
    """Flush the log and event workers (as Prefect's own test harness does), so that the
    run's logs reach the server before the UI is looked at."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all()
    EventsWorker.drain_all()


def _run_ingest_flow(api_url: str, workspace: Path) -> tuple[str, str]:
    """One real run of ``voiceloop-ingest`` against the Prefect server at ``api_url``;
    returns (flow run id, flow run name)."""
    import prefect.settings as ps
    from prefect.client.orchestration import get_client

    from flows.ingest import ingest_flow

    _drain_prefect_workers()  # workers of an earlier harness must not carry our logs
    with ps.temporary_settings(updates={ps.PREFECT_API_URL: api_url,
                                        ps.PREFECT_SERVER_ANALYTICS_ENABLED: False}):
        try:
            state = ingest_flow(profile="tiny", workspace=str(workspace), return_state=True)
        finally:
            _drain_prefect_workers()
        assert state.is_completed(), f"the ingest flow run did not complete: {state}"
        run_id = state.state_details.flow_run_id
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(run_id)
    return str(run.id), run.name


def _build_registry(settings: Any, root: Path) -> tuple[dict[str, str], dict[str, str]]:
    """The registry story; returns (aliases, the canary version's gate tags)."""
    from voiceloop.registry import Registry
    from voiceloop.tracking import mlflow_scope

    registry = Registry(settings)
    client = registry.client
    v1 = register_tiny(settings, root / "models", "ui-v1", None, seed=0)
    registry.set_production(v1, "seed: first model")
    v2 = register_tiny(settings, root / "models", "ui-v2", "candidate", seed=1)
    registry.tag_version(v2, gate_tags(v2, v1, settings.promotion.gate))
    registry.start_canary(v2, 5.0)
    registry.promote(v2, "canary passed 1 step (5 %)")
    # A third version of version 2's logged model (as a retrain that reproduces it would
    # register), gated and in canary now.
    mv2 = client.get_model_version(MODEL, v2)
    with mlflow_scope(settings.tracking_uri):  # the logged-model lookup reads the globals
        v3 = str(client.create_model_version(
            MODEL, source=mv2.source, run_id=mv2.run_id, model_id=mv2.model_id,
            description="UI test: re-registered ui-v2").version)
    client.set_registered_model_alias(MODEL, "candidate", v3)
    tags = gate_tags(v3, v2, settings.promotion.gate, candidate_wrong=8, production_wrong=10)
    registry.tag_version(v3, tags)
    registry.start_canary(v3, CANARY_SHARE)
    aliases = registry.aliases()
    assert aliases == {"production": v2, "previous": v1, "canary": v3, "candidate": v3}, aliases
    return aliases, tags


@pytest.fixture(scope="module")
def loop_ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopUI]:
    from monitoring.drift import run_drift_report
    from voiceloop.settings import load_settings
    from voiceloop.tracking import make_client

    root = tmp_path_factory.mktemp("ui")
    shots = root / "screenshots"
    shots.mkdir()
    print(f"\nUI test: screenshots in {shots}", flush=True)
    timings: dict[str, float] = {}
    t0 = time.monotonic()

    def lap(name: str) -> None:
        timings[name] = round(time.monotonic() - t0, 1)

    settings = load_settings(profile="tiny", workspace=root / "ws")
    assert settings.tracking.registered_model == MODEL
    with ExitStack() as stack:
        # Prefect server first: it starts while the models are exported.
        port = free_port()
        api = f"http://127.0.0.1:{port}/api"
        prefect_home = root / "prefect"
        prefect = ServerProcess("prefect server", [
            sys.executable, "-m", "prefect", "server", "start",
            "--host", "127.0.0.1", "--port", str(port)],
            root / "logs" / "prefect.log", cwd=root, env={
                "PREFECT_HOME": str(prefect_home),
                "PREFECT_SERVER_DATABASE_CONNECTION_URL":
                    f"sqlite+aiosqlite:///{prefect_home / 'prefect.db'}",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                "PREFECT_API_URL": api, "PREFECT_UI_API_URL": api,  # the UI's API address
                "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port),
            })
        stack.callback(prefect.stop)
        prefect.start()

        make_client(settings)  # creates and migrates the SQLite store before the UI opens it
        mlflow_port = free_port()
        mlflow = ServerProcess("mlflow ui", [
            sys.executable, "-m", "mlflow", "ui",
            "--backend-store-uri", settings.tracking_uri,
            "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1"],
            root / "logs" / "mlflow.log", cwd=root)
        stack.callback(mlflow.stop)
        mlflow.start()

        aliases, gate = _build_registry(settings, root)
        lap("registry")

        wait_http(f"{api}/health", SERVER_START_S, expect="true", alive=prefect)
        lap("prefect up")
        run_id, run_name = _run_ingest_flow(api, settings.workspace)
        lap("flow run")

        report_dir = root / "report"
        drift = run_drift_report(
            synthetic_traffic(1000, seed=1, embeddings=False, model_version="ui-v1"),
            synthetic_traffic(600, seed=2, snr_shift=-12.0, level_shift=6.0, embeddings=False,
                              model_version="ui-v1"),
            settings.monitoring.drift, report_dir=report_dir, model_version="ui-v2")
        report_url = stack.enter_context(serve_folder(report_dir))
        lap("drift report")

        mlflow_url = f"http://127.0.0.1:{mlflow_port}"
        wait_http(f"{mlflow_url}/health", SERVER_START_S, alive=mlflow)
        lap("mlflow up")

        ui = LoopUI(mlflow_url, f"http://127.0.0.1:{port}", report_url, aliases, gate,
                    run_id, run_name, drift, shots, timings)
        try:
            yield ui
        finally:
            print(f"\nUI test: timings (s since start) {timings}; screenshots in {shots}: "
                  f"{sorted(p.name for p in shots.glob('*.png'))}", flush=True)
            target = os.environ.get("VOICELOOP_ARTIFACTS")
            if target:
                dest = Path(target) / "ui-screenshots"
                shutil.copytree(shots, dest, dirs_exist_ok=True)
                print(f"UI test: screenshots copied to {dest}", flush=True)


@pytest.fixture(scope="module")
def browser(loop_ui: LoopUI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    why = chromium_missing()
    if why is not None:
        pytest.fail(f"the browser test needs Debian's Chromium and ChromeDriver: {why}")
    folder = tmp_path_factory.mktemp("chromium")
    start = time.monotonic()
    with chromium_driver(folder / "profile", folder / "chromedriver.log") as driver:
        loop_ui.timings["browser start"] = round(time.monotonic() - start, 1)
        yield driver


# --------------------------------------------------------------------------- helpers


def _text(driver: Any) -> str:
    """The page's visible text, whitespace collapsed."""
    from selenium.webdriver.common.by import By

    return " ".join(driver.find_element(By.TAG_NAME, "body").text.split())


def _wait_text(driver: Any, *needles: str, timeout_s: float = PAGE_WAIT_S) -> str:
    """Wait until the visible text contains every needle; returns the text."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    seen = {"text": ""}

    def ready(d: Any) -> bool:
        seen["text"] = _text(d)
        return all(n in seen["text"] for n in needles)

    try:
        WebDriverWait(driver, timeout_s, poll_frequency=0.5).until(ready)
    except TimeoutException:
        missing = [n for n in needles if n not in seen["text"]]
        raise AssertionError(f"{driver.current_url}: {missing} not shown within "
                             f"{timeout_s:g} s; the page shows: {seen['text'][:2000]}") from None
    return seen["text"]


def _page(driver: Any, loop_ui: LoopUI, url: str, shot: str,
          check: Callable[[], None], settle_s: float = 0.0) -> None:
    """Open ``url``, run ``check`` and save a screenshot ``shot`` whatever happened
    (``settle_s`` after the check, for drawings that are not text, e.g. canvases)."""
    driver.get(url)
    try:
        check()
        time.sleep(settle_s)
    finally:
        driver.save_screenshot(str(loop_ui.screenshots / shot))


def _scroll_to_text(driver: Any, text: str, block: str = "start") -> None:
    """Scroll the element whose own text is ``text`` into view (for a screenshot)."""
    from selenium.webdriver.common.by import By

    element = driver.find_element(By.XPATH, f"//*[normalize-space(text())=\"{text}\"]")
    driver.execute_script(f"arguments[0].scrollIntoView({{block: '{block}'}});", element)
    time.sleep(0.5)


def _version_blocks(text: str) -> dict[str, str]:
    """The registered-model page's versions table, cut into one text per version."""
    parts = re.split(r"\bVersion (\d+)\b", text.split(" Versions ", 1)[-1])
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


# --------------------------------------------------------------------------- tests


def test_mlflow_ui_shows_the_model_its_aliases_and_gate_tags(browser: Any,
                                                             loop_ui: LoopUI) -> None:
    a = loop_ui.aliases
    prod, prev, canary = a["production"], a["previous"], a["canary"]

    def model_page() -> None:
        text = _wait_text(browser, MODEL, f"Version {canary}", f"Version {prev}",
                          "@ production", "@ canary", "@ previous")
        assert f"{MODEL} - MLflow" in browser.title or MODEL in browser.title
        # the canary share is a registered-model tag a person can read (and change)
        assert re.search(r"canary_share\s+25\b", text), text[:1500]
        blocks = _version_blocks(text)
        assert {prod, prev, canary} <= set(blocks), blocks.keys()
        assert "@ production" in blocks[prod] and "@ canary" not in blocks[prod]
        assert "@ previous" in blocks[prev] and "@ production" not in blocks[prev]
        assert "@ canary" in blocks[canary] and "@ candidate" in blocks[canary]
        # the offline gate's verdict and the rollout history, per version
        assert re.search(r"gate\.result\s*:\s*pass", blocks[canary]), blocks[canary]
        assert re.search(r"gate\.result\s*:\s*pass", blocks[prod]), blocks[prod]
        assert re.search(r"rollout\.status\s*:\s*promoted", blocks[prod]), blocks[prod]
        assert re.search(r"rollout\.status\s*:\s*canary", blocks[canary]), blocks[canary]

    _page(browser, loop_ui, f"{loop_ui.mlflow_url}/#/models/{MODEL}", "mlflow-model.png",
          model_page)
    _scroll_to_text(browser, f"Version {prev}", block="end")  # production and previous rows
    browser.save_screenshot(str(loop_ui.screenshots / "mlflow-model-versions.png"))

    def version_page() -> None:
        text = _wait_text(browser, f"Version {canary}", "@ canary", "gate.result",
                          "gate.production_version")
        assert re.search(r"Aliases\s*:.*@ canary", text), text[:1500]
        assert re.search(r"gate\.result\s+pass\b", text), text
        assert re.search(rf"gate\.production_version\s+{prod}\b", text), text
        accuracy = loop_ui.gate["gate.golden.intent_accuracy"]
        assert re.search(rf"gate\.golden\.intent_accuracy\s+{re.escape(accuracy)}", text), text

    _page(browser, loop_ui, f"{loop_ui.mlflow_url}/#/models/{MODEL}/versions/{canary}",
          "mlflow-canary-version.png", version_page)


def test_evidently_report_shows_its_headline_and_the_drifted_columns(browser: Any,
                                                                     loop_ui: LoopUI) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    columns = [s for s in loop_ui.drift.signals if s.metric]  # one widget per ValueDrift
    title_xpath = "//*[starts-with(normalize-space(text()), \"Drift in column '\")]"

    def report() -> None:
        # The report is a JS app in one HTML file: wait until every widget has rendered.
        WebDriverWait(browser, PAGE_WAIT_S, poll_frequency=0.5).until(
            lambda d: len(d.find_elements(By.XPATH, title_xpath)) >= len(columns))
        titles = [e.text.strip() for e in browser.find_elements(By.XPATH, title_xpath)]
        # The headline (first widget) is the first monitored column's drift verdict.
        assert titles[0] == f"Drift in column '{columns[0].name}'", titles
        assert titles == [f"Drift in column '{s.name}'" for s in columns], titles
        shown = {m["col"]: m for m in re.finditer(
            r"Drift in column '(?P<col>[^']+)' Data drift (?P<verdict>not detected|detected)\."
            r" Drift detection method: (?P<method>.+?)\. Drift score: (?P<score>[0-9.]+)",
            _text(browser))}
        assert set(shown) == {s.name for s in columns}, shown.keys()
        for s in columns:  # what the page shows is what the monitor decided on
            m = shown[s.name]
            assert (m["verdict"] == "detected") == s.drifted, (s.name, m.group(0), s)
            assert float(m["score"]) == pytest.approx(s.score, abs=1e-3), (m.group(0), s.score)
        assert shown["snr_db"]["verdict"] == "detected"
        assert shown["level_dbfs"]["verdict"] == "detected"
        assert shown["duration_s"]["verdict"] == "not detected"

    _page(browser, loop_ui, f"{loop_ui.report_url}/drift.html", "evidently-report.png", report)
    _scroll_to_text(browser, "Drift in column 'snr_db'")  # the drifted column's widget
    browser.save_screenshot(str(loop_ui.screenshots / "evidently-snr_db.png"))


def test_prefect_ui_lists_the_flow_run(browser: Any, loop_ui: LoopUI) -> None:
    name = loop_ui.flow_run_name

    def runs() -> None:
        # The row: flow name > run name, then its state (the flow name is fetched apart
        # from the run, so wait for the whole row, not for the words anywhere).
        text = _wait_text(browser, f"voiceloop-ingest {name} Completed")
        assert "1 run" in text, text[:2000]
        assert "Can't connect to Server API" not in text

    _page(browser, loop_ui, f"{loop_ui.prefect_url}/runs", "prefect-runs.png", runs)

    def run_page() -> None:
        text = _wait_text(browser, f"{name} Completed", "Flow voiceloop-ingest",
                          f"Beginning flow run '{name}' for flow 'voiceloop-ingest'",
                          "ingested 0 batches: 0 requests = 0 accepted + 0 quarantined")
        assert "Can't connect to Server API" not in text

    _page(browser, loop_ui, f"{loop_ui.prefect_url}/runs/flow-run/{loop_ui.flow_run_id}",
          "prefect-flow-run.png", run_page, settle_s=2.0)  # the run graph is a canvas
