"""Vocabularies: characters for the CTC head, intents, and parse tokens for the decoder.

The parse of an utterance is the token sequence
``[HassLightSet] [area] kitchen [brightness] fifty <eos>``: one intent token, then per
slot a slot-type token followed by the value's words. Its readable form is
``HassLightSet | area = kitchen | brightness = fifty``.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from model.data.manifest import Slot
from model.data.textnorm import spell_number

__all__ = [
    "CTCVocab",
    "CharVocab",
    "ParseVocab",
    "WordVocab",
    "ctc_vocab_from_json",
    "format_parse",
    "number_words",
]


class CharVocab:
    """``<blank>`` (index 0), space, apostrophe, ``a``–``z``: spoken-form transcripts."""

    symbols: tuple[str, ...] = ("<blank>", " ", "'", *string.ascii_lowercase)
    blank = 0

    def __init__(self) -> None:
        self._index = {s: i for i, s in enumerate(self.symbols)}

    def __len__(self) -> int:
        return len(self.symbols)

    def encode(self, text: str) -> list[int]:
        """Characters outside the vocabulary are dropped (transcripts are normalised)."""
        return [self._index[c] for c in text if c in self._index and c != "<blank>"]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.symbols[i] for i in ids if i != self.blank)

    def to_json(self) -> dict[str, object]:
        return {"units": "char"}


@dataclass(frozen=True)
class WordVocab:
    """Whole-word CTC units: ``<blank>`` 0, ``<unk>`` 1, then the words (sorted).

    The command domain has a closed vocabulary of a few hundred words; a word-level CTC
    label rate is ~5× lower than characters, so alignments are loose and each output
    unit is a word the model can learn directly, instead of English spelling.
    """

    words: tuple[str, ...]
    blank = 0
    UNK = 1

    def __len__(self) -> int:
        return 2 + len(self.words)

    def _index(self) -> dict[str, int]:
        cached = self.__dict__.get("_index_cache")
        if cached is None:
            cached = {w: i + 2 for i, w in enumerate(self.words)}
            object.__setattr__(self, "_index_cache", cached)
        return cached

    def encode(self, text: str) -> list[int]:
        index = self._index()
        return [index.get(w, self.UNK) for w in text.split()]

    def decode(self, ids: Iterable[int]) -> str:
        out = []
        for i in ids:
            if i == self.blank:
                continue
            out.append("<unk>" if i == self.UNK or i - 2 >= len(self.words) else self.words[i - 2])
        return " ".join(out)

    def to_json(self) -> dict[str, object]:
        return {"units": "word", "words": list(self.words)}


CTCVocab = CharVocab | WordVocab


def ctc_vocab_from_json(data: dict | None) -> CTCVocab:
    """The CTC vocabulary a package config describes (characters when absent)."""
    if not data or data.get("units") == "char":
        return CharVocab()
    if data.get("units") == "word":
        return WordVocab(tuple(data["words"]))
    raise ValueError(f"unknown CTC units {data.get('units')!r}")


def number_words() -> set[str]:
    """Every word used to spell numbers, so values never seen in training still decode."""
    words: set[str] = set()
    for n in (*range(1000), 1000, 1_000_000, 1_000_000_000):
        words.update(spell_number(n).split())
        words.update(spell_number(n, ordinal=True).split())
    return words | {"point", "half", "quarter", "percent", "degrees"}


@dataclass(frozen=True)
class ParseVocab:
    """Token ↔ index for the parse decoder.

    Layout: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3, then ``[Intent]`` tokens,
    ``[slot]`` tokens and value words, each group sorted (deterministic).
    """

    intents: tuple[str, ...]
    slot_types: tuple[str, ...]
    words: tuple[str, ...]

    PAD = 0
    BOS = 1
    EOS = 2
    UNK = 3
    _SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")

    @classmethod
    def build(
        cls, intents: Iterable[str], slot_types: Iterable[str], texts: Iterable[str]
    ) -> ParseVocab:
        """Vocabulary over the given intents and slot types; words from ``texts`` (e.g. all
        transcripts and open-list values) plus every number word."""
        words = set(number_words())
        for text in texts:
            words.update(text.split())
        return cls(tuple(sorted(set(intents))), tuple(sorted(set(slot_types))), tuple(sorted(words)))

    @property
    def tokens(self) -> tuple[str, ...]:
        return (
            *self._SPECIALS,
            *(f"[{i}]" for i in self.intents),
            *(f"[{s}]" for s in self.slot_types),
            *self.words,
        )

    def __len__(self) -> int:
        return len(self._SPECIALS) + len(self.intents) + len(self.slot_types) + len(self.words)

    def _index(self) -> dict[str, int]:
        cached = self.__dict__.get("_index_cache")
        if cached is None:
            cached = {t: i for i, t in enumerate(self.tokens)}
            object.__setattr__(self, "_index_cache", cached)
        return cached

    def encode(self, intent: str, slots: Sequence[Slot]) -> list[int]:
        """``<bos>`` + parse tokens + ``<eos>``; unknown words map to ``<unk>``."""
        index = self._index()
        ids = [self.BOS, index.get(f"[{intent}]", self.UNK)]
        for slot in slots:
            ids.append(index.get(f"[{slot.type}]", self.UNK))
            ids.extend(index.get(w, self.UNK) for w in slot.value.split())
        ids.append(self.EOS)
        return ids

    def decode(self, ids: Iterable[int]) -> tuple[str, list[Slot]]:
        """Token ids (without ``<bos>``; stops at ``<eos>``) → (intent, slots).

        Words before any slot token, or a slot with no words, are ignored; an intent token
        after the first position is ignored too — the parse is read leniently so that one
        wrong token does not lose the rest.
        """
        tokens = self.tokens
        intent = ""
        slots: list[Slot] = []
        current: str | None = None
        words: list[str] = []

        def close() -> None:
            if current is not None and words:
                slots.append(Slot(type=current, value=" ".join(words)))

        for i in ids:
            if i == self.EOS:
                break
            if i in (self.PAD, self.BOS, self.UNK) or i >= len(tokens):
                continue
            token = tokens[i]
            if token.startswith("[") and token.endswith("]"):
                name = token[1:-1]
                if name in self.intents:
                    if not intent and current is None:
                        intent = name
                    continue
                close()
                current, words = name, []
            elif current is not None:
                words.append(token)
        close()
        return intent, slots

    def to_json(self) -> dict[str, list[str]]:
        return {
            "intents": list(self.intents),
            "slot_types": list(self.slot_types),
            "words": list(self.words),
        }

    @classmethod
    def from_json(cls, data: dict[str, list[str]]) -> ParseVocab:
        return cls(tuple(data["intents"]), tuple(data["slot_types"]), tuple(data["words"]))


def format_parse(intent: str, slots: Sequence[Slot]) -> str:
    """Readable parse: ``HassLightSet | area = kitchen | brightness = fifty``."""
    return " | ".join([intent, *(f"{s.type} = {s.value}" for s in slots)])
