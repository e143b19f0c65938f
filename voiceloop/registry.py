"""The one helper for the MLflow model registry: aliases, the canary share, versions'
model folders.

One registered model (``tracking.registered_model``, ``voiceloop-slu``) with aliases
``production``, ``canary``, ``candidate`` and ``previous``. The canary share (percent of
traffic) is a tag on the registered model (``serving.canary_share_tag``), so the
service, the promotion flow and a person in the MLflow UI see and change one truth.
Aliases are resolved by name, never by scanning versions.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from voiceloop.settings import Settings
from voiceloop.tracking import make_client, mlflow_scope

__all__ = ["ALIASES", "Registry", "VersionRef"]

log = logging.getLogger(__name__)

ALIASES: tuple[str, ...] = ("production", "canary", "candidate", "previous")


@dataclass(frozen=True)
class VersionRef:
    """A registered model version: ``name``, ``version`` (a string, as MLflow has it),
    its ``run_id`` and ``source`` URI."""

    name: str
    version: str
    run_id: str | None
    source: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


class Registry:
    """Registry access for ``settings`` (tracking URI, model name, tag name).

    Args:
        settings: parsed params.
        client: an existing client (default: one for ``settings.tracking_uri``).
    """

    def __init__(self, settings: Settings, client: MlflowClient | None = None) -> None:
        self.settings = settings
        self.client = client or make_client(settings)
        self.name = settings.tracking.registered_model
        self.share_tag = settings.serving.canary_share_tag

    def exists(self) -> bool:
        """Whether the registered model exists yet."""
        try:
            self.client.get_registered_model(self.name)
        except MlflowException:
            return False
        return True

    def alias(self, alias: str) -> VersionRef | None:
        """The version ``alias`` points at, or None when the alias (or model) is absent."""
        try:
            mv = self.client.get_model_version_by_alias(self.name, alias)
        except MlflowException:
            return None
        return VersionRef(self.name, str(mv.version), mv.run_id, mv.source)

    def aliases(self) -> dict[str, str]:
        """Alias → version of the registered model (empty when it does not exist)."""
        try:
            return {k: str(v) for k, v in self.client.get_registered_model(self.name).aliases.items()}
        except MlflowException:
            return {}

    def canary_share(self) -> float:
        """The canary share in percent (0 when the tag is absent or not a number)."""
        try:
            tags = self.client.get_registered_model(self.name).tags
        except MlflowException:
            return 0.0
        try:
            return min(100.0, max(0.0, float(tags.get(self.share_tag, 0.0))))
        except ValueError:
            log.warning("registered model tag %s=%r is not a number: share 0",
                        self.share_tag, tags.get(self.share_tag))
            return 0.0

    def set_canary_share(self, share: float) -> None:
        """Set the canary share (percent).

        Raises:
            ValueError: ``share`` outside [0, 100].
        """
        if not 0.0 <= share <= 100.0:
            raise ValueError(f"canary share must lie in [0, 100] percent, got {share}")
        self.client.set_registered_model_tag(self.name, self.share_tag, f"{share:g}")

    def model_folder(self, ref: VersionRef, cache: Path | None = None) -> Path:
        """A local copy of ``ref``'s model folder (downloaded once into ``cache``, default
        ``<workspace>/registry-cache/<name>/<version>``)."""
        import mlflow

        target = (cache or self.settings.workspace / "registry-cache") / ref.name / ref.version
        marker = target / ".complete"
        if marker.exists():
            return target / "model"
        tmp = target.with_name(target.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with mlflow_scope(self.settings.tracking_uri):
            mlflow.artifacts.download_artifacts(artifact_uri=ref.uri, dst_path=str(tmp / "model"),
                                                 tracking_uri=self.settings.tracking_uri)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        marker.touch()
        return target / "model"
