"""The pipeline's stages as the CLI, DVC and the Prefect flows run them.

``model/`` is a library: it trains, scores and predicts, and logs to whatever
:class:`~model.training.fit.Tracker` it is handed. This module is the layer that adds the
MLOps around it — the Great Expectations suite on a new corpus, an MLflow run per
training (resumed with the training), registry versions and aliases, MLflow URIs as
model arguments — so that no Prefect, registry or validation code lives in ``model/``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from model.data.corpus import CorpusLayout, CorpusReport, build_corpus
from model.data.grammar import DOMAINS, Grammar
from model.evaluation.compare import Comparison, compare_models
from model.evaluation.evaluate import EvaluateResult, evaluate_model
from model.inference.predict import PredictSummary, predict_manifest
from model.training.fit import RunLayout
from model.training.student import StudentResult, train_student
from model.training.teacher import TrainResult, train_teacher
from voiceloop.settings import Settings
from voiceloop.tracking import RunLogger, resolve_model_uri

__all__ = [
    "DistillOutcome",
    "TeacherOutcome",
    "corpus_stage",
    "distill_stage",
    "evaluate_stage",
    "predict_stage",
    "seed_production",
    "train_stage",
    "validate_corpus",
]

log = logging.getLogger(__name__)


def validate_corpus(layout: CorpusLayout, grammar: Grammar, settings: Settings) -> bool:
    """Run the Great Expectations manifest suite over all splits; write its report
    (``reports/validation.{md,json}``) and say whether it passed."""
    from monitoring.manifest_suite import validate_manifests

    result = validate_manifests(
        layout.manifests(), settings.corpus.validation, intents=grammar.intent_names,
        slot_types=grammar.slot_types, domains=DOMAINS,
    )
    (layout.reports_dir / "validation.md").write_text(result.to_markdown(), encoding="utf-8")
    (layout.reports_dir / "validation.json").write_text(
        json.dumps(result.to_json(), indent=2, default=str), encoding="utf-8")
    return result.success


def corpus_stage(settings: Settings, progress: bool = True, validate: bool = True) -> CorpusReport:
    """Build (or resume) the corpus and validate it with the Great Expectations suite.

    Raises:
        CorpusValidationError: the suite failed (see ``reports/validation.md``).
    """
    return build_corpus(
        settings, progress,
        (lambda layout, grammar: validate_corpus(layout, grammar, settings)) if validate else None)


@contextmanager
def _run(settings: Settings, layout: RunLayout, name: str, tags: dict[str, str],
         track: bool, resume: bool) -> Iterator[RunLogger | None]:
    """The MLflow run of a training in ``layout``: the one a resumed training started
    (its id is kept in ``run.json``), else a new one; FAILED if the training raises."""
    if not track:
        yield None
        return
    layout.root.mkdir(parents=True, exist_ok=True)
    run_id = None
    if resume and layout.run_file.exists() and layout.last.exists():
        run_id = json.loads(layout.run_file.read_text(encoding="utf-8")).get("run_id")
    tracker = RunLogger.attach(settings, run_id) if run_id else RunLogger.start(settings, name, tags)
    layout.run_file.write_text(json.dumps({"run_id": tracker.run_id}), encoding="utf-8")
    try:
        yield tracker
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish()


@dataclass
class TeacherOutcome:
    """A trained teacher and its registry version (``<model>-teacher@current``)."""

    result: TrainResult
    run_id: str | None
    registered_version: str | None


def train_stage(
    settings: Settings, progress: bool = True, resume: bool = True, track: bool = True,
    out_dir: Path | None = None,
) -> TeacherOutcome:
    """Train the teacher; with ``track``, log it to MLflow and register the model folder
    as a new version of ``<registered_model>-teacher`` with alias ``current``."""
    layout = RunLayout(out_dir or settings.models_dir / "teacher")
    tags = {"stage": "train_teacher", "profile": settings.profile}
    with _run(settings, layout, f"teacher-{settings.profile}", tags, track, resume) as tracker:
        result = train_teacher(settings, progress, resume, layout.root, tracker)
        version = None
        if tracker:
            version = tracker.register(f"{settings.tracking.registered_model}-teacher",
                                       "model", "current")
            tracker.set_tags({"registered_version": version})
    return TeacherOutcome(result, tracker.run_id if tracker else None, version)


@dataclass
class DistillOutcome:
    """What the ``distill`` stage produced: the training result, the teacher/student
    comparison on the test split, and the registry reference of the deploy bundle."""

    result: StudentResult
    comparison: Comparison
    registered: str | None
    run_id: str | None


def distill_stage(
    settings: Settings, teacher_dir: Path | None = None, progress: bool = True,
    resume: bool = True, track: bool = True, out_dir: Path | None = None,
    init_from: Path | None = None, alias: str | None = "candidate",
) -> DistillOutcome:
    """Distil the student, score its int8 bundle against the teacher on the test split,
    and with ``track`` log both to the student's MLflow run and register the bundle as a
    pyfunc model version of ``<registered_model>`` (with ``alias``, if given)."""
    # Imported before the hour of training, not after it: a run must use one version of
    # the code (a module edited mid-run once broke the final registration step).
    from serving.pyfunc import log_pyfunc, register_pyfunc

    teacher_dir = teacher_dir or settings.models_dir / "teacher" / "model"
    layout = RunLayout(out_dir or settings.models_dir / "student")
    tags = {"stage": "distill", "profile": settings.profile, "teacher": str(teacher_dir)}
    with _run(settings, layout, f"student-{settings.profile}", tags, track, resume) as tracker:
        result = train_student(settings, teacher_dir, progress, resume, layout.root, tracker,
                               init_from)
        comparison = compare_models(settings, teacher_dir, layout.root, "test", progress)
        registered = None
        if tracker:
            tracker.log_metrics({f"compare/{k}": float(v) for k, v in comparison.flat().items()}, 0)
            tracker.log_artifacts(layout.root / "eval" / "test", "evaluation/test")
            tracker.log_artifacts(result.deploy_dir, "deploy")
            info = log_pyfunc(tracker.client, tracker.run_id, result.deploy_dir, "pyfunc",
                              threads=1, batch_size=settings.decode.batch_size,
                              max_parse_len=settings.decode.max_parse_len)
            name = settings.tracking.registered_model
            version = register_pyfunc(tracker.client, info, name, alias)
            tracker.set_tags({"registered_version": version})
            registered = f"models:/{name}/{version}" + (f" (@{alias})" if alias else "")
    return DistillOutcome(result, comparison, registered, tracker.run_id if tracker else None)


def evaluate_stage(
    settings: Settings, model_uri: str, split: str = "test", out_dir: Path | None = None,
    progress: bool = True, track: bool = True, use_lm: bool | None = None,
) -> EvaluateResult:
    """Score a model (folder or MLflow URI) on a corpus split, write the report and, with
    ``track``, log it to the model's training run (or a new ``evaluate`` run)."""
    folder = resolve_model_uri(model_uri, settings)
    if out_dir is None and model_uri.startswith(("models:/", "runs:/")):
        # Never write into an MLflow artifact store: a registry URI gets its own folder.
        slug = "".join(c if c.isalnum() or c in "@._-" else "_"
                       for c in model_uri.split(":/", 1)[-1]).strip("_")
        out_dir = settings.models_dir / "eval" / slug / split
    result = evaluate_model(settings, folder, split, out_dir, progress, use_lm)
    if track:
        run_id = result.run_id
        tracker = (RunLogger.attach(settings, run_id) if run_id
                   else RunLogger.start(settings, f"evaluate-{settings.profile}", {"stage": "evaluate"}))
        metrics = json.loads(result.files["metrics"].read_text(encoding="utf-8"))
        tracker.log_metrics({f"{split}/{k}": v for k, v in metrics.items()}, 0)
        tracker.log_artifacts(result.out_dir, f"evaluation/{split}")
        tracker.finish()
    return result


def predict_stage(
    settings: Settings, model_uri: str, manifest: Path, out: Path, batch_size: int = 16,
    progress: bool = False, use_lm: bool | None = None,
) -> PredictSummary:
    """Batch prediction with a model given as a folder or an MLflow URI."""
    return predict_manifest(settings, resolve_model_uri(model_uri, settings), manifest, out,
                            batch_size, progress, use_lm)



def seed_production(settings: Settings, bundle: Path | None = None) -> str | None:
    """Give an empty registry its first ``production`` model: the released student
    (``release/student``, or ``bundle``) logged as a pyfunc and registered. Returns the
    new version, or None when the registry already has a production model.

    Raises:
        FileNotFoundError: no bundle given and the repository has no released model.
    """
    from serving.pyfunc import log_pyfunc, register_pyfunc
    from voiceloop.registry import Registry
    from voiceloop.release import default_model, released_models

    registry = Registry(settings)
    registry.recover()
    if registry.alias("production") is not None:
        return None
    source = bundle or default_model()
    if source is None:
        raise FileNotFoundError("the registry has no production model and the repository no "
                                "released model (release/student): train one, or serve --model")
    tracker = RunLogger.start(settings, "seed-production",
                              {"stage": "seed", "source": str(source)})
    try:
        info = log_pyfunc(tracker.client, tracker.run_id, source, "pyfunc", threads=1,
                          batch_size=settings.decode.batch_size,
                          max_parse_len=settings.decode.max_parse_len)
        version = register_pyfunc(tracker.client, info, registry.name)
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish()
    tags = {"source": str(source), "seed": "true"}
    released = released_models()
    if released is not None and Path(source).resolve() == released["bundle"].resolve():
        # Lineage the retraining flow warm-starts from (voiceloop.retrain).
        tags |= {"teacher": str(released["teacher"]), "student_package": str(released["student"])}
    registry.tag_version(version, tags)
    registry.set_production(version, f"seed production model from {source}")
    log.info("registry was empty: %s version %s is now production", registry.name, version)
    return version
