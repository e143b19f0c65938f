"""`dvc repro` (corpus → train_teacher → evaluate → distill) on the tiny profile, in a
scratch copy of the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from voiceloop.settings import repo_root

pytestmark = pytest.mark.integration

_DVC = [sys.executable, "-m", "dvc"]
_COPY = ["dvc.yaml", "pipelines/retrain/dvc.yaml", "params.yaml", ".dvcignore", ".dvc/config",
         ".dvc/.gitignore"]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("VOICELOOP_WORKSPACE", None)
    result = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, f"{' '.join(args)}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def scratch_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git + DVC repo with this project's pipeline files and code, profile = tiny,
    after `dvc repro corpus`."""
    root = tmp_path_factory.mktemp("repo")
    src = repo_root()
    for name in _COPY:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / name, root / name)
    for package in ("model", "monitoring", "serving", "voiceloop"):
        # __pycache__ too (copy2 keeps the source mtimes that make the bytecode valid):
        # each stage is a new process, and compiling the packages costs it seconds.
        shutil.copytree(src / package, root / package)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["profile"] = "tiny"
    # The shortest training that still exercises every stage (the e2e tests train longer):
    # one teacher epoch; two student epochs, the second with QAT.
    params["profiles"]["tiny"]["train"]["epochs"] = 1
    params["profiles"]["tiny"]["student"]["train"]["epochs"] = 2
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / ".gitignore").write_text("/workspace/\n")
    _run(["git", "init", "-q"], root)
    _run(["git", "add", "-A"], root)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], root)
    _run([*_DVC, "repro", "corpus"], root)
    return root


def test_dvc_repro_corpus_builds_tracks_and_pushes(scratch_repo: Path) -> None:
    dvc = _DVC
    corpus = scratch_repo / "workspace" / "corpus" / "tiny"
    assert (corpus / "manifests" / "train.jsonl").exists()
    lock = yaml.safe_load((scratch_repo / "dvc.lock").read_text())
    outs = {o["path"] for o in lock["stages"]["corpus"]["outs"]}
    assert "workspace/corpus/tiny/manifests" in outs
    assert "profiles.tiny.corpus" in lock["stages"]["corpus"]["params"]["params.yaml"]

    status = _run([*dvc, "status", "corpus"], scratch_repo)
    assert "changed" not in status.stdout

    metrics = json.loads(_run([*dvc, "metrics", "show", "--json"], scratch_repo).stdout)
    assert "utterances" in json.dumps(metrics)

    _run([*dvc, "push", "-q"], scratch_repo)
    remote = scratch_repo / "workspace" / "dvc-remote"
    assert remote.exists() and any(remote.rglob("*"))

    # Nothing changed: a second repro does not run the stage again.
    again = _run([*dvc, "repro", "corpus"], scratch_repo)
    assert "didn't change" in again.stdout or "up to date" in again.stdout.lower()


def test_training_params_do_not_invalidate_the_corpus(scratch_repo: Path) -> None:
    params_path = scratch_repo / "params.yaml"
    original = params_path.read_text()
    params = yaml.safe_load(original)
    params["profiles"]["tiny"]["train"]["epochs"] = 7
    params["base"]["model"]["d_model"] = 64
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        status = _run([*_DVC, "status", "corpus"], scratch_repo)
        assert "changed" not in status.stdout and "modified" not in status.stdout
    finally:
        params_path.write_text(original)


def test_changing_a_corpus_param_invalidates_the_stage(scratch_repo: Path) -> None:
    params_path = scratch_repo / "params.yaml"
    original = params_path.read_text()
    params = yaml.safe_load(original)
    params["profiles"]["tiny"]["corpus"]["augment"]["reverb"]["bank_size"] = 3
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        status = _run([*_DVC, "status", "corpus"], scratch_repo)
        assert "modified" in status.stdout and "profiles" in status.stdout
    finally:
        params_path.write_text(original)


def test_dvc_repro_trains_evaluates_and_reports_metrics_and_plots(scratch_repo: Path) -> None:
    _run([*_DVC, "repro"], scratch_repo)
    teacher = scratch_repo / "workspace" / "models" / "tiny" / "teacher"
    assert (teacher / "model" / "weights.pt").exists()
    assert (teacher / "eval" / "test" / "evaluation.md").exists()
    student = teacher.parent / "student"
    assert (student / "deploy" / "encoder.onnx").exists()
    assert (student / "eval" / "test" / "comparison.md").exists()
    metrics = json.loads(_run([*_DVC, "metrics", "show", "--json"], scratch_repo).stdout)
    text = json.dumps(metrics)
    for key in ("valid_semer", "intent_accuracy", "slu_f1", "utterances", "delta_slot_f1",
                "qat_start_epoch"):
        assert key in text, key
    plots = _run([*_DVC, "plots", "show", "--json"], scratch_repo).stdout
    assert "history.csv" in plots and "confusion_matrix.png" in plots
    assert "student/history.csv" in plots
    # the model pipeline is up to date (pipelines/retrain/dvc.yaml waits for a retraining)
    status = _run([*_DVC, "status", "dvc.yaml"], scratch_repo)
    assert "changed" not in status.stdout
