"""Template selection and the template-level train/valid/test split.

Splitting by template (not by sentence) is what makes the test split measure
generalisation to unseen phrasings: every sentence of a template lands in one split.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from model.data.grammar import Template

__all__ = [
    "ALL_SPLITS",
    "HELDOUT_SPLITS",
    "SPLITS",
    "TemplateSplit",
    "select_templates",
    "split_templates",
    "template_group",
]

SPLITS: tuple[str, ...] = ("train", "valid", "test")
HELDOUT_SPLITS: tuple[str, ...] = ("valid_heldout", "test_heldout")
"""Sentences of the valid/test templates spoken by the held-out voice family, which no
training utterance uses: the leave-one-voice-family-out check of generalisation."""
ALL_SPLITS: tuple[str, ...] = SPLITS + HELDOUT_SPLITS


def template_group(split: str) -> str:
    """The template split a split draws its sentences from (``test_heldout`` → ``test``)."""
    return split.removesuffix("_heldout")
_MIN_TEMPLATES_TO_HOLD_OUT = 3


@dataclass(frozen=True)
class TemplateSplit:
    """Split of each template, plus the intents too small to hold any template out."""

    split_of: dict[str, str]
    train_only_intents: tuple[str, ...]

    def templates_in(self, split: str) -> list[str]:
        return sorted(t for t, s in self.split_of.items() if s == split)


def _by_intent(templates: Sequence[Template]) -> dict[str, list[Template]]:
    groups: dict[str, list[Template]] = defaultdict(list)
    for template in templates:
        groups[template.intent].append(template)
    return dict(sorted(groups.items()))


def select_templates(
    templates: Sequence[Template],
    rng: np.random.Generator,
    max_templates: int | None = None,
    max_intents: int | None = None,
    intents: Sequence[str] | None = None,
) -> list[Template]:
    """Choose the templates a corpus is built from.

    Args:
        templates: all templates of the grammar.
        rng: source of randomness (seeded by the caller).
        max_templates: cap on the number of templates, taken round-robin over intents so
            every chosen intent keeps templates in proportion.
        max_intents: keep at most this many intents, drawn among those with enough
            templates to be split three ways.
        intents: keep only these intents (e.g. for a domain-shift scenario).

    Returns:
        Templates in a deterministic order (by intent, then id).

    Raises:
        ValueError: ``intents`` names an intent the grammar does not have.
    """
    groups = _by_intent(templates)
    if intents is not None:
        unknown = sorted(set(intents) - set(groups))
        if unknown:
            raise ValueError(f"unknown intents {unknown}; grammar has {sorted(groups)}")
        groups = {name: groups[name] for name in sorted(set(intents))}
    if max_intents is not None and len(groups) > max_intents:
        splittable = [n for n, ts in groups.items() if len(ts) >= _MIN_TEMPLATES_TO_HOLD_OUT]
        pool = splittable if len(splittable) >= max_intents else list(groups)
        chosen = sorted(rng.choice(pool, size=max_intents, replace=False).tolist())
        groups = {name: groups[name] for name in chosen}
    shuffled = {
        name: [ts[i] for i in rng.permutation(len(ts))] for name, ts in groups.items()
    }
    if max_templates is None:
        picked = [t for ts in shuffled.values() for t in ts]
    else:
        picked = []
        depth = 0
        while len(picked) < max_templates and any(len(ts) > depth for ts in shuffled.values()):
            for ts in shuffled.values():
                if depth < len(ts) and len(picked) < max_templates:
                    picked.append(ts[depth])
            depth += 1
    return sorted(picked, key=lambda t: (t.intent, t.id))


def split_templates(
    templates: Sequence[Template], valid: float, test: float, rng: np.random.Generator
) -> TemplateSplit:
    """Assign each template to train, valid or test, stratified by intent.

    An intent with at least three templates gets ``round(n × fraction)`` templates in
    each held-out split (at least one where the fraction is positive) and keeps at least
    one for training. An intent with fewer templates stays in train entirely, and is
    listed in ``train_only_intents`` so reports can say so.
    """
    split_of: dict[str, str] = {}
    train_only: list[str] = []
    for intent, group in _by_intent(templates).items():
        order = [group[i] for i in rng.permutation(len(group))]
        n = len(order)
        if n < _MIN_TEMPLATES_TO_HOLD_OUT:
            train_only.append(intent)
            n_test = n_valid = 0
        else:
            n_test = max(1 if test > 0 else 0, math.floor(n * test + 0.5))
            n_valid = max(1 if valid > 0 else 0, math.floor(n * valid + 0.5))
            while n_test + n_valid > n - 1:
                # Keep a training template: shrink the larger held-out share first.
                if n_valid >= n_test and n_valid > 0:
                    n_valid -= 1
                else:
                    n_test -= 1
        for i, template in enumerate(order):
            split_of[template.id] = (
                "test" if i < n_test else "valid" if i < n_test + n_valid else "train"
            )
    return TemplateSplit(split_of=split_of, train_only_intents=tuple(train_only))
