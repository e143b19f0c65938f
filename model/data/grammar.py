"""Text grammar: Home Assistant intent templates expanded into labelled sentences.

The English intents of ``home-assistant-intents`` are hassil templates such as
``"turn on [the] {area} lights"``. A template is the unit of phrasing: the corpus splits
train/valid/test by template so that test phrasings are never seen in training.

Sentences are drawn by a random walk over a template's expression tree (alternatives,
optionals, permutations, expansion rules, slot lists), with open lists (``area``,
``name``, ``floor`` and the wildcards) filled from ``values/<language>.yaml``. Labels
then come from hassil's own recogniser (``recognize_best``, as Home Assistant uses it):
a sentence the recogniser cannot map back to its template's intent is dropped and
counted, never silently mislabelled.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from hassil import Intents
from hassil.expression import (
    Alternative,
    Expression,
    ListReference,
    Permutation,
    RuleReference,
    Sentence,
    TextChunk,
)
from hassil.expression import (
    Sequence as SequenceExpr,
)
from hassil.intents import RangeSlotList, SlotList, TextSlotList, WildcardSlotList
from hassil.recognize import recognize_best
from hassil.util import normalize_whitespace
from home_assistant_intents import get_intents
from tqdm import tqdm

from model.data.manifest import Slot
from model.data.textnorm import normalise_text

__all__ = [
    "DOMAINS",
    "Grammar",
    "GrammarReport",
    "LabelledSentence",
    "Template",
    "domain_of",
    "load_values",
    "predicted_domain",
]

_VALUES_DIR = Path(__file__).parent / "values"

# Intent -> domain for intents whose domain does not depend on the device addressed.
_INTENT_DOMAIN = {
    "HassLightSet": "lights",
    "HassClimateGetTemperature": "climate",
    "HassClimateSetTemperature": "climate",
    "HassClimateSetFanMode": "climate",
    "HassFanSetSpeed": "climate",
    "HassGetWeather": "weather",
    "HassGetCurrentDate": "clock",
    "HassGetCurrentTime": "clock",
    "HassShoppingListAddItem": "shopping_list",
    "HassShoppingListCompleteItem": "shopping_list",
    "HassListAddItem": "todo_list",
    "HassListCompleteItem": "todo_list",
    "HassListRemoveItem": "todo_list",
    "HassVacuumStart": "appliances",
    "HassVacuumReturnToBase": "appliances",
    "HassVacuumCleanArea": "appliances",
    "HassLawnMowerStartMowing": "appliances",
    "HassLawnMowerDock": "appliances",
    "HassSetPosition": "covers",
    "HassBroadcast": "general",
    "HassNevermind": "general",
    "HassRespond": "general",
}
# Home Assistant entity domain -> our domain, for HassTurnOn/Off and HassGetState.
_ENTITY_DOMAIN = {
    "light": "lights",
    "cover": "covers",
    "valve": "covers",
    "lock": "security",
    "binary_sensor": "security",
    "fan": "climate",
    "climate": "climate",
    "media_player": "media",
    "vacuum": "appliances",
    "lawn_mower": "appliances",
    "person": "presence",
}
DOMAINS: tuple[str, ...] = (
    "lights", "climate", "media", "timers", "shopping_list", "todo_list", "weather",
    "clock", "appliances", "covers", "security", "presence", "devices", "status", "general",
)


def domain_of(intent: str, entity_domains: Sequence[str]) -> str:
    """Coarse domain of a template, used to slice metrics and stage domain shifts.

    Args:
        intent: hassil intent name.
        entity_domains: Home Assistant entity domains the template is restricted to
            (its ``requires_context`` or fixed ``domain`` slot); empty if unrestricted.
    """
    if intent in _INTENT_DOMAIN:
        return _INTENT_DOMAIN[intent]
    if "Timer" in intent:
        return "timers"
    if intent.startswith(("HassMedia", "HassSetVolume")):
        return "media"
    mapped = {_ENTITY_DOMAIN.get(d) for d in entity_domains} - {None}
    if len(mapped) == 1:
        return mapped.pop()  # type: ignore[return-value]
    return "status" if intent == "HassGetState" else "devices"


def predicted_domain(
    intent: str,
    slots: Iterable[Slot | Mapping[str, Any]],
    values: Mapping[str, Any],
) -> str:
    """Coarse domain of a *prediction* (no template known): :func:`domain_of` with the
    entity domains of the device the prediction names.

    Args:
        intent: the predicted intent.
        slots: the predicted slots (``Slot`` or ``{"type", "value"}`` mappings); the values
            of ``name`` slots are looked up among the device names.
        values: the open-list values (:func:`load_values`, ``Grammar.values``); its
            ``name`` entry maps Home Assistant entity domain → device names.

    Returns:
        One of :data:`DOMAINS`. A device name found under no (or several unrelated)
        entity domains falls back as :func:`domain_of` says (``devices``, ``status``).
    """
    said = set()
    for slot in slots:
        kind, value = (slot.type, slot.value) if isinstance(slot, Slot) else (
            slot.get("type"), slot.get("value"))
        if kind == "name" and isinstance(value, str):
            said.add(value)
    names: Mapping[str, Sequence[str]] = values.get("name") or {}
    entity_domains = sorted(d for d, listed in names.items() if said & set(listed))
    return domain_of(intent, entity_domains)


def load_values(language: str = "en", values_path: Path | None = None) -> dict[str, Any]:
    """The open-list values of ``language`` (``values/<language>.yaml``): ``area``,
    ``floor``, ``name`` (entity domain → device names), the wildcard lists.

    Raises:
        ValueError: no values file for ``language``.
    """
    values_path = values_path or _VALUES_DIR / f"{language}.yaml"
    if not values_path.exists():
        raise ValueError(f"no open-list values for {language!r}: {values_path} missing")
    return yaml.safe_load(values_path.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Template:
    """One hassil sentence template of one intent.

    Attributes:
        id: stable id, ``<intent>-<8 hex of sha1(intent, template text)>``.
        intent: hassil intent name.
        text: the template source, e.g. ``"turn on [the] {area} lights"``.
        domain: coarse domain (see :func:`domain_of`).
        entity_domains: HA entity domains a ``{name}`` in this template must belong to.
        needs_area_context: the template names no area but requires the speaker's area
            (``requires_context: area: slot: true``), e.g. "turn on the lights".
    """

    id: str
    intent: str
    text: str
    domain: str
    entity_domains: tuple[str, ...]
    needs_area_context: bool
    sentence: Sentence = field(repr=False, compare=False)
    expansion_rules: dict[str, Sentence] = field(repr=False, compare=False)


@dataclass(frozen=True)
class LabelledSentence:
    """A sentence in spoken form with the labels hassil recovered for it."""

    text: str
    intent: str
    slots: tuple[Slot, ...]
    template_id: str
    domain: str


@dataclass
class GrammarReport:
    """Counts that balance: ``sampled == labelled + sum(dropped.values())``."""

    templates: int = 0
    sampled: int = 0
    labelled: int = 0
    duplicates: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    dropped_by_intent: Counter[str] = field(default_factory=Counter)

    def balanced(self) -> bool:
        return self.sampled == self.labelled + self.duplicates + sum(self.dropped.values())


def _template_id(intent: str, text: str) -> str:
    digest = hashlib.sha1(f"{intent}\x00{text}".encode()).hexdigest()[:8]
    return f"{intent}-{digest}"


class Grammar:
    """The English (or other language) intent grammar with our open-list values.

    Build with :meth:`load`; then :meth:`sample` sentences from :attr:`templates` and
    :meth:`label` them.
    """

    def __init__(self, intents: Intents, values: dict[str, Any]) -> None:
        self.intents = intents
        self.values = values
        self._names_by_domain: dict[str, list[str]] = {
            domain: list(names) for domain, names in values["name"].items()
        }
        name_tuples = [
            (name, name, {"domain": domain})
            for domain, names in self._names_by_domain.items()
            for name in names
        ]
        # Lists the recogniser matches against; wildcards stay wildcards so free text is
        # captured whatever our value lists hold.
        self.recognise_lists: dict[str, SlotList] = {
            "area": TextSlotList.from_strings(values["area"], name="area"),
            "floor": TextSlotList.from_strings(values["floor"], name="floor"),
            "name": TextSlotList.from_tuples(name_tuples, name="name"),
        }
        self.templates: list[Template] = list(self._iter_templates())

    @classmethod
    def load(cls, language: str = "en", values_path: Path | None = None) -> Grammar:
        """Load the packaged intents of ``language`` and the open-list values file."""
        intents_dict = get_intents(language)
        if intents_dict is None:
            raise ValueError(f"home-assistant-intents has no language {language!r}")
        return cls(Intents.from_dict(intents_dict), load_values(language, values_path))

    @property
    def intent_names(self) -> list[str]:
        return sorted(self.intents.intents)

    @property
    def slot_types(self) -> list[str]:
        """Every slot name a template can produce (list references of all templates)."""
        names: set[str] = set()
        for template in self.templates:
            names.update(_slot_names(template.sentence.expression, template.expansion_rules))
        return sorted(names)

    def _iter_templates(self) -> Iterable[Template]:
        seen: set[str] = set()
        for intent_name, intent in self.intents.intents.items():
            for data in intent.data:
                rules = {**self.intents.expansion_rules, **data.expansion_rules}
                required = data.requires_context or {}
                domains = required.get("domain") or (data.slots or {}).get("domain") or []
                if isinstance(domains, str):
                    domains = [domains]
                area = required.get("area")
                needs_area = isinstance(area, dict) and bool(area.get("slot"))
                for sentence in data.sentences:
                    text = sentence.text or ""
                    template_id = _template_id(intent_name, text)
                    if template_id in seen:
                        continue
                    seen.add(template_id)
                    yield Template(
                        id=template_id,
                        intent=intent_name,
                        text=text,
                        domain=domain_of(intent_name, domains),
                        entity_domains=tuple(domains),
                        needs_area_context=needs_area,
                        sentence=sentence,
                        expansion_rules=rules,
                    )

    # -- sampling ---------------------------------------------------------------------

    def sample(self, template: Template, rng: np.random.Generator) -> str:
        """Draw one written sentence (digits and symbols still raw) from ``template``."""
        text = self._walk(template.sentence.expression, template, rng)
        return normalize_whitespace(text).strip()

    def _walk(self, expr: Expression, template: Template, rng: np.random.Generator) -> str:
        if isinstance(expr, TextChunk):
            return expr.original_text
        if isinstance(expr, Alternative):
            return self._walk(expr.items[rng.integers(len(expr.items))], template, rng)
        if isinstance(expr, Permutation):
            # Permutation items carry their own separating whitespace.
            order = rng.permutation(len(expr.items))
            return "".join(self._walk(expr.items[i], template, rng) for i in order)
        if isinstance(expr, SequenceExpr):
            return "".join(self._walk(item, template, rng) for item in expr.items)
        if isinstance(expr, RuleReference):
            rule = template.expansion_rules[expr.rule_name]
            return self._walk(rule.expression, template, rng)
        if isinstance(expr, ListReference):
            return self._sample_list(expr, template, rng)
        raise ValueError(f"unexpected hassil expression {type(expr).__name__} in {template.id}")

    def _sample_list(
        self, ref: ListReference, template: Template, rng: np.random.Generator
    ) -> str:
        name = ref.list_name
        if name == "name":
            domains = [d for d in template.entity_domains if d in self._names_by_domain]
            domains = domains or sorted(self._names_by_domain)
            names = self._names_by_domain[domains[rng.integers(len(domains))]]
            return names[rng.integers(len(names))]
        if name in ("area", "floor"):
            values = self.values[name]
            return values[rng.integers(len(values))]
        slot_list = self.intents.slot_lists.get(name)
        if isinstance(slot_list, WildcardSlotList) or slot_list is None:
            values = self.values["wildcards"].get(name)
            if not values:
                raise ValueError(f"no values for open list {{{name}}} (template {template.id})")
            return values[rng.integers(len(values))]
        if isinstance(slot_list, RangeSlotList):
            numbers = list(slot_list.get_numbers())
            number = numbers[rng.integers(len(numbers))]
            return f"{number:g}" if isinstance(number, float) else str(number)
        if isinstance(slot_list, TextSlotList):
            value = slot_list.values[rng.integers(len(slot_list.values))]
            return self._walk(value.text_in, template, rng)
        raise ValueError(f"unsupported slot list {{{name}}}: {type(slot_list).__name__}")

    # -- labelling --------------------------------------------------------------------

    def label(self, text: str, template: Template) -> LabelledSentence | str:
        """Recover intent and slots for a sentence drawn from ``template``.

        Returns the labelled sentence, or a short drop reason (``"unrecognised"``,
        ``"other_intent:<name>"``, ``"unspeakable_slot:<name>"``).
        """
        context: dict[str, Any] = {}
        if template.needs_area_context:
            # The speaker's own area comes from the satellite, not from speech.
            context["area"] = {"value": "speaker area", "text": "speaker area"}
        result = recognize_best(
            text,
            self.intents,
            slot_lists=self.recognise_lists,
            intent_context=context or None,
            language=self.intents.language,
        )
        if result is None:
            return "unrecognised"
        if result.intent.name != template.intent:
            return f"other_intent:{result.intent.name}"
        spoken = []
        for entity in result.entities_list:
            raw = entity.text_clean
            if not raw or (entity.text_span is None and raw.lower() not in text.lower()):
                continue  # fixed or context slots are not spoken
            value = normalise_text(raw)
            if not value:
                return f"unspeakable_slot:{entity.name}"
            start = entity.text_span[0] if entity.text_span else text.lower().find(raw.lower())
            spoken.append((start, Slot(type=entity.name, value=value)))
        spoken.sort(key=lambda item: item[0])
        return LabelledSentence(
            text=normalise_text(text),
            intent=template.intent,
            slots=tuple(slot for _, slot in spoken),
            template_id=template.id,
            domain=template.domain,
        )

    def generate(
        self,
        templates: Sequence[Template],
        per_template: int | Mapping[str, int],
        rng: np.random.Generator,
        max_attempts_factor: int = 3,
        progress: bool = False,
    ) -> tuple[list[LabelledSentence], GrammarReport]:
        """Sample and label up to ``per_template`` distinct sentences per template.

        Args:
            templates: templates to draw from.
            per_template: sentences wanted per template, one number for all or a
                mapping from template id.
            rng: source of randomness.
            max_attempts_factor: draws allowed per wanted sentence; a template with few
                distinct sentences yields fewer than asked.
            progress: a progress bar over the templates (labelling the ``full`` corpus
                takes minutes).

        Duplicated sentences are redrawn and counted, so the report balances.
        """
        report = GrammarReport(templates=len(templates))
        out: list[LabelledSentence] = []
        for template in tqdm(templates, desc="label", unit="template", disable=not progress):
            wanted = per_template if isinstance(per_template, int) else per_template[template.id]
            seen: set[str] = set()
            for _ in range(wanted * max_attempts_factor):
                if len(seen) >= wanted:
                    break
                written = self.sample(template, rng)
                report.sampled += 1
                key = normalise_text(written)
                if key in seen:
                    report.duplicates += 1
                    continue
                labelled = self.label(written, template)
                if isinstance(labelled, str):
                    report.dropped[labelled.split(":")[0]] += 1
                    report.dropped_by_intent[template.intent] += 1
                    seen.add(key)
                    continue
                seen.add(key)
                report.labelled += 1
                out.append(labelled)
        return out, report


def _slot_names(expr: Expression, rules: dict[str, Sentence], _depth: int = 0) -> set[str]:
    if _depth > 50:
        return set()
    if isinstance(expr, ListReference):
        return {expr.slot_name}
    if isinstance(expr, RuleReference):
        rule = rules.get(expr.rule_name)
        return _slot_names(rule.expression, rules, _depth + 1) if rule else set()
    names: set[str] = set()
    for item in getattr(expr, "items", []):
        names |= _slot_names(item, rules, _depth + 1)
    return names
