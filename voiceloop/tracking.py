"""MLflow access with explicit run ids (no fluent, thread-local run stack).

The tracking URI comes from settings (default: SQLite in the workspace) and is applied
when a client is made, never at import time.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from voiceloop.settings import Settings

__all__ = ["RunLogger", "flatten", "make_client", "mlflow_scope", "resolve_model_uri"]

log = logging.getLogger(__name__)

# Let MLflow skip its telemetry and git probing noise on machines without the internet.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")


@contextmanager
def mlflow_scope(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking and registry URIs set to ``uri`` for the block, then
    put back exactly as they were — "not set" included, environment variables included.

    Some MLflow 3 paths read only these globals (``download_artifacts`` of a
    ``models:/name@alias`` URI, the fluent ``log_model``). Leaving them set leaks one
    workspace's registry into every later client of the process that does not name its
    registry: the test suite caught a second workspace's alias being resolved in the
    first workspace's registry.
    """
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved_registry = registry_utils._registry_uri
    saved_tracking = tracking_utils._tracking_uri
    saved_env = {k: os.environ.get(k) for k in ("MLFLOW_REGISTRY_URI", "MLFLOW_TRACKING_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_tracking)
        registry_utils._registry_uri = saved_registry
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def make_client(settings: Settings) -> MlflowClient:
    """A client for the configured tracking server (creating the SQLite folder)."""
    if settings.tracking_uri.startswith("sqlite:///"):
        Path(settings.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    settings.artifact_root.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)


def _experiment_id(client: MlflowClient, name: str, artifact_root: Path) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=(artifact_root / name).as_uri())


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (lists become strings)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


class RunLogger:
    """One MLflow run, addressed by id: params, metrics, tags, artifacts.

    Create with :meth:`start` (new run) or :meth:`attach` (resume an existing run).
    """

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    @classmethod
    def start(
        cls, settings: Settings, run_name: str, tags: Mapping[str, str] | None = None
    ) -> RunLogger:
        client = make_client(settings)
        experiment = _experiment_id(client, settings.tracking.experiment, settings.artifact_root)
        run = client.create_run(experiment, run_name=run_name, tags=dict(tags or {}))
        return cls(client, run.info.run_id)

    @classmethod
    def attach(cls, settings: Settings, run_id: str) -> RunLogger:
        client = make_client(settings)
        client.update_run(run_id, status="RUNNING")
        return cls(client, run_id)

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        existing = self.client.get_run(self.run_id).data.params
        items = [p for p in items if p.key not in existing]  # params are immutable in MLflow
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def register(self, name: str, artifact_path: str, alias: str | None = None) -> str:
        """Register ``runs:/<run>/<artifact_path>`` as a new version of ``name``."""
        try:
            self.client.get_registered_model(name)
        except Exception:  # noqa: BLE001 - MLflow raises a generic RestException
            self.client.create_registered_model(name)
        source = f"{self.client.get_run(self.run_id).info.artifact_uri}/{artifact_path}"
        version = self.client.create_model_version(name, source, run_id=self.run_id)
        if alias:
            self.client.set_registered_model_alias(name, alias, version.version)
        return str(version.version)


def resolve_model_uri(uri: str, settings: Settings) -> Path:
    """A local model folder for ``uri``: a path, or ``models:/name@alias`` /
    ``models:/name/version`` / ``runs:/id/path`` fetched from MLflow.

    Raises:
        FileNotFoundError: a local path that does not exist.
    """
    if not uri.startswith(("models:/", "runs:/")):
        path = Path(uri)
        if not path.exists():
            raise FileNotFoundError(f"model folder not found: {path}")
        return path
    import mlflow

    make_client(settings)  # creates folders
    # models:/ URIs are resolved through the registry, which download_artifacts reads
    # from the process-wide setting rather than from its tracking_uri argument.
    with mlflow_scope(settings.tracking_uri):
        return Path(mlflow.artifacts.download_artifacts(
            artifact_uri=uri, tracking_uri=settings.tracking_uri))
