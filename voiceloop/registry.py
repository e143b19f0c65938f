"""The one helper for the MLflow model registry: aliases, the canary share, versions'
model folders.

One registered model (``tracking.registered_model``, ``voiceloop-slu``) with aliases
``production``, ``canary``, ``candidate`` and ``previous``. The canary share (percent of
traffic) is a tag on the registered model (``serving.canary_share_tag``), so the
service, the promotion flow and a person in the MLflow UI see and change one truth.
Aliases are resolved by name, never by scanning versions.

**Exactly one ``production``, at every moment.** An MLflow alias names one version and
moving it is one write, so production is never absent as long as it is only ever
*moved*, never deleted. Multi-step changes (promote: ``previous`` ← old production,
``production`` ← candidate, drop ``canary``; roll back: the reverse) first write their
intent to the registered-model tag ``rollout_journal``; :meth:`Registry.recover` finishes
an interrupted change on the next start (every step is idempotent), so a flow that dies
between two alias moves leaves a state that is valid and gets completed.

Rollout history lives in version tags: ``gate.*`` (the offline gate's verdict),
``canary.step<N>`` (each canary step's analysis), ``rollout.status`` /
``rollout.reason`` / ``rollout.at`` (promoted, rolled back, …).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from voiceloop.settings import Settings
from voiceloop.tracking import make_client, mlflow_scope

__all__ = ["ALIASES", "JOURNAL_TAG", "Registry", "VersionRef"]

log = logging.getLogger(__name__)

ALIASES: tuple[str, ...] = ("production", "canary", "candidate", "previous")
JOURNAL_TAG = "rollout_journal"


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
        # Several server processes load the same version at once: each downloads into a
        # folder of its own and renames it into place complete (marker inside) — a shared
        # temporary folder let one process load the other's half-written copy.
        tmp = target.with_name(f"{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.mkdir(parents=True)
        try:
            with mlflow_scope(self.settings.tracking_uri):
                mlflow.artifacts.download_artifacts(
                    artifact_uri=ref.uri, dst_path=str(tmp / "model"),
                    tracking_uri=self.settings.tracking_uri)
            (tmp / ".complete").touch()
            try:
                tmp.rename(target)
            except OSError:  # another process's copy got there first, or a broken leftover
                if not marker.exists():
                    shutil.rmtree(target, ignore_errors=True)
                    tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target / "model"

    # ------------------------------------------------------------------ history tags

    def tag_version(self, version: str, tags: dict[str, Any]) -> None:
        """Set version tags (values JSON-encoded unless they are strings)."""
        for key, value in tags.items():
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            self.client.set_model_version_tag(self.name, version, key, text[:5000])

    def version_tags(self, version: str) -> dict[str, str]:
        return dict(self.client.get_model_version(self.name, version).tags)

    def versions(self) -> list[dict[str, Any]]:
        """Every version with its aliases and tags, newest first (the registry table)."""
        aliases: dict[str, list[str]] = {}
        for alias, version in self.aliases().items():
            aliases.setdefault(version, []).append(alias)
        rows = []
        for mv in self.client.search_model_versions(f"name='{self.name}'"):
            rows.append({"version": str(mv.version), "aliases": sorted(aliases.get(str(mv.version), [])),
                         "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC),
                         "run_id": mv.run_id, "tags": dict(mv.tags)})
        return sorted(rows, key=lambda r: int(r["version"]), reverse=True)

    def _stamp(self, version: str, status: str, reason: str) -> None:
        self.tag_version(version, {"rollout.status": status, "rollout.reason": reason,
                                   "rollout.at": datetime.now(UTC).isoformat(timespec="seconds")})

    # ------------------------------------------------------------------ alias moves

    def _journal(self, entry: dict[str, Any] | None) -> None:
        if entry is None:
            self.client.delete_registered_model_tag(self.name, JOURNAL_TAG)
        else:
            self.client.set_registered_model_tag(self.name, JOURNAL_TAG, json.dumps(entry))

    def journal(self) -> dict[str, Any] | None:
        """The change in progress (None when none is)."""
        try:
            text = self.client.get_registered_model(self.name).tags.get(JOURNAL_TAG)
        except MlflowException:
            return None
        return json.loads(text) if text else None

    def _set(self, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(self.name, alias, version)

    def _drop(self, alias: str, only_if: str | None = None) -> None:
        """Remove ``alias`` (when it points at ``only_if``, if given)."""
        ref = self.alias(alias)
        if ref is not None and (only_if is None or ref.version == only_if):
            self.client.delete_registered_model_alias(self.name, alias)

    def set_production(self, version: str, reason: str) -> None:
        """Point ``production`` at ``version`` directly (seeding an empty registry, tests)."""
        self._set("production", version)
        self._stamp(version, "production", reason)

    def reject(self, version: str, reason: str) -> None:
        """A candidate that failed the offline gate: tagged, ``candidate`` alias removed
        (it never served, so nothing else moves)."""
        self._drop("candidate", only_if=version)
        self._stamp(version, "rejected", reason)

    def start_canary(self, version: str, share: float) -> None:
        """``canary`` → ``version`` at ``share`` percent (production untouched)."""
        self._set("canary", version)
        self.set_canary_share(share)
        self._stamp(version, "canary", f"canary at {share:g} %")

    def promote(self, version: str, reason: str, crash_after: int | None = None) -> None:
        """Make ``version`` production; the old production becomes ``previous``; the
        canary share drops to 0 and ``canary`` / ``candidate`` aliases pointing at it go.

        ``crash_after``: tests stop after that many steps, like a dying flow.
        """
        old = self.alias("production")
        entry = {"op": "promote", "version": version, "from": old.version if old else None,
                 "reason": reason, "started": datetime.now(UTC).isoformat(timespec="seconds")}
        self._journal(entry)
        self._run(entry, crash_after)

    def rollback(self, reason: str, to: str | None = None, crash_after: int | None = None) -> str:
        """Roll back: with a canary, stop it (share 0, ``canary`` removed, the canary
        version tagged with ``reason``); without one, move ``production`` back to
        ``to`` (default: ``previous``, which is then cleared so that a second rollback
        cannot re-install the bad version). Returns the production version afterwards.

        Raises:
            LookupError: nothing to roll back to (no canary and no ``previous``).
        """
        canary, production = self.alias("canary"), self.alias("production")
        if canary is not None and (production is None or canary.version != production.version):
            entry = {"op": "abort_canary", "version": canary.version, "reason": reason}
        else:
            target = to or (self.alias("previous").version if self.alias("previous") else None)
            if target is None or production is None:
                raise LookupError("nothing to roll back to: no canary and no `previous` version")
            entry = {"op": "restore", "version": target, "from": production.version,
                     "reason": reason}
        self._journal(entry)
        self._run(entry, crash_after)
        current = self.alias("production")
        assert current is not None
        return current.version

    def recover(self) -> dict[str, Any] | None:
        """Finish a change a dead flow left half done; returns it (None if none was)."""
        entry = self.journal()
        if entry is not None:
            log.warning("finishing an interrupted registry change: %s", entry)
            self._run(entry, None)
        return entry

    def _run(self, entry: dict[str, Any], crash_after: int | None) -> None:
        """Apply a journalled change step by step (each step idempotent)."""
        v = entry["version"]
        if entry["op"] == "promote":
            steps = [
                lambda: self._set("previous", entry["from"]) if entry["from"] and entry["from"] != v else None,
                lambda: self._set("production", v),
                lambda: self.set_canary_share(0.0),
                lambda: self._drop("canary"),
                lambda: self._drop("candidate", only_if=v),
                lambda: self._stamp(v, "promoted", entry["reason"]),
            ]
        elif entry["op"] == "abort_canary":
            steps = [
                lambda: self.set_canary_share(0.0),
                lambda: self._drop("canary"),
                lambda: self._stamp(v, "rolled_back", entry["reason"]),
            ]
        elif entry["op"] == "restore":
            # `previous` is used up: a second rollback must not bring the bad version back.
            steps = [
                lambda: self._set("production", v),
                lambda: self._drop("previous", only_if=v),
                lambda: self._stamp(entry["from"], "rolled_back", entry["reason"]),
                lambda: self._stamp(v, "production", f"restored: {entry['reason']}"),
            ]
        else:
            raise ValueError(f"unknown registry change {entry['op']!r}")
        for i, step in enumerate(steps):
            if crash_after is not None and i >= crash_after:
                raise RuntimeError(f"simulated crash after step {i} of {entry['op']}")
            step()
        self._journal(None)
