"""What teacher and student training share: run layout, model construction, LR schedule,
time budget, checkpoints and RNG state, validation, history and the run summary."""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.data.grammar import Grammar
from model.data.manifest import ManifestRow
from model.decoding.greedy import choose_clarify_threshold
from model.evaluation.plots import plot_learning_curves
from model.evaluation.report import EvaluationReport, evaluate
from model.frontend.features import FeatureConfig
from model.inference.batch import predict_dataset
from model.inference.prediction import Prediction
from model.nn.network import EncoderConfig, JointModel, ModelConfig
from model.nn.package import ModelPackage
from model.nn.tokens import CharVocab, CTCVocab, ParseVocab, WordVocab
from model.training.dataset import SLUDataset
from voiceloop.settings import ModelSettings, Settings

__all__ = [
    "RunLayout",
    "TeacherLayout",
    "TrainResult",
    "WarmupCosine",
    "attach_lm_metrics",
    "build_ctc_vocab",
    "build_model",
    "build_vocab",
    "clarify_threshold_for",
    "epochs_in_budget",
    "restore_rng_state",
    "rng_state",
    "save_checkpoint",
    "seed_everything",
    "validate_model",
    "validation_row",
    "write_history",
    "write_run_summary",
]

log = logging.getLogger(__name__)


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


TeacherLayout = RunLayout


@dataclass
class TrainResult:
    """Summary of a training run."""

    model_dir: Path
    run_id: str | None
    epochs_run: int
    best_epoch: int
    best_valid: dict[str, float]
    parameters: int
    wall_s: float
    stopped: str
    clarify_threshold: float


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
    """Characters, or the parse vocabulary's words as whole-word CTC units."""
    return WordVocab(vocab.words) if settings.model.ctc_units == "word" else CharVocab()


def build_model(
    settings: Settings, vocab: ParseVocab, ctc_vocab: CTCVocab, shape: ModelSettings | None = None
) -> JointModel:
    """A fresh model of ``shape`` (default: the teacher's, ``settings.model``)."""
    m = shape or settings.model
    enc = EncoderConfig(
        n_mels=settings.features.n_mels, d_model=m.d_model, layers=m.encoder_layers,
        heads=m.heads, ffn_mult=m.ffn_mult, conv_kernel=m.conv_kernel,
        subsampling=m.subsampling, dropout=m.dropout, causal_conv=m.causal_conv,
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


def rng_state(np_rng: np.random.Generator, aug_gen: torch.Generator) -> dict[str, Any]:
    """The random streams a resumed run must continue exactly."""
    return {"np_rng": np_rng.bit_generator.state, "aug_gen": aug_gen.get_state(),
            "torch_rng": torch.get_rng_state()}


def restore_rng_state(
    state: dict[str, Any], np_rng: np.random.Generator, aug_gen: torch.Generator
) -> None:
    np_rng.bit_generator.state = state["np_rng"]
    aug_gen.set_state(state["aug_gen"])
    torch.set_rng_state(state["torch_rng"])


def validation_row(report: EvaluationReport) -> dict[str, float]:
    """The per-epoch validation metrics both training loops log."""
    o = report.overall
    return {
        "valid_semer": o.semer, "valid_wer": o.wer, "valid_cer": o.cer,
        "valid_intent_accuracy": o.intent_accuracy, "valid_slot_f1": o.slot_f1,
        "valid_exact_match": o.exact_match,
    }


def clarify_threshold_for(
    preds: list[Prediction], rows: list[ManifestRow], target_accuracy: float
) -> float:
    """The clarify threshold chosen on validation predictions (see ``decoding``)."""
    return choose_clarify_threshold(
        [p.confidence for p in preds],
        [p.intent == r.intent for p, r in zip(preds, rows, strict=True)],
        target_accuracy,
    )


def write_run_summary(
    layout: RunLayout, history: list[dict[str, float]], metrics: dict[str, Any], title: str,
    tracker: Any | None,
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


def load_ctc_units(model_dir: Path) -> str:
    """``"char"`` or ``"word"``: the CTC units of a saved model folder."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    return str((config.get("ctc_vocab") or {}).get("units", "char"))


def attach_lm_metrics(settings: Settings, model_dir: Path, progress: bool) -> dict[str, float]:
    """Attach the transcript LM (``model.training.lm_stage``) when ``decode.lm.enabled``; its
    validation figures as run metrics (empty when disabled)."""
    if not settings.decode.lm.enabled or load_ctc_units(model_dir) != "char":
        return {}
    from model.training.lm_stage import attach_lm  # lm_stage builds on this module

    lm = attach_lm(settings, model_dir, progress)
    return {"lm_valid_wer_greedy": lm.greedy_wer, "lm_valid_wer_beam": lm.beam_wer,
            "lm_weight": lm.config.lm_weight, "lm_word_score": lm.config.word_score,
            "lm_copy_values": float(lm.config.copy_values)}


def validate_model(
    model: JointModel, settings: Settings, data: SLUDataset, vocab: ParseVocab,
    ctc_vocab: CTCVocab, feats: FeatureConfig,
) -> tuple[EvaluationReport, list[Prediction]]:
    """Score ``model`` on ``data`` (its cached features); hands it back in training mode."""
    model.eval()
    package = ModelPackage(model, feats, vocab, ctc_vocab=ctc_vocab)
    preds = predict_dataset(package, [r.id for r in data.rows], data.feats,
                            settings.decode.batch_size, settings.decode.max_parse_len)
    model.train()
    return evaluate(data.rows, preds), preds


def write_history(path: Path, history: list[dict[str, float]]) -> None:
    keys = sorted({k for row in history for k in row}, key=lambda k: (k != "epoch", k))
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


