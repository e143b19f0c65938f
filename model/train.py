"""Teacher training: multitask loss, curriculum, checkpoints with resume, early stopping.

``train_teacher`` is what the CLI and the DVC stage ``train_teacher`` run. Everything it
writes goes to ``<workspace>/models/<profile>/teacher/``:

- ``checkpoints/last.pt`` (every epoch; resume point) and ``checkpoints/best.pt``;
- ``model/`` (the self-contained package of the best epoch, see ``model.package``);
- ``history.csv`` (per-epoch curves, DVC ``plots``), ``train_metrics.json`` (DVC
  ``metrics``), ``learning_curves.png``;
- ``run.json`` (the MLflow run id, so a resumed training continues the same run).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from model.data.corpus import CorpusLayout
from model.data.grammar import Grammar
from model.data.manifest import ManifestRow, read_manifest
from model.dataset import SLUDataset, collate, load_features, make_batches
from model.decoding import choose_clarify_threshold
from model.evaluation import EvaluationReport, evaluate
from model.features import FeatureConfig, SpecAugment, normalise_features
from model.inference import SLUPredictor
from model.losses import ctc_loss, intent_loss, make_weighting, parse_loss
from model.network import EncoderConfig, JointModel, ModelConfig
from model.package import ModelPackage, save_package
from model.plots import plot_learning_curves
from model.prediction import Prediction
from model.tokens import CharVocab, CTCVocab, ParseVocab, WordVocab
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
    "feature_config",
    "load_split",
    "predict_dataset",
    "random_subset",
    "restore_rng_state",
    "rng_state",
    "save_checkpoint",
    "seed_everything",
    "train_teacher",
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


def feature_config(settings: Settings) -> FeatureConfig:
    f = settings.features
    return FeatureConfig(
        sample_rate=settings.corpus.tts.sample_rate, n_mels=f.n_mels, win_ms=f.win_ms,
        hop_ms=f.hop_ms, normalise=f.normalise,
    )


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
    """Attach the transcript LM (``model.lm_stage``) when ``decode.lm.enabled``; its
    validation figures as run metrics (empty when disabled)."""
    if not settings.decode.lm.enabled or load_ctc_units(model_dir) != "char":
        return {}
    from model.lm_stage import attach_lm  # lm_stage builds on this module

    lm = attach_lm(settings, model_dir, progress)
    return {"lm_valid_wer_greedy": lm.greedy_wer, "lm_valid_wer_beam": lm.beam_wer,
            "lm_weight": lm.config.lm_weight, "lm_word_score": lm.config.word_score,
            "lm_copy_values": float(lm.config.copy_values)}


def predict_dataset(
    package: ModelPackage, data: SLUDataset, batch_size: int, max_parse_len: int,
    use_lm: bool = True,
) -> list[Prediction]:
    """Predictions for every utterance of ``data`` from its cached features (transcripts
    from the package's LM beam search when it has one and ``use_lm``)."""
    predictor = SLUPredictor(package, batch_size=batch_size, max_parse_len=max_parse_len,
                             use_lm=use_lm)
    return predictor.predict_features([r.id for r in data.rows], data.feats)


def validate_model(
    model: JointModel, settings: Settings, data: SLUDataset, vocab: ParseVocab,
    ctc_vocab: CTCVocab, feats: FeatureConfig,
) -> tuple[EvaluationReport, list[Prediction]]:
    """Score ``model`` on ``data`` (its cached features); hands it back in training mode."""
    model.eval()
    package = ModelPackage(model, feats, vocab, ctc_vocab=ctc_vocab)
    preds = predict_dataset(package, data, settings.decode.batch_size, settings.decode.max_parse_len)
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


def random_subset(
    rows: list[ManifestRow], feats: list, limit: int | None, seed: int
) -> tuple[list[ManifestRow], list]:
    """At most ``limit`` rows (with their features), drawn at random with ``seed`` and kept
    in their original order; everything when ``limit`` is None or not smaller."""
    if not limit or len(rows) <= limit:
        return rows, feats
    keep = sorted(np.random.default_rng(seed).choice(len(rows), limit, replace=False))
    return [rows[i] for i in keep], [feats[i] for i in keep]


def load_split(
    settings: Settings, split: str, progress: bool, features: FeatureConfig | None = None
) -> tuple[list[ManifestRow], list]:
    """Rows of ``split`` and their features ``[(T_i, F)]`` (fp16, cached).

    ``features`` defaults to the teacher's configuration from ``settings``. A ``global``
    configuration (the streaming student's) is served from the cache of raw log-mels,
    normalised with its statistics on the way out.
    """
    layout = CorpusLayout(settings.corpus_dir)
    path = layout.manifest(split)
    if not path.exists():
        raise FileNotFoundError(
            f"no {split} manifest at {path}: build the corpus first "
            f"(voiceloop corpus -p {settings.profile})"
        )
    rows = read_manifest(path)
    cfg = features or feature_config(settings)
    cached_cfg = replace(cfg, normalise="none", mean=None, std=None) if cfg.normalise == "global" else cfg
    feats = load_features(
        rows, layout.manifests_dir, cached_cfg,
        settings.workspace / "features" / settings.profile, progress,
    )
    if cfg.normalise == "global":
        feats = [normalise_features(f, cfg).to(torch.float16) for f in feats]
    return rows, feats


def train_teacher(
    settings: Settings,
    progress: bool = True,
    resume: bool = True,
    out_dir: Path | None = None,
    track: bool = True,
) -> TrainResult:
    """Train the teacher on the corpus of ``settings.profile``.

    Args:
        settings: parsed params.
        progress: show progress bars.
        resume: continue from ``checkpoints/last.pt`` when it exists.
        out_dir: run folder (default ``<models_dir>/teacher``).
        track: log to MLflow (params, per-step and per-epoch metrics, plots, model) and
            register the model as a version of ``<registered_model>-teacher``.
    """
    from model import lm_stage  # noqa: F401  loaded now: the run must not see later edits
    from voiceloop.tracking import RunLogger  # MLflow import is slow; only when training

    start_time = time.perf_counter()
    ts = settings.train
    torch.set_num_threads(ts.threads)
    seed_everything(settings.seed)
    layout = TeacherLayout(out_dir or settings.models_dir / "teacher")
    layout.root.mkdir(parents=True, exist_ok=True)

    grammar = Grammar.load(settings.corpus.language)
    train_rows, train_feats = load_split(settings, "train", progress)
    valid_rows, valid_feats = load_split(settings, "valid", progress)
    train_rows, train_feats = random_subset(
        train_rows, train_feats, ts.max_train_utterances, settings.seed + 1)
    valid_rows, valid_feats = random_subset(
        valid_rows, valid_feats, ts.eval_max_utterances, settings.seed)
    vocab = build_vocab(grammar, train_rows)
    ctc_vocab = build_ctc_vocab(settings, vocab)
    train = SLUDataset(train_rows, train_feats, ctc_vocab, vocab)
    valid = SLUDataset(valid_rows, valid_feats, ctc_vocab, vocab)
    feats_cfg = feature_config(settings)

    model = build_model(settings, vocab, ctc_vocab)
    weighting = make_weighting(
        ts.loss.weighting, ts.loss.weights, ts.loss.final_weights, ts.loss.schedule_epochs
    )
    optimizer = torch.optim.AdamW(
        [
            {"params": model.parameters(), "weight_decay": ts.weight_decay},
            {"params": weighting.parameters(), "weight_decay": 0.0},
        ],
        lr=ts.lr,
    )
    batches_per_epoch = len(make_batches(train.lengths, ts.batch_max_frames))
    schedule = WarmupCosine(ts.warmup_steps, ts.epochs * batches_per_epoch, ts.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    specaug = SpecAugment(**settings.features.specaugment.model_dump())
    np_rng = np.random.default_rng(settings.seed)
    aug_gen = torch.Generator().manual_seed(settings.seed)

    epoch, step, best_semer, best_epoch, stale = 0, 0, math.inf, -1, 0
    history: list[dict[str, float]] = []
    best_valid: dict[str, float] = {}
    run_id: str | None = None
    if resume and layout.last.exists():
        state = torch.load(layout.last, weights_only=False)
        model.load_state_dict(state["model"])
        weighting.load_state_dict(state["weighting"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        schedule.total = state.get("schedule_total", schedule.total)
        epoch, step = state["epoch"] + 1, state["step"]
        best_semer, best_epoch, stale = state["best_semer"], state["best_epoch"], state["stale"]
        history, best_valid = state["history"], state["best_valid"]
        restore_rng_state(state, np_rng, aug_gen)
        run_id = state.get("run_id")
        log.info("resumed from %s at epoch %d (step %d)", layout.last, epoch, step)

    tracker: RunLogger | None = None
    if track:
        tracker = (
            RunLogger.attach(settings, run_id) if run_id
            else RunLogger.start(settings, f"teacher-{settings.profile}",
                                 {"stage": "train_teacher", "profile": settings.profile})
        )
        run_id = tracker.run_id
        layout.run_file.write_text(json.dumps({"run_id": run_id}), encoding="utf-8")
        tracker.log_params({
            "profile": settings.profile, "seed": settings.seed,
            "features": settings.features.model_dump(), "model": settings.model.model_dump(),
            "train": settings.train.model_dump(), "parameters": model.num_parameters(),
            "train_utterances": len(train), "valid_utterances": len(valid),
        })

    stopped = "epochs"
    model.train()
    while epoch < ts.epochs:
        curriculum = epoch < ts.curriculum_epochs
        batches = make_batches(
            train.lengths, ts.batch_max_frames, rng=np_rng,
            order=train.difficulty() if curriculum else None,
        )
        sums = {"ctc": 0.0, "intent": 0.0, "parse": 0.0, "total": 0.0}
        epoch_start = time.perf_counter()
        bar = tqdm(batches, desc=f"epoch {epoch}", unit="batch", disable=not progress)
        for i, idx in enumerate(bar):
            batch = collate(train, idx)
            feats = specaug(batch.feats, batch.lengths, aug_gen)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=ts.bf16):
                out = model(feats, batch.lengths, batch.parse_in, batch.parse_pad_mask)
            assert out.parse_logits is not None
            losses = {
                "ctc": ctc_loss(out.ctc_logits, out.ctc_lengths, batch.ctc_targets,
                                batch.ctc_lengths),
                "intent": intent_loss(out.intent_logits, batch.intents),
                "parse": parse_loss(out.parse_logits, batch.parse_out, ts.loss.label_smoothing),
            }
            breakdown = weighting(losses, epoch + i / len(batches))
            optimizer.zero_grad(set_to_none=True)
            breakdown.total.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), ts.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            for task, value in breakdown.losses.items():
                sums[task] += value
            sums["total"] += float(breakdown.total.detach())
            if progress:
                bar.set_postfix(ctc=f"{breakdown.losses['ctc']:.2f}",
                                intent=f"{breakdown.losses['intent']:.2f}",
                                parse=f"{breakdown.losses['parse']:.2f}")
            if tracker and step % ts.log_every_steps == 0:
                tracker.log_metrics({
                    **{f"step/loss_{t}": v for t, v in breakdown.losses.items()},
                    **{f"step/weight_{t}": v for t, v in breakdown.weights.items()},
                    "step/loss_total": float(breakdown.total.detach()),
                    "step/lr": scheduler.get_last_lr()[0],
                    "step/grad_norm": float(grad_norm),
                }, step)
        train_s = time.perf_counter() - epoch_start
        report, _ = validate_model(model, settings, valid, vocab, ctc_vocab, feats_cfg)
        if epoch == 0 and ts.max_minutes is not None:
            fits = epochs_in_budget(start_time, epoch_start, ts.max_minutes)
            if fits < ts.epochs:
                schedule.total = max(1, fits) * batches_per_epoch
                log.info("time budget fits ~%d epochs: LR decays over %d steps", fits,
                         schedule.total)
        o = report.overall
        weights = breakdown.weights
        row = {
            "epoch": epoch,
            **{f"train_loss_{t}": sums[t] / len(batches) for t in ("ctc", "intent", "parse")},
            "train_loss_total": sums["total"] / len(batches),
            **{f"weight_{t}": w for t, w in weights.items()},
            **validation_row(report), "lr": scheduler.get_last_lr()[0],
            "train_utt_per_s": len(train) / train_s, "epoch_s": time.perf_counter() - epoch_start,
        }
        history.append(row)
        log.info(
            "epoch %d: semer %.3f wer %.3f intent %.3f slot-f1 %.3f (%.0f s)", epoch,
            o.semer, o.wer, o.intent_accuracy, o.slot_f1, row["epoch_s"],
        )
        if tracker:
            tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, epoch)
        improved = o.semer < best_semer - 1e-6
        if improved:
            best_semer, best_epoch, stale = o.semer, epoch, 0
            best_valid = {k: v for k, v in row.items() if k.startswith("valid_")}
            save_checkpoint(layout.best, {"model": model.state_dict(), "epoch": epoch})
        elif epoch + 1 > ts.min_epochs:
            stale += 1
        save_checkpoint(layout.last, {
            "model": model.state_dict(), "weighting": weighting.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "epoch": epoch, "step": step, "best_semer": best_semer, "best_epoch": best_epoch,
            "stale": stale, "history": history, "best_valid": best_valid,
            **rng_state(np_rng, aug_gen), "run_id": run_id,
            "schedule_total": schedule.total,
        })
        write_history(layout.history, history)
        epoch += 1
        if stale >= ts.early_stopping_patience:
            stopped = f"early stopping: no SemER gain for {stale} epochs"
            break
        elapsed_min = (time.perf_counter() - start_time) / 60
        if ts.max_minutes is not None and elapsed_min + row["epoch_s"] / 60 > ts.max_minutes:
            stopped = f"time budget: {elapsed_min:.1f} of {ts.max_minutes} minutes used"
            break

    # The best epoch becomes the model; its clarify threshold is set on validation data.
    model.load_state_dict(torch.load(layout.best, weights_only=False)["model"])
    _, preds = validate_model(model, settings, valid, vocab, ctc_vocab, feats_cfg)
    model.eval()  # _validate hands the model back in training mode
    threshold = clarify_threshold_for(preds, valid.rows, settings.decode.clarify_target_accuracy)
    wall_s = time.perf_counter() - start_time
    metadata = {
        "version": f"teacher-{settings.profile}-{run_id or 'local'}",
        "role": "teacher", "profile": settings.profile, "run_id": run_id,
        "best_epoch": best_epoch, "parameters": model.num_parameters(),
    }
    package = ModelPackage(model, feats_cfg, vocab, threshold, metadata, ctc_vocab)
    save_package(package, layout.model_dir)
    lm_metrics = attach_lm_metrics(settings, layout.model_dir, progress)
    metrics = {
        **lm_metrics,
        **best_valid, "best_epoch": best_epoch, "epochs_run": len(history),
        "parameters": model.num_parameters(), "wall_minutes": round(wall_s / 60, 2),
        "clarify_threshold": threshold,
    }
    write_run_summary(layout, history, metrics, f"teacher ({settings.profile})", tracker)
    if tracker:
        version = tracker.register(f"{settings.tracking.registered_model}-teacher", "model", "current")
        tracker.set_tags({"stopped": stopped, "registered_version": version})
        tracker.finish()
    return TrainResult(
        model_dir=layout.model_dir, run_id=run_id, epochs_run=len(history),
        best_epoch=best_epoch, best_valid=best_valid, parameters=model.num_parameters(),
        wall_s=wall_s, stopped=stopped, clarify_threshold=threshold,
    )
