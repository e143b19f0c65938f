"""The e2e modules share one tiny corpus and teacher (building them is most of each
module's set-up); each module works in its own copy of that workspace, so what one
module writes (a resumed teacher, a student, a registry) never reaches another."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from model.training.fit import capped_threads
from voiceloop.settings import Settings, load_settings
from voiceloop.stages import corpus_stage, train_stage


@pytest.fixture(scope="session")
def tiny_teacher_workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace with the tiny corpus and a tiny teacher trained and tracked in MLflow
    (its run and the ``<model>-teacher@current`` version in the workspace's registry)."""
    torch.set_num_threads(capped_threads(2))
    settings = load_settings(profile="tiny", workspace=tmp_path_factory.mktemp("tiny-base"))
    corpus_stage(settings, progress=False)
    result = train_stage(settings, progress=False).result
    assert result.epochs_run == settings.train.epochs
    return settings.workspace


@pytest.fixture(scope="module")
def tiny_workspace(tiny_teacher_workspace: Path, tmp_path_factory: pytest.TempPathFactory
                   ) -> Callable[[str], Settings]:
    """A factory: the tiny-profile settings of a fresh copy of the shared workspace.
    (The copied MLflow store still points at the shared workspace's artifacts, which
    stay for the session.)"""
    def copy(name: str) -> Settings:
        ws = tmp_path_factory.mktemp(name)
        shutil.copytree(tiny_teacher_workspace, ws, dirs_exist_ok=True, symlinks=True)
        return load_settings(profile="tiny", workspace=ws)
    return copy
