"""What every flow needs first: its settings, and the model it works for."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from model.nn.export import is_bundle, load_bundle_config
from model.nn.package import load_package
from voiceloop.registry import Registry
from voiceloop.settings import Settings, load_settings
from voiceloop.stages import seed_production
from voiceloop.tracking import resolve_model_uri

__all__ = ["MonitoredModel", "flow_settings", "monitored_model"]

log = logging.getLogger(__name__)


def flow_settings(profile: str | None = None, workspace: str | None = None,
                  params: str | None = None) -> Settings:
    """The settings of a flow run (flow parameters are plain strings): ``params`` (a
    ``params.yaml`` path; default the repository's), its ``profile``, the ``workspace``."""
    return load_settings(Path(params) if params else None, profile,
                         Path(workspace) if workspace else None)


@dataclass(frozen=True)
class MonitoredModel:
    """The model whose embeddings and reference a flow uses: its local folder, version
    string (what predictions carry), registry version (None for ``--model`` paths) and
    whether a retraining registered it (``adapted``: ``monitoring.adapted_reference``
    decides its reference)."""

    folder: Path
    version: str
    registry_version: str | None
    adapted: bool = False


def _version_of(folder: Path) -> str:
    from model.inference.onnx import pyfunc_bundle_dir

    if (folder / "MLmodel").is_file():
        folder = pyfunc_bundle_dir(folder)
    if is_bundle(folder):
        return load_bundle_config(folder).version
    return load_package(folder).version


def monitored_model(settings: Settings, model: str | None = None) -> MonitoredModel:
    """``model`` (any form ``voiceloop predict`` takes) or, by default, the registry's
    ``production`` version — seeded from the released model when the registry is empty,
    so a fresh workspace works without setting up a registry by hand."""
    if model:
        folder = resolve_model_uri(model, settings)
        return MonitoredModel(folder, _version_of(folder), None)
    registry = Registry(settings)
    if registry.alias("production") is None:
        seed_production(settings)
    ref = registry.alias("production")
    assert ref is not None
    folder = registry.model_folder(ref)
    adapted = "retrain_run" in registry.version_tags(ref.version)
    return MonitoredModel(folder, _version_of(folder), ref.version, adapted)
