"""Template-level split: no template (phrasing) is shared across splits."""

from collections import Counter, defaultdict

import numpy as np
import pytest

from model.data.grammar import Grammar
from model.data.splits import select_templates, split_templates


@pytest.fixture(scope="module")
def grammar() -> Grammar:
    return Grammar.load("en")


def test_every_template_in_exactly_one_split(grammar: Grammar) -> None:
    split = split_templates(grammar.templates, 0.1, 0.15, np.random.default_rng(0))
    assert set(split.split_of) == {t.id for t in grammar.templates}
    assert set(split.split_of.values()) == {"train", "valid", "test"}


def test_sentences_of_a_template_never_cross_splits(grammar: Grammar) -> None:
    templates = select_templates(grammar.templates, np.random.default_rng(1), max_templates=120)
    split = split_templates(templates, 0.2, 0.2, np.random.default_rng(1))
    sentences, _ = grammar.generate(templates, 3, np.random.default_rng(1))
    splits_of_template: dict[str, set[str]] = defaultdict(set)
    split_of_text: dict[str, set[str]] = defaultdict(set)
    for sentence in sentences:
        splits_of_template[sentence.template_id].add(split.split_of[sentence.template_id])
        split_of_text[sentence.text].add(split.split_of[sentence.template_id])
    assert all(len(s) == 1 for s in splits_of_template.values())
    test_templates = set(split.templates_in("test"))
    train_templates = set(split.templates_in("train"))
    assert test_templates and train_templates and not (test_templates & train_templates)


def test_split_is_stratified_and_keeps_training_templates(grammar: Grammar) -> None:
    split = split_templates(grammar.templates, 0.1, 0.15, np.random.default_rng(2))
    per_intent: dict[str, Counter[str]] = defaultdict(Counter)
    for template in grammar.templates:
        per_intent[template.intent][split.split_of[template.id]] += 1
    for intent, counts in per_intent.items():
        assert counts["train"] >= 1, intent
        if intent in split.train_only_intents:
            assert counts["valid"] == counts["test"] == 0
        else:
            assert counts["test"] >= 1 and counts["valid"] >= 1, (intent, counts)


def test_split_is_deterministic_by_seed(grammar: Grammar) -> None:
    a = split_templates(grammar.templates, 0.1, 0.15, np.random.default_rng(5))
    b = split_templates(grammar.templates, 0.1, 0.15, np.random.default_rng(5))
    c = split_templates(grammar.templates, 0.1, 0.15, np.random.default_rng(6))
    assert a == b
    assert a.split_of != c.split_of


def test_select_templates_caps_round_robin_over_intents(grammar: Grammar) -> None:
    picked = select_templates(
        grammar.templates, np.random.default_rng(0), max_templates=40, max_intents=8
    )
    assert len(picked) == 40
    per_intent = Counter(t.intent for t in picked)
    assert len(per_intent) == 8
    assert all(n >= 3 for n in per_intent.values())  # enough to split three ways


def test_select_templates_rejects_unknown_intent(grammar: Grammar) -> None:
    with pytest.raises(ValueError, match="HassMakeCoffee"):
        select_templates(grammar.templates, np.random.default_rng(0), intents=["HassMakeCoffee"])
