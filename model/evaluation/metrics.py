"""Pure evaluation metrics for transcripts, intents, slots and confidence calibration.

Every function takes parallel sequences (one entry per utterance, references first) and
raises ``ValueError`` when their lengths differ. Corpus-level rates are *micro* averages
(total errors over total reference units), never means of per-utterance rates, so that
long utterances weigh more than short ones, as in the usual ASR/SLU benchmarks.

Vacuous inputs follow one rule, "nothing to get wrong, nothing got wrong": error rates
are 0.0 and accuracies / F1 scores are 1.0 when there is nothing to score (no utterances,
or no slots anywhere). Callers that gate on these numbers should also check ``n``.

Slots are compared exactly on ``(type, value)``; values are expected to be normalised
already (lower-case spoken words, see ``ARCHITECTURE.md``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import jiwer
import numpy as np

from model.data.manifest import Slot

__all__ = [
    "DURATION_BUCKETS",
    "PRF",
    "SLUF1",
    "Confusion",
    "ReliabilityBin",
    "SemER",
    "cer",
    "char_distance",
    "duration_bucket",
    "exact_match_rate",
    "expected_calibration_error",
    "intent_accuracy",
    "reliability_bins",
    "semer",
    "slot_prf",
    "slu_f1",
    "wer",
    "word_distance",
]

DURATION_BUCKETS: tuple[str, ...] = ("<1.5s", "1.5-2.5s", "2.5-4s", ">=4s")
"""Labels returned by :func:`duration_bucket`, shortest first."""


# --------------------------------------------------------------------------- helpers


def _check_lengths(**named: Sequence[object]) -> int:
    """Return the common length of the named sequences; ``ValueError`` if they differ."""
    lengths = {name: len(seq) for name, seq in named.items()}
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{name}={n}" for name, n in lengths.items())
        raise ValueError(f"sequences must have the same length, got {detail}")
    return next(iter(lengths.values()), 0)


def _levenshtein(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Edit distance (unit-cost insert/delete/substitute) between two sequences."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        current = [i]
        for j, y in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def _key(slot: Slot) -> tuple[str, str]:
    return (slot.type, slot.value)


def _normalise_space(text: str) -> str:
    # Collapse runs of whitespace so that "turn  on" and "turn on" are the same words and
    # the same characters; jiwer's character transform alone would count the extra space.
    return " ".join(text.split())


# --------------------------------------------------------------------------- ASR


def _edit_rate(
    references: Sequence[str],
    hypotheses: Sequence[str],
    process: Callable[[list[str], list[str]], jiwer.WordOutput | jiwer.CharacterOutput],
) -> float:
    _check_lengths(references=references, hypotheses=hypotheses)
    if not references:
        return 0.0
    out = process(
        [_normalise_space(r) for r in references], [_normalise_space(h) for h in hypotheses]
    )
    errors = out.substitutions + out.deletions + out.insertions
    total = out.hits + out.substitutions + out.deletions
    # With no reference unit anywhere, every inserted unit is a full error (jiwer 4 does the
    # same): the rate is the insertion count, and 0.0 for an all-empty corpus.
    return errors / max(total, 1)


def wer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus word error rate: (S + D + I) / reference words, summed over utterances.

    An empty reference contributes its hypothesis words as insertions and nothing to the
    denominator; an all-empty corpus (or no utterances) scores 0.0. Whitespace runs are
    collapsed first; no other normalisation (both sides are already spoken-form words).

    Args:
        references: reference transcripts, one per utterance.
        hypotheses: hypothesis transcripts, parallel to ``references``.
    """
    return _edit_rate(references, hypotheses, jiwer.process_words)


def cer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus character error rate: (S + D + I) / reference characters, spaces included.

    Empty references and all-empty corpora are handled as in :func:`wer`.

    Args:
        references: reference transcripts, one per utterance.
        hypotheses: hypothesis transcripts, parallel to ``references``.
    """
    return _edit_rate(references, hypotheses, jiwer.process_characters)


# --------------------------------------------------------------------------- intents


def intent_accuracy(ref_intents: Sequence[str], hyp_intents: Sequence[str]) -> float:
    """Fraction of utterances whose predicted intent equals the reference (1.0 if none)."""
    n = _check_lengths(ref_intents=ref_intents, hyp_intents=hyp_intents)
    if n == 0:
        return 1.0
    return sum(r == h for r, h in zip(ref_intents, hyp_intents, strict=True)) / n


# --------------------------------------------------------------------------- slots


def _safe_ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


@dataclass(frozen=True)
class Confusion:
    """Soft confusion counts (floats: SLU-F1 adds fractional distances) with P/R/F1.

    ``precision = tp / (tp + fp)`` and ``recall = tp / (tp + fn)``, 0.0 when the
    denominator is 0; ``f1`` is their harmonic mean, 0.0 when both are 0. The exception is
    ``tp = fp = fn = 0`` (no slot expected and none predicted): all three are 1.0, since
    a model that correctly predicts "no slots" has made no mistake — scoring it 0 would
    punish slot-less slices (e.g. ``HassNevermind``) for being right.
    """

    tp: float = 0.0
    fp: float = 0.0
    fn: float = 0.0

    def __add__(self, other: Confusion) -> Confusion:
        return Confusion(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)

    @property
    def _vacuous(self) -> bool:
        return self.tp == 0 and self.fp == 0 and self.fn == 0

    @property
    def precision(self) -> float:
        return 1.0 if self._vacuous else _safe_ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        return 1.0 if self._vacuous else _safe_ratio(self.tp, self.tp + self.fn)

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return _safe_ratio(2 * p * r, p + r)


@dataclass(frozen=True)
class PRF:
    """Micro-averaged slot precision, recall and F1 with the integer counts behind them."""

    precision: float
    recall: float
    f1: float
    tp: int
    fp: int
    fn: int


def slot_prf(ref_slots: Sequence[Sequence[Slot]], hyp_slots: Sequence[Sequence[Slot]]) -> PRF:
    """Exact-match slot precision/recall/F1, micro-averaged over the corpus.

    Per utterance, slots are multisets of ``(type, value)``: a predicted slot is a true
    positive when an identical, not yet matched reference slot exists. An utterance with
    no slots on either side adds nothing; with no slots anywhere, P = R = F1 = 1.0 (see
    :class:`Confusion`).

    Args:
        ref_slots: reference slots, one sequence per utterance.
        hyp_slots: predicted slots, parallel to ``ref_slots``.
    """
    _check_lengths(ref_slots=ref_slots, hyp_slots=hyp_slots)
    tp = fp = fn = 0
    for refs, hyps in zip(ref_slots, hyp_slots, strict=True):
        ref_count = Counter(_key(s) for s in refs)
        hyp_count = Counter(_key(s) for s in hyps)
        matched = sum((ref_count & hyp_count).values())
        tp += matched
        fp += sum(hyp_count.values()) - matched
        fn += sum(ref_count.values()) - matched
    c = Confusion(tp, fp, fn)
    return PRF(c.precision, c.recall, c.f1, tp, fp, fn)


def word_distance(reference: str, prediction: str) -> float:
    """SLURP word distance: ``min(1, WER(reference words, predicted words))``.

    An empty reference is at distance 0 from an empty prediction and 1 from anything else.
    """
    ref, hyp = reference.split(), prediction.split()
    if not ref:
        return 0.0 if not hyp else 1.0
    return min(1.0, _levenshtein(ref, hyp) / len(ref))


def char_distance(reference: str, prediction: str) -> float:
    """SLURP character distance: Levenshtein / max(len(reference), len(prediction)), 0 if both empty."""
    longest = max(len(reference), len(prediction))
    return _levenshtein(reference, prediction) / longest if longest else 0.0


@dataclass(frozen=True)
class SLUF1:
    """SLURP's SLU-F1 and its two components, with the soft counts behind them.

    ``word`` / ``char`` are the corpus totals, ``word_by_type`` / ``char_by_type`` the
    same counts per slot type (a type appears once it occurs on either side).
    ``slu_f1`` is the F1 of ``word + char``.
    """

    word_f1: float
    char_f1: float
    slu_f1: float
    word: Confusion
    char: Confusion
    word_by_type: dict[str, Confusion]
    char_by_type: dict[str, Confusion]


def _slurp_counts(
    ref_slots: Sequence[Sequence[Slot]],
    hyp_slots: Sequence[Sequence[Slot]],
    distance: Callable[[str, str], float],
) -> dict[str, Confusion]:
    by_type: dict[str, Confusion] = {}

    def add(slot_type: str, tp: float = 0.0, fp: float = 0.0, fn: float = 0.0) -> None:
        by_type[slot_type] = by_type.get(slot_type, Confusion()) + Confusion(tp, fp, fn)

    for refs, hyps in zip(ref_slots, hyp_slots, strict=True):
        remaining = list(refs)
        for hyp in hyps:
            candidates = [i for i, ref in enumerate(remaining) if ref.type == hyp.type]
            if not candidates:
                add(hyp.type, fp=1.0)
                continue
            # Lowest distance wins; ties go to the earliest reference slot (stable min).
            best = min(candidates, key=lambda i: distance(remaining[i].value, hyp.value))
            d = distance(remaining.pop(best).value, hyp.value)
            add(hyp.type, tp=1.0, fp=d, fn=d)
        for ref in remaining:
            add(ref.type, fn=1.0)
    return by_type


def _total(by_type: dict[str, Confusion]) -> Confusion:
    return sum(by_type.values(), Confusion())


def slu_f1(ref_slots: Sequence[Sequence[Slot]], hyp_slots: Sequence[Sequence[Slot]]) -> SLUF1:
    """SLU-F1 as defined by the SLURP benchmark (Bastianelli et al., 2020).

    Per utterance, each predicted slot whose type is among the still unmatched reference
    slots is paired with the reference slot of that type at the lowest distance ``d``
    (``tp += 1, fp += d, fn += d``; the reference slot is used up); a predicted slot of
    any other type counts ``fp += 1``; each reference slot left over counts ``fn += 1``.
    This runs twice, with :func:`word_distance` and with :func:`char_distance` (each pass
    picks its own nearest slot, as SLURP does). Word-F1 and char-F1 are micro F1 over
    their counts; SLU-F1 is the F1 of the summed word and char counts. With no slots
    anywhere all three are 1.0 (see :class:`Confusion`).

    Args:
        ref_slots: reference slots, one sequence per utterance.
        hyp_slots: predicted slots, parallel to ``ref_slots``.
    """
    _check_lengths(ref_slots=ref_slots, hyp_slots=hyp_slots)
    word_by_type = _slurp_counts(ref_slots, hyp_slots, word_distance)
    char_by_type = _slurp_counts(ref_slots, hyp_slots, char_distance)
    word, char = _total(word_by_type), _total(char_by_type)
    return SLUF1(
        word_f1=word.f1,
        char_f1=char.f1,
        slu_f1=(word + char).f1,
        word=word,
        char=char,
        word_by_type=dict(sorted(word_by_type.items())),
        char_by_type=dict(sorted(char_by_type.items())),
    )


# --------------------------------------------------------------------------- frames


@dataclass(frozen=True)
class SemER:
    """Semantic error rate ``(S + D + I) / reference_count`` with its counts."""

    rate: float
    substitutions: int
    deletions: int
    insertions: int
    reference_count: int


def _align_slots(refs: Sequence[Slot], hyps: Sequence[Slot]) -> tuple[int, int, int]:
    """Greedy type alignment: returns (substitutions, deletions, insertions)."""
    remaining_refs = [_key(s) for s in refs]
    unmatched_hyps: list[tuple[str, str]] = []
    # Exact matches first, so that a correct slot is never spent on a wrong partner
    # (ref lamp, fan vs hyp fan, lamps is 1 substitution, not 2).
    for hyp in (_key(s) for s in hyps):
        if hyp in remaining_refs:
            remaining_refs.remove(hyp)
        else:
            unmatched_hyps.append(hyp)
    substitutions = insertions = 0
    for hyp_type, _ in unmatched_hyps:
        same_type = next((r for r in remaining_refs if r[0] == hyp_type), None)
        if same_type is None:
            insertions += 1
        else:
            remaining_refs.remove(same_type)
            substitutions += 1
    return substitutions, len(remaining_refs), insertions


def semer(
    ref_intents: Sequence[str],
    ref_slots: Sequence[Sequence[Slot]],
    hyp_intents: Sequence[str],
    hyp_slots: Sequence[Sequence[Slot]],
) -> SemER:
    """Semantic error rate, the intent counted as one more slot of each utterance.

    Per utterance: a wrong (or empty) intent is one substitution. Slots are aligned by
    type, exact ``(type, value)`` matches first: same type and value is correct, same type
    and another value a substitution, an unmatched reference slot a deletion, an unmatched
    predicted slot an insertion. ``rate = (S + D + I) / sum(len(ref slots) + 1)``; it can
    exceed 1 when many slots are inserted. No utterances: rate 0.0.

    Args:
        ref_intents: reference intents.
        ref_slots: reference slots, one sequence per utterance.
        hyp_intents: predicted intents.
        hyp_slots: predicted slots.
    """
    _check_lengths(
        ref_intents=ref_intents, ref_slots=ref_slots, hyp_intents=hyp_intents, hyp_slots=hyp_slots
    )
    subs = dels = ins = ref_count = 0
    for ref_intent, refs, hyp_intent, hyps in zip(
        ref_intents, ref_slots, hyp_intents, hyp_slots, strict=True
    ):
        s, d, i = _align_slots(refs, hyps)
        subs += s + (ref_intent != hyp_intent)
        dels += d
        ins += i
        ref_count += len(refs) + 1
    rate = (subs + dels + ins) / ref_count if ref_count else 0.0
    return SemER(rate, subs, dels, ins, ref_count)


def exact_match_rate(
    ref_intents: Sequence[str],
    ref_slots: Sequence[Sequence[Slot]],
    hyp_intents: Sequence[str],
    hyp_slots: Sequence[Sequence[Slot]],
) -> float:
    """Exact-frame accuracy: intent correct and slot multiset identical (1.0 if no utterances).

    Args:
        ref_intents: reference intents.
        ref_slots: reference slots, one sequence per utterance.
        hyp_intents: predicted intents.
        hyp_slots: predicted slots.
    """
    n = _check_lengths(
        ref_intents=ref_intents, ref_slots=ref_slots, hyp_intents=hyp_intents, hyp_slots=hyp_slots
    )
    if n == 0:
        return 1.0
    hits = sum(
        ri == hi and Counter(map(_key, rs)) == Counter(map(_key, hs))
        for ri, rs, hi, hs in zip(ref_intents, ref_slots, hyp_intents, hyp_slots, strict=True)
    )
    return hits / n


# --------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class ReliabilityBin:
    """One equal-width confidence bin ``(lower, upper]`` (the first bin also holds 0.0).

    ``mean_confidence`` and ``accuracy`` are 0.0 for an empty bin (``count == 0``), which
    keeps the bins JSON-serialisable; plots should skip empty bins.
    """

    lower: float
    upper: float
    count: int
    mean_confidence: float
    accuracy: float


def reliability_bins(
    confidences: Sequence[float], correct: Sequence[bool], n_bins: int = 15
) -> list[ReliabilityBin]:
    """Bin predictions by confidence for a reliability diagram.

    Args:
        confidences: predicted-class probabilities in [0, 1].
        correct: whether each prediction was right, parallel to ``confidences``.
        n_bins: number of equal-width bins over [0, 1] (at least 1).

    Returns:
        ``n_bins`` bins, lowest first, empty ones included.
    """
    _check_lengths(confidences=confidences, correct=correct)
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    conf = np.asarray(confidences, dtype=float)
    hit = np.asarray(correct, dtype=bool)
    if conf.size and (np.isnan(conf).any() or conf.min() < 0.0 or conf.max() > 1.0):
        raise ValueError("confidences must lie in [0, 1]")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # right=True gives bins (lower, upper], Guo et al.'s convention; 0.0 lands in bin 0.
    index = np.digitize(conf, edges[1:-1], right=True)
    bins = []
    for b in range(n_bins):
        mask = index == b
        count = int(mask.sum())
        bins.append(
            ReliabilityBin(
                lower=float(edges[b]),
                upper=float(edges[b + 1]),
                count=count,
                mean_confidence=float(conf[mask].mean()) if count else 0.0,
                accuracy=float(hit[mask].mean()) if count else 0.0,
            )
        )
    return bins


def expected_calibration_error(
    confidences: Sequence[float], correct: Sequence[bool], n_bins: int = 15
) -> float:
    """Expected calibration error over equal-width bins (Guo et al., 2017).

    ``ECE = sum_b (n_b / N) * |accuracy_b - mean_confidence_b|``; 0.0 with no predictions.

    Args:
        confidences: predicted-class probabilities in [0, 1].
        correct: whether each prediction was right, parallel to ``confidences``.
        n_bins: number of equal-width bins over [0, 1] (at least 1).
    """
    bins = reliability_bins(confidences, correct, n_bins)
    total = len(confidences)
    if total == 0:
        return 0.0
    return float(sum(b.count / total * abs(b.accuracy - b.mean_confidence) for b in bins))


# --------------------------------------------------------------------------- slicing


def duration_bucket(seconds: float) -> str:
    """Duration slice label: ``"<1.5s"``, ``"1.5-2.5s"``, ``"2.5-4s"`` or ``">=4s"``.

    Lower bounds are inclusive (1.5 s is in ``"1.5-2.5s"``). Negative or NaN durations
    raise ``ValueError``.
    """
    if math.isnan(seconds) or seconds < 0:
        raise ValueError(f"duration must be a non-negative number of seconds, got {seconds}")
    if seconds < 1.5:
        return DURATION_BUCKETS[0]
    if seconds < 2.5:
        return DURATION_BUCKETS[1]
    if seconds < 4.0:
        return DURATION_BUCKETS[2]
    return DURATION_BUCKETS[3]
