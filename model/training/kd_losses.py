"""Knowledge-distillation losses: teacher posteriors as soft targets for the student.

All are temperature-scaled KL divergences ``T² · KL(p_teacher^T || p_student^T)`` (Hinton
et al. 2015; the ``T²`` keeps gradient magnitudes comparable across temperatures), so
they need no labels: the retraining flow distils on unlabelled production audio too.

- CTC frame posteriors: teacher and student CTC outputs run at the same rate by design
  (teacher: subsampling 4 × CTC upsampling 2; student: subsampling 8 × upsampling 4 —
  both 20 ms per label slot), so frames are compared one to one over the frames both
  have (lengths can differ by a few frames at the end of an utterance).
- intent logits: one distribution per utterance.
- parse decoder: per-token distributions under teacher forcing on the same token prefix.
- hidden states: optional mean-squared error between projected encoder outputs,
  time-pooled to a common length.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["hidden_mse", "kd_ctc", "kd_intent", "kd_parse", "kl_with_temperature"]


def kl_with_temperature(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``T² · KL(softmax(teacher/T) || softmax(student/T))`` summed over the last axis.

    Args:
        student, teacher: logits ``(..., K)`` of the same shape.
        temperature: ``T > 0``.

    Returns:
        ``(...)`` per-position divergences (not reduced).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student.shape != teacher.shape:
        raise ValueError(f"shape mismatch: student {tuple(student.shape)} vs teacher "
                         f"{tuple(teacher.shape)}")
    log_p_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1) * temperature**2


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def kd_ctc(
    student: Tensor, student_lengths: Tensor, teacher: Tensor, teacher_lengths: Tensor,
    temperature: float = 2.0,
) -> Tensor:
    """Frame-level KD on CTC posteriors.

    Args:
        student: ``(B, S, C)`` student CTC logits; ``student_lengths`` ``(B,)``.
        teacher: ``(B, S', C)`` teacher CTC logits at the same frame rate;
            ``teacher_lengths`` ``(B,)``.

    Frames ``t < min(student_len, teacher_len)`` are compared; the mean over them is
    returned.
    """
    frames = min(student.size(1), teacher.size(1))
    per_frame = kl_with_temperature(student[:, :frames], teacher[:, :frames], temperature)
    valid = torch.arange(frames)[None, :] < torch.minimum(student_lengths, teacher_lengths)[:, None]
    return _masked_mean(per_frame, valid)


def kd_intent(student: Tensor, teacher: Tensor, temperature: float = 2.0) -> Tensor:
    """Utterance-level KD on intent logits ``(B, I)``; mean over the batch."""
    return kl_with_temperature(student, teacher, temperature).mean()


def kd_parse(
    student: Tensor, teacher: Tensor, pad_mask: Tensor, temperature: float = 2.0
) -> Tensor:
    """Token-level KD on parse-decoder logits ``(B, U, P)`` under the same teacher-forced
    prefix; ``pad_mask`` ``(B, U)`` is True on padding. Mean over real tokens."""
    return _masked_mean(kl_with_temperature(student, teacher, temperature), ~pad_mask)


def hidden_mse(
    student: Tensor, student_lengths: Tensor, teacher: Tensor, teacher_lengths: Tensor,
    projection: torch.nn.Module,
) -> Tensor:
    """MSE between projected student encodings and teacher encodings.

    Both ``(B, T, D)`` sequences are average-pooled to the student's frame count (the
    coarser one) before comparison, over valid frames only.
    """
    projected = projection(student)  # (B, S, D_teacher)
    pooled = F.adaptive_avg_pool1d(teacher.transpose(1, 2), student.size(1)).transpose(1, 2)
    per_frame = ((projected.float() - pooled.float()) ** 2).mean(-1)
    scale = teacher.size(1) / student.size(1)
    valid_len = torch.minimum(student_lengths, (teacher_lengths.float() / scale).long())
    valid = torch.arange(student.size(1))[None, :] < valid_len[:, None]
    return _masked_mean(per_frame, valid)
