"""Retraining: from ingested production traffic to a registered ``candidate``.

Three steps, each a plain function the Prefect flow (``flows/retrain.py``) orchestrates:

1. :func:`plan_retraining` — the pool is every curated sample of the production model
   not yet used by an earlier retraining; active learning (``monitoring.selection``)
   picks what annotators label within the budget (labels come from the annotation
   store), the teacher pseudo-labels confident samples, and a replay sample of the old
   corpus joins them against forgetting. It writes the run's corpus (manifests whose audio
   points into the traffic store and the base corpus), validated by the Great
   Expectations manifest suite, and ``spec.json``.
2. :func:`train_candidate` — warm-start fine-tune of the production teacher, distillation
   of the production student from it with QAT (the ``--init-from`` path), int8 export.
   This is the command of the DVC stage ``retrain`` (``dvc exp run
   pipelines/retrain/dvc.yaml:retrain``), so the run
   is a DVC experiment with its parameters and metrics.
3. :func:`register_candidate` — an MLflow run with the lineage as tags (git commit, DVC
   data versions, traffic batch ids, labels used vs budget, parent version), the pyfunc
   model registered as a new version with alias ``candidate``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import subprocess
import sys
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import soundfile as sf
import yaml

from model.data.corpus import CorpusLayout
from model.data.grammar import DOMAINS, Grammar, load_values, predicted_domain
from model.data.manifest import ManifestRow, read_manifest, write_manifest
from model.inference.batch import SLUPredictor
from model.nn.export import load_bundle_config
from model.nn.package import LM_DIRNAME, LM_SENTENCES, load_package
from model.training.lm_stage import LM_INHERITED_TEXT, LM_TEXT_MANIFEST
from monitoring.drift import ReferenceStore
from monitoring.ingest import curated_root
from monitoring.selection import Selection, labelling_budget, select_for_training
from serving.annotations import AnnotationStore
from serving.traffic import extract_audio
from voiceloop.registry import Registry, VersionRef
from voiceloop.settings import Settings, repo_root
from voiceloop.tracking import RunLogger, resolve_model_uri

__all__ = [
    "CandidateOutputs",
    "RetrainSpec",
    "inherit_thresholds",
    "plan_retraining",
    "register_candidate",
    "run_training_stage",
    "train_candidate",
]

log = logging.getLogger(__name__)

SPEC = "spec.json"
STUDENT_PACKAGE_TAG = "student_package"
TEACHER_TAG = "teacher"


@dataclass
class RetrainSpec:
    """Everything a retraining run is: written to ``<run_dir>/spec.json`` (the DVC
    stage's dependency) and turned into lineage tags.

    Attributes:
        run_id: this retraining's id; ``run_dir`` its folder; ``profile`` the settings
            profile name its corpus and models live under (``retrain-<run_id>``).
        parent_version: the production registry version it starts from.
        teacher_init, student_init: local folders of the production teacher and student
            torch packages (the warm starts).
        batches: traffic batch ids the new samples came from.
        labelled, pseudo, replay: sample counts by label source; ``budget`` the labels
            allowed; ``requested`` the labels asked for (``labelled`` ≤ ``requested``:
            an annotator may not have labelled some).
        data_version: the curated traffic's DVC version the pool was read at.
        manifest_sha: SHA-256 of the training manifest (the run's data version).
        corrupt_labels: a deliberately bad candidate (intents shuffled): the demo's way to
            prove the gate and canary catch one.
    """

    run_id: str
    run_dir: str
    profile: str
    parent_version: str
    teacher_init: str
    student_init: str
    batches: list[str] = field(default_factory=list)
    pool: int = 0
    labelled: int = 0
    requested: int = 0
    pseudo: int = 0
    replay: int = 0
    budget: int = 0
    data_version: str | None = None
    manifest_sha: str = ""
    corrupt_labels: bool = False
    created: str = ""

    def save(self) -> Path:
        path = Path(self.run_dir) / SPEC
        path.write_text(json.dumps(asdict(self), indent=2), encoding="utf-8")
        return path

    @classmethod
    def load(cls, run_dir: Path) -> RetrainSpec:
        return cls(**json.loads((run_dir / SPEC).read_text(encoding="utf-8")))


def run_settings(settings: Settings, spec: RetrainSpec) -> Settings:
    """The settings of one retraining: its own corpus/model folders, the short
    warm-start budgets of ``retrain``."""
    r = settings.retrain

    def step(train: Any, s: Any) -> Any:
        return train.model_copy(update={
            "epochs": s.epochs, "max_minutes": s.max_minutes, "lr": s.lr,
            "warmup_steps": s.warmup_steps, "threads": s.threads, "min_epochs": s.epochs,
            "curriculum_epochs": 0, "eval_max_utterances": r.valid_utterances})

    student = settings.student.model_copy(update={
        "train": step(settings.student.train, r.student),
        # One QAT epoch at least, whatever the budget: the deployed graph is int8.
        "qat": settings.student.qat.model_copy(update={"start_fraction": 0.5})})
    return settings.model_copy(update={
        "profile": spec.profile, "train": step(settings.train, r.teacher), "student": student})


def production_lineage(settings: Settings, registry: Registry) -> tuple[VersionRef, Path, Path]:
    """The production version and the local folders of its teacher and student torch
    packages (tags set at registration; the seed version points at ``release/``)."""
    ref = registry.alias("production")
    if ref is None:
        raise LookupError("no production model to retrain from")
    tags = registry.version_tags(ref.version)
    missing = [t for t in (TEACHER_TAG, STUDENT_PACKAGE_TAG) if t not in tags]
    if missing:
        raise LookupError(f"production version {ref.version} lacks lineage tags {missing}: "
                          "it cannot be warm-started (was it registered by hand?)")
    return (ref, resolve_model_uri(tags[TEACHER_TAG], settings),
            resolve_model_uri(tags[STUDENT_PACKAGE_TAG], settings))


def _used_request_ids(settings: Settings) -> set[str]:
    used: set[str] = set()
    for path in (settings.workspace / "retrain").glob("*/used_requests.json"):
        used.update(json.loads(path.read_text(encoding="utf-8")))
    return used


def _pool(settings: Settings, embedding_model: str) -> pd.DataFrame:
    """Curated samples embedded by ``embedding_model`` not used by an earlier run."""
    files = sorted((curated_root(settings) / "traffic").rglob("*.parquet"))
    frames = [f[f["embedding_model"] == embedding_model]
              for f in (pq.read_table(p).to_pandas() for p in files)]
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame()
    pool = pd.concat(frames, ignore_index=True)
    return pool[~pool["request_id"].isin(_used_request_ids(settings))].reset_index(drop=True)


def _row(rid: str, audio: Path, transcript: str, intent: str, slots: list, domain: str,
         source: str) -> ManifestRow:
    info = sf.info(str(audio))
    return ManifestRow(id=f"t{rid}", audio=str(audio), duration_s=round(info.frames / info.samplerate, 4),
                       transcript=transcript, intent=intent, slots=slots, engine="traffic",
                       voice="unknown", split="train", template_id=f"traffic-{source}",
                       domain=domain if domain in DOMAINS else "general")


def plan_retraining(settings: Settings, corrupt_labels: bool = False,
                    progress: bool = False) -> RetrainSpec | None:
    """Select, label and assemble the training data of one retraining (step 1).

    Returns None (and says why in the log) when the pool holds fewer than
    ``retrain.min_new_samples`` usable new samples.

    Raises:
        LookupError: no production model, or one without lineage tags.
        ManifestValidationError: the assembled manifests fail the manifest suite.
    """
    r = settings.retrain
    registry = Registry(settings)
    registry.recover()
    parent, teacher_dir, student_dir = production_lineage(settings, registry)
    student_pkg = load_package(student_dir)
    pool = _pool(settings, student_pkg.version)
    if len(pool) < r.min_new_samples:
        log.warning("retraining skipped: %d new samples < min_new_samples %d", len(pool),
                    r.min_new_samples)
        return None
    run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    run_dir = settings.workspace / "retrain" / run_id
    spec = RetrainSpec(run_id=run_id, run_dir=str(run_dir), profile=f"retrain-{run_id}",
                       parent_version=parent.version, teacher_init=str(teacher_dir),
                       student_init=str(student_dir), corrupt_labels=corrupt_labels,
                       created=datetime.now(UTC).isoformat(timespec="seconds"))
    # The teacher's answers: disagreement for active learning, pseudo-labels.
    teacher = SLUPredictor(load_package(teacher_dir), batch_size=settings.decode.batch_size)
    # The pool's audio, out of the traffic store's shards into the run's folder: the
    # training manifest points at files, and the run keeps the data it learnt from.
    copies = extract_audio(settings.traffic_root, pool, run_dir / "traffic_audio")
    readable = [path is not None for path in copies]
    if not all(readable):
        log.warning("retraining: %d of %d pooled samples have no readable stored audio; "
                    "left out", readable.count(False), len(copies))
    pool = pool[readable].reset_index(drop=True)
    audio = [path for path in copies if path is not None]
    request_ids = pool["request_id"].astype(str).tolist()
    audio_of = dict(zip(request_ids, audio, strict=True))
    preds = teacher.predict_files(request_ids, audio, progress)
    by_id = {p.id: p for p in preds}
    usable = [p.error is None for p in preds]
    pool = pool[usable].reset_index(drop=True)
    store = ReferenceStore.for_workspace(settings.workspace)
    reference = (store.load(student_pkg.version)[0] if store.exists(student_pkg.version)
                 else pd.DataFrame())  # (frame, sidecar)
    budget = labelling_budget(len(pool), r.label_fraction, r.max_labels)
    selection: Selection = select_for_training(pool, by_id, reference, budget, r.pseudo_threshold)
    labels = AnnotationStore(settings.annotations_root).read(selection.label_ids)
    values = load_values(settings.corpus.language)
    new_rows: list[ManifestRow] = []
    for rid in selection.label_ids:
        a = labels.get(rid)
        if a is None:
            continue  # asked, not (yet) labelled: counts against the budget all the same
        new_rows.append(_row(rid, audio_of[rid], a.transcript, a.intent,
                             a.slots, a.domain or predicted_domain(a.intent, a.slots, values),
                             "label"))
    for rid, p in selection.pseudo.items():
        new_rows.append(_row(rid, audio_of[rid], p.transcript, p.intent,
                             p.slots, predicted_domain(p.intent, p.slots, values), "pseudo"))
    base = CorpusLayout(settings.workspace / "corpus" / r.base_profile)
    if not base.manifest("train").exists():
        raise FileNotFoundError(f"no base corpus at {base.root}: build it (voiceloop corpus -p "
                                f"{r.base_profile})")
    replay_n = min(max(r.replay_utterances, int(r.replay_ratio * len(new_rows))),
                   len(read_manifest(base.manifest("train"))))
    old = read_manifest(base.manifest("train"))
    replay = [old[i] for i in sorted(np.random.default_rng(settings.seed).choice(
        len(old), replay_n, replace=False))]
    train = new_rows + [_absolute(row, base) for row in replay]
    if corrupt_labels:
        intents = [row.intent for row in train]
        random.Random(settings.seed).shuffle(intents)
        train = [row.model_copy(update={"intent": i}) for row, i in zip(train, intents, strict=True)]
    layout = CorpusLayout(settings.workspace / "corpus" / spec.profile)
    write_manifest(layout.manifest("train"), train)
    # The LM keeps the production model's own LM text (its parent's corpus, e.g. the
    # release's `full` one) when that model carries it; otherwise the whole old corpus'
    # text, not only the replayed sample's.
    parent_text = teacher_dir / LM_DIRNAME / LM_SENTENCES
    if parent_text.is_file():
        shutil.copyfile(parent_text, layout.manifests_dir / LM_INHERITED_TEXT)
    else:
        replayed = {row.id for row in replay}
        write_manifest(layout.manifest(LM_TEXT_MANIFEST),
                       [_absolute(row, base) for row in old if row.id not in replayed])
    for split in ("valid", "valid_heldout", "test", "test_heldout"):
        if base.manifest(split).exists():
            write_manifest(layout.manifest(split),
                           [_absolute(row, base) for row in read_manifest(base.manifest(split))])
    _validate(settings, layout)
    spec.batches = sorted(set(pool["batch_id"]))
    spec.pool, spec.budget, spec.requested = len(pool), budget, len(selection.label_ids)
    spec.labelled = sum(1 for row in new_rows if row.template_id == "traffic-label")
    spec.pseudo, spec.replay = len(selection.pseudo), len(replay)
    spec.manifest_sha = hashlib.sha256(layout.manifest("train").read_bytes()).hexdigest()[:16]
    ledger = curated_root(settings) / "ledger.jsonl"
    spec.data_version = _last_data_version(ledger)
    run_dir.mkdir(parents=True, exist_ok=True)
    selection.scores.to_csv(run_dir / "selection.csv", index=False)
    (run_dir / "used_requests.json").write_text(json.dumps(pool["request_id"].tolist()))
    spec.save()
    log.info("retraining %s: %d pool samples → %d labelled (budget %d, asked %d), %d "
             "pseudo-labelled, %d replayed", run_id, spec.pool, spec.labelled, spec.budget,
             spec.requested, spec.pseudo, spec.replay)
    return spec


def _absolute(row: ManifestRow, layout: CorpusLayout) -> ManifestRow:
    return row.model_copy(update={"audio": str(row.audio_path(layout.manifests_dir).resolve())})


def _last_data_version(ledger: Path) -> str | None:
    if not ledger.exists():
        return None
    version = None
    for line in ledger.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry.get("type") == "data_version":
            version = entry.get("data_version") or entry.get("md5") or version
    return version


def _validate(settings: Settings, layout: CorpusLayout) -> None:
    from monitoring.manifest_suite import validate_manifests

    grammar = Grammar.load(settings.corpus.language)
    result = validate_manifests(layout.manifests(), settings.corpus.validation,
                                intents=grammar.intent_names, slot_types=grammar.slot_types,
                                domains=DOMAINS)
    layout.reports_dir.mkdir(parents=True, exist_ok=True)
    (layout.reports_dir / "validation.md").write_text(result.to_markdown(), encoding="utf-8")
    if not result.success:
        raise ValueError(f"the retraining manifests fail validation: see "
                         f"{layout.reports_dir / 'validation.md'}")


@dataclass
class CandidateOutputs:
    """Where :func:`train_candidate` left the new models."""

    teacher: Path
    student_model: Path
    bundle: Path
    metrics: dict[str, float]


def train_candidate(settings: Settings, run_dir: Path, progress: bool = False) -> CandidateOutputs:
    """Step 2 (the DVC stage's command): fine-tune the teacher, distil the student, export."""
    from model.training.student import train_student
    from model.training.teacher import train_teacher

    spec = RetrainSpec.load(run_dir)
    rs = run_settings(settings, spec)
    teacher = train_teacher(rs, progress, resume=False, out_dir=run_dir / "teacher",
                            init_from=Path(spec.teacher_init))
    student = train_student(rs, teacher.model_dir, progress, resume=False,
                            out_dir=run_dir / "student", init_from=Path(spec.student_init))
    metrics = {**{f"teacher_{k}": v for k, v in teacher.best_valid.items()},
               **{f"student_{k}": v for k, v in student.best_valid.items()},
               "teacher_minutes": teacher.wall_s / 60, "student_minutes": student.wall_s / 60}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    return CandidateOutputs(teacher.model_dir, student.model_dir, student.deploy_dir, metrics)


def _dvc_workspace(path: Path) -> bool:
    """Whether the DVC stage would train in ``path``: the stage's paths come from
    params.yaml's ``workspace`` (not from $VOICELOOP_WORKSPACE or ``--workspace``), and DVC
    tracks outputs inside the repository only."""
    if not (repo_root() / ".git").exists():
        return False
    raw = yaml.safe_load((repo_root() / "params.yaml").read_text(encoding="utf-8")) or {}
    configured = (repo_root() / str(raw.get("workspace", "workspace"))).resolve()
    return path.resolve() == configured


#: The DVC stage of a retraining run; outside the root dvc.yaml so `dvc repro` skips it.
RETRAIN_STAGE = "pipelines/retrain/dvc.yaml:retrain"


def run_training_stage(settings: Settings, run_dir: Path, progress: bool = False) -> str:
    """Run :func:`train_candidate` as the DVC experiment ``dvc exp run`` of
    :data:`RETRAIN_STAGE` when the settings' workspace is the one params.yaml names
    inside the repository (the stage's paths), else directly. Returns how it ran
    (``dvc-exp:<name>`` or ``direct``)."""
    current = settings.workspace / "retrain" / "current"
    if settings.retrain.dvc_experiment and not _dvc_workspace(settings.workspace):
        log.info("training directly: the DVC stage trains in params.yaml's workspace, not in "
                 "%s", settings.workspace)
    elif settings.retrain.dvc_experiment:
        if current.is_symlink() or current.exists():
            current.unlink() if current.is_symlink() else None
        current.symlink_to(run_dir.resolve(), target_is_directory=True)
        name = f"retrain-{RetrainSpec.load(run_dir).run_id}"
        cmd = [sys.executable, "-m", "dvc", "exp", "run", RETRAIN_STAGE, "--name", name]
        done = subprocess.run(cmd, cwd=repo_root(), capture_output=True, text=True, check=False)
        if done.returncode == 0:
            return f"dvc-exp:{name}"
        log.warning("dvc exp run failed (%s); training directly", done.stderr.strip()[-500:])
    train_candidate(settings, run_dir, progress)
    return "direct"


def register_candidate(settings: Settings, spec: RetrainSpec, how: str,
                       outputs: CandidateOutputs | None = None) -> str:
    """Step 3: log the run with its lineage and register the new version as ``candidate``."""
    from serving.pyfunc import log_pyfunc, register_pyfunc
    from voiceloop.release import _git_commit

    run_dir = Path(spec.run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    registry = Registry(settings)
    tracker = RunLogger.start(settings, f"retrain-{spec.run_id}", {
        "stage": "retrain", "parent_version": spec.parent_version, "git_commit": _git_commit(),
        "data_version": spec.data_version or "", "manifest_sha": spec.manifest_sha,
        "traffic_batches": ",".join(spec.batches)[:5000], "labels_used": str(spec.labelled),
        "labels_requested": str(spec.requested), "label_budget": str(spec.budget),
        "pseudo_labels": str(spec.pseudo), "replay": str(spec.replay), "trained": how,
        "corrupt_labels": str(spec.corrupt_labels)})
    try:
        tracker.log_params({"retrain": settings.retrain.model_dump(), "pool": spec.pool})
        tracker.log_metrics({k: float(v) for k, v in metrics.items()}, 0)
        tracker.log_artifact(run_dir / SPEC)
        tracker.log_artifact(run_dir / "selection.csv")
        tracker.log_artifacts(run_dir / "teacher" / "model", "teacher")
        tracker.log_artifacts(run_dir / "student" / "model", "student_model")
        info = log_pyfunc(tracker.client, tracker.run_id, run_dir / "student" / "deploy",
                          "pyfunc", threads=1, batch_size=settings.decode.batch_size,
                          max_parse_len=settings.decode.max_parse_len)
        version = register_pyfunc(tracker.client, info, registry.name, "candidate")
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish()
    registry.tag_version(version, {
        TEACHER_TAG: f"runs:/{tracker.run_id}/teacher",
        STUDENT_PACKAGE_TAG: f"runs:/{tracker.run_id}/student_model",
        "parent_version": spec.parent_version, "retrain_run": spec.run_id,
        "labels_used": f"{spec.labelled}/{spec.budget}", "data_version": spec.data_version or "",
        "rollout.status": "candidate"})
    inherit_thresholds(settings, Path(spec.student_init), run_dir / "student" / "deploy")
    return version


def inherit_thresholds(settings: Settings, parent_student: Path, bundle: Path) -> bool:
    """Give the model of deploy ``bundle`` the calibrated drift thresholds of the parent
    whose student package is ``parent_student``, as a prior: better than params.yaml's
    uncalibrated defaults, but calibrated against the parent's corpus reference, so
    likely looser against the version's own live reference (``monitoring.
    adapted_reference``) — recalibrating on the version's own windows is still to do.
    Returns whether the parent had thresholds to inherit."""
    store = ReferenceStore.for_workspace(settings.workspace)
    thresholds = store.load_thresholds(load_package(parent_student).version)
    if thresholds is None:
        return False
    store.save_thresholds(load_bundle_config(bundle).version, thresholds)
    return True
