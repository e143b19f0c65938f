"""Tests that fail when learning breaks.

The teacher's and the student's *real* training steps (``TeacherTask.step`` /
``StudentTask.step``: collate, normalisation, losses, weighting) must let a tiny model
overfit a tiny batch — the loss falls by a stated factor and the greedy predictions
become right — and the distillation terms must be non-zero on differing models and
point the student towards the teacher. A loss wired to the wrong targets, a detached
graph, a zero weight or a sign error makes one of these fail.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.data.manifest import ManifestRow, Slot
from model.decoding.greedy import ctc_greedy
from model.frontend.features import FeatureConfig
from model.nn.network import EncoderConfig, JointModel, ModelConfig
from model.nn.tokens import ParseVocab, TaggedCharVocab, split_tagged
from model.training.dataset import SLUDataset
from model.training.kd_losses import kd_ctc, kd_intent
from model.training.losses import parse_loss
from model.training.student import StudentLayout, StudentTask, teacher_targets
from model.training.teacher import TeacherTask
from voiceloop.settings import load_settings

torch.set_num_threads(1)

VOCAB = ParseVocab.build(["HassTurnOn", "HassTurnOff", "HassLightSet"], ["area", "brightness"],
                         ["turn on the kitchen", "turn off the hall", "set the den to fifty"])
CTC = TaggedCharVocab(VOCAB.slot_types)
ROWS = [
    ("turn on the kitchen", "HassTurnOn", [Slot(type="area", value="kitchen")]),
    ("turn off the hall", "HassTurnOff", [Slot(type="area", value="hall")]),
    ("set the den to fifty", "HassLightSet",
     [Slot(type="area", value="den"), Slot(type="brightness", value="fifty")]),
]


def _settings(tmp_path: Path):
    s = load_settings(profile="tiny", workspace=tmp_path)
    # No perturbation and no masking: the test is whether the step can fit, not regularise.
    features = s.features.model_copy(update={
        "warp": s.features.warp.model_copy(update={"p": 0.0}),
        "specaugment": s.features.specaugment.model_copy(update={"freq_masks": 0, "time_masks": 0}),
    })
    return s.model_copy(update={"features": features})


def _data() -> tuple[SLUDataset, FeatureConfig]:
    gen = torch.Generator().manual_seed(0)
    rows = [ManifestRow(id=f"u{i}", audio="x.wav", duration_s=1.6, transcript=t, intent=intent,
                        slots=slots, engine="espeak-ng", voice="v", split="train",
                        template_id=f"t{i}", domain="lights")
            for i, (t, intent, slots) in enumerate(ROWS)]
    # Distinct fixed "log-mels" per utterance: memorisable, like a tiny training set.
    feats = [torch.randn(160, 80, generator=gen).half() for _ in rows]
    return SLUDataset(rows, feats, CTC, VOCAB), FeatureConfig(normalise="utterance")


def _model(layers: int, causal: bool, seed: int) -> JointModel:
    torch.manual_seed(seed)
    return JointModel(ModelConfig(
        EncoderConfig(d_model=48, layers=layers, heads=2, ffn_mult=2, conv_kernel=5, subsampling=8,
                      causal_conv=causal, frontend_channels=8, dropout=0.0),
        n_chars=len(CTC), n_intents=len(VOCAB.intents), n_parse_tokens=len(VOCAB),
        decoder_layers=0, ctc_upsample=4))


def _train(task, steps: int) -> list[float]:
    opt = torch.optim.AdamW(task.param_groups(), lr=3e-3, weight_decay=0.0)
    np_rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    losses = []
    task.model.train()
    for i in range(steps):
        result = task.step([0, 1, 2], 5.0 + i / steps, np_rng, gen)  # past the SpecAugment ramp
        opt.zero_grad()
        result.total.backward()
        opt.step()
        losses.append(float(result.total))
    return losses


@torch.no_grad()
def _predict(model: JointModel, data: SLUDataset, features: FeatureConfig) -> list[tuple]:
    from model.training.dataset import collate

    model.eval()
    batch = collate(data, [0, 1, 2], features)
    enc, lengths, pad = model.encode(batch.feats, batch.lengths)
    logits, ctc_lengths = model.ctc(enc, lengths)
    texts = [split_tagged(CTC.decode(ids)) for ids in ctc_greedy(logits, ctc_lengths)]
    intents = model.intent_head(enc, pad).argmax(-1).tolist()
    return [(t, VOCAB.intents[i], s) for (t, s), i in zip(texts, intents, strict=True)]


def _expected() -> list[tuple]:
    return [(t, intent, slots) for t, intent, slots in ROWS]


def test_teacher_step_overfits_a_tiny_batch(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    data, features = _data()
    task = TeacherTask(settings, _model(2, False, 0), data, features, validator=None)  # type: ignore[arg-type]
    losses = _train(task, 250)
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])  # stated factor: 10
    # Transcript, slots (read off the tagged transcript) and intent all right.
    assert _predict(task.model, data, features) == _expected()


def test_student_step_overfits_with_distillation(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    data, teacher_features = _data()
    teacher_task = TeacherTask(settings, _model(2, False, 0), data, teacher_features,
                               validator=None)  # type: ignore[arg-type]
    _train(teacher_task, 250)
    teacher = teacher_task.model.eval()
    targets = teacher_targets(teacher, teacher_features, data, 6000, True, 10, False, False, False)
    stats = torch.cat([f.float() for f in data.feats])
    student_features = FeatureConfig(normalise="causal", mean=tuple(stats.mean(0).tolist()),
                                     std=tuple(stats.std(0).tolist()))
    student = _model(1, True, 1)
    task = StudentTask(settings, student, data, student_features, targets, 48,
                       validator=None, layout=StudentLayout(tmp_path / "s"),  # type: ignore[arg-type]
                       vocab=VOCAB, ctc_vocab=CTC)
    task.qat_start = None  # float training only: QAT has its own tests
    first = task.step([0, 1, 2], 5.0, np.random.default_rng(0), torch.Generator().manual_seed(0))
    assert first.terms["kd_ctc"] > 0.1 and first.terms["kd_intent"] > 0.01  # models differ
    losses = _train(task, 300)
    assert losses[-1] < losses[0] / 5, (losses[0], losses[-1])  # stated factor: 5
    assert _predict(student, data, student_features) == _expected()


def test_distillation_terms_point_the_student_towards_the_teacher() -> None:
    torch.manual_seed(0)
    teacher_ctc, teacher_intent = torch.randn(2, 12, 7), torch.randn(2, 5)
    student_ctc = torch.randn(2, 12, 7, requires_grad=True)
    student_intent = torch.randn(2, 5, requires_grad=True)
    lengths = torch.tensor([12, 9])
    for step in range(2):
        loss = kd_ctc(student_ctc, lengths, teacher_ctc, lengths, 2.0) + kd_intent(
            student_intent, teacher_intent, 2.0)
        if step == 0:
            start = float(loss)
            assert start > 0.05
            loss.backward()
            with torch.no_grad():  # one gradient step must move towards the teacher
                student_ctc -= 0.5 * student_ctc.grad
                student_intent -= 0.5 * student_intent.grad
    assert float(loss) < start
    same = kd_ctc(teacher_ctc, lengths, teacher_ctc, lengths, 2.0)
    assert float(same) == pytest.approx(0.0, abs=1e-6)


def test_label_smoothing_is_visible_on_non_uniform_logits() -> None:
    logits = torch.full((1, 3, 10), -4.0)
    targets = torch.tensor([[4, 5, 6]])
    logits[0, torch.arange(3), targets[0]] = 6.0  # confident and right
    plain = float(parse_loss(logits, targets, 0.0))
    smoothed = float(parse_loss(logits, targets, 0.1))
    assert plain < 0.01 and smoothed > plain + 0.5  # the smoothing floor shows


@pytest.mark.parametrize(("start_fraction", "fits", "expected"),
                         [(0.0, 3, 1), (0.5, 1, 1), (0.5, 2, 1), (0.5, 4, 2), (0.9, 4, 3)])
def test_qat_start_epoch_for_the_epochs_the_budget_fits(start_fraction: float, fits: int,
                                                       expected: int) -> None:
    """At least one float epoch and, when two fit, at least one QAT epoch, wherever the
    fraction puts the switch."""
    from types import SimpleNamespace

    qat = SimpleNamespace(start_fraction=start_fraction)
    task = SimpleNamespace(qat_start=0, settings=SimpleNamespace(student=SimpleNamespace(qat=qat)))
    StudentTask.on_budget(task, fits)  # type: ignore[arg-type]
    assert task.qat_start == expected
