"""The monitoring flows for real: Prefect's test harness (a real API server on loopback),
the released model answering simulated users through the real service, the real traffic
store, Great Expectations, DVC, Evidently and MLflow; nothing mocked.

- ``voiceloop-ingest``: served traffic plus a batch of crafted bad samples written with
  the real ``TrafficWriter``; bad samples are quarantined with their reasons, the counts
  balance, and a rerun ingests nothing. (A crash between two batches, a flaky store and a
  poison batch are covered at library level in ``tests/integration/test_ingest.py``, which
  the flow calls unchanged.)
- ``voiceloop-monitor`` on small windows (``WINDOW`` rows, set in a copy of
  ``params.yaml`` passed as the flows' ``params``): a ``baseline`` window is not drifted;
  ``accent_shift``, ``noise_shift`` and ``domain_shift`` windows are; the three
  consecutive drifted windows make one episode, so one alert and one
  ``voiceloop.drift.detected`` event, read back from the harness's events API with its
  evidence (signals, scores, window, model version).

Thresholds. Small windows need their own thresholds: they are calibrated
(``calibrate_thresholds``) on windows of a *calibration pool* — the older requests of the
baseline users' run, held apart from the window judged next (that run's latest
``WINDOW`` requests) and from the reference — against the reference the monitor flow's
own ``reference`` task built, and stored with ``ReferenceStore.save_thresholds``, where
``monitor_flow`` loads them: as in production, where thresholds are calibrated on past
traffic known to be baseline and then judge what comes after. The reference is the
model's validation data: baseline utterances rendered with another seed and written as
the workspace corpus' ``valid`` split.

The model must respond to audio for drift to mean anything: ``release/student`` (or
``$VOICELOOP_TEST_MODEL``, a model folder, e.g. a candidate). Rendering about 630
utterances is most of the module's ~3 minutes on one core.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import yaml

from model.data.manifest import ManifestRow, write_manifest
from monitoring.alerts import AlertStore
from monitoring.drift import ReferenceStore, calibrate_thresholds, sample_windows
from monitoring.ingest import curated_root
from monitoring.reference import load_window
from serving.contracts import TrafficRecord
from serving.scenarios import render_successes
from serving.service import build_app
from serving.simulator import simulate
from serving.traffic import TrafficWriter
from tests.support import running_server
from voiceloop.settings import FeedbackSettings, Settings, TrafficSettings, load_settings

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MODEL = Path(os.environ.get("VOICELOOP_TEST_MODEL") or ROOT / "release" / "student")
PROFILE = "full"  # the released model's corpus: the scenarios vary its distribution
WINDOW = 60  # rows per judged window (and per calibration window)
SCENARIO_REQUESTS = WINDOW + 8  # a few may be quarantined; the window takes the latest
CALIBRATION_POOL = 240  # older baseline requests the thresholds are calibrated on
CALIBRATION_WINDOWS = 20  # = monitoring.drift.calibration.min_windows
REFERENCE_ROWS = 120  # rendered validation utterances the reference is built from
# Seeds: the reference and the baseline run (calibration pool + first judged window) draw
# distinct utterances. Scenario runs share the baseline run's seed: their utterances differ
# anyway (they depend on the scenario's name), and rooms simulated for a seed are cached.
SEEDS = {"reference": 101, "baseline": 303, "accent_shift": 303, "noise_shift": 303,
         "domain_shift": 303}
RATE = 16000


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model_dir() -> Path:
    if not (MODEL / "config.json").is_file() and not (MODEL / "MLmodel").is_file():
        pytest.fail(f"no model at {MODEL}: the released student (voiceloop release) is part "
                    "of the repository; set $VOICELOOP_TEST_MODEL to test another model")
    return MODEL


@pytest.fixture(scope="module")
def params(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``params.yaml`` with small windows: decided at ``WINDOW`` rows, the embedding
    signal computed on windows that small (the defaults are 2000 / 500 / 200 rows)."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    drift = raw["base"]["monitoring"]["drift"]
    drift.update({"window_rows": WINDOW, "min_samples": WINDOW})
    drift["embedding"]["min_rows"] = WINDOW // 2
    drift["calibration"]["min_windows"] = CALIBRATION_WINDOWS
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def _settings(params: Path, workspace: Path) -> Settings:
    return load_settings(params, PROFILE, workspace)


@contextlib.contextmanager
def _service(settings: Settings, model: Path) -> Iterator[str]:
    """The real service on loopback serving ``model``, logging to the settings' traffic
    store; leaving it commits every logged request (the app's shutdown flushes)."""
    with running_server(build_app(settings, model, workers=1)) as url:
        yield url


def _serve(settings: Settings, model: Path, scenario: str, requests: int) -> None:
    """``requests`` simulated users of ``scenario`` through the service; returns once
    every request is committed to the traffic store."""
    with _service(settings, model) as url:
        report = simulate(url, scenario, settings=settings, requests=requests, rate=0.0,
                          seed=SEEDS[scenario], concurrency=2, render_workers=1,
                          max_seconds=600, feedback=FeedbackSettings(p_wrong=0.0, p_right=0.0),
                          progress=False)
    assert report.answered == requests, report.errors


def _write_validation_split(settings: Settings, count: int) -> None:
    """``count`` baseline utterances as the corpus' ``valid`` split (WAV + manifest)."""
    audio_dir = settings.corpus_dir / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    rendered, _ = render_successes(settings, "baseline", count=count, seed=SEEDS["reference"],
                                   cache_dir=settings.simulations_dir)
    for u in rendered:
        sf.write(audio_dir / f"{u.id}.wav", u.audio, u.sample_rate, subtype="PCM_16")
        rows.append(ManifestRow(
            id=u.id, audio=f"../audio/{u.id}.wav", duration_s=u.duration_s,
            transcript=u.transcript, intent=u.intent, slots=list(u.slots), engine=u.engine,
            voice=u.voice, split="valid", template_id=u.template_id, domain=u.domain,
            rate=u.rate))
    write_manifest(settings.corpus_dir / "manifests" / "valid.jsonl", rows)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, params: Path, model_dir: Path,
              prefect_harness: None) -> dict[str, Any]:
    """The monitored workspace with its reference, built by the monitor flow's own task
    from the workspace corpus' ``valid`` split (rendered baseline utterances)."""
    from flows.common import monitored_model
    from flows.monitor import reference_task

    settings = _settings(params, tmp_path_factory.mktemp("monitoring") / "ws")
    t0 = time.monotonic()
    _write_validation_split(settings, REFERENCE_ROWS)
    target = monitored_model(settings, str(model_dir))
    reference = reference_task.fn(settings, target).frame  # stored: monitor_flow loads it
    return {"settings": settings, "params": str(params), "target": target,
            "reference": reference, "timings": {"reference": time.monotonic() - t0}}


# --------------------------------------------------------------------------- traffic


def _bad_batch(settings: Settings, version: str) -> dict[str, str]:
    """Crafted bad samples (and one good one) written with the real ``TrafficWriter``,
    dated a year back so no drift window reads them; returns id → expected reason start."""
    rng = np.random.default_rng(7)
    t = np.arange(int(1.5 * RATE)) / RATE
    voice = (0.2 * np.sin(2 * np.pi * 180 * t) * np.clip(np.sin(2 * np.pi * 2.5 * t), 0, None)
             + rng.normal(0, 0.003, t.size)).astype(np.float32)

    def record(rid: str, **fields: Any) -> TrafficRecord:
        base: dict[str, Any] = {
            "request_id": rid, "timestamp": datetime(2025, 1, 1, 12, tzinfo=UTC),
            "route": "production", "model_version": version, "transcript": "turn on the light",
            "intent": "HassTurnOn", "slots": [], "confidence": 0.9, "latency_ms": 20.0,
            "duration_s": 1.5, "sample_rate": RATE, "audio_format": "wav"}
        return TrafficRecord(**(base | fields))

    items: list[tuple[TrafficRecord, np.ndarray]] = [
        (record("crafted-good"), voice),
        (record("crafted-silent"), rng.normal(0, 1e-4, RATE).astype(np.float32)),
        (record("crafted-clipped"), np.clip(voice * 40, -1, 1)),
        (record("crafted-short", duration_s=0.1), voice[: RATE // 10]),
        (record("crafted-badconf", confidence=1.5), voice),
    ]
    with TrafficWriter(settings.traffic_root, TrafficSettings(batch_max_seconds=60)) as writer:
        for rec, audio in items:
            assert writer.submit(rec, audio, RATE)
        assert writer.flush(30)
    return {"crafted-silent": "silence share", "crafted-clipped": "clipping share",
            "crafted-short": "duration 0.1 s below", "crafted-badconf": "confidence 1.5 outside"}


@pytest.fixture(scope="module")
def baseline_traffic(workspace: dict[str, Any], model_dir: Path) -> dict[str, str]:
    """The monitored store: a crafted bad batch, then one run of baseline users whose
    older ``CALIBRATION_POOL`` requests calibrate the thresholds and whose latest
    ``WINDOW`` make the first judged window; returns crafted id → expected reason."""
    settings: Settings = workspace["settings"]
    t0 = time.monotonic()
    expected = _bad_batch(settings, workspace["target"].version)
    _serve(settings, model_dir, "baseline", CALIBRATION_POOL + SCENARIO_REQUESTS)
    workspace["timings"]["baseline traffic"] = time.monotonic() - t0
    return expected


@pytest.fixture(scope="module")
def calibrated(workspace: dict[str, Any], baseline_traffic: dict[str, str],
               model_dir: Path) -> dict[str, Any]:
    """Thresholds for ``WINDOW``-row windows, calibrated on windows of the baseline run's
    older requests — held apart from the window judged next (its latest ``WINDOW``
    rows, as ``load_window`` reads them) and from the reference — and stored where
    ``monitor_flow`` loads them. In production: calibrating on past traffic known to be
    baseline, then monitoring what comes after."""
    from flows.ingest import ingest_flow

    settings: Settings = workspace["settings"]
    version = workspace["target"].version
    ingest_flow(**_flow_args(workspace, model_dir))  # a no-op when the ingest test ran
    t0 = time.monotonic()
    rows = load_window(curated_root(settings), version, 100_000)
    served = rows[~rows["request_id"].str.startswith("crafted-")]  # sorted by timestamp
    judged_next = load_window(curated_root(settings), version, WINDOW)
    pool = served[~served["request_id"].isin(judged_next["request_id"])].reset_index(drop=True)
    assert len(pool) >= CALIBRATION_POOL * 0.9 and len(served) - len(pool) == WINDOW
    thresholds = calibrate_thresholds(
        workspace["reference"],
        sample_windows(pool, WINDOW, CALIBRATION_WINDOWS, seed=settings.seed),
        settings.monitoring.drift, seed=settings.seed)
    ReferenceStore.for_workspace(settings.workspace).save_thresholds(version, thresholds)
    workspace["timings"]["calibration"] = time.monotonic() - t0
    return {"thresholds": thresholds, "pool_rows": len(pool)}


def _flow_args(workspace: dict[str, Any], model_dir: Path) -> dict[str, str]:
    settings: Settings = workspace["settings"]
    return {"profile": PROFILE, "workspace": str(settings.workspace),
            "params": workspace["params"], "model": str(model_dir)}


def _drift_events(event: str, since: datetime, expect: int,
                  timeout_s: float = 30.0) -> list[Any]:
    """The ``event`` events that occurred from ``since`` on, as the harness's API stored
    them, once ``expect`` are there (events travel through the client's events worker and
    the server's persister). ``since`` matters: the harness is shared by the session, and
    the end-to-end loop test emits the same event earlier."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all(timeout=10)
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            # limit: the server pages at most 50 (the client's default of 100 is refused).
            page = client.read_events(
                filter=EventFilter(event=EventNameFilter(name=[event]),
                                   occurred=EventOccurredFilter(since=since)),
                limit=50)
            if len(page.events) >= expect or time.monotonic() > deadline:
                return page.events
            time.sleep(0.5)


# --------------------------------------------------------------------------- tests


def test_ingest_flow_quarantines_bad_samples_and_a_rerun_ingests_nothing(
    workspace: dict[str, Any], baseline_traffic: dict[str, str], model_dir: Path
) -> None:
    from flows.ingest import ingest_flow

    settings: Settings = workspace["settings"]
    first = ingest_flow(**_flow_args(workspace, model_dir))
    assert first["requests"] == CALIBRATION_POOL + SCENARIO_REQUESTS + 5
    assert first["requests"] == first["accepted"] + first["quarantined"]  # counts balance
    assert all(b["requests"] == b["accepted"] + b["quarantined"] for b in first["batches"])
    assert first["data_version"] and first["data_version_changed"]  # versioned with DVC

    quarantine = pd.concat([pd.read_parquet(p) for p in
                            (curated_root(settings) / "quarantine").glob("*.parquet")])
    reasons = {rid: list(r) for rid, r in zip(quarantine["request_id"], quarantine["reasons"],
                                              strict=True)}
    for rid, start in baseline_traffic.items():
        assert any(r.startswith(start) for r in reasons[rid]), (rid, reasons.get(rid))
    assert "crafted-good" not in reasons
    assert first["quarantined"] == len(reasons) == sum(len(r) > 0 for r in reasons.values())
    curated = load_window(curated_root(settings), workspace["target"].version, 10_000)
    assert len(curated) == first["accepted"] and curated["request_id"].is_unique
    assert "crafted-good" in set(curated["request_id"])

    again = ingest_flow(**_flow_args(workspace, model_dir))
    assert again["batches"] == [] and again["requests"] == 0
    assert again["skipped"] == again["committed"] == len(first["batches"])
    assert again["data_version"] == first["data_version"] and not again["data_version_changed"]


def test_monitor_flow_detects_shifts_alerts_once_and_emits_the_event_with_evidence(
    workspace: dict[str, Any], calibrated: dict[str, Any], model_dir: Path
) -> None:
    from flows.ingest import ingest_flow
    from flows.monitor import monitor_flow

    settings: Settings = workspace["settings"]
    version = workspace["target"].version
    args = _flow_args(workspace, model_dir)
    started = datetime.now(UTC)
    results: dict[str, dict[str, Any]] = {"baseline": monitor_flow(**args)}
    for scenario in ("accent_shift", "noise_shift", "domain_shift"):
        _serve(settings, model_dir, scenario, SCENARIO_REQUESTS)
        ingest_flow(**args)
        results[scenario] = monitor_flow(**args)
    summary = {k: (r["drifted"], r["reasons"]) for k, r in results.items()}
    print(f"windows: {summary}; setup: {workspace['timings']}")

    assert all(r["sufficient"] and r["window"] == WINDOW for r in results.values()), summary
    assert not results["baseline"]["drifted"], summary
    assert all(results[s]["drifted"] for s in ("accent_shift", "noise_shift", "domain_shift")), \
        summary
    # One episode: the first drifted window raises the alert, the next two join it.
    assert results["baseline"]["alert_id"] is None
    alert_id = results["accent_shift"]["alert_id"]
    assert alert_id is not None
    assert results["noise_shift"]["alert_id"] is None and results["domain_shift"]["alert_id"] is None
    alerts = AlertStore.for_workspace(settings.workspace).list()
    assert [a.id for a in alerts] == [alert_id]
    assert alerts[0].drifted_windows == 3 and alerts[0].status == "open"
    assert alerts[0].model_version == version
    for result in results.values():
        assert (Path(result["report_dir"]) / "drift.html").is_file()  # Evidently's report
        assert result["mlflow_run_id"]

    # The event, once, with the evidence of the window that opened the episode.
    events = _drift_events(settings.flows.drift_event, started, expect=1)
    time.sleep(2)  # had a second one been emitted it would be stored by now
    events = _drift_events(settings.flows.drift_event, started, expect=2, timeout_s=0)
    assert len(events) == 1, [e.payload for e in events]
    event = events[0]
    payload = event.payload
    assert event.resource.id == f"voiceloop.model.{settings.tracking.registered_model}"
    assert payload["model_version"] == version and payload["alert_id"] == alert_id
    assert payload["window"]["n"] == WINDOW
    assert payload["window"]["start"] and payload["window"]["end"]
    assert payload["reasons"] == results["accent_shift"]["reasons"]
    assert payload["signals"] and all(s["drifted"] for s in payload["signals"])
    for s in payload["signals"]:
        assert s["name"] and s["score"] is not None and s["score"] >= s["threshold"], s
    assert "accent" not in str(payload)  # scenario-free: the monitor cannot know why
