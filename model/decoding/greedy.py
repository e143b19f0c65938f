"""Decoding: CTC greedy transcripts, greedy parse decoding, and the clarify threshold."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from model.nn.network import JointModel
from model.nn.tokens import ParseVocab

__all__ = [
    "ParseStep",
    "choose_clarify_threshold",
    "ctc_greedy",
    "greedy_parse",
    "greedy_parse_steps",
    "value_mask",
]


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


ParseStep = Callable[[Tensor], Tensor]
"""One decoder step: tokens ``(B, U)`` so far → logits ``(B, P)`` for the next token."""


def value_mask(vocab: ParseVocab, transcripts: Sequence[str]) -> Tensor:
    """``(B, P)`` bool: the parse tokens each utterance may emit when slot values must be
    copied from its transcript: every special, intent and slot-type token, and only the
    value words that occur in that transcript.

    Slot values are spoken words of the command (the corpus guarantees it: every
    reference value occurs verbatim in its transcript), so a value word the transcript
    does not contain is a hallucination of the parse decoder.
    """
    index = vocab._index()
    first_word = len(vocab) - len(vocab.words)
    mask = torch.zeros(len(transcripts), len(vocab), dtype=torch.bool)
    mask[:, :first_word] = True
    for b, text in enumerate(transcripts):
        ids = [index[w] for w in set(text.split()) if w in index and index[w] >= first_word]
        if ids:
            mask[b, ids] = True
    return mask


@torch.no_grad()
def greedy_parse(
    model: JointModel, enc: Tensor, enc_pad_mask: Tensor, max_len: int,
    allowed: Tensor | None = None,
) -> tuple[list[list[int]], Tensor]:
    """Decode parses token by token, taking the most likely token each step.

    Args:
        model: the joint model (its parse decoder is used).
        enc: ``(B, T', D)`` encoder output.
        enc_pad_mask: ``(B, T')`` True on padding.
        max_len: longest parse to emit (tokens after ``<bos>``).
        allowed: optional ``(B, P)`` bool, the tokens each utterance may emit
            (:func:`value_mask`).

    Returns:
        B token-id lists (without ``<bos>``, up to and excluding ``<eos>``) and the
        ``(B,)`` mean log-probability of the chosen tokens (a parse confidence).
    """
    limit = min(max_len, model.parse_decoder.positions.size(0) - 1)

    def step(tokens: Tensor) -> Tensor:
        return model.parse_decoder(tokens, enc, enc_pad_mask)[:, -1]

    return greedy_parse_steps(step, enc.size(0), limit, allowed)


@torch.no_grad()
def greedy_parse_steps(
    step: ParseStep, batch: int, limit: int, allowed: Tensor | None = None,
) -> tuple[list[list[int]], Tensor]:
    """The greedy loop of :func:`greedy_parse` over any decoder (torch, ONNX Runtime, …).

    Args:
        step: tokens ``(B, U)`` int64 (``<bos>`` first) → next-token logits ``(B, P)``.
        batch: B.
        limit: most tokens to emit after ``<bos>``.
        allowed: optional ``(B, P)`` bool mask of permitted tokens (the others get
            probability zero, the permitted ones are renormalised).

    Returns:
        As :func:`greedy_parse`.
    """
    tokens = torch.full((batch, 1), ParseVocab.BOS, dtype=torch.long)
    finished = torch.zeros(batch, dtype=torch.bool)
    logp_sum = torch.zeros(batch)
    steps = torch.zeros(batch)
    for _ in range(limit):
        logits = step(tokens).float()
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        logp = torch.log_softmax(logits, dim=-1)
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
