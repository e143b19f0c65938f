"""Multitask losses: CTC, intent cross-entropy, parse cross-entropy, and task weighting."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from model.nn.tokens import ParseVocab

__all__ = [
    "TASKS",
    "LossBreakdown",
    "ScheduledWeighting",
    "UncertaintyWeighting",
    "ctc_loss",
    "intent_loss",
    "make_weighting",
    "parse_loss",
]

TASKS: tuple[str, ...] = ("ctc", "intent", "parse", "inter_ctc")
"""Loss terms a model may have: a model without a parse decoder or intermediate CTC
simply produces no such term, and weightings skip the absent ones."""


def ctc_loss(
    logits: Tensor, logit_lengths: Tensor, targets: Tensor, target_lengths: Tensor, blank: int = 0
) -> Tensor:
    """CTC over characters, averaged over the batch of per-character losses.

    Args:
        logits: ``(B, T', C)`` unnormalised scores.
        logit_lengths: ``(B,)`` valid frames.
        targets: ``(sum L,)`` concatenated target ids (no blanks).
        target_lengths: ``(B,)``.

    Returns a scalar; impossible alignments (more characters than frames) give zero
    instead of infinity so that one bad utterance cannot poison a batch.
    """
    log_probs = F.log_softmax(logits.float(), dim=-1).transpose(0, 1)  # (T', B, C)
    return F.ctc_loss(
        log_probs, targets, logit_lengths, target_lengths, blank=blank,
        reduction="mean", zero_infinity=True,
    )


def intent_loss(logits: Tensor, intents: Tensor) -> Tensor:
    """Cross-entropy of ``(B, I)`` logits against ``(B,)`` intent indices."""
    return F.cross_entropy(logits.float(), intents)


def parse_loss(logits: Tensor, targets: Tensor, label_smoothing: float = 0.1) -> Tensor:
    """Token cross-entropy with label smoothing; ``(B, U, P)`` vs ``(B, U)``, padding ignored."""
    return F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(),
        ignore_index=ParseVocab.PAD, label_smoothing=label_smoothing,
    )


@dataclass
class LossBreakdown:
    """Total loss plus each task's raw loss and the weight it got this step."""

    total: Tensor
    losses: dict[str, float]
    weights: dict[str, float]


class UncertaintyWeighting(nn.Module):
    """Learned task weights (Kendall, Gal & Cipolla 2018).

    ``total = Σ_i exp(-s_i) · L_i + s_i`` with one learnable log-variance ``s_i`` per task;
    the effective weight of task i is ``exp(-s_i)``. Initialised so that the starting
    weights equal ``init_weights``.
    """

    def __init__(self, init_weights: dict[str, float]) -> None:
        super().__init__()
        missing = {"ctc", "intent"} - set(init_weights)
        if missing:
            raise ValueError(f"initial weights missing for {sorted(missing)}")
        bad = {t: w for t, w in init_weights.items() if w <= 0}
        if bad:
            raise ValueError(f"uncertainty weighting needs positive initial weights, got {bad}")
        self.log_vars = nn.ParameterDict(
            {t: nn.Parameter(torch.tensor(-float(torch.log(torch.tensor(w)))))
             for t, w in init_weights.items()}
        )

    def forward(self, losses: dict[str, Tensor], epoch: float = 0.0) -> LossBreakdown:
        total = torch.zeros(())
        weights = {}
        for task, loss in losses.items():
            if task not in self.log_vars:
                raise ValueError(f"no weight for loss term {task!r}")
            s = self.log_vars[task]
            total = total + torch.exp(-s) * loss + s
            weights[task] = float(torch.exp(-s).detach())
        return LossBreakdown(total, {t: float(v.detach()) for t, v in losses.items()}, weights)


class ScheduledWeighting(nn.Module):
    """Weights moving linearly from ``start`` to ``end`` over ``epochs`` epochs.

    With start favouring CTC and end favouring intent and parse, acoustics are learnt
    first and semantics later; ``start == end`` gives fixed weights.
    """

    def __init__(self, start: dict[str, float], end: dict[str, float], epochs: int) -> None:
        super().__init__()
        if epochs < 1:
            raise ValueError("epochs must be >= 1")
        self.start, self.end, self.epochs = dict(start), dict(end), epochs

    def weights_at(self, epoch: float) -> dict[str, float]:
        frac = min(1.0, max(0.0, epoch / self.epochs))
        return {t: self.start[t] + frac * (self.end.get(t, self.start[t]) - self.start[t])
                for t in self.start}

    def forward(self, losses: dict[str, Tensor], epoch: float = 0.0) -> LossBreakdown:
        all_weights = self.weights_at(epoch)
        missing = sorted(set(losses) - set(all_weights))
        if missing:
            raise ValueError(f"no weight for loss terms {missing}")
        weights = {t: all_weights[t] for t in losses}
        total = sum((weights[t] * loss for t, loss in losses.items()), torch.zeros(()))
        return LossBreakdown(total, {t: float(v.detach()) for t, v in losses.items()}, weights)


def make_weighting(
    kind: str, weights: dict[str, float], final_weights: dict[str, float], schedule_epochs: int
) -> nn.Module:
    """The weighting module named by ``kind``: uncertainty, schedule or fixed."""
    if kind == "uncertainty":
        return UncertaintyWeighting(weights)
    if kind == "schedule":
        return ScheduledWeighting(weights, final_weights, schedule_epochs)
    if kind == "fixed":
        return ScheduledWeighting(weights, weights, 1)
    raise ValueError(f"unknown loss weighting {kind!r}")
