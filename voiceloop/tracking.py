"""MLflow access with explicit run ids (no fluent, thread-local run stack).

The tracking URI comes from settings (default: SQLite in the workspace) and is applied
when a client is made, never at import time.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from voiceloop.settings import Settings

__all__ = ["RunLogger", "flatten", "make_client", "mlflow_scope", "resolve_model_uri"]

log = logging.getLogger(__name__)

# Let MLflow skip its telemetry and git probing noise on machines without the internet.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
# An MLflow 3 server (the demo's and the UI test's `mlflow ui`) otherwise starts a job
# runner with seven polling huey consumer processes, for GenAI scoring jobs this project
# never submits: ~0.45 of a core busy on a 2-core machine (seen during the test suite).
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")


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


def _empty_store_template() -> Path:
    """An empty, fully migrated MLflow SQLite store for the installed MLflow version,
    made once per machine under ``$XDG_CACHE_HOME/voiceloop`` (``~/.cache/voiceloop``).

    MLflow creates a new store by running its whole migration history: 2.5 s in a process
    that already made one, 6.5 s in a fresh one — every new workspace, every test
    workspace and every DVC stage process that opens a new store paid it.
    """
    import mlflow

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "voiceloop"
    path = cache / f"mlflow-{mlflow.__version__}-empty.db"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            db = Path(tmp) / "mlflow.db"
            MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
            os.replace(db, path)  # atomic: concurrent makers each move a complete file
    return path


def _seed_sqlite_store(db: Path, artifact_root: Path) -> None:
    """Create the SQLite store ``db`` as a copy of the migrated empty template, its
    ``Default`` experiment's artifacts under ``artifact_root`` (MLflow would put them
    under the current directory). A store that exists is never touched: the copy is
    hard-linked into place, which fails when another process got there first."""
    if db.exists():
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    tmp = db.with_name(f".{db.name}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(_empty_store_template(), tmp)
        with sqlite3.connect(tmp) as con:
            con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                        (str(artifact_root / "0"),))
        con.close()
        try:
            os.link(tmp, db)
        except FileExistsError:
            pass  # another process created the store meanwhile: use theirs
    except (OSError, sqlite3.Error, MlflowException) as exc:  # MLflow then creates the store
        log.warning("could not seed the MLflow store %s from the template: %s", db, exc)
    finally:
        tmp.unlink(missing_ok=True)


def make_client(settings: Settings) -> MlflowClient:
    """A client for the configured tracking server (a new SQLite store starts as a copy
    of a migrated empty one: see :func:`_empty_store_template`)."""
    settings.artifact_root.mkdir(parents=True, exist_ok=True)
    if settings.tracking_uri.startswith("sqlite:///"):
        _seed_sqlite_store(Path(settings.tracking_uri.removeprefix("sqlite:///")),
                           settings.artifact_root)
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
