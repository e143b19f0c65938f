"""Prefect flow: the drift check of one window of ingested traffic against the production
model's reference — Evidently report, label-free performance estimate, decision, alert,
and the ``voiceloop.drift.detected`` event that starts retraining (thin orchestration over
:mod:`monitoring`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event

from flows.common import MonitoredModel, flow_settings, monitored_model
from model.inference.onnx import load_predictor
from monitoring.alerts import AlertStore
from monitoring.drift import DriftDecision, ReferenceStore, detect_drift
from monitoring.ingest import curated_root
from monitoring.reference import build_reference, load_first, load_window
from serving.annotations import AnnotationStore
from voiceloop.settings import Settings
from voiceloop.tracking import RunLogger

__all__ = ["Reference", "drift_markdown", "drift_payload", "monitor_flow", "reference_task"]


@dataclass(frozen=True)
class Reference:
    """A model version's reference (``frame``), or None while a live reference is still
    warming up, with ``live_rows`` of the rows it needs so far."""

    frame: pd.DataFrame | None
    live_rows: int = 0


@task(name="reference", retries=1)
def reference_task(settings: Settings, target: MonitoredModel) -> Reference:
    """The model version's reference, built and stored on first use: its corpus split,
    or — for a version adapted by a retraining, with ``monitoring.adapted_reference:
    live`` — its own first ``reference_rows`` rows of ingested traffic (no frame while
    fewer exist: warming up)."""
    store = ReferenceStore.for_workspace(settings.workspace)
    if store.exists(target.version):
        return Reference(store.load(target.version)[0])  # (frame, sidecar)
    m = settings.monitoring
    if target.adapted and m.adapted_reference == "live":
        first = load_first(curated_root(settings), target.version, m.reference_rows,
                           served_by=target.version)
        if len(first) < m.reference_rows:
            return Reference(None, len(first))
        store.save(first, target.version, source_split="live traffic: the version's first "
                   f"{len(first)} ingested rows")
        return Reference(first, len(first))
    predictor = load_predictor(target.folder, batch_size=settings.decode.batch_size, threads=1)
    frame = build_reference(settings, predictor, settings.monitoring.reference_split,
                            settings.monitoring.reference_rows)
    store.save(frame, target.version, source_split=settings.monitoring.reference_split)
    return Reference(frame)


def drift_payload(decision: DriftDecision, target: MonitoredModel, report_dir: Path,
                  alert_id: int | None) -> dict[str, Any]:
    """The event's evidence: which signals, their scores, the window, the model version
    (nothing about any scenario: the monitor does not know why the world changed)."""
    return {
        "model_version": target.version, "registry_version": target.registry_version,
        "window": decision.window.model_dump(mode="json"),
        "signals": [s.model_dump(mode="json") for s in decision.drifted_signals],
        "reasons": decision.reasons, "alert_id": alert_id,
        "estimated_accuracy": decision.performance.expected_accuracy if decision.performance else None,
        "report": str(report_dir / "drift.html"),
    }


def drift_markdown(decision: DriftDecision, target: MonitoredModel, report_dir: Path) -> str:
    """The window's headline as a Prefect markdown artifact."""
    verdict = "**DRIFT**" if decision.drifted else ("no drift" if decision.sufficient
                                                   else "too few samples to decide")
    p = decision.performance
    lines = [
        f"# Drift check: {verdict}", "",
        f"- model `{target.version}` (registry version {target.registry_version or '—'})",
        f"- window: {decision.window.n} samples, {decision.window.start} → {decision.window.end}",
    ]
    if p is not None and p.expected_accuracy is not None:
        reference = p.reference_expected_accuracy
        lines.append(
            f"- estimated intent accuracy (calibrated confidence): {p.expected_accuracy:.1%}"
            + (f" (reference {reference:.1%})" if reference is not None else "")
            + (f"; realised on {p.n_labelled} labelled: {p.realised_accuracy:.1%}"
               if p.realised_accuracy is not None else ""))
    lines += ["", "| signal | kind | score | threshold | drifted |", "|---|---|---:|---:|---|"]
    for s in sorted(decision.signals, key=lambda s: (not s.drifted, s.name)):
        score = "—" if s.score is None else f"{s.score:.3f}"
        lines.append(f"| {s.name} | {s.kind} | {score} | {s.threshold:.3f} | "
                     f"{'**yes**' if s.drifted else 'no'} |")
    lines += ["", f"Evidently report: `{report_dir / 'drift.html'}`"]
    return "\n".join(lines) + "\n"


@flow(name="voiceloop-monitor", log_prints=True)
def monitor_flow(profile: str | None = None, workspace: str | None = None,
                 params: str | None = None, model: str | None = None, window_rows: int | None = None) -> dict[str, Any]:
    """Compare the latest window of ingested traffic with the production model's
    reference; log the Evidently report and summary to MLflow; raise an alert and the
    drift event once per drift episode.

    Args:
        profile, workspace, params: which profile of which ``params.yaml`` (default the
            repository's), and which workspace.
        model: the model whose reference and embeddings to use (any form ``voiceloop
            predict`` takes); default the registry's ``production`` version.
        window_rows: window size (default ``monitoring.drift.window_rows``).
    """
    logger = get_run_logger()
    settings = flow_settings(profile, workspace, params)
    target = monitored_model(settings, model)
    drift = settings.monitoring.drift
    thresholds = ReferenceStore.for_workspace(settings.workspace).load_thresholds(target.version)
    ref = reference_task(settings, target)
    if ref.frame is None:
        message = (f"version {target.version} (adapted by a retraining) is warming up: "
                   f"{ref.live_rows} of the {settings.monitoring.reference_rows} ingested "
                   "rows its live reference needs; no drift decision until then")
        logger.info(message)
        create_markdown_artifact(f"# Drift check: warming up\n\n{message}\n",
                                 key="voiceloop-drift", description="Drift check")
        return {"drifted": False, "sufficient": False, "warming_up": True, "window": 0,
                "live_rows": ref.live_rows}
    reference = ref.frame
    current = load_window(curated_root(settings), target.version, window_rows or drift.window_rows)
    if not current.empty and "request_id" in reference.columns:
        # A live reference's rows are never judged against themselves.
        current = current[~current["request_id"].isin(reference["request_id"])]
        current = current.reset_index(drop=True)
        if current.empty:
            logger.info("no ingested traffic after the live reference of %s yet",
                        target.version)
            return {"drifted": False, "sufficient": False, "window": 0}
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    report_dir = settings.workspace / "monitoring" / "reports" / stamp
    if current.empty:
        logger.warning("no ingested traffic embedded by %s yet: nothing to compare",
                       target.version)
        return {"drifted": False, "sufficient": False, "window": 0}
    if thresholds is not None:
        drift = thresholds.apply(drift, rows=len(current), reference_rows=len(reference))
    decision, result = detect_drift(
        reference, current, drift, report_dir=report_dir, model_version=target.version,
        annotations=AnnotationStore(settings.annotations_root), seed=settings.seed)
    tracker = RunLogger.start(settings, f"monitor-{stamp}", {
        "stage": "monitor", "model_version": target.version,
        "registry_version": target.registry_version or "", "drifted": str(decision.drifted)})
    tracker.log_metrics({f"drift/{s.name}": s.score for s in decision.signals
                         if s.score is not None}, 0)
    p = decision.performance
    if p is not None and p.expected_accuracy is not None:
        tracker.log_metrics({"estimated_accuracy": p.expected_accuracy,
                             "window_rows": decision.window.n,
                             **({"realised_accuracy": p.realised_accuracy}
                                if p.realised_accuracy is not None else {})}, 0)
    tracker.log_artifacts(report_dir, "drift")
    tracker.finish()
    alert = AlertStore.for_workspace(settings.workspace, settings.monitoring.alerts).record(decision)
    create_markdown_artifact(drift_markdown(decision, target, report_dir), key="voiceloop-drift",
                             description="Drift check of the latest traffic window")
    if alert is not None:
        # One event per drift episode (the alert store deduplicates windows), so a
        # deployment trigger starts one retraining, not one per hourly window.
        emit_event(event=settings.flows.drift_event,
                   resource={"prefect.resource.id": f"voiceloop.model.{settings.tracking.registered_model}",
                             "prefect.resource.name": settings.tracking.registered_model},
                   payload=drift_payload(decision, target, report_dir, alert.id))
        logger.warning("drift detected (alert %s): %s", alert.id, "; ".join(decision.reasons))
    return {"drifted": decision.drifted, "sufficient": decision.sufficient,
            "alert_id": alert.id if alert else None, "reasons": decision.reasons,
            "window": decision.window.n, "report_dir": str(report_dir),
            "mlflow_run_id": tracker.run_id, "seconds": result.seconds}
