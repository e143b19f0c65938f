"""Student training: knowledge distillation from the teacher, dynamic-chunk streaming
training and quantisation-aware training, then export to an int8 deploy bundle.

``train_student`` is what ``voiceloop distill`` and the DVC stage ``distill`` run. It
writes to ``<workspace>/models/<profile>/student/``:

- ``checkpoints/{last,best}.pt`` (resume point; best among the deployable epochs);
- ``pre_qat_model/`` (the fp32 student when QAT started: the post-training-quantisation
  baseline the benchmark compares against);
- ``model/`` (torch package of the chosen epoch, weights baked onto the int8 grid; the
  streaming recogniser runs it), ``deploy/`` (ONNX int8 bundle users get),
  ``deploy_fp32/`` (its float twin);
- ``history.csv``, ``learning_curves.png``, ``train_metrics.json``, ``run.json``.

Data flow per batch: cached raw log-mels → utterance-normalised for the teacher (its
training condition) and globally normalised + SpecAugment for the student (streamable).
The teacher runs frozen in eval mode under the same teacher-forced parse prefix, so
every KD term compares distributions over the same targets.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

import model.training.lm_stage  # noqa: F401  loaded before the hour of training, not after it
from model.decoding.greedy import greedy_parse
from model.evaluation.compare import Comparison, compare_models
from model.frontend.cache import load_split, random_subset
from model.frontend.features import FeatureConfig, SpecAugment, global_stats, normalise_features
from model.nn.export import export_onnx, quantize_bundle
from model.nn.network import JointModel, JointOutput, chunk_attention_mask
from model.nn.package import ModelPackage, load_package, save_package
from model.nn.qat import QATHandle, prepare_qat
from model.nn.tokens import CTCVocab, ParseVocab
from model.training.dataset import SLUDataset, collate, make_batches, pad_parses
from model.training.fit import (
    RunLayout,
    WarmupCosine,
    attach_lm_metrics,
    build_model,
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
from model.training.kd_losses import hidden_mse, kd_ctc, kd_intent, kd_parse
from model.training.losses import ctc_loss, intent_loss, parse_loss
from voiceloop.settings import Settings

__all__ = [
    "DistillOutcome",
    "StudentLayout",
    "StudentResult",
    "TeacherTargets",
    "ctc_frame_ms",
    "run_distill_stage",
    "student_losses",
    "teacher_targets",
    "train_student",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudentLayout(RunLayout):
    """Files of one student run: those of any run plus the student's exports."""

    @property
    def pre_qat_dir(self) -> Path:
        return self.root / "pre_qat_model"

    @property
    def deploy_dir(self) -> Path:
        return self.root / "deploy"

    @property
    def deploy_fp32_dir(self) -> Path:
        return self.root / "deploy_fp32"


@dataclass
class StudentResult:
    """Summary of a distillation run."""

    model_dir: Path
    deploy_dir: Path
    run_id: str | None
    epochs_run: int
    best_epoch: int
    qat_start_epoch: int | None
    best_valid: dict[str, float]
    parameters: int
    wall_s: float
    stopped: str


def ctc_frame_ms(model: JointModel, hop_ms: float) -> float:
    """Duration of one CTC label slot in ms (subsampling × hop / upsampling)."""
    return model.cfg.encoder.subsampling * hop_ms / model.cfg.ctc_upsample


def _parse_tensors(sequences: list[list[int]]) -> tuple[Tensor, Tensor, Tensor]:
    """Token id lists (no bos/eos) → decoder input, target and padding mask ``(B, U)``."""
    parse_in, parse_out = pad_parses([[ParseVocab.BOS, *s, ParseVocab.EOS] for s in sequences])
    return parse_in, parse_out, parse_in == ParseVocab.PAD


@torch.no_grad()
def _teacher_outputs(
    teacher: JointModel, feats: Tensor, lengths: Tensor, parse_in: Tensor | None,
    parse_pad: Tensor | None, max_parse_len: int, bf16: bool,
) -> tuple[JointOutput, Tensor, Tensor, Tensor]:
    """Teacher outputs under teacher forcing.

    With ``parse_in`` None (unlabelled audio) the teacher first decodes its own parse,
    which then serves as the decoder prefix for both models and as the student's
    target. Returns the outputs and the ``(parse_in, parse_out, parse_pad)`` used.
    """
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        if parse_in is None:
            enc, _, pad = teacher.encode(feats, lengths)
            sequences, _ = greedy_parse(teacher, enc, pad, max_parse_len)
            parse_in, parse_out, parse_pad = _parse_tensors(sequences)
        else:
            parse_out = torch.empty(0)
        out = teacher(feats, lengths, parse_in, parse_pad)
    assert parse_pad is not None
    return out, parse_in, parse_out, parse_pad


@dataclass
class TeacherTargets:
    """The frozen teacher's outputs for every training utterance, computed once.

    The teacher runs in eval mode on clean (un-augmented) features, so its outputs do not
    change between epochs; computing them once removes the teacher's forward pass from
    every training step (about 40 % of the step on this CPU). Per utterance i:

    Attributes:
        ctc: ``(S_i, C)`` CTC logits (fp16), ``S_i`` valid 20 ms slots.
        intent: ``(N, I)`` intent logits.
        parse_in, parse_out: ``(U_i,)`` decoder input (``<bos>`` + parse) and target
            (parse + ``<eos>``): the ground truth, or the teacher's own decode when the
            audio is unlabelled.
        parse: ``(U_i, P)`` parse-token logits (fp16) under that prefix.
        encoder: ``(T_i, D)`` encodings (fp16), kept only for hidden-state KD.
    """

    ctc: list[Tensor]
    intent: Tensor
    parse_in: list[Tensor]
    parse_out: list[Tensor]
    parse: list[Tensor]
    encoder: list[Tensor] | None

    def batch(self, idx: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                              Tensor | None, Tensor | None]:
        """Padded tensors for utterances ``idx``: ctc ``(B, S, C)``, ctc lengths ``(B,)``,
        intent ``(B, I)``, parse_in/parse_out ``(B, U)``, parse logits ``(B, U, P)``, and
        encoder ``(B, T, D)`` + lengths (or None)."""
        pad = nn.utils.rnn.pad_sequence

        def padded(items: list[Tensor], value: float = 0.0) -> Tensor:
            return pad(items, batch_first=True, padding_value=value)

        ctc = padded([self.ctc[i] for i in idx]).float()
        ctc_lengths = torch.tensor([self.ctc[i].size(0) for i in idx])
        parse_in = padded([self.parse_in[i] for i in idx], ParseVocab.PAD).long()
        parse_out = padded([self.parse_out[i] for i in idx], ParseVocab.PAD).long()
        parse = padded([self.parse[i] for i in idx]).float()
        enc = enc_lengths = None
        if self.encoder is not None:
            enc = padded([self.encoder[i] for i in idx]).float()
            enc_lengths = torch.tensor([self.encoder[i].size(0) for i in idx])
        return ctc, ctc_lengths, self.intent[idx], parse_in, parse_out, parse, enc, enc_lengths


def teacher_targets(
    teacher: JointModel, features: FeatureConfig, data: SLUDataset, max_frames: int,
    labelled: bool, max_parse_len: int, bf16: bool, keep_encoder: bool, progress: bool,
) -> TeacherTargets:
    """Run the teacher once over ``data`` (raw features) and keep its outputs."""
    n = len(data)
    ctc: list[Tensor] = [torch.empty(0)] * n
    parse_in: list[Tensor] = [torch.empty(0)] * n
    parse_out: list[Tensor] = [torch.empty(0)] * n
    parse: list[Tensor] = [torch.empty(0)] * n
    encoder: list[Tensor] | None = [torch.empty(0)] * n if keep_encoder else None
    intent = torch.zeros(n, teacher.cfg.n_intents)
    batches = make_batches(data.lengths, max_frames)
    for idx in tqdm(batches, desc="teacher targets", unit="batch", disable=not progress):
        batch = collate(data, idx, features)
        out, p_in, p_out, p_pad = _teacher_outputs(
            teacher, batch.feats, batch.lengths, batch.parse_in if labelled else None,
            batch.parse_pad_mask if labelled else None, max_parse_len, bf16)
        if labelled:
            p_out = batch.parse_out
        assert out.parse_logits is not None
        for j, i in enumerate(idx):
            u = int((~p_pad[j]).sum())
            ctc[i] = out.ctc_logits[j, : int(out.ctc_lengths[j])].half()
            parse_in[i], parse_out[i] = p_in[j, :u].clone(), p_out[j, :u].clone()
            parse[i] = out.parse_logits[j, :u].half()
            intent[i] = out.intent_logits[j].float()
            if encoder is not None:
                encoder[i] = out.encoder[j, : int(out.encoder_lengths[j])].half()
    return TeacherTargets(ctc, intent, parse_in, parse_out, parse, encoder)


def warm_start(
    student: JointModel, source: ModelPackage, vocab: ParseVocab, ctc_vocab: CTCVocab,
) -> None:
    """Copy ``source``'s weights into ``student`` (in place).

    Raises:
        ValueError: the vocabularies differ (the heads' rows would mean other tokens) or
            the architectures differ (names both configurations).
    """
    if source.parse_vocab.tokens != vocab.tokens or source.ctc_vocab.to_json() != ctc_vocab.to_json():
        raise ValueError("warm start: the source model's vocabularies differ from the "
                         "teacher's; train from scratch instead")
    if getattr(source.model, "cfg", None) != student.cfg:
        raise ValueError(f"warm start: architecture differs: {source.model.cfg} vs {student.cfg}")
    student.load_state_dict(source.model.state_dict())


def _chunk_mask(
    student: JointModel, lengths: Tensor, rng: np.random.Generator, chunks: list[int],
    full_context_p: float, left_chunks: int | None,
) -> Tensor | None:
    """Dynamic-chunk training: full context or a random chunk size for this batch."""
    if not chunks or rng.random() < full_context_p:
        return None
    frames = int(student.encoder.subsampling.output_lengths(lengths).max())
    return chunk_attention_mask(frames, int(rng.choice(chunks)), left_chunks)


def student_losses(
    student: JointModel, train: SLUDataset, idx: list[int], targets: TeacherTargets,
    student_cfg: FeatureConfig, settings: Settings, specaug: SpecAugment,
    aug_gen: torch.Generator, np_rng: np.random.Generator, projection: nn.Module,
) -> tuple[dict[str, Tensor], Tensor, Tensor | None]:
    """One training step's loss terms for utterances ``idx`` of ``train`` (raw features).

    Returns each term (KD and, for labelled data, ground truth), their weighted total and
    the chunk mask the batch was trained with (None = full context).
    """
    st = settings.student
    ds = st.distill
    batch = collate(train, idx, student_cfg)
    s_feats = specaug(batch.feats, batch.lengths, aug_gen)
    (t_ctc, t_ctc_lengths, t_intent, parse_in, parse_out, t_parse, t_enc,
     t_enc_lengths) = targets.batch(idx)
    parse_pad = parse_in == ParseVocab.PAD
    mask = _chunk_mask(student, batch.lengths, np_rng, st.streaming.chunks,
                       st.streaming.full_context_p, st.streaming.left_chunks)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=st.train.bf16):
        s_out = student(s_feats, batch.lengths, parse_in, parse_pad, mask)
    assert s_out.parse_logits is not None
    T = ds.temperature
    terms: dict[str, Tensor] = {
        "kd_ctc": kd_ctc(s_out.ctc_logits, s_out.ctc_lengths, t_ctc, t_ctc_lengths, T),
        "kd_intent": kd_intent(s_out.intent_logits, t_intent, T),
        "kd_parse": kd_parse(s_out.parse_logits, t_parse, parse_pad, T),
    }
    if t_enc is not None and t_enc_lengths is not None:
        terms["kd_hidden"] = hidden_mse(s_out.encoder, s_out.encoder_lengths,
                                        t_enc, t_enc_lengths, projection)
    if ds.labelled:
        terms["ctc"] = ctc_loss(s_out.ctc_logits, s_out.ctc_lengths, batch.ctc_targets,
                                batch.ctc_lengths)
        terms["intent"] = intent_loss(s_out.intent_logits, batch.intents)
        terms["parse"] = parse_loss(s_out.parse_logits, parse_out, st.train.loss.label_smoothing)
    w, kw = ds.weights, ds.kd_weights
    weights = {"kd_ctc": kw["ctc"], "kd_intent": kw["intent"], "kd_parse": kw["parse"],
               "kd_hidden": kw["hidden"], "ctc": w["ctc"], "intent": w["intent"],
               "parse": w["parse"]}
    total = sum((weights[k] * v for k, v in terms.items()), torch.zeros(()))
    return terms, total, mask


def train_student(
    settings: Settings,
    teacher_dir: Path | None = None,
    progress: bool = True,
    resume: bool = True,
    out_dir: Path | None = None,
    track: bool = True,
    init_from: Path | None = None,
) -> StudentResult:
    """Distil the teacher into the student of ``settings.student`` and export it.

    Args:
        settings: parsed params (``student`` section).
        teacher_dir: teacher package folder (default ``<models_dir>/teacher/model``).
        progress: progress bars.
        resume: continue from ``checkpoints/last.pt`` when it exists.
        out_dir: run folder (default ``<models_dir>/student``).
        track: MLflow logging, and registration of the deploy bundle as a pyfunc.
        init_from: a float student package (e.g. an earlier run's ``pre_qat_model/``) to
            start from instead of random weights: the retraining flow's warm start, and the
            way to give a student more epochs than one time budget holds. Same architecture
            and vocabularies required; ignored when resuming a checkpoint.
    """
    from voiceloop.tracking import RunLogger  # MLflow import is slow; only when training

    start_time = time.perf_counter()
    st = settings.student
    ts, ds = st.train, st.distill
    torch.set_num_threads(ts.threads)
    seed_everything(settings.seed)
    layout = StudentLayout(out_dir or settings.models_dir / "student")
    layout.root.mkdir(parents=True, exist_ok=True)

    teacher_dir = teacher_dir or settings.models_dir / "teacher" / "model"
    teacher_pkg = load_package(teacher_dir)
    teacher = teacher_pkg.model.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    vocab, ctc_vocab = teacher_pkg.parse_vocab, teacher_pkg.ctc_vocab

    raw_cfg = replace(teacher_pkg.features, normalise="none", mean=None, std=None)
    train_rows, train_raw = load_split(settings, "train", progress, raw_cfg)
    valid_rows, valid_raw = load_split(settings, "valid", progress, raw_cfg)
    train_rows, train_raw = random_subset(
        train_rows, train_raw, ts.max_train_utterances, settings.seed + 1)
    valid_rows, valid_raw = random_subset(
        valid_rows, valid_raw, ts.eval_max_utterances, settings.seed)
    mean, std = global_stats(train_raw)
    student_cfg = replace(raw_cfg, normalise="global", mean=mean, std=std)
    train = SLUDataset(train_rows, train_raw, ctc_vocab, vocab)
    valid = SLUDataset(
        valid_rows, [normalise_features(f, student_cfg) for f in valid_raw], ctc_vocab, vocab)

    student = build_model(settings, vocab, ctc_vocab, st.model)
    resuming = resume and layout.last.exists()
    if init_from is not None and not resuming:
        warm_start(student, load_package(init_from), vocab, ctc_vocab)
        log.info("student warm-started from %s", init_from)
    rates = (ctc_frame_ms(student, raw_cfg.hop_ms), ctc_frame_ms(teacher, raw_cfg.hop_ms))
    if rates[0] != rates[1]:
        raise ValueError(
            f"student CTC slots are {rates[0]} ms but the teacher's are {rates[1]} ms: choose "
            "student subsampling/ctc_upsample so that frame-level distillation aligns")
    projection = nn.Linear(student.cfg.encoder.d_model, teacher.cfg.encoder.d_model)
    optimizer = torch.optim.AdamW(
        [{"params": student.parameters()}, {"params": projection.parameters()}],
        lr=ts.lr, weight_decay=ts.weight_decay,
    )
    batches_per_epoch = len(make_batches(train.lengths, ts.batch_max_frames))
    schedule = WarmupCosine(ts.warmup_steps, ts.epochs * batches_per_epoch, ts.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    specaug = SpecAugment(**settings.features.specaugment.model_dump())
    np_rng = np.random.default_rng(settings.seed)
    aug_gen = torch.Generator().manual_seed(settings.seed)
    qat_start = math.ceil(st.qat.start_fraction * ts.epochs) if st.qat.enabled else None

    epoch, step, best_semer, best_epoch, stale = 0, 0, math.inf, -1, 0
    history: list[dict[str, float]] = []
    best_valid: dict[str, float] = {}
    run_id: str | None = None
    qat: QATHandle | None = None
    if resuming:
        state = torch.load(layout.last, weights_only=False)
        qat_start = state["qat_start"]
        if state["qat_active"]:
            qat = prepare_qat(student, per_sample_activations=True)
        student.load_state_dict(state["model"])
        projection.load_state_dict(state["projection"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        schedule.total = state["schedule_total"]
        epoch, step = state["epoch"] + 1, state["step"]
        best_semer, best_epoch, stale = state["best_semer"], state["best_epoch"], state["stale"]
        history, best_valid = state["history"], state["best_valid"]
        restore_rng_state(state, np_rng, aug_gen)
        run_id = state.get("run_id")
        log.info("resumed from %s at epoch %d", layout.last, epoch)

    tracker: RunLogger | None = None
    if track:
        tracker = (
            RunLogger.attach(settings, run_id) if run_id
            else RunLogger.start(settings, f"student-{settings.profile}",
                                 {"stage": "distill", "profile": settings.profile,
                                  "teacher_version": teacher_pkg.version})
        )
        run_id = tracker.run_id
        layout.run_file.write_text(json.dumps({"run_id": run_id}), encoding="utf-8")
        tracker.log_params({
            "profile": settings.profile, "seed": settings.seed,
            "student": st.model_dump(), "parameters": student.num_parameters(),
            "teacher_parameters": teacher.num_parameters(), "teacher": str(teacher_dir),
            "teacher_version": teacher_pkg.version, "train_utterances": len(train),
            "init_from": str(init_from) if init_from else "",
        })

    targets = teacher_targets(
        teacher, teacher_pkg.features, train, ts.batch_max_frames, ds.labelled,
        settings.decode.max_parse_len, ts.bf16, ds.kd_weights["hidden"] > 0, progress)
    stopped = "epochs"
    student.train()
    while epoch < ts.epochs:
        if qat_start is not None and epoch >= qat_start and qat is None:
            # Keep the float student QAT starts from: the PTQ baseline of the benchmark.
            student.eval()
            save_package(ModelPackage(student, student_cfg, vocab, 0.0,
                                      {"version": f"student-pre-qat-{settings.profile}",
                                       "role": "student-pre-qat"}, ctc_vocab),
                         layout.pre_qat_dir)
            student.train()
            qat = prepare_qat(student, per_sample_activations=True)
            # Only epochs trained with rounding may be chosen from now on.
            best_semer, best_epoch, stale = math.inf, -1, 0
            log.info("epoch %d: quantisation-aware training starts (%d layers)", epoch,
                     len(qat.modules))
        batches = make_batches(train.lengths, ts.batch_max_frames, rng=np_rng)
        sums: dict[str, float] = {}
        epoch_start = time.perf_counter()
        bar = tqdm(batches, desc=f"student epoch {epoch}", unit="batch", disable=not progress)
        for i, idx in enumerate(bar):
            terms, total, mask = student_losses(
                student, train, idx, targets, student_cfg, settings, specaug, aug_gen, np_rng,
                projection)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            grad_norm = nn.utils.clip_grad_norm_(student.parameters(), ts.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            values = {k: float(v.detach()) for k, v in terms.items()}
            values["total"] = float(total.detach())
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            if progress:
                bar.set_postfix(kd_ctc=f"{values['kd_ctc']:.2f}", total=f"{values['total']:.2f}")
            if tracker and step % ts.log_every_steps == 0:
                tracker.log_metrics({
                    **{f"step/loss_{k}": v for k, v in values.items()},
                    "step/lr": scheduler.get_last_lr()[0], "step/grad_norm": float(grad_norm),
                    "step/qat": float(qat is not None),
                    "step/chunk": 0.0 if mask is None else float(
                        (~mask[0]).sum()),  # frames the first query may see
                }, step)
        train_s = time.perf_counter() - epoch_start
        report, _ = validate_model(student, settings, valid, vocab, ctc_vocab, student_cfg)
        if epoch == 0 and ts.max_minutes is not None:
            fits = epochs_in_budget(start_time, epoch_start, ts.max_minutes)
            if fits < ts.epochs:
                schedule.total = max(1, fits) * batches_per_epoch
                if qat_start is not None:
                    qat_start = min(max(1, math.ceil(st.qat.start_fraction * fits)), fits - 1)
                log.info("time budget fits ~%d epochs; QAT from epoch %s", fits, qat_start)
        o = report.overall
        row = {
            "epoch": epoch,
            **{f"train_loss_{k}": v / len(batches) for k, v in sums.items()},
            **validation_row(report), "lr": scheduler.get_last_lr()[0],
            "qat": float(qat is not None), "train_utt_per_s": len(train) / train_s,
            "epoch_s": time.perf_counter() - epoch_start,
        }
        history.append(row)
        log.info("student epoch %d%s: semer %.3f wer %.3f intent %.3f slot-f1 %.3f (%.0f s)",
                 epoch, " [QAT]" if qat else "", o.semer, o.wer, o.intent_accuracy,
                 o.slot_f1, row["epoch_s"])
        if tracker:
            tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, epoch)
        if o.semer < best_semer - 1e-6:
            best_semer, best_epoch, stale = o.semer, epoch, 0
            best_valid = {k: v for k, v in row.items() if k.startswith("valid_")}
            save_checkpoint(layout.best, {"model": student.state_dict(), "epoch": epoch,
                                          "qat_active": qat is not None})
        elif epoch + 1 > ts.min_epochs:
            stale += 1
        save_checkpoint(layout.last, {
            "model": student.state_dict(), "projection": projection.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "schedule_total": schedule.total, "epoch": epoch, "step": step,
            "best_semer": best_semer, "best_epoch": best_epoch, "stale": stale,
            "history": history, "best_valid": best_valid, **rng_state(np_rng, aug_gen),
            "run_id": run_id, "qat_start": qat_start, "qat_active": qat is not None,
        })
        write_history(layout.history, history)
        epoch += 1
        if stale >= ts.early_stopping_patience and (qat_start is None or qat is not None):
            stopped = f"early stopping: no SemER gain for {stale} epochs"
            break
        elapsed_min = (time.perf_counter() - start_time) / 60
        if ts.max_minutes is not None and elapsed_min + row["epoch_s"] / 60 > ts.max_minutes:
            stopped = f"time budget: {elapsed_min:.1f} of {ts.max_minutes} minutes used"
            break

    best = torch.load(layout.best, weights_only=False)
    if best["qat_active"] and qat is None:
        qat = prepare_qat(student, per_sample_activations=True)
    student.load_state_dict(best["model"])
    if qat is not None:
        qat.strip(bake=True)  # weights now lie on the int8 grid the deploy bundle uses
    _, preds = validate_model(student, settings, valid, vocab, ctc_vocab, student_cfg)
    student.eval()
    threshold = clarify_threshold_for(preds, valid.rows, settings.decode.clarify_target_accuracy)
    wall_s = time.perf_counter() - start_time
    metadata: dict[str, Any] = {
        "version": f"student-{settings.profile}-{run_id or 'local'}",
        "role": "student", "profile": settings.profile, "run_id": run_id,
        "best_epoch": best_epoch, "parameters": student.num_parameters(),
        "teacher_version": teacher_pkg.version, "qat": qat is not None,
        "streaming_chunks": st.streaming.chunks,
    }
    package = ModelPackage(student, student_cfg, vocab, threshold, metadata, ctc_vocab)
    save_package(package, layout.model_dir)
    # Tuned for the student's own posteriors; the bundles get a copy through export.
    lm_metrics = attach_lm_metrics(settings, layout.model_dir, progress)
    if lm_metrics:
        package.lm_dir = layout.model_dir / "lm"
    export_onnx(package, layout.deploy_fp32_dir)
    quantize_bundle(layout.deploy_fp32_dir, layout.deploy_dir)
    metrics = {
        **best_valid, **lm_metrics, "best_epoch": best_epoch, "epochs_run": len(history),
        "qat_start_epoch": qat_start if qat_start is not None else -1,
        "parameters": student.num_parameters(), "teacher_parameters": teacher.num_parameters(),
        "wall_minutes": round(wall_s / 60, 2), "clarify_threshold": threshold,
    }
    write_run_summary(layout, history, metrics, f"student ({settings.profile})", tracker)
    if tracker:
        tracker.set_tags({"stopped": stopped})
        tracker.finish()
    return StudentResult(
        model_dir=layout.model_dir, deploy_dir=layout.deploy_dir, run_id=run_id,
        epochs_run=len(history), best_epoch=best_epoch, qat_start_epoch=qat_start,
        best_valid=best_valid, parameters=student.num_parameters(), wall_s=wall_s,
        stopped=stopped,
    )


@dataclass
class DistillOutcome:
    """What the ``distill`` stage produced: the training result, the teacher/student
    comparison on the test split, and the registry reference of the deploy bundle."""

    result: StudentResult
    comparison: Comparison
    registered: str | None


def run_distill_stage(
    settings: Settings, teacher_dir: Path | None = None, progress: bool = True,
    resume: bool = True, track: bool = True, out_dir: Path | None = None,
    init_from: Path | None = None,
) -> DistillOutcome:
    """``train_student``, then score the int8 bundle against the teacher on the test
    split, log the comparison to the student's MLflow run and register the bundle as a
    pyfunc model ``<registered_model>@candidate`` (aliases, not deprecated stages)."""
    # Imported before the hour of training, not after it: a run must use one version of
    # the code (a module edited mid-run once broke the final registration step).
    from serving.pyfunc import log_pyfunc, register_pyfunc
    from voiceloop.tracking import RunLogger

    teacher_dir = teacher_dir or settings.models_dir / "teacher" / "model"
    result = train_student(settings, teacher_dir, progress, resume, out_dir=out_dir, track=track,
                           init_from=init_from)
    root = result.model_dir.parent
    comparison = compare_models(settings, teacher_dir, root, "test", progress)
    registered = None
    if track and result.run_id:
        tracker = RunLogger.attach(settings, result.run_id)
        tracker.log_metrics({f"compare/{k}": float(v) for k, v in comparison.flat().items()}, 0)
        tracker.log_artifacts(root / "eval" / "test", "evaluation/test")
        tracker.log_artifacts(result.deploy_dir, "deploy")
        info = log_pyfunc(tracker.client, result.run_id, result.deploy_dir, "pyfunc",
                          threads=1, batch_size=settings.decode.batch_size,
                          max_parse_len=settings.decode.max_parse_len)
        name = settings.tracking.registered_model
        version = register_pyfunc(tracker.client, info, name, "candidate")
        tracker.set_tags({"registered_version": version})
        tracker.finish()
        registered = f"models:/{name}@candidate (version {version})"
    return DistillOutcome(result, comparison, registered)
