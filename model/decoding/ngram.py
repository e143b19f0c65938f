"""Word n-gram language model for CTC beam search, written as an ARPA file.

The command domain has a closed, small vocabulary (about 500 words in the full corpus),
so most of what a character CTC gets wrong is spelling that a lexicon and a word n-gram
can fix. The model is trained on the *training* transcripts only (the test split holds
out whole templates; its sentences must stay unseen).

Estimation: interpolated absolute discounting (Ney et al.), with every order's
probability mass for unseen continuations passed to the next lower order, stored in
ARPA backoff form (interpolated probabilities for seen n-grams, backoff weights that
make each history's distribution sum to one). ``<unk>`` gets the discounted unigram
mass, so out-of-vocabulary words are possible but unlikely.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["NgramLM", "train_ngram"]

BOS, EOS, UNK = "<s>", "</s>", "<unk>"


@dataclass(frozen=True)
class NgramLM:
    """An n-gram model: ``probs[n-1][(w1..wn)]`` = log10 P(wn | w1..wn-1) and
    ``backoffs[n-1][(w1..wn)]`` = log10 backoff weight of that history (ARPA units)."""

    order: int
    probs: tuple[dict[tuple[str, ...], float], ...]
    backoffs: tuple[dict[tuple[str, ...], float], ...]

    @property
    def vocabulary(self) -> list[str]:
        """Words with a unigram (``<s>``, ``</s>`` and ``<unk>`` included)."""
        return sorted(w for (w,) in self.probs[0])

    def log10_prob(self, word: str, history: tuple[str, ...]) -> float:
        """log10 P(word | history), backing off through shorter histories."""
        history = history[-(self.order - 1):] if self.order > 1 else ()
        if (word,) not in self.probs[0]:
            word = UNK
        penalty = 0.0
        while True:
            gram = (*history, word)
            p = self.probs[len(gram) - 1].get(gram)
            if p is not None:
                return penalty + p
            penalty += self.backoffs[len(history) - 1].get(history, 0.0) if history else 0.0
            history = history[1:]

    def sentence_log10_prob(self, words: Iterable[str]) -> float:
        """log10 P(<s> words </s>)."""
        history: tuple[str, ...] = (BOS,)
        total = 0.0
        for w in [*words, EOS]:
            total += self.log10_prob(w, history)
            history = (*history, w)
        return total

    def write_arpa(self, path: Path) -> Path:
        """Write the model in ARPA format (readable by KenLM / flashlight)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = ["", "\\data\\"]
        lines += [f"ngram {n + 1}={len(self.probs[n])}" for n in range(self.order)]
        for n in range(self.order):
            lines += ["", f"\\{n + 1}-grams:"]
            for gram in sorted(self.probs[n]):
                row = f"{self.probs[n][gram]:.6f}\t{' '.join(gram)}"
                if n < self.order - 1 and gram in self.backoffs[n]:
                    row += f"\t{self.backoffs[n][gram]:.6f}"
                lines.append(row)
        lines += ["", "\\end\\", ""]
        path.write_text("\n".join(lines), encoding="utf-8")
        return path


def train_ngram(sentences: Iterable[str], order: int = 3, discount: float = 0.7,
                min_count: int = 1) -> NgramLM:
    """Estimate an interpolated absolute-discounting n-gram model.

    Args:
        sentences: training transcripts, words separated by spaces.
        order: n (≥ 1).
        discount: absolute discount D in (0, 1) taken from every seen count.
        min_count: n-grams of order ≥ 3 seen fewer times are left out (count cut-off, as
            SRILM's ``-gtNmin``): their counts join the history's backoff mass, so every
            history's distribution still sums to one. A 5-gram of the full corpus is 6 MB
            of ARPA with every singleton kept.

    Raises:
        ValueError: bad order/discount/min_count, or no words at all.
    """
    if order < 1:
        raise ValueError(f"order must be ≥ 1, not {order}")
    if not 0 < discount < 1:
        raise ValueError(f"discount must lie in (0, 1), not {discount}")
    if min_count < 1:
        raise ValueError(f"min_count must be ≥ 1, not {min_count}")
    counts: list[Counter[tuple[str, ...]]] = [Counter() for _ in range(order)]
    for sentence in sentences:
        words = [BOS, *sentence.split(), EOS]
        for n in range(1, order + 1):
            for i in range(max(0, 1 if n == 1 else 0), len(words) - n + 1):
                counts[n - 1][tuple(words[i:i + n])] += 1
    if not counts[0]:
        raise ValueError("no training words")

    # Unigrams: discounted counts, the freed mass spread uniformly over vocabulary + <unk>.
    total = sum(counts[0].values())
    vocab = sorted({g[0] for g in counts[0]} | {UNK})
    uniform = discount * len(counts[0]) / total / len(vocab)
    interp: dict[tuple[str, ...], float] = {
        (w,): max(counts[0].get((w,), 0) - discount, 0) / total + uniform for w in vocab
    }
    probs: list[dict[tuple[str, ...], float]] = [
        {g: math.log10(p) for g, p in interp.items()} | {(BOS,): -99.0}  # <s> is never predicted
    ]
    backoffs: list[dict[tuple[str, ...], float]] = [{} for _ in range(order)]

    for n in range(2, order + 1):
        by_history: dict[tuple[str, ...], dict[str, int]] = defaultdict(dict)
        for gram, c in counts[n - 1].items():
            by_history[gram[:-1]][gram[-1]] = c
        level: dict[tuple[str, ...], float] = {}
        cut = min_count if n >= 3 else 1
        for history, nexts in by_history.items():
            c_h = sum(nexts.values())
            kept = {w: c for w, c in nexts.items() if c >= cut}
            # Interpolation weight of the lower order = the mass freed by discounting (and
            # by the cut-off). In ARPA form it is exactly the backoff weight: an unseen
            # continuation gets gamma(h) * P(w | shorter history), and the kept ones sum to
            # 1 - gamma(h).
            gamma = (discount * len(kept) + (c_h - sum(kept.values()))) / c_h
            backoffs[n - 2][history] = math.log10(gamma)
            for w, c in kept.items():
                # (h[1:], w) is always kept when (h, w) is: it is seen at least as often,
                # and the cut-off of a lower order is never higher.
                level[(*history, w)] = (c - discount) / c_h + gamma * interp[(*history[1:], w)]
        interp.update(level)
        probs.append({g: math.log10(p) for g, p in level.items()})
    for n in range(order - 1):
        # A history that was itself cut off has no entry to carry a backoff weight (its
        # continuations were all cut too): it backs off at weight 1, like an unseen one.
        backoffs[n] = {g: b for g, b in backoffs[n].items() if g in probs[n]}
        for gram in probs[n]:
            backoffs[n].setdefault(gram, 0.0)
    return NgramLM(order, tuple(probs), tuple(backoffs))
