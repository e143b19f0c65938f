"""Teacher training: multitask loss, curriculum, checkpoints with resume, early stopping.

``train_teacher`` is what the CLI and the DVC stage ``train_teacher`` run. Everything it
writes goes to ``<workspace>/models/<profile>/teacher/``:

- ``checkpoints/last.pt`` (every epoch; resume point) and ``checkpoints/best.pt``;
- ``model/`` (the self-contained package of the best epoch, see ``model.nn.package``);
- ``history.csv`` (per-epoch curves, DVC ``plots``), ``train_metrics.json`` (DVC
  ``metrics``), ``learning_curves.png``;
- ``run.json`` (the MLflow run id, so a resumed training continues the same run).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from model.data.grammar import Grammar
from model.frontend.cache import feature_config, load_split, random_subset
from model.frontend.features import SpecAugment
from model.nn.package import ModelPackage, save_package
from model.training.dataset import SLUDataset, collate, make_batches
from model.training.fit import (
    TeacherLayout,
    TrainResult,
    WarmupCosine,
    attach_lm_metrics,
    build_ctc_vocab,
    build_model,
    build_vocab,
    clarify_threshold_for,
    epochs_in_budget,
    restore_rng_state,
    rng_state,
    save_checkpoint,
    seed_everything,
    validate_model,
    validation_row,
    write_history,
    write_run_summary,
)
from model.training.losses import ctc_loss, intent_loss, make_weighting, parse_loss
from voiceloop.settings import Settings

__all__ = ["train_teacher"]

log = logging.getLogger(__name__)


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
