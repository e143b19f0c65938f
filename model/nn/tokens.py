"""Vocabularies: CTC units (characters, tagged characters or words), intents, and parse
tokens for the optional parse decoder.

**Tagged transcripts** carry the slots inside the transcript: ``turn on the <area> kitchen
</> lights``: an opening tag per slot type before the value's words and one closing tag
``</>`` after them. A CTC head over :class:`TaggedCharVocab` spells such transcripts, so
the slots are read off the (LM-beam) transcript and are verbatim spans of it by
construction; :func:`tag_transcript` builds the training targets from a manifest row and
:func:`split_tagged` reads a decoded string back into transcript and slots.

The parse of an utterance (decoder models) is the token sequence
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
    "CLOSE_TAG",
    "CTCVocab",
    "CharVocab",
    "ParseVocab",
    "TaggedCharVocab",
    "WordVocab",
    "ctc_vocab_from_json",
    "format_parse",
    "is_tag",
    "number_words",
    "open_tag",
    "split_tagged",
    "tag_transcript",
]

CLOSE_TAG = "</>"


def open_tag(slot_type: str) -> str:
    """The tag word that opens a slot of ``slot_type``: ``<area>``."""
    return f"<{slot_type}>"


def is_tag(word: str) -> bool:
    """True for a slot tag word (``<area>`` or ``</>``)."""
    return len(word) > 2 and word[0] == "<" and word[-1] == ">"


def tag_transcript(transcript: str, slots: Sequence[Slot]) -> tuple[str, int]:
    """Insert slot tags around each slot value's words in ``transcript``.

    Each value is looked for as a contiguous run of whole words, first after the previous
    slot's span (slots are listed in spoken order), then anywhere not yet tagged. A value
    that is not a verbatim span (rare: the grammar speaks values as written) stays
    untagged.

    Returns:
        The tagged transcript and the number of slots that could not be placed.
    """
    words = transcript.split()
    taken = [False] * len(words)
    spans: dict[int, tuple[int, str]] = {}  # start -> (end, type)
    missed, cursor = 0, 0

    def find(value: list[str], start: int) -> int | None:
        n = len(value)
        for i in range(start, len(words) - n + 1):
            if words[i : i + n] == value and not any(taken[i : i + n]):
                return i
        return None

    for slot in slots:
        value = slot.value.split()
        at = find(value, cursor) if value else None
        if at is None and value:
            at = find(value, 0)
        if at is None:
            missed += 1
            continue
        end = at + len(value)
        taken[at:end] = [True] * len(value)
        spans[at] = (end, slot.type)
        cursor = end
    out: list[str] = []
    close_at: int | None = None
    for i, word in enumerate(words):
        if close_at == i:
            out.append(CLOSE_TAG)
            close_at = None
        if i in spans:
            close_at, slot_type = spans[i]
            out.append(open_tag(slot_type))
        out.append(word)
    if close_at is not None:
        out.append(CLOSE_TAG)
    return " ".join(out), missed


def split_tagged(text: str, slot_types: Iterable[str] | None = None) -> tuple[str, list[Slot]]:
    """A tagged transcript → (plain transcript, slots).

    Read leniently, because a decoder may emit tags imperfectly: a slot runs from its
    opening tag to the next tag or the end; a closing tag without an open slot, a slot
    with no words and (with ``slot_types``) an unknown slot type are dropped.
    """
    known = None if slot_types is None else set(slot_types)
    words: list[str] = []
    slots: list[Slot] = []
    current: str | None = None
    value: list[str] = []

    def close() -> None:
        if current is not None and value:
            slots.append(Slot(type=current, value=" ".join(value)))

    for word in text.split():
        if is_tag(word):
            close()
            current, value = None, []
            if word != CLOSE_TAG:
                name = word[1:-1]
                current = name if known is None or name in known else None
            continue
        words.append(word)
        if current is not None:
            value.append(word)
    close()
    return " ".join(words), slots


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

    def target_text(self, transcript: str, slots: Sequence[Slot]) -> str:
        """What the CTC head spells for an utterance: its transcript."""
        return transcript


@dataclass(frozen=True)
class TaggedCharVocab:
    """Characters plus slot tags: ``<blank>`` 0, space, apostrophe, ``a``–``z``, then one
    opening tag per slot type (sorted) and the closing tag ``</>``.

    The CTC head spells tagged transcripts (see the module docstring); a tag is one CTC
    unit, written as a word of its own in text.
    """

    slot_types: tuple[str, ...]
    blank = 0

    @property
    def symbols(self) -> tuple[str, ...]:
        return (*CharVocab.symbols, *(open_tag(t) for t in self.slot_types), CLOSE_TAG)

    def __len__(self) -> int:
        return len(CharVocab.symbols) + len(self.slot_types) + 1

    def _index(self) -> dict[str, int]:
        cached = self.__dict__.get("_index_cache")
        if cached is None:
            cached = {s: i for i, s in enumerate(self.symbols)}
            object.__setattr__(self, "_index_cache", cached)
        return cached

    def encode(self, text: str) -> list[int]:
        """A tagged transcript → unit ids; unknown tags and characters are dropped."""
        index = self._index()
        ids: list[int] = []
        for word in text.split():
            if ids:
                ids.append(index[" "])
            if is_tag(word):
                if word in index:
                    ids.append(index[word])
                elif ids:
                    ids.pop()  # no double space for a dropped tag
                continue
            ids.extend(index[c] for c in word if c in index and c != "<blank>")
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Unit ids → a tagged transcript (tags as separate words, single spaces)."""
        symbols = self.symbols
        parts = []
        for i in ids:
            if i == self.blank or i >= len(symbols):
                continue
            s = symbols[i]
            parts.append(f" {s} " if is_tag(s) else s)
        return " ".join("".join(parts).split())

    def target_text(self, transcript: str, slots: Sequence[Slot]) -> str:
        """What the CTC head spells for an utterance: its tagged transcript."""
        return tag_transcript(transcript, slots)[0]

    def to_json(self) -> dict[str, object]:
        return {"units": "tagged", "slot_types": list(self.slot_types)}


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

    def target_text(self, transcript: str, slots: Sequence[Slot]) -> str:
        """What the CTC head spells for an utterance: its transcript."""
        return transcript


CTCVocab = CharVocab | TaggedCharVocab | WordVocab


def ctc_vocab_from_json(data: dict | None) -> CTCVocab:
    """The CTC vocabulary a package config describes (characters when absent)."""
    if not data or data.get("units") == "char":
        return CharVocab()
    if data.get("units") == "word":
        return WordVocab(tuple(data["words"]))
    if data.get("units") == "tagged":
        return TaggedCharVocab(tuple(data["slot_types"]))
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
