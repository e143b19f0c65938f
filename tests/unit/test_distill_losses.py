"""Distillation losses on hand-checkable cases."""

import math

import pytest
import torch

from model.training.kd_losses import hidden_mse, kd_ctc, kd_intent, kd_parse, kl_with_temperature

torch.set_num_threads(1)


def test_kl_zero_when_student_equals_teacher() -> None:
    logits = torch.randn(3, 5)
    assert torch.allclose(kl_with_temperature(logits, logits, 2.0), torch.zeros(3), atol=1e-6)


def test_kl_hand_computed_with_temperature_scaling() -> None:
    # teacher logits [ln 3, 0] at T=1 -> p = [3/4, 1/4]; student uniform q = [1/2, 1/2]
    # KL = 3/4 ln(3/2) + 1/4 ln(1/2)
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    student = torch.zeros(1, 2)
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert float(kl_with_temperature(student, teacher, 1.0)) == pytest.approx(expected, rel=1e-5)
    # at T=2 the teacher is softened to softmax([ln3/2, 0]) and the result scaled by 4
    p = torch.softmax(teacher / 2, -1)[0]
    expected_t2 = 4 * float((p * (p.log() - math.log(0.5))).sum())
    assert float(kl_with_temperature(student, teacher, 2.0)) == pytest.approx(expected_t2, rel=1e-5)


def test_kl_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        kl_with_temperature(torch.zeros(2), torch.zeros(2), 0.0)
    with pytest.raises(ValueError):
        kl_with_temperature(torch.zeros(2, 3), torch.zeros(2, 4), 1.0)


def test_kd_ctc_ignores_frames_beyond_either_length() -> None:
    torch.manual_seed(0)
    teacher = torch.randn(2, 10, 4)
    student = teacher.clone()
    student[0, 6:] = torch.randn(4, 4)  # beyond teacher length 6: must not count
    student[1, 8:] = 0.0  # student has 9 frames (one extra) but lengths cut at 8
    loss = kd_ctc(student[:, :9], torch.tensor([9, 8]), teacher, torch.tensor([6, 10]))
    assert float(loss) == pytest.approx(0.0, abs=1e-6)
    student[0, 2] += 5.0  # inside both lengths: must count
    assert float(kd_ctc(student, torch.tensor([9, 8]), teacher, torch.tensor([6, 10]))) > 0


def test_kd_intent_and_parse_masking() -> None:
    torch.manual_seed(1)
    t = torch.randn(4, 7)
    assert float(kd_intent(t, t)) == pytest.approx(0.0, abs=1e-6)
    teacher = torch.randn(2, 3, 6)
    student = teacher.clone()
    student[1, 2] = torch.randn(6)
    pad = torch.tensor([[False, False, False], [False, False, True]])
    assert float(kd_parse(student, teacher, pad)) == pytest.approx(0.0, abs=1e-6)


def test_hidden_mse_pools_teacher_to_student_rate() -> None:
    teacher = torch.arange(8.0).reshape(1, 8, 1).repeat(1, 1, 2)  # frames 0..7
    student = torch.tensor([[[0.5, 0.5], [2.5, 2.5], [4.5, 4.5], [6.5, 6.5]]])  # pairwise means
    loss = hidden_mse(student, torch.tensor([4]), teacher, torch.tensor([8]), torch.nn.Identity())
    assert float(loss) == pytest.approx(0.0, abs=1e-6)
