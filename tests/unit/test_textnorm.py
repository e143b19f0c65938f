"""Number spelling and spoken-form normalisation, on hand-written cases."""

import pytest

from model.data.textnorm import is_spoken_form, normalise_text, spell_number


@pytest.mark.parametrize(
    ("number", "words"),
    [
        (0, "zero"),
        (7, "seven"),
        (13, "thirteen"),
        (20, "twenty"),
        (42, "forty two"),
        (100, "one hundred"),
        (105, "one hundred five"),
        (999, "nine hundred ninety nine"),
        (1000, "one thousand"),
        (1905, "one thousand nine hundred five"),
        (6500, "six thousand five hundred"),
        (1_000_001, "one million one"),
    ],
)
def test_spell_number_cardinals(number: int, words: str) -> None:
    assert spell_number(number) == words


@pytest.mark.parametrize(
    ("number", "words"),
    [(1, "first"), (2, "second"), (3, "third"), (5, "fifth"), (12, "twelfth"),
     (20, "twentieth"), (21, "twenty first"), (100, "one hundredth")],
)
def test_spell_number_ordinals(number: int, words: str) -> None:
    assert spell_number(number, ordinal=True) == words


@pytest.mark.parametrize("bad", [-1, 10**12])
def test_spell_number_rejects_out_of_range(bad: int) -> None:
    with pytest.raises(ValueError):
        spell_number(bad)


@pytest.mark.parametrize(
    ("written", "spoken"),
    [
        ("Set brightness to 42 %", "set brightness to forty two percent"),
        ("brightness 50%", "brightness fifty percent"),
        ("Set it to 21.5°", "set it to twenty one point five degrees"),
        ("set the heat to 70°F", "set the heat to seventy degrees fahrenheit"),
        ("an hour and a 1/2", "an hour and a half"),
        ("the 3rd floor", "the third floor"),
        ("1,000 watts", "one thousand watts"),
        ("What's the temperature?", "what's the temperature"),
        ("rock & roll", "rock and roll"),
        ("timer for 'pizza'", "timer for pizza"),
        ("2.05", "two point zero five"),
        ("  Turn   ON the  Lights!! ", "turn on the lights"),
    ],
)
def test_normalise_text(written: str, spoken: str) -> None:
    assert normalise_text(written) == spoken
    assert is_spoken_form(spoken)


def test_normalised_text_has_no_digits_or_symbols() -> None:
    text = normalise_text("Set 3 timers: 5 min, 10 min & 1/2 hour @ 7pm #2 +1")
    assert is_spoken_form(text), text
    assert not any(ch.isdigit() for ch in text)


def test_is_spoken_form_rejects_written_text() -> None:
    assert not is_spoken_form("Turn on")
    assert not is_spoken_form("fifty %")
    assert not is_spoken_form("two  spaces")
    assert not is_spoken_form("")
