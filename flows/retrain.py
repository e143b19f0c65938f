"""Prefect flow: retrain on drift (the ``voiceloop.drift.detected`` event, through a
deployment trigger) or on schedule — select and label traffic, fine-tune the teacher,
distil the student with QAT, register the ``candidate`` (thin orchestration over
:mod:`voiceloop.retrain`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.common import flow_settings
from voiceloop.retrain import RetrainSpec, plan_retraining, register_candidate, run_training_stage
from voiceloop.settings import Settings

__all__ = ["retrain_flow", "retrain_markdown"]


@task(name="select-and-label", retries=1)
def plan_task(settings: Settings, corrupt_labels: bool) -> RetrainSpec | None:
    return plan_retraining(settings, corrupt_labels)


@task(name="train-teacher-and-student")
def train_task(settings: Settings, run_dir: str) -> str:
    # No retries: a training failure is worth a person's look, not a silent second hour.
    return run_training_stage(settings, Path(run_dir))


@task(name="register-candidate", retries=2, retry_delay_seconds=5)
def register_task(settings: Settings, spec: RetrainSpec, how: str) -> str:
    return register_candidate(settings, spec, how)


def retrain_markdown(spec: RetrainSpec, version: str, how: str) -> str:
    return "\n".join([
        f"# Retraining {spec.run_id}: candidate version {version}", "",
        f"- from production version {spec.parent_version}; trained {how}",
        (f"- pool {spec.pool} new samples from {len(spec.batches)} traffic batches "
        f"(data version `{spec.data_version}`)"),
        (f"- labels used {spec.labelled} of a budget of {spec.budget} (asked {spec.requested}); "
        f"{spec.pseudo} teacher pseudo-labels; {spec.replay} replayed corpus utterances"),
        *(["- **labels deliberately shuffled** (a bad candidate, to test the gate and canary)"]
          if spec.corrupt_labels else []),
    ]) + "\n"


@flow(name="voiceloop-retrain", log_prints=True)
def retrain_flow(profile: str | None = None, workspace: str | None = None,
                 params: str | None = None, corrupt_labels: bool = False, reason: str = "schedule", event: dict[str, Any] | None = None) -> dict[str, Any]:
    """Retrain from the production model on the traffic it has seen since the last
    retraining; register the result as ``candidate``.

    Args:
        profile, workspace, params: which profile of which ``params.yaml`` (default the
            repository's), and which workspace.
        corrupt_labels: shuffle the intents of the training data (a deliberately bad
            candidate: the demo proves the gate or the canary catches it).
        reason: why it runs (``schedule``, ``drift``, ``manual``).
        event: the triggering event's payload (a drift alert's evidence), if any.
    """
    logger = get_run_logger()
    settings = flow_settings(profile, workspace, params)
    spec = plan_task(settings, corrupt_labels)
    if spec is None:
        logger.warning("nothing to retrain on yet")
        return {"status": "skipped"}
    logger.info("retraining %s (%s): %d labelled, %d pseudo-labelled, %d replayed",
                spec.run_id, reason, spec.labelled, spec.pseudo, spec.replay)
    how = train_task(settings, spec.run_dir)
    version = register_task(settings, spec, how)
    create_markdown_artifact(retrain_markdown(spec, version, how), key="voiceloop-retrain",
                             description="Retraining: data, labels and the new candidate")
    return {"status": "registered", "version": version, "run_id": spec.run_id,
            "trained": how, "labelled": spec.labelled, "budget": spec.budget,
            "pseudo": spec.pseudo, "replay": spec.replay, "reason": reason,
            "alert_id": (event or {}).get("alert_id")}
