"""Decoding: CTC greedy transcripts, greedy parse decoding, and the clarify threshold."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from model.network import JointModel
from model.tokens import ParseVocab

__all__ = ["choose_clarify_threshold", "ctc_greedy", "greedy_parse"]


def ctc_greedy(logits: Tensor, lengths: Tensor, blank: int = 0) -> list[list[int]]:
    """Best path: argmax per frame, merge repeats, drop blanks.

    ``(B, T', C)`` logits and ``(B,)`` lengths → B lists of character ids.
    """
    best = logits.argmax(dim=-1)  # (B, T')
    out: list[list[int]] = []
    for b in range(best.size(0)):
        path = best[b, : int(lengths[b])].tolist()
        ids, previous = [], None
        for token in path:
            if token != previous and token != blank:
                ids.append(token)
            previous = token
        out.append(ids)
    return out


@torch.no_grad()
def greedy_parse(
    model: JointModel, enc: Tensor, enc_pad_mask: Tensor, max_len: int
) -> tuple[list[list[int]], Tensor]:
    """Decode parses token by token, taking the most likely token each step.

    Args:
        model: the joint model (its parse decoder is used).
        enc: ``(B, T', D)`` encoder output.
        enc_pad_mask: ``(B, T')`` True on padding.
        max_len: longest parse to emit (tokens after ``<bos>``).

    Returns:
        B token-id lists (without ``<bos>``, up to and excluding ``<eos>``) and the
        ``(B,)`` mean log-probability of the chosen tokens (a parse confidence).
    """
    b = enc.size(0)
    tokens = torch.full((b, 1), ParseVocab.BOS, dtype=torch.long)
    finished = torch.zeros(b, dtype=torch.bool)
    logp_sum = torch.zeros(b)
    steps = torch.zeros(b)
    limit = min(max_len, model.parse_decoder.positions.size(0) - 1)
    for _ in range(limit):
        logits = model.parse_decoder(tokens, enc, enc_pad_mask)[:, -1]
        logp = torch.log_softmax(logits.float(), dim=-1)
        best = logp.argmax(dim=-1)
        best = torch.where(finished, torch.full_like(best, ParseVocab.PAD), best)
        logp_sum += torch.where(finished, 0.0, logp.gather(1, best.clamp(min=0)[:, None])[:, 0])
        steps += (~finished).float()
        tokens = torch.cat([tokens, best[:, None]], dim=1)
        finished |= best == ParseVocab.EOS
        if bool(finished.all()):
            break
    out = []
    for row in tokens[:, 1:].tolist():
        ids = []
        for t in row:
            if t in (ParseVocab.EOS, ParseVocab.PAD):
                break
            ids.append(t)
        out.append(ids)
    return out, logp_sum / steps.clamp(min=1)


def choose_clarify_threshold(
    confidences: Sequence[float], correct: Sequence[bool], target_accuracy: float
) -> float:
    """Lowest confidence threshold at which accepted utterances reach ``target_accuracy``.

    Utterances with confidence ≥ threshold are accepted; those below get ``clarify``.
    Picks the threshold that accepts the most utterances while the accepted ones are
    at least ``target_accuracy`` correct; 0.0 when everything already is; 1.0 when no
    threshold reaches the target (then every answer asks for clarification).
    """
    if len(confidences) != len(correct):
        raise ValueError("confidences and correct differ in length")
    if not confidences:
        return 0.0
    conf = np.asarray(confidences, dtype=np.float64)
    ok = np.asarray(correct, dtype=np.float64)
    order = np.argsort(-conf, kind="stable")
    running = np.cumsum(ok[order]) / np.arange(1, len(order) + 1)
    good = np.nonzero(running >= target_accuracy)[0]
    if good.size == 0:
        return 1.0
    last = int(good[-1])
    if last == len(order) - 1:
        return 0.0
    return float(conf[order][last])
