"""Grammar sampling and label extraction with hassil's recogniser."""

from collections import Counter

import numpy as np
import pytest

from model.data.grammar import (
    DOMAINS,
    Grammar,
    Template,
    domain_of,
    load_values,
    predicted_domain,
)
from model.data.manifest import Slot
from model.data.textnorm import is_spoken_form


@pytest.fixture(scope="module")
def grammar() -> Grammar:
    return Grammar.load("en")


def _template(grammar: Grammar, intent: str, contains: str) -> Template:
    for template in grammar.templates:
        if template.intent == intent and contains in template.text:
            return template
    raise AssertionError(f"no {intent} template containing {contains!r}")


def test_grammar_covers_all_intents_with_unique_template_ids(grammar: Grammar) -> None:
    assert len(grammar.intent_names) >= 40
    assert {t.intent for t in grammar.templates} == set(grammar.intent_names)
    ids = [t.id for t in grammar.templates]
    assert len(ids) == len(set(ids))
    assert all(t.domain in DOMAINS for t in grammar.templates)


def test_template_ids_are_stable_across_loads(grammar: Grammar) -> None:
    again = Grammar.load("en")
    assert [t.id for t in again.templates] == [t.id for t in grammar.templates]


def test_label_extracts_area_and_spelled_brightness(grammar: Grammar) -> None:
    template = _template(grammar, "HassLightSet", "{brightness}")
    labelled = grammar.label("set the kitchen brightness to 50%", template)
    assert not isinstance(labelled, str), labelled
    assert labelled.intent == "HassLightSet"
    assert labelled.text == "set the kitchen brightness to fifty percent"
    assert Slot(type="area", value="kitchen") in labelled.slots
    assert Slot(type="brightness", value="fifty") in labelled.slots


def test_label_orders_slots_as_spoken(grammar: Grammar) -> None:
    template = _template(grammar, "HassTurnOn", "{area}")
    rng = np.random.default_rng(3)
    for _ in range(20):
        text = grammar.sample(template, rng)
        labelled = grammar.label(text, template)
        if isinstance(labelled, str):
            continue
        positions = [labelled.text.find(s.value) for s in labelled.slots]
        assert all(p >= 0 for p in positions), (labelled.text, labelled.slots)
        assert positions == sorted(positions)


def test_label_drops_sentence_of_another_intent(grammar: Grammar) -> None:
    template = _template(grammar, "HassTurnOn", "{area}")
    assert grammar.label("what time is it", template) == "other_intent:HassGetCurrentTime"
    assert grammar.label("purple monkey dishwasher", template) == "unrecognised"


def test_wildcards_are_filled_from_value_lists(grammar: Grammar) -> None:
    template = _template(grammar, "HassShoppingListAddItem", "{shopping_list_item:item}")
    sentences, report = grammar.generate([template], 5, np.random.default_rng(0))
    items = set(grammar.values["wildcards"]["shopping_list_item"])
    assert sentences and report.balanced()
    for sentence in sentences:
        values = [s.value for s in sentence.slots if s.type == "item"]
        assert values and values[0] in items, sentence


def test_generate_is_deterministic_and_balanced(grammar: Grammar) -> None:
    templates = grammar.templates[::20]
    a, report = grammar.generate(templates, 3, np.random.default_rng(7))
    b, _ = grammar.generate(templates, 3, np.random.default_rng(7))
    assert a == b
    assert report.balanced()
    assert report.labelled == len(a)
    # hassil's recogniser recovers labels for nearly every sentence the grammar yields.
    assert report.labelled >= 0.9 * (report.sampled - report.duplicates)


def test_generated_labels_are_in_spoken_form(grammar: Grammar) -> None:
    sentences, _ = grammar.generate(grammar.templates[::10], 2, np.random.default_rng(1))
    slot_types = set(grammar.slot_types)
    for sentence in sentences:
        assert is_spoken_form(sentence.text), sentence.text
        for slot in sentence.slots:
            assert slot.type in slot_types
            assert is_spoken_form(slot.value), slot
    per_template = Counter(s.template_id for s in sentences)
    assert max(per_template.values()) <= 2


def test_fixed_domain_is_not_a_spoken_slot(grammar: Grammar) -> None:
    template = next(
        t for t in grammar.templates if t.intent == "HassTurnOn" and "light" in t.entity_domains
    )
    sentences, _ = grammar.generate([template], 4, np.random.default_rng(2))
    assert sentences
    assert all(s.type != "domain" for sent in sentences for s in sent.slots)


@pytest.mark.parametrize(
    ("intent", "entity_domains", "domain"),
    [
        ("HassStartTimer", (), "timers"),
        ("HassMediaPause", (), "media"),
        ("HassTurnOn", ("light",), "lights"),
        ("HassTurnOn", ("cover", "valve"), "covers"),
        ("HassTurnOn", (), "devices"),
        ("HassGetState", (), "status"),
        ("HassShoppingListAddItem", (), "shopping_list"),
    ],
)
def test_domain_of(intent: str, entity_domains: tuple[str, ...], domain: str) -> None:
    assert domain_of(intent, entity_domains) == domain


def test_load_unknown_language_raises() -> None:
    with pytest.raises(ValueError, match="language"):
        Grammar.load("xx-not-a-language")


@pytest.mark.parametrize(
    ("intent", "slots", "domain"),
    [
        ("HassTurnOn", [Slot(type="name", value="ceiling fan")], "climate"),
        ("HassTurnOff", [{"type": "name", "value": "garage door"}], "covers"),
        ("HassTurnOn", [Slot(type="area", value="kitchen"), Slot(type="name", value="desk lamp")],
         "lights"),
        ("HassTurnOn", [Slot(type="name", value="lava lamp")], "devices"),  # unknown device
        ("HassTurnOn", [Slot(type="name", value="kettle")], "devices"),  # switch: no domain
        ("HassGetState", [Slot(type="name", value="front door")], "security"),
        ("HassGetState", [], "status"),
        ("HassStartTimer", [Slot(type="name", value="desk lamp")], "timers"),  # intent decides
        ("HassLightSet", [], "lights"),
    ],
)
def test_predicted_domain(intent: str, slots: list, domain: str, grammar: Grammar) -> None:
    assert predicted_domain(intent, slots, grammar.values) == domain
    assert predicted_domain(intent, slots, load_values("en")) == domain
