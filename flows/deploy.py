"""The deployments: every flow served by one process with its schedule and triggers.

``voiceloop flows serve`` runs :func:`serve_flows` next to a Prefect server (``voiceloop
flows server``, loopback); the runs, their artifacts and the drift events then show in
the Prefect UI. Schedules come from ``params.yaml`` (``flows``): ingestion every 10
minutes, drift monitoring hourly, retraining weekly **and** whenever the monitor emits
``voiceloop.drift.detected`` (a deployment trigger), promotion after every completed
retraining (a trigger on the retraining run's completion event).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.events import DeploymentEventTrigger

from flows.ingest import ingest_flow
from flows.monitor import monitor_flow
from flows.promote import promote_flow
from flows.retrain import retrain_flow
from voiceloop.settings import Settings

__all__ = ["deployments", "serve_flows"]


def deployments(settings: Settings, parameters: dict[str, Any], *, schedules: bool = True
                ) -> list[RunnerDeployment]:
    """The deployments for one profile/workspace (``parameters`` go to every flow).
    ``schedules=False``: no interval or cron (the event triggers stay) — for a driver that
    runs ingestion and monitoring itself (the demo: an hourly drift check that happened to
    fire mid-story judged the freshly promoted model, raised a second episode and started
    a second retraining beside the demo's own)."""
    f = settings.flows
    return [
        ingest_flow.to_deployment(
            name="ingest",
            interval=timedelta(minutes=f.ingest_every_minutes) if schedules else None,
            parameters=parameters, tags=["voiceloop", "monitoring"],
            description="Validate, featurise and version new production-traffic batches."),
        monitor_flow.to_deployment(
            name="monitor", cron=f.monitor_cron if schedules else None, parameters=parameters,
            tags=["voiceloop", "monitoring"],
            description="Drift check of the latest traffic window; raises the drift event."),
        retrain_flow.to_deployment(
            name="retrain", cron=f.retrain_cron if schedules else None, parameters=parameters,
            tags=["voiceloop", "retraining"],
            # The drift event starts a retraining (one event per drift episode).
            triggers=[DeploymentEventTrigger(expect={f.drift_event},
                                             parameters={**parameters, "reason": "drift"})],
            description="Select and label traffic, fine-tune the teacher, distil the student "
                        "with QAT, register the candidate. Weekly, and on drift."),
        promote_flow.to_deployment(
            name="promote", parameters=parameters, tags=["voiceloop", "promotion"],
            triggers=[DeploymentEventTrigger(expect={"prefect.flow-run.Completed"},
                                             match_related={"prefect.resource.name": "voiceloop-retrain"},
                                             parameters=parameters)],
            description="Offline gate, canary stages with automatic rollback, promotion. "
                        "Runs after each completed retraining."),
    ]


def serve_flows(settings: Settings, parameters: dict[str, Any], *, schedules: bool = True
                ) -> None:
    """Serve every deployment until interrupted (blocks); ``schedules`` as in
    :func:`deployments`."""
    serve(*deployments(settings, parameters, schedules=schedules))
