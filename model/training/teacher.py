"""Teacher training: the multitask model trained on labelled corpus audio.

``train_teacher`` is what the CLI and the DVC stage ``train_teacher`` run; the loop is
:func:`model.training.fit.fit`. Everything it writes goes to
``<workspace>/models/<profile>/teacher/``:

- ``checkpoints/last.pt`` (every epoch; resume point) and ``checkpoints/best.pt``;
- ``model/`` (the self-contained package of the best epoch, see ``model.nn.package``,
  with its transcript LM in ``model/lm/``);
- ``history.csv`` (per-epoch curves, DVC ``plots``), ``train_metrics.json`` (DVC
  ``metrics``), ``learning_curves.png``.

Per batch: cached raw log-mels → voice perturbation (speed, VTLP, tilt) → per-utterance
normalisation → SpecAugment (ramped up over the first epochs) → the network → CTC (over
tagged transcripts: slots are read off them), intent cross-entropy, optionally the parse
decoder's cross-entropy and an intermediate CTC, combined with fixed weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.data.grammar import Grammar
from model.frontend.cache import feature_config, load_split, random_subset
from model.frontend.features import FeatureConfig, SpecAugment
from model.frontend.warp import FeatureWarp
from model.nn.network import JointModel
from model.nn.package import ModelPackage, load_package
from model.nn.tokens import CTCVocab, ParseVocab
from model.training.dataset import SLUDataset, collate
from model.training.fit import (
    FitTask,
    RunLayout,
    StepResult,
    Tracker,
    Validator,
    build_ctc_vocab,
    build_model,
    build_vocab,
    capped_threads,
    finalise_package,
    fit,
    resolve_bf16,
    seed_everything,
    write_run_summary,
)
from model.training.losses import ctc_loss, intent_loss, make_weighting, parse_loss
from voiceloop.settings import Settings, WarpSettings

__all__ = ["TeacherTask", "TrainResult", "make_warp", "train_teacher"]

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """Summary of a training run."""

    model_dir: Path
    epochs_run: int
    best_epoch: int
    best_valid: dict[str, float]
    parameters: int
    wall_s: float
    stopped: str
    clarify_threshold: float


def make_warp(warp: WarpSettings, features: FeatureConfig) -> FeatureWarp | None:
    """The training-time voice perturbation of ``warp`` (None when all of it is off)."""
    if warp.p == 0 or (warp.speed is None and warp.vtlp is None and warp.tilt_db == 0):
        return None
    return FeatureWarp(features.n_mels, features.sample_rate, warp.speed, warp.vtlp,
                       warp.tilt_db, warp.p)


def specaugment_strength(epoch_progress: float, ramp_epochs: float) -> float:
    """SpecAugment mask-width factor: grows linearly to 1 over ``ramp_epochs``."""
    return 1.0 if ramp_epochs <= 0 else min(1.0, epoch_progress / ramp_epochs)


class TeacherTask(FitTask):
    """The teacher's training step (see the module docstring)."""

    name = "teacher"

    def __init__(self, settings: Settings, model: JointModel, train: SLUDataset,
                 features: FeatureConfig, validator: Validator) -> None:
        ts = settings.train
        self.settings, self.model, self.train, self.features = settings, model, train, features
        self.validator = validator
        self.lengths = train.lengths
        self.weighting = make_weighting(ts.loss.weighting, ts.loss.weights,
                                        ts.loss.final_weights, ts.loss.schedule_epochs)
        sa = settings.features.specaugment
        self.specaug = SpecAugment(sa.freq_masks, sa.freq_width, sa.time_masks,
                                   sa.time_width_frac, sa.time_width_max)
        self.warp = make_warp(settings.features.warp, features)
        self.bf16 = resolve_bf16(ts.bf16)
        self._last_weights: dict[str, float] = {}

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": self.model.parameters()},
                {"params": self.weighting.parameters(), "weight_decay": 0.0}]

    def batch_order(self, epoch: int) -> np.ndarray | None:
        return self.train.difficulty() if epoch < self.settings.train.curriculum_epochs else None

    def step(self, idx: list[int], epoch_progress: float, np_rng: np.random.Generator,
             aug_gen: torch.Generator) -> StepResult:
        batch = collate(self.train, idx, self.features, self.warp, aug_gen)
        strength = specaugment_strength(epoch_progress,
                                        self.settings.features.specaugment.ramp_epochs)
        feats = self.specaug(batch.feats, batch.lengths, aug_gen, strength)
        decoder = self.model.parse_decoder is not None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(feats, batch.lengths, batch.parse_in if decoder else None,
                             batch.parse_pad_mask if decoder else None)
        losses = {
            "ctc": ctc_loss(out.ctc_logits, out.ctc_lengths, batch.ctc_targets, batch.ctc_lengths),
            "intent": intent_loss(out.intent_logits, batch.intents),
        }
        if out.parse_logits is not None:
            losses["parse"] = parse_loss(out.parse_logits, batch.parse_out,
                                         self.settings.train.loss.label_smoothing)
        if out.inter_ctc_logits is not None:
            losses["inter_ctc"] = ctc_loss(out.inter_ctc_logits, out.ctc_lengths,
                                           batch.ctc_targets, batch.ctc_lengths)
        breakdown = self.weighting(losses, epoch_progress)
        self._last_weights = breakdown.weights
        return StepResult(breakdown.total, breakdown.losses,
                          {f"weight_{t}": w for t, w in breakdown.weights.items()})

    def validate(self) -> dict[str, float]:
        return self.validator(self.model)[0]

    def epoch_columns(self) -> dict[str, float]:
        return {f"weight_{t}": w for t, w in self._last_weights.items()}

    def state(self) -> dict[str, Any]:
        return {"weighting": self.weighting.state_dict()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.weighting.load_state_dict(state["weighting"])


def teacher_data(
    settings: Settings, progress: bool, init: ModelPackage | None = None,
) -> tuple[SLUDataset, ParseVocab, CTCVocab, FeatureConfig]:
    """The training set (raw cached features) with the teacher's vocabularies: built
    from the grammar and training rows, or the warm-start model's (``init``), whose heads
    must keep meaning the same units."""
    ts = settings.train
    rows, raw = load_split(settings, "train", progress, raw=True)
    rows, raw = random_subset(rows, raw, ts.max_train_utterances, settings.seed + 1)
    if init is not None:
        vocab, ctc_vocab, features = init.parse_vocab, init.ctc_vocab, init.features
    else:
        vocab = build_vocab(Grammar.load(settings.corpus.language), rows)
        ctc_vocab, features = build_ctc_vocab(settings, vocab), feature_config(settings)
    return SLUDataset(rows, raw, ctc_vocab, vocab), vocab, ctc_vocab, features


def train_teacher(
    settings: Settings,
    progress: bool = True,
    resume: bool = True,
    out_dir: Path | None = None,
    tracker: Tracker | None = None,
    init_from: Path | None = None,
) -> TrainResult:
    """Train the teacher on the corpus of ``settings.profile``.

    Args:
        settings: parsed params.
        progress: show progress bars.
        resume: continue from ``checkpoints/last.pt`` when it exists.
        out_dir: run folder (default ``<models_dir>/teacher``).
        tracker: where to log params, per-step and per-epoch metrics, plots and the model
            (the stage layer passes an MLflow run); None logs nowhere.
        init_from: a teacher package to fine-tune (warm start: the retraining flow); its
            architecture, vocabularies and feature settings are kept (``settings.model``
            is not used). Its weights are ignored when resuming a checkpoint.
    """
    ts = settings.train
    torch.set_num_threads(capped_threads(ts.threads))
    seed_everything(settings.seed)
    layout = RunLayout(out_dir or settings.models_dir / "teacher")
    layout.root.mkdir(parents=True, exist_ok=True)

    init = load_package(init_from) if init_from is not None else None
    train, vocab, ctc_vocab, features = teacher_data(settings, progress, init)
    validator = Validator(settings, features, vocab, ctc_vocab, progress, ts.eval_max_utterances)
    # A warm start fine-tunes the model it is given, whatever shape the profile names.
    model = JointModel(init.model.cfg) if init is not None else build_model(settings, vocab, ctc_vocab)
    if init is not None and not (resume and layout.last.exists()):
        model.load_state_dict(init.model.state_dict())
        log.info("teacher warm-started from %s", init_from)
    task = TeacherTask(settings, model, train, features, validator)
    if tracker:
        tracker.log_params({
            "profile": settings.profile, "seed": settings.seed,
            "features": settings.features.model_dump(), "model": settings.model.model_dump(),
            "train": ts.model_dump(), "parameters": model.num_parameters(),
            "train_utterances": len(train), "bf16": task.bf16,
            "valid_utterances": {k: len(v[0]) for k, v in validator.splits.items()},
        })
    outcome = fit(task, ts, layout, tracker, settings.seed, progress, resume)

    model.load_state_dict(torch.load(layout.best, weights_only=False)["model"])
    metadata = {
        "version": f"teacher-{settings.profile}-{tracker.run_id if tracker else 'local'}",
        "role": "teacher", "profile": settings.profile,
        "init_from": str(init_from) if init_from else None,
        "run_id": tracker.run_id if tracker else None,
        "best_epoch": outcome.best_epoch, "parameters": model.num_parameters(),
    }
    final = finalise_package(model, features, vocab, ctc_vocab, validator, settings,
                             layout.model_dir, metadata, progress)
    metrics = {
        **final.metrics, **outcome.best_valid, "best_epoch": outcome.best_epoch,
        "epochs_run": len(outcome.history), "parameters": model.num_parameters(),
        "wall_minutes": round(outcome.wall_s / 60, 2),
    }
    write_run_summary(layout, outcome.history, metrics, f"teacher ({settings.profile})", tracker)
    if tracker:
        tracker.set_tags({"stopped": outcome.stopped})
    return TrainResult(
        model_dir=layout.model_dir, epochs_run=len(outcome.history),
        best_epoch=outcome.best_epoch, best_valid=outcome.best_valid,
        parameters=model.num_parameters(), wall_s=outcome.wall_s, stopped=outcome.stopped,
        clarify_threshold=final.package.clarify_threshold,
    )
