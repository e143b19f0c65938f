"""Spoken-form text normalisation: numbers and symbols spelled out as words.

Transcripts and slot values are lower-case words only (``a-z``, space, apostrophe), so
that a character-level CTC head never has to guess how "42 %" was pronounced:
``"Set it to 42.5°"`` → ``"set it to forty two point five degrees"``.
"""

from __future__ import annotations

import re

__all__ = ["is_spoken_form", "normalise_text", "spell_number"]

_ONES = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
    "eighteen", "nineteen",
]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_SCALES = [(10**9, "billion"), (10**6, "million"), (1000, "thousand")]
_ORDINAL_IRREGULAR = {
    "one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
    "nine": "ninth", "twelve": "twelfth",
}

# Symbols that are read aloud, applied after numbers have been spelled out.
_SYMBOLS = {
    "%": " percent ",
    "°c": " degrees celsius ",
    "°f": " degrees fahrenheit ",
    "°": " degrees ",
    "&": " and ",
    "+": " plus ",
    "@": " at ",
    "#": " number ",
}
# "an hour and a 1/2" is said "an hour and a half".
_FRACTIONS = {"1/2": "half", "1/4": "quarter", "3/4": "three quarters", "1/3": "third"}

_NUMBER_RE = re.compile(r"(?<![\w.])(\d+)(?:\.(\d+))?(st|nd|rd|th)?(?![\d])")
_SPOKEN_RE = re.compile(r"^[a-z']+( [a-z']+)*$")


def _below_thousand(n: int) -> list[str]:
    words: list[str] = []
    hundreds, rest = divmod(n, 100)
    if hundreds:
        words += [_ONES[hundreds], "hundred"]
    if rest >= 20:
        tens, ones = divmod(rest, 10)
        words.append(_TENS[tens])
        if ones:
            words.append(_ONES[ones])
    elif rest or not words:
        words.append(_ONES[rest])
    return words


def spell_number(n: int, ordinal: bool = False) -> str:
    """Spell a non-negative integer in English words, without "and" or hyphens.

    Args:
        n: the integer, ``0 <= n < 10**12``.
        ordinal: spell the ordinal form ("twenty first") instead of the cardinal.

    Raises:
        ValueError: ``n`` is negative or too large.

    >>> spell_number(1905)
    'one thousand nine hundred five'
    """
    if n < 0 or n >= 10**12:
        raise ValueError(f"cannot spell {n}: only 0 <= n < 10**12")
    words: list[str] = []
    rest = n
    for scale, name in _SCALES:
        count, rest = divmod(rest, scale)
        if count:
            words += _below_thousand(count) + [name]
    if rest or not words:
        words += _below_thousand(rest)
    if ordinal:
        last = words[-1]
        if last in _ORDINAL_IRREGULAR:
            words[-1] = _ORDINAL_IRREGULAR[last]
        elif last.endswith("y"):
            words[-1] = last[:-1] + "ieth"
        else:
            words[-1] = last + "th"
    return " ".join(words)


def _spell_match(match: re.Match[str]) -> str:
    integer, fraction, suffix = match.group(1), match.group(2), match.group(3)
    if suffix and not fraction:
        return f" {spell_number(int(integer), ordinal=True)} "
    words = spell_number(int(integer))
    if fraction:
        # Decimals are read digit by digit: "2.25" -> "two point two five".
        words += " point " + " ".join(_ONES[int(d)] for d in fraction)
    return f" {words} "


def normalise_text(text: str) -> str:
    """Turn written text into its spoken form: lower case words, single spaces.

    Numbers become words (``"21.5"`` → ``"twenty one point five"``, ``"3rd"`` →
    ``"third"``), common symbols are read aloud (``%``, ``°``, ``&``, ``+``), simple
    fractions are spelled (``"a 1/2"`` → ``"a half"``), and every other character that is
    not a letter or an in-word apostrophe becomes a space.
    """
    out = text.lower().replace("’", "'")
    for fraction, words in _FRACTIONS.items():
        out = re.sub(rf"(?<!\d){re.escape(fraction)}(?!\d)", f" {words} ", out)
    # Thousands separators ("1,000") would otherwise split into two numbers.
    out = re.sub(r"(?<=\d),(?=\d{3}\b)", "", out)
    out = _NUMBER_RE.sub(_spell_match, out)
    for symbol, words in _SYMBOLS.items():
        out = out.replace(symbol, words)
    out = re.sub(r"[^a-z' ]+", " ", out)
    # Apostrophes only survive inside words ("what's"), not as quotes.
    out = re.sub(r"(?<![a-z])'|'(?![a-z])", " ", out)
    return " ".join(out.split())


def is_spoken_form(text: str) -> bool:
    """True when ``text`` is already normalised (lower-case words, single spaces)."""
    return bool(_SPOKEN_RE.match(text))
