"""Prefect flow: ingest committed production-traffic batches (thin orchestration over
:func:`monitoring.ingest.ingest`)."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.common import flow_settings, monitored_model
from monitoring.ingest import IngestReport, ingest
from voiceloop.settings import Settings

__all__ = ["ingest_flow", "ingest_markdown"]


@task(name="ingest-batches", retries=2, retry_delay_seconds=10)
def ingest_task(settings: Settings, model_dir: str) -> IngestReport:
    # ingest() is idempotent by batch id, so a retry after a transient failure redoes
    # only what the ledger does not hold.
    return ingest(settings, model_dir, progress=False)


def ingest_markdown(report: IngestReport) -> str:
    """The run's headline as a Prefect markdown artifact."""
    lines = [
        "# Traffic ingestion", "",
        f"- batches ingested: **{len(report.batches)}**",
        (f"- requests: {report.requests} = accepted {report.accepted} + quarantined "
         f"{report.quarantined} (balanced: {report.balanced()})"),
        (f"- data version (DVC): `{report.data_version or 'none yet'}`"
         + (" (new)" if report.data_version_changed else " (unchanged)")),
    ]
    poison = [b for b in report.batches if b.status == "poison"]
    if poison:
        lines += ["", "## Poison batches (quarantined whole)", ""]
        lines += [f"- `{b.batch_id}`: {b.error}" for b in poison]
    return "\n".join(lines) + "\n"


@flow(name="voiceloop-ingest", log_prints=True)
def ingest_flow(profile: str | None = None, workspace: str | None = None,
                params: str | None = None, model: str | None = None) -> dict[str, Any]:
    """Validate, featurise and version every committed traffic batch not yet ingested.

    Args:
        profile, workspace, params: which profile of which ``params.yaml`` (default the
            repository's), and which workspace.
        model: the model whose encoder embeds the samples (any form ``voiceloop predict``
            takes); default the registry's ``production`` version.
    """
    logger = get_run_logger()
    settings = flow_settings(profile, workspace, params)
    target = monitored_model(settings, model)
    report = ingest_task(settings, str(target.folder))
    logger.info("ingested %d batches: %d requests = %d accepted + %d quarantined",
                len(report.batches), report.requests, report.accepted, report.quarantined)
    create_markdown_artifact(ingest_markdown(report), key="voiceloop-ingest",
                             description="Traffic ingestion: counts, quarantine, data version")
    return report.model_dump(mode="json")
