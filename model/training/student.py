"""Student training: knowledge distillation from the teacher, dynamic-chunk streaming
training and quantisation-aware training, then export to an int8 deploy bundle.

``train_student`` is what ``voiceloop distill`` and the DVC stage ``distill`` run (through
the stage layer, which also compares it with the teacher and registers it); the loop is
:func:`model.training.fit.fit`. It writes to ``<workspace>/models/<profile>/student/``:

- ``checkpoints/{last,best}.pt`` (resume point; best among the deployable epochs);
- ``pre_qat_model/`` (the fp32 student when QAT started: the post-training-quantisation
  baseline the benchmark compares against);
- ``model/`` (torch package of the chosen epoch, weights baked onto the int8 grid; the
  streaming recogniser runs it), ``deploy/`` (ONNX int8 bundle users get),
  ``deploy_fp32/`` (its float twin);
- ``history.csv``, ``learning_curves.png``, ``train_metrics.json``, ``run.json``.

Data flow per batch: cached raw log-mels → the frozen teacher's outputs, computed once
per run on clean utterance-normalised features (its training condition); for the student
the same raw features are voice-perturbed (frequency warp and tilt only, so frames stay
aligned with the teacher's), causally normalised (streamable) and SpecAugmented. With a
parse decoder on both sides the teacher runs under the same teacher-forced parse prefix,
so every KD term compares distributions over the same targets.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

import model.training.lm_stage  # noqa: F401  loaded before the hour of training, not after it
from model.decoding.greedy import greedy_parse
from model.frontend.cache import load_split, random_subset
from model.frontend.features import FeatureConfig, SpecAugment, global_stats
from model.nn.export import export_onnx, quantize_bundle
from model.nn.network import JointModel, JointOutput, chunk_attention_mask
from model.nn.package import ModelPackage, load_package, save_package
from model.nn.qat import QATHandle, prepare_qat
from model.nn.tokens import CTCVocab, ParseVocab
from model.training.dataset import SLUDataset, collate, make_batches, pad_parses
from model.training.fit import (
    FitTask,
    RunLayout,
    StepResult,
    Tracker,
    Validator,
    build_model,
    capped_threads,
    finalise_package,
    fit,
    resolve_bf16,
    seed_everything,
    write_run_summary,
)
from model.training.kd_losses import hidden_mse, kd_ctc, kd_intent, kd_parse
from model.training.losses import ctc_loss, intent_loss, parse_loss
from model.training.teacher import make_warp, specaugment_strength
from voiceloop.settings import Settings

__all__ = [
    "StudentLayout",
    "StudentResult",
    "StudentTask",
    "TeacherTargets",
    "ctc_frame_ms",
    "init_from_teacher",
    "teacher_targets",
    "train_student",
    "warm_start",
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
    epochs_run: int
    best_epoch: int
    qat_start_epoch: int | None
    best_valid: dict[str, float]
    parameters: int
    teacher_parameters: int
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
) -> tuple[JointOutput, Tensor | None, Tensor | None, Tensor | None]:
    """Teacher outputs, under teacher forcing when it has a parse decoder.

    With ``parse_in`` None (unlabelled audio) a decoder teacher first decodes its own
    parse, which then serves as the decoder prefix for both models and as the student's
    target. Returns the outputs and the ``(parse_in, parse_out, parse_pad)`` used (all
    None for a teacher without a decoder).
    """
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        if teacher.parse_decoder is None:
            return teacher(feats, lengths), None, None, None
        if parse_in is None:
            enc, _, pad = teacher.encode(feats, lengths)
            sequences, _ = greedy_parse(teacher, enc, pad, max_parse_len)
            parse_in, parse_out, parse_pad = _parse_tensors(sequences)
        else:
            parse_out = torch.empty(0)
        out = teacher(feats, lengths, parse_in, parse_pad)
    return out, parse_in, parse_out, parse_pad


@dataclass
class TeacherTargets:
    """The frozen teacher's outputs for every training utterance, computed once.

    The teacher runs in eval mode on clean (un-augmented) features, so its outputs do not
    change between epochs; computing them once removes the teacher's forward pass from
    every training step (about 40 % of the step on a CPU). Per utterance i:

    Attributes:
        ctc: ``(S_i, C)`` CTC logits (fp16), ``S_i`` valid 20 ms slots.
        intent: ``(N, I)`` intent logits.
        parse_in, parse_out: ``(U_i,)`` decoder input (``<bos>`` + parse) and target
            (parse + ``<eos>``): the ground truth, or the teacher's own decode when the
            audio is unlabelled. None for a teacher without a parse decoder.
        parse: ``(U_i, P)`` parse-token logits (fp16) under that prefix, or None.
        encoder: ``(T_i, D)`` encodings (fp16), kept only for hidden-state KD.
    """

    ctc: list[Tensor]
    intent: Tensor
    parse_in: list[Tensor] | None
    parse_out: list[Tensor] | None
    parse: list[Tensor] | None
    encoder: list[Tensor] | None

    def batch(self, idx: list[int]) -> dict[str, Tensor | None]:
        """Padded tensors for utterances ``idx``: ``ctc`` ``(B, S, C)``, ``ctc_lengths``
        ``(B,)``, ``intent`` ``(B, I)``, ``parse_in``/``parse_out`` ``(B, U)``, ``parse``
        ``(B, U, P)``, ``encoder`` ``(B, T, D)`` + ``encoder_lengths`` (None where absent)."""
        pad = nn.utils.rnn.pad_sequence

        def padded(items: list[Tensor], value: float = 0.0) -> Tensor:
            return pad(items, batch_first=True, padding_value=value)

        out: dict[str, Tensor | None] = {
            "ctc": padded([self.ctc[i] for i in idx]).float(),
            "ctc_lengths": torch.tensor([self.ctc[i].size(0) for i in idx]),
            "intent": self.intent[idx],
            "parse_in": None, "parse_out": None, "parse": None,
            "encoder": None, "encoder_lengths": None,
        }
        if self.parse_in is not None and self.parse_out is not None and self.parse is not None:
            out["parse_in"] = padded([self.parse_in[i] for i in idx], ParseVocab.PAD).long()
            out["parse_out"] = padded([self.parse_out[i] for i in idx], ParseVocab.PAD).long()
            out["parse"] = padded([self.parse[i] for i in idx]).float()
        if self.encoder is not None:
            out["encoder"] = padded([self.encoder[i] for i in idx]).float()
            out["encoder_lengths"] = torch.tensor([self.encoder[i].size(0) for i in idx])
        return out


def teacher_targets(
    teacher: JointModel, features: FeatureConfig, data: SLUDataset, max_frames: int,
    labelled: bool, max_parse_len: int, bf16: bool, keep_encoder: bool, progress: bool,
) -> TeacherTargets:
    """Run the teacher once over ``data`` (raw features, normalised with ``features``)."""
    n = len(data)
    decoder = teacher.parse_decoder is not None
    ctc: list[Tensor] = [torch.empty(0)] * n
    parse_in: list[Tensor] | None = [torch.empty(0)] * n if decoder else None
    parse_out: list[Tensor] | None = [torch.empty(0)] * n if decoder else None
    parse: list[Tensor] | None = [torch.empty(0)] * n if decoder else None
    encoder: list[Tensor] | None = [torch.empty(0)] * n if keep_encoder else None
    intent = torch.zeros(n, teacher.cfg.n_intents)
    batches = make_batches(data.lengths, max_frames)
    for idx in tqdm(batches, desc="teacher targets", unit="batch", disable=not progress):
        batch = collate(data, idx, features)
        out, p_in, p_out, p_pad = _teacher_outputs(
            teacher, batch.feats, batch.lengths, batch.parse_in if labelled else None,
            batch.parse_pad_mask if labelled else None, max_parse_len, bf16)
        if labelled and decoder:
            p_out = batch.parse_out
        for j, i in enumerate(idx):
            ctc[i] = out.ctc_logits[j, : int(out.ctc_lengths[j])].half()
            intent[i] = out.intent_logits[j].float()
            if parse is not None and parse_in is not None and parse_out is not None:
                assert p_pad is not None and p_in is not None and p_out is not None
                assert out.parse_logits is not None
                u = int((~p_pad[j]).sum())
                parse_in[i], parse_out[i] = p_in[j, :u].clone(), p_out[j, :u].clone()
                parse[i] = out.parse_logits[j, :u].half()
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
    cfg = getattr(source.model, "cfg", None)
    if cfg is not None:
        # Causal or centred depthwise convolutions differ only in their padding, not in
        # their weights: a streaming student may be continued as a full-context one.
        cfg = replace(cfg, encoder=replace(cfg.encoder, causal_conv=student.cfg.encoder.causal_conv))
    if cfg != student.cfg:
        raise ValueError(f"warm start: architecture differs: {source.model.cfg} vs {student.cfg}")
    student.load_state_dict(source.model.state_dict())


# Encoder fields that fix the shapes or the meaning of the weights a student copies from
# its teacher's first blocks (causal_conv and layers may differ: padding, not weights).
_TRUNCATION_FIELDS = ("n_mels", "d_model", "heads", "ffn_mult", "conv_kernel", "subsampling",
                      "frontend_channels", "pos_enc")


def init_from_teacher(student: JointModel, teacher: JointModel) -> None:
    """Initialise ``student`` (in place) from ``teacher`` cut to the student's depth: the
    front end, blocks ``0 .. student layers - 1``, the CTC and the intent heads. The
    student keeps its own causal/centred convolution padding, attention masks and input
    normalisation (the teacher's per-utterance statistics are not streamable): it starts
    from the teacher's weights, not from the teacher's function.

    Raises:
        ValueError: the student is deeper than the teacher, or an encoder field that
            shapes the copied weights differs (each is named with both values), or the
            heads' output sizes differ.
    """
    s_enc, t_enc = student.cfg.encoder, teacher.cfg.encoder
    if s_enc.layers > t_enc.layers:
        raise ValueError(f"init from teacher: the student has {s_enc.layers} blocks, the "
                         f"teacher only {t_enc.layers}")
    differ = [f"{f}: student {getattr(s_enc, f)} vs teacher {getattr(t_enc, f)}"
              for f in _TRUNCATION_FIELDS if getattr(s_enc, f) != getattr(t_enc, f)]
    for f in ("n_chars", "n_intents", "ctc_upsample", "decoder_layers"):
        if getattr(student.cfg, f) != getattr(teacher.cfg, f):
            differ.append(f"{f}: student {getattr(student.cfg, f)} vs teacher "
                          f"{getattr(teacher.cfg, f)}")
    if differ:
        raise ValueError("init from teacher: architectures differ in " + "; ".join(differ))
    source = teacher.state_dict()
    target = student.state_dict()
    missing = [k for k in target if k not in source or source[k].shape != target[k].shape]
    if missing:  # a model change the field checks above do not know of
        raise ValueError(f"init from teacher: no teacher weights for {missing[:5]}")
    student.load_state_dict({k: source[k].to(target[k].dtype) for k in target})


def _chunk_mask(
    student: JointModel, lengths: Tensor, rng: np.random.Generator, chunks: list[int],
    full_context_p: float, left_chunks: int | None,
) -> Tensor | None:
    """Dynamic-chunk training: full context or a random chunk size for this batch. A
    full-context encoder (``causal_conv`` false: its convolutions look ahead) cannot
    stream, so it always trains on full context whatever ``full_context_p`` says — e.g. a
    warm start of the full-context release by a profile that trains streaming students."""
    if not chunks:
        return None
    full = rng.random() < full_context_p  # drawn either way: the batch order shares the rng
    if full or not student.cfg.encoder.causal_conv:
        return None
    frames = int(student.encoder.subsampling.output_lengths(lengths).max())
    return chunk_attention_mask(frames, int(rng.choice(chunks)), left_chunks)


class StudentTask(FitTask):
    """The student's training step: KD from the teacher's cached targets plus (labelled
    data) ground-truth terms, dynamic-chunk attention, and quantisation-aware training
    from ``qat_start`` on (only QAT epochs may then be chosen; the float student at the
    switch is kept as the post-training-quantisation baseline)."""

    name = "student"

    def __init__(
        self, settings: Settings, student: JointModel, train: SLUDataset,
        features: FeatureConfig, targets: TeacherTargets, teacher_d_model: int,
        validator: Validator, layout: StudentLayout, vocab: ParseVocab, ctc_vocab: CTCVocab,
    ) -> None:
        st = settings.student
        self.settings, self.model, self.train, self.features = settings, student, train, features
        self.targets, self.validator, self.layout = targets, validator, layout
        self.vocab, self.ctc_vocab = vocab, ctc_vocab
        self.lengths = train.lengths
        self.projection = nn.Linear(student.cfg.encoder.d_model, teacher_d_model)
        sa = settings.features.specaugment
        self.specaug = SpecAugment(sa.freq_masks, sa.freq_width, sa.time_masks,
                                   sa.time_width_frac, sa.time_width_max)
        self.warp = make_warp(settings.features.warp, features)
        self.bf16 = resolve_bf16(st.train.bf16)
        self.qat_start: int | None = (
            math.ceil(st.qat.start_fraction * st.train.epochs) if st.qat.enabled else None)
        self.qat: QATHandle | None = None

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": self.model.parameters()}, {"params": self.projection.parameters()}]

    def begin_epoch(self, epoch: int) -> bool:
        if self.qat_start is None or epoch < self.qat_start or self.qat is not None:
            return False
        # Keep the float student QAT starts from: the PTQ baseline of the benchmark.
        self.model.eval()
        save_package(ModelPackage(self.model, self.features, self.vocab, 0.0,
                                  {"version": f"student-pre-qat-{self.settings.profile}",
                                   "role": "student-pre-qat"}, self.ctc_vocab),
                     self.layout.pre_qat_dir)
        self.model.train()
        self.qat = prepare_qat(self.model, per_sample_activations=True)
        log.info("epoch %d: quantisation-aware training starts (%d layers)", epoch,
                 len(self.qat.modules))
        return True  # only epochs trained with rounding may be chosen from now on

    def selectable(self) -> bool:
        return self.qat_start is None or self.qat is not None

    def may_stop_early(self) -> bool:
        return self.selectable()

    def on_budget(self, fits: int) -> None:
        if self.qat_start is not None:
            qs = self.settings.student.qat.start_fraction
            self.qat_start = min(max(1, math.ceil(qs * fits)), max(1, fits - 1))
            log.info("QAT from epoch %d", self.qat_start)

    def step(self, idx: list[int], epoch_progress: float, np_rng: np.random.Generator,
             aug_gen: torch.Generator) -> StepResult:
        st = self.settings.student
        ds = st.distill
        batch = collate(self.train, idx, self.features, self.warp, aug_gen, time_stretch=False)
        strength = specaugment_strength(epoch_progress,
                                        self.settings.features.specaugment.ramp_epochs)
        feats = self.specaug(batch.feats, batch.lengths, aug_gen, strength)
        t = self.targets.batch(idx)
        parse_in = t["parse_in"] if self.model.parse_decoder is not None else None
        parse_pad = parse_in == ParseVocab.PAD if parse_in is not None else None
        mask = _chunk_mask(self.model, batch.lengths, np_rng, st.streaming.chunks,
                           st.streaming.full_context_p, st.streaming.left_chunks)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(feats, batch.lengths, parse_in, parse_pad, mask)
        T = ds.temperature
        assert t["ctc"] is not None and t["ctc_lengths"] is not None and t["intent"] is not None
        terms: dict[str, Tensor] = {
            "kd_ctc": kd_ctc(out.ctc_logits, out.ctc_lengths, t["ctc"], t["ctc_lengths"], T),
            "kd_intent": kd_intent(out.intent_logits, t["intent"], T),
        }
        if out.parse_logits is not None and t["parse"] is not None and parse_pad is not None:
            terms["kd_parse"] = kd_parse(out.parse_logits, t["parse"], parse_pad, T)
        if ds.kd_weights["hidden"] > 0 and t["encoder"] is not None:
            assert t["encoder_lengths"] is not None
            terms["kd_hidden"] = hidden_mse(out.encoder, out.encoder_lengths, t["encoder"],
                                            t["encoder_lengths"], self.projection)
        if ds.labelled:
            terms["ctc"] = ctc_loss(out.ctc_logits, out.ctc_lengths, batch.ctc_targets,
                                    batch.ctc_lengths)
            terms["intent"] = intent_loss(out.intent_logits, batch.intents)
            if out.parse_logits is not None and t["parse_out"] is not None:
                terms["parse"] = parse_loss(out.parse_logits, t["parse_out"],
                                            st.train.loss.label_smoothing)
            if out.inter_ctc_logits is not None:
                terms["inter_ctc"] = ctc_loss(out.inter_ctc_logits, out.ctc_lengths,
                                              batch.ctc_targets, batch.ctc_lengths)
        w, kw = ds.weights, ds.kd_weights
        weights = {"kd_ctc": kw["ctc"], "kd_intent": kw["intent"], "kd_parse": kw["parse"],
                   "kd_hidden": kw["hidden"], "ctc": w["ctc"], "intent": w["intent"],
                   "parse": w["parse"], "inter_ctc": w.get("inter_ctc", 0.0)}
        total = sum((weights[k] * v for k, v in terms.items()), torch.zeros(()))
        return StepResult(total, {k: float(v.detach()) for k, v in terms.items()}, {
            "qat": float(self.qat is not None),
            # frames the first query may see (0 = full context)
            "chunk": 0.0 if mask is None else float((~mask[0]).sum()),
        })

    def validate(self) -> dict[str, float]:
        return self.validator(self.model)[0]

    def epoch_columns(self) -> dict[str, float]:
        return {"qat": float(self.qat is not None)}

    def state(self) -> dict[str, Any]:
        return {"projection": self.projection.state_dict(), "qat_start": self.qat_start,
                "qat_active": self.qat is not None}

    def load_state(self, state: dict[str, Any]) -> None:
        self.qat_start = state["qat_start"]
        if state["qat_active"] and self.qat is None:
            self.qat = prepare_qat(self.model, per_sample_activations=True)
        self.projection.load_state_dict(state["projection"])

    def best_extra(self) -> dict[str, Any]:
        return {"qat_active": self.qat is not None}


def student_features(settings: Settings, raw_cfg: FeatureConfig,
                     train_raw: list[Tensor]) -> FeatureConfig:
    """The student's (causal) feature normalisation, with training-set statistics."""
    mean, std = global_stats(train_raw)
    return replace(raw_cfg, normalise=settings.student.normalise, mean=mean, std=std)


def train_student(
    settings: Settings,
    teacher_dir: Path | None = None,
    progress: bool = True,
    resume: bool = True,
    out_dir: Path | None = None,
    tracker: Tracker | None = None,
    init_from: Path | None = None,
) -> StudentResult:
    """Distil the teacher into the student of ``settings.student`` and export it.

    Args:
        settings: parsed params (``student`` section).
        teacher_dir: teacher package folder (default ``<models_dir>/teacher/model``).
        progress: progress bars.
        resume: continue from ``checkpoints/last.pt`` when it exists.
        out_dir: run folder (default ``<models_dir>/student``).
        tracker: where to log (the stage layer passes an MLflow run); None logs nowhere.
        init_from: a float student package (e.g. an earlier run's ``pre_qat_model/``) to
            start from instead of random weights: the retraining flow's warm start, and the
            way to give a student more epochs than one time budget holds. Same architecture
            and vocabularies required; ignored when resuming a checkpoint.
    """
    st = settings.student
    ts, ds = st.train, st.distill
    torch.set_num_threads(capped_threads(ts.threads))
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
    train_rows, train_raw = load_split(settings, "train", progress, raw_cfg, raw=True)
    train_rows, train_raw = random_subset(
        train_rows, train_raw, ts.max_train_utterances, settings.seed + 1)
    init = load_package(init_from) if init_from is not None else None
    # A warm start keeps its input normalisation: new statistics would shift every input.
    student_cfg = (init.features if init is not None
                   else student_features(settings, raw_cfg, train_raw))
    train = SLUDataset(train_rows, train_raw, ctc_vocab, vocab)
    validator = Validator(settings, student_cfg, vocab, ctc_vocab, progress, ts.eval_max_utterances)

    student = (JointModel(init.model.cfg) if init is not None
               else build_model(settings, vocab, ctc_vocab, st.model))
    if init is not None and not (resume and layout.last.exists()):
        warm_start(student, init, vocab, ctc_vocab)
        log.info("student warm-started from %s", init_from)
    elif st.init == "teacher" and not (resume and layout.last.exists()):
        init_from_teacher(student, teacher)
        log.info("student initialised from the teacher's first %d blocks",
                 student.cfg.encoder.layers)
    rates = (ctc_frame_ms(student, raw_cfg.hop_ms), ctc_frame_ms(teacher, raw_cfg.hop_ms))
    if rates[0] != rates[1]:
        raise ValueError(
            f"student CTC slots are {rates[0]} ms but the teacher's are {rates[1]} ms: choose "
            "student subsampling/ctc_upsample so that frame-level distillation aligns")
    bf16 = resolve_bf16(ts.bf16)
    targets = teacher_targets(
        teacher, teacher_pkg.features, train, ts.batch_max_frames, ds.labelled,
        settings.decode.max_parse_len, bf16, ds.kd_weights["hidden"] > 0, progress)
    task = StudentTask(settings, student, train, student_cfg, targets,
                       teacher.cfg.encoder.d_model, validator, layout, vocab, ctc_vocab)
    if tracker:
        tracker.log_params({
            "profile": settings.profile, "seed": settings.seed,
            "student": st.model_dump(), "parameters": student.num_parameters(),
            "teacher_parameters": teacher.num_parameters(), "teacher": str(teacher_dir),
            "teacher_version": teacher_pkg.version, "train_utterances": len(train),
            "init_from": str(init_from) if init_from else "", "bf16": bf16,
        })
    outcome = fit(task, ts, layout, tracker, settings.seed, progress, resume)

    best = torch.load(layout.best, weights_only=False)
    if best.get("qat_active") and task.qat is None:
        task.qat = prepare_qat(student, per_sample_activations=True)
    student.load_state_dict(best["model"])
    if task.qat is not None:
        task.qat.strip(bake=True)  # weights now lie on the int8 grid the deploy bundle uses
    metadata: dict[str, Any] = {
        "version": f"student-{settings.profile}-{tracker.run_id if tracker else 'local'}",
        "role": "student", "profile": settings.profile,
        "run_id": tracker.run_id if tracker else None,
        "best_epoch": outcome.best_epoch, "parameters": student.num_parameters(),
        "teacher_version": teacher_pkg.version, "qat": task.qat is not None,
        "streaming_chunks": st.streaming.chunks,
    }
    final = finalise_package(student, student_cfg, vocab, ctc_vocab, validator, settings,
                             layout.model_dir, metadata, progress)
    export_onnx(final.package, layout.deploy_fp32_dir)
    quantize_bundle(layout.deploy_fp32_dir, layout.deploy_dir)
    metrics = {
        **outcome.best_valid, **final.metrics, "best_epoch": outcome.best_epoch,
        "epochs_run": len(outcome.history),
        "qat_start_epoch": task.qat_start if task.qat_start is not None else -1,
        "parameters": student.num_parameters(), "teacher_parameters": teacher.num_parameters(),
        "wall_minutes": round(outcome.wall_s / 60, 2),
    }
    write_run_summary(layout, outcome.history, metrics, f"student ({settings.profile})", tracker)
    if tracker:
        tracker.set_tags({"stopped": outcome.stopped})
    return StudentResult(
        model_dir=layout.model_dir, deploy_dir=layout.deploy_dir,
        epochs_run=len(outcome.history), best_epoch=outcome.best_epoch,
        qat_start_epoch=task.qat_start, best_valid=outcome.best_valid,
        parameters=student.num_parameters(), teacher_parameters=teacher.num_parameters(),
        wall_s=outcome.wall_s, stopped=outcome.stopped,
    )
