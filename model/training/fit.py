"""The one training loop teacher and student share, and what both runs need around it.

:func:`fit` owns everything that does not depend on *what* is trained: AdamW with warm-up
and cosine decay (shortened to the time budget after the first epoch), length-bucketed
shuffled batches, gradient clipping, per-step and per-epoch logging to a
:class:`Tracker`, validation every epoch, checkpoints (``last.pt`` every epoch with the
full state for an exact resume; ``best.pt`` whenever the selection metric improves),
early stopping and the time budget. A :class:`FitTask` says what is trained: its
parameters, one step's loss, what to validate, and hooks for the student's
quantisation-aware phase (:mod:`model.training.student`) — the teacher
(:mod:`model.training.teacher`) uses none of them.

:func:`finalise_package` is the shared end of a run: calibrate the intent confidences,
choose the clarify threshold, write the model folder and attach the transcript LM.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from model.data.grammar import Grammar
from model.data.manifest import ManifestRow
from model.decoding.greedy import choose_clarify_threshold
from model.evaluation.plots import plot_learning_curves
from model.evaluation.report import EvaluationReport, evaluate
from model.fileio import atomic_path
from model.frontend.cache import load_split, random_subset
from model.frontend.features import FeatureConfig
from model.inference.batch import length_sorted_batches, predict_dataset
from model.inference.prediction import Prediction
from model.nn.network import EncoderConfig, JointModel, ModelConfig
from model.nn.package import ModelPackage, save_package
from model.nn.tokens import CharVocab, CTCVocab, ParseVocab, TaggedCharVocab, WordVocab
from model.training.dataset import make_batches
from voiceloop.settings import ModelSettings, Settings, TrainSettings

__all__ = [
    "FitOutcome",
    "FitTask",
    "RunLayout",
    "StepResult",
    "Tracker",
    "Validator",
    "WarmupCosine",
    "build_ctc_vocab",
    "build_model",
    "build_vocab",
    "calibrate_temperature",
    "clarify_threshold_for",
    "epochs_in_budget",
    "finalise_package",
    "fit",
    "resolve_bf16",
    "save_checkpoint",
    "seed_everything",
    "write_history",
    "write_run_summary",
]

log = logging.getLogger(__name__)


class Tracker(Protocol):
    """Where a run logs (an MLflow run in production: ``voiceloop.tracking.RunLogger``).

    ``model/`` only needs this much; the stage layer creates, resumes and registers runs.
    """

    run_id: str

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...

    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None: ...


def capped_threads(requested: int) -> int:
    """The intra-op thread count a run should use: ``requested`` (``train.threads``),
    lowered to ``$OMP_NUM_THREADS`` when that is set. The variable is the usual way a
    container or a scheduler tells a process its share of the cores; two processes that
    each spin 2 OpenMP threads on 2 cores slow each other by an order of magnitude (the
    parallel test suite sets it to 1 per worker).

    Raises:
        ValueError: ``requested`` below 1, or ``$OMP_NUM_THREADS`` not a positive integer.
    """
    if requested < 1:
        raise ValueError(f"requested threads must be >= 1, got {requested}")
    raw = os.environ.get("OMP_NUM_THREADS", "").strip()
    if not raw:
        return requested
    outer = raw.split(",")[0].strip()  # "4,2": one count per nesting level; the first is ours
    if not outer.isdigit() or int(outer) < 1:
        raise ValueError(f"OMP_NUM_THREADS must be a positive integer (or a list of them), "
                         f"got {raw!r}")
    return min(requested, int(outer))


@dataclass(frozen=True)
class RunLayout:
    """Files of one training run (teacher or student) under ``root``."""

    root: Path

    @property
    def last(self) -> Path:
        return self.root / "checkpoints" / "last.pt"

    @property
    def best(self) -> Path:
        return self.root / "checkpoints" / "best.pt"

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def history(self) -> Path:
        return self.root / "history.csv"

    @property
    def metrics(self) -> Path:
        return self.root / "train_metrics.json"

    @property
    def curves(self) -> Path:
        return self.root / "learning_curves.png"

    @property
    def run_file(self) -> Path:
        return self.root / "run.json"


# --------------------------------------------------------------------------- building


def build_vocab(grammar: Grammar, rows: list[ManifestRow]) -> ParseVocab:
    """Parse vocabulary: every intent and slot type of the grammar, every word of the
    training transcripts and of the open-list values (so held-out values decode)."""
    values = grammar.values
    texts = [r.transcript for r in rows]
    texts += list(values["area"]) + list(values["floor"])
    texts += [n for names in values["name"].values() for n in names]
    texts += [w for items in values["wildcards"].values() for w in items]
    return ParseVocab.build(grammar.intent_names, grammar.slot_types, texts)


def build_ctc_vocab(settings: Settings, vocab: ParseVocab) -> CTCVocab:
    """The CTC units ``settings.model.ctc_units`` names: tagged characters (slot types
    from ``vocab``), characters, or the parse vocabulary's words."""
    units = settings.model.ctc_units
    if units == "tagged":
        return TaggedCharVocab(vocab.slot_types)
    return WordVocab(vocab.words) if units == "word" else CharVocab()


def build_model(
    settings: Settings, vocab: ParseVocab, ctc_vocab: CTCVocab, shape: ModelSettings | None = None
) -> JointModel:
    """A fresh model of ``shape`` (default: the teacher's, ``settings.model``)."""
    m = shape or settings.model
    enc = EncoderConfig(
        n_mels=settings.features.n_mels, d_model=m.d_model, layers=m.encoder_layers,
        heads=m.heads, ffn_mult=m.ffn_mult, conv_kernel=m.conv_kernel,
        subsampling=m.subsampling, dropout=m.dropout, causal_conv=m.causal_conv,
        frontend_channels=m.frontend_channels, inter_ctc_layer=m.inter_ctc_layer,
    )
    cfg = ModelConfig(
        encoder=enc, n_chars=len(ctc_vocab), n_intents=len(vocab.intents),
        n_parse_tokens=len(vocab), decoder_layers=m.decoder_layers,
        decoder_heads=m.decoder_heads, decoder_ffn=m.decoder_ffn,
        max_parse_len=m.max_parse_len, ctc_upsample=m.ctc_upsample,
    )
    return JointModel(cfg)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_bf16(setting: bool | str) -> bool:
    """``bf16: auto`` → True only where oneDNN has native bfloat16 (AVX512-BF16/AMX);
    elsewhere bf16 autocast is emulated and slower than fp32."""
    if setting == "auto":
        return bool(torch.backends.mkldnn.is_available()
                    and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return bool(setting)


class WarmupCosine:
    """LR factor: linear warm-up, then cosine decay to ``floor`` at ``total`` steps.

    ``total`` can be shortened after the first epoch, when a time budget turns out to
    allow fewer epochs than configured, so the decay still completes in the budget.
    """

    def __init__(self, warmup: int, total: int, floor: float) -> None:
        self.warmup, self.total, self.floor = warmup, total, floor

    def __call__(self, step: int) -> float:
        if self.warmup and step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))


def epochs_in_budget(start_time: float, epoch_start: float, max_minutes: float) -> int:
    """Epochs that fit ``max_minutes`` in all, judged after the first epoch (which began
    at ``epoch_start``; the run at ``start_time``, both ``time.perf_counter()`` values)."""
    now = time.perf_counter()
    return 1 + int(max(0.0, max_minutes * 60 - (now - start_time)) // (now - epoch_start))


# --------------------------------------------------------------------------- validation


class Validator:
    """Scores a model on the validation split and, when the corpus has it, on the
    held-out-voice twin of that split (sentences of the same templates spoken by a voice
    family no training utterance uses).

    The epoch row carries ``valid_*`` and ``heldout_*`` metrics; ``select`` — what
    checkpoints are chosen by — is the mean SemER over both, so a checkpoint that only
    fits the training voices better does not win.
    """

    def __init__(
        self, settings: Settings, features: FeatureConfig, vocab: ParseVocab,
        ctc_vocab: CTCVocab, progress: bool, limit: int | None = None,
    ) -> None:
        self.settings, self.features, self.vocab, self.ctc_vocab = settings, features, vocab, ctc_vocab
        self.splits: dict[str, tuple[list[ManifestRow], list[Tensor]]] = {}
        for split in ("valid", "valid_heldout"):
            if split != "valid" and not (settings.corpus_dir / "manifests" / f"{split}.jsonl").exists():
                continue
            rows, feats = load_split(settings, split, progress, features)
            self.splits[split] = random_subset(rows, feats, limit, settings.seed)

    @property
    def calibration_split(self) -> str:
        """Where intent confidences are calibrated: the held-out voices when present."""
        return "valid_heldout" if "valid_heldout" in self.splits else "valid"

    def predictions(self, package: ModelPackage, split: str = "valid") -> list[Prediction]:
        rows, feats = self.splits[split]
        d = self.settings.decode
        return predict_dataset(package, [r.id for r in rows], feats, d.batch_size, d.max_parse_len,
                               use_lm=package.lm_dir is not None)

    def __call__(self, model: JointModel) -> tuple[dict[str, float], dict[str, EvaluationReport]]:
        """Validation row of ``model`` (greedy decoding); hands it back in training mode."""
        model.eval()
        package = ModelPackage(model, self.features, self.vocab, ctc_vocab=self.ctc_vocab)
        reports = {split: evaluate(self.splits[split][0], self.predictions(package, split))
                   for split in self.splits}
        model.train()
        row: dict[str, float] = {}
        for split, report in reports.items():
            prefix = "valid" if split == "valid" else "heldout"
            o = report.overall
            row.update({
                f"{prefix}_semer": o.semer, f"{prefix}_wer": o.wer, f"{prefix}_cer": o.cer,
                f"{prefix}_intent_accuracy": o.intent_accuracy, f"{prefix}_slot_f1": o.slot_f1,
                f"{prefix}_exact_match": o.exact_match,
            })
        row["select"] = float(np.mean([r.overall.semer for r in reports.values()]))
        return row, reports


# --------------------------------------------------------------------------- the loop


@dataclass
class StepResult:
    """One training step: the loss to minimise, each term's value (logged as
    ``loss_<name>``) and anything else to log per step (``step/<name>``)."""

    total: Tensor
    terms: dict[str, float]
    extra: dict[str, float] = field(default_factory=dict)


class FitTask(ABC):
    """What :func:`fit` trains. Subclasses: the teacher's and the student's task.

    Attributes:
        name: run name in logs and progress bars (``teacher`` / ``student``).
        model: the network whose weights are checkpointed and selected.
        lengths: ``(N,)`` frames per training utterance (for batching).
    """

    name: str
    model: JointModel
    lengths: np.ndarray

    @abstractmethod
    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW parameter groups (model plus any loss or projection parameters)."""

    @abstractmethod
    def step(self, idx: list[int], epoch_progress: float, np_rng: np.random.Generator,
             aug_gen: torch.Generator) -> StepResult:
        """The loss of utterances ``idx`` at ``epoch_progress`` (epochs, fractional)."""

    @abstractmethod
    def validate(self) -> dict[str, float]:
        """The epoch's validation row (see :class:`Validator`)."""

    def batch_order(self, epoch: int) -> np.ndarray | None:
        """A curriculum key per utterance for this epoch, or None to shuffle."""
        return None

    def begin_epoch(self, epoch: int) -> bool:
        """Called before each epoch; True when checkpoint selection must start afresh
        (the student entering quantisation-aware training)."""
        return False

    def selectable(self) -> bool:
        """Whether the current epoch may become the chosen checkpoint."""
        return True

    def may_stop_early(self) -> bool:
        return True

    def on_budget(self, fits: int) -> None:
        """The time budget holds ``fits`` epochs (known after the first one)."""

    def epoch_columns(self) -> dict[str, float]:
        """Extra columns of the epoch row."""
        return {}

    def state(self) -> dict[str, Any]:
        """Task state a resume needs beyond the model and optimizer (``last.pt``)."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state`; called before the model weights are loaded."""

    def best_extra(self) -> dict[str, Any]:
        """What ``best.pt`` needs besides the weights to rebuild the chosen model."""
        return {}


@dataclass
class FitOutcome:
    """How a :func:`fit` run went; ``best.pt`` holds the chosen weights."""

    history: list[dict[str, float]]
    best_epoch: int
    best_valid: dict[str, float]
    stopped: str
    wall_s: float
    steps: int


def fit(
    task: FitTask, ts: TrainSettings, layout: RunLayout, tracker: Tracker | None,
    seed: int, progress: bool = True, resume: bool = True,
) -> FitOutcome:
    """Train ``task`` under ``ts`` (epochs, LR schedule, budget, early stopping), writing
    ``layout``'s checkpoints and history; resumes from ``last.pt`` when asked and present.

    Early stopping counts epochs without a better ``select`` only after
    ``ts.min_epochs``; the time budget ends training after the epoch that would overrun
    it, and after the first epoch the LR decay is shortened to the epochs that fit.
    """
    start_time = time.perf_counter()
    model = task.model
    optimizer = torch.optim.AdamW(task.param_groups(), lr=ts.lr, weight_decay=ts.weight_decay)
    batches_per_epoch = len(make_batches(task.lengths, ts.batch_max_frames))
    schedule = WarmupCosine(ts.warmup_steps, ts.epochs * batches_per_epoch, ts.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    np_rng = np.random.default_rng(seed)
    aug_gen = torch.Generator().manual_seed(seed)

    epoch, step, best, best_epoch, stale = 0, 0, math.inf, -1, 0
    history: list[dict[str, float]] = []
    best_valid: dict[str, float] = {}
    if resume and layout.last.exists():
        state = torch.load(layout.last, weights_only=False)
        task.load_state(state["task"])
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        schedule.total = state["schedule_total"]
        epoch, step = state["epoch"] + 1, state["step"]
        best, best_epoch, stale = state["best"], state["best_epoch"], state["stale"]
        history, best_valid = state["history"], state["best_valid"]
        np_rng.bit_generator.state = state["np_rng"]
        aug_gen.set_state(state["aug_gen"])
        torch.set_rng_state(state["torch_rng"])
        log.info("%s: resumed from %s at epoch %d (step %d)", task.name, layout.last, epoch, step)

    stopped = "epochs"
    model.train()
    while epoch < ts.epochs:
        if task.begin_epoch(epoch):
            best, best_epoch, stale = math.inf, -1, 0
        batches = make_batches(task.lengths, ts.batch_max_frames, rng=np_rng,
                               order=task.batch_order(epoch))
        sums: dict[str, float] = {}
        epoch_start = time.perf_counter()
        bar = tqdm(batches, desc=f"{task.name} epoch {epoch}", unit="batch", disable=not progress)
        for i, idx in enumerate(bar):
            result = task.step(idx, epoch + i / len(batches), np_rng, aug_gen)
            optimizer.zero_grad(set_to_none=True)
            result.total.backward()
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), ts.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            values = {**result.terms, "total": float(result.total.detach())}
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            if progress:
                bar.set_postfix({k: f"{v:.2f}" for k, v in values.items() if k in ("ctc", "total")})
            if tracker and step % ts.log_every_steps == 0:
                tracker.log_metrics({
                    **{f"step/loss_{k}": v for k, v in values.items()},
                    **{f"step/{k}": v for k, v in result.extra.items()},
                    "step/lr": scheduler.get_last_lr()[0], "step/grad_norm": float(grad_norm),
                }, step)
        train_s = time.perf_counter() - epoch_start
        valid = task.validate()
        if epoch == 0 and ts.max_minutes is not None:
            fits = epochs_in_budget(start_time, epoch_start, ts.max_minutes)
            if fits < ts.epochs:
                schedule.total = max(1, fits) * batches_per_epoch
                task.on_budget(fits)
                log.info("%s: the time budget fits ~%d epochs; LR decays over %d steps",
                         task.name, fits, schedule.total)
        row = {
            "epoch": epoch, **{f"train_loss_{k}": v / len(batches) for k, v in sums.items()},
            **task.epoch_columns(), **valid, "lr": scheduler.get_last_lr()[0],
            "train_utt_per_s": len(task.lengths) / train_s,
            "epoch_s": time.perf_counter() - epoch_start,
        }
        history.append(row)
        log.info("%s epoch %d: select %.3f | valid semer %.3f wer %.3f intent %.3f slot-f1 %.3f"
                 "%s (%.0f s)", task.name, epoch, valid["select"], valid["valid_semer"],
                 valid["valid_wer"], valid["valid_intent_accuracy"], valid["valid_slot_f1"],
                 f" | held-out voice semer {valid['heldout_semer']:.3f} wer "
                 f"{valid['heldout_wer']:.3f} intent {valid['heldout_intent_accuracy']:.3f}"
                 if "heldout_semer" in valid else "", row["epoch_s"])
        if tracker:
            tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, epoch)
        if task.selectable() and valid["select"] < best - 1e-6:
            best, best_epoch, stale = valid["select"], epoch, 0
            best_valid = dict(valid)
            save_checkpoint(layout.best, {"model": model.state_dict(), "epoch": epoch,
                                          **task.best_extra()})
        elif epoch + 1 > ts.min_epochs:
            stale += 1
        save_checkpoint(layout.last, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "schedule_total": schedule.total,
            "epoch": epoch, "step": step, "best": best, "best_epoch": best_epoch,
            "stale": stale, "history": history, "best_valid": best_valid, "task": task.state(),
            "np_rng": np_rng.bit_generator.state, "aug_gen": aug_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
        })
        write_history(layout.history, history)
        epoch += 1
        if stale >= ts.early_stopping_patience and task.may_stop_early():
            stopped = f"early stopping: no better validation SemER for {stale} epochs"
            break
        elapsed_min = (time.perf_counter() - start_time) / 60
        if ts.max_minutes is not None and elapsed_min + row["epoch_s"] / 60 > ts.max_minutes:
            stopped = f"time budget: {elapsed_min:.1f} of {ts.max_minutes} minutes used"
            break
    if best_epoch < 0:
        raise RuntimeError(f"{task.name}: no epoch could be selected (history: {len(history)})")
    return FitOutcome(history, best_epoch, best_valid, stopped,
                      time.perf_counter() - start_time, step)


# --------------------------------------------------------------------------- finalisation


@torch.no_grad()
def _intent_logits(model: JointModel, feats: Sequence[Tensor], batch_size: int) -> Tensor:
    """``(N, I)`` intent logits for features ``[(T_i, F)]`` (input order)."""
    model.eval()
    out = torch.zeros(len(feats), model.cfg.n_intents)
    for idx in length_sorted_batches([f.shape[0] for f in feats], batch_size):
        batch = [feats[i].float() for i in idx]
        lengths = torch.tensor([f.shape[0] for f in batch])
        enc, _, pad = model.encode(nn.utils.rnn.pad_sequence(batch, batch_first=True), lengths)
        out[idx] = model.intent_head(enc, pad).float()
    return out


def calibrate_temperature(logits: Tensor, labels: Tensor) -> float:
    """Temperature scaling (Guo et al. 2017): the T > 0 minimising the NLL of
    ``softmax(logits / T)`` for ``(N, I)`` logits and ``(N,)`` labels. 1.0 when N = 0."""
    if logits.numel() == 0:
        return 1.0
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def clarify_threshold_for(
    preds: list[Prediction], rows: list[ManifestRow], target_accuracy: float
) -> float:
    """The clarify threshold chosen on validation predictions (see ``decoding``)."""
    return choose_clarify_threshold(
        [p.confidence for p in preds],
        [p.intent == r.intent for p, r in zip(preds, rows, strict=True)],
        target_accuracy,
    )


@dataclass
class Finalised:
    """The written model folder and the figures of its finalisation."""

    package: ModelPackage
    metrics: dict[str, float]


def finalise_package(
    model: JointModel, features: FeatureConfig, vocab: ParseVocab, ctc_vocab: CTCVocab,
    validator: Validator, settings: Settings, model_dir: Path, metadata: dict[str, Any],
    progress: bool,
) -> Finalised:
    """The end of every training run: temperature-scale the intent confidences on the
    calibration split, choose the clarify threshold on validation predictions, write the
    model folder and attach the transcript LM (``decode.lm.enabled``)."""
    model.eval()
    temperature = 1.0
    if settings.decode.calibrate:
        rows, feats = validator.splits[validator.calibration_split]
        index = {name: i for i, name in enumerate(vocab.intents)}
        labels = torch.tensor([index[r.intent] for r in rows])
        temperature = calibrate_temperature(
            _intent_logits(model, feats, settings.decode.batch_size), labels)
        log.info("intent temperature %.3f (fitted on %s, %d utterances)", temperature,
                 validator.calibration_split, len(rows))
    package = ModelPackage(model, features, vocab, 0.0, metadata, ctc_vocab,
                           intent_temperature=temperature)
    save_package(package, model_dir)
    metrics: dict[str, float] = {"intent_temperature": temperature}
    if settings.decode.lm.enabled and not isinstance(ctc_vocab, WordVocab):
        from model.training.lm_stage import attach_lm  # builds on this module

        lm = attach_lm(settings, model_dir, progress)
        package.lm_dir = lm.folder
        metrics.update({
            "lm_valid_wer_greedy": lm.greedy_wer, "lm_valid_wer_beam": lm.beam_wer,
            "lm_weight": lm.config.lm_weight, "lm_word_score": lm.config.word_score})
    preds = validator.predictions(package, "valid")
    package.clarify_threshold = clarify_threshold_for(
        preds, validator.splits["valid"][0], settings.decode.clarify_target_accuracy)
    save_package(package, model_dir)
    metrics["clarify_threshold"] = package.clarify_threshold
    return Finalised(package, metrics)


# --------------------------------------------------------------------------- files


def write_run_summary(
    layout: RunLayout, history: list[dict[str, float]], metrics: dict[str, Any], title: str,
    tracker: Tracker | None,
) -> None:
    """End of a training run: ``train_metrics.json``, the learning-curve plot, and the
    same plus history and model folder in the MLflow run (``tracker``, if any)."""
    metrics["train_utt_per_s"] = float(np.mean([h["train_utt_per_s"] for h in history]))
    layout.metrics.write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    plot_learning_curves(history, layout.curves, title)
    if tracker:
        tracker.log_metrics({"final/" + k: float(v) for k, v in metrics.items()}, len(history))
        tracker.log_artifact(layout.curves, "plots")
        tracker.log_artifact(layout.history, "plots")
        tracker.log_artifacts(layout.model_dir, "model")


def write_history(path: Path, history: list[dict[str, float]]) -> None:
    keys = sorted({k for row in history for k in row}, key=lambda k: (k != "epoch", k))
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
