"""Metric functions on hand-computed cases; the arithmetic is in the comments."""

import pytest

from model.data.manifest import Slot
from model.evaluation.metrics import (
    Confusion,
    cer,
    char_distance,
    duration_bucket,
    exact_match_rate,
    expected_calibration_error,
    intent_accuracy,
    reliability_bins,
    semer,
    slot_prf,
    slu_f1,
    wer,
    word_distance,
)


def S(slot_type: str, value: str) -> Slot:
    return Slot(type=slot_type, value=value)


# ------------------------------------------------------------------ WER / CER


def test_wer_single_utterance() -> None:
    # turn on the light / turn of the lights: on->of, light->lights = 2 substitutions / 4 words
    assert wer(["turn on the light"], ["turn of the lights"]) == pytest.approx(2 / 4)


def test_wer_is_corpus_level_not_mean_of_utterances() -> None:
    # u1: 2 errors / 4 words; u2: "stop" vs "": 1 deletion / 1 word.
    # corpus: (2 + 1) / (4 + 1) = 0.6; the mean of per-utterance rates would be 0.75.
    assert wer(["turn on the light", "stop"], ["turn of the lights", ""]) == pytest.approx(0.6)


def test_wer_empty_references() -> None:
    # "" vs "hello there": 2 insertions, 0 reference words; "turn on" exact: 0 / 2.
    # corpus: 2 / 2 = 1.0
    assert wer(["", "turn on"], ["hello there", "turn on"]) == pytest.approx(1.0)
    # all-empty corpus and no utterances: nothing to get wrong
    assert wer(["", ""], ["", ""]) == 0.0
    assert wer([], []) == 0.0
    # no reference word anywhere: the rate is the insertion count (2 / max(0, 1))
    assert wer([""], ["hello there"]) == pytest.approx(2.0)


def test_wer_collapses_whitespace() -> None:
    assert wer(["turn  on "], [" turn on"]) == 0.0
    assert cer(["turn  on "], [" turn on"]) == 0.0


def test_cer() -> None:
    # "light" vs "lights": 1 insertion / 5 chars = 0.2
    assert cer(["light"], ["lights"]) == pytest.approx(0.2)
    # "on" vs "of": 1 sub; "the lamp" (8 chars incl. space) vs "the lam": 1 deletion
    # corpus: 2 / (2 + 8) = 0.2
    assert cer(["on", "the lamp"], ["of", "the lam"]) == pytest.approx(0.2)
    # empty reference: 3 inserted chars ("a b"), no reference chars
    assert cer([""], ["a b"]) == pytest.approx(3.0)
    assert cer([""], [""]) == 0.0


# ------------------------------------------------------------------ intents


def test_intent_accuracy() -> None:
    # 2 of 3 right
    refs = ["HassTurnOn", "HassTurnOff", "HassGetWeather"]
    hyps = ["HassTurnOn", "HassTurnOn", "HassGetWeather"]
    assert intent_accuracy(refs, hyps) == pytest.approx(2 / 3)
    assert intent_accuracy([], []) == 1.0


# ------------------------------------------------------------------ slots (exact)


def test_slot_prf_micro_multiset() -> None:
    ref = [
        [S("area", "kitchen"), S("name", "lamp")],  # u1
        [S("name", "fan"), S("name", "fan")],  # u2: the same slot twice
        [],  # u3: nothing either side, contributes nothing
        [],  # u4
    ]
    hyp = [
        [S("area", "kitchen"), S("name", "lamps")],  # tp 1 (area), fp 1 (lamps), fn 1 (lamp)
        [S("name", "fan")],  # tp 1, fn 1 (only one of the two fans matched)
        [],
        [S("area", "office")],  # fp 1
    ]
    # tp = 2, fp = 2, fn = 2 -> P = 2/4, R = 2/4, F1 = 0.5
    prf = slot_prf(ref, hyp)
    assert (prf.tp, prf.fp, prf.fn) == (2, 2, 2)
    assert prf.precision == pytest.approx(0.5)
    assert prf.recall == pytest.approx(0.5)
    assert prf.f1 == pytest.approx(0.5)


def test_slot_prf_unequal_precision_recall() -> None:
    # tp 1, fp 0, fn 2 -> P = 1, R = 1/3, F1 = 2 * 1 * (1/3) / (4/3) = 0.5
    prf = slot_prf([[S("a", "x"), S("b", "y"), S("c", "z")]], [[S("a", "x")]])
    assert (prf.precision, prf.recall, prf.f1) == pytest.approx((1.0, 1 / 3, 0.5))
    # nothing predicted at all: P = 0 (0/0 -> 0), R = 0, F1 = 0
    prf = slot_prf([[S("a", "x")]], [[]])
    assert (prf.precision, prf.recall, prf.f1) == (0.0, 0.0, 0.0)


def test_slot_prf_no_slots_anywhere_is_perfect() -> None:
    prf = slot_prf([[], []], [[], []])
    assert (prf.precision, prf.recall, prf.f1, prf.tp, prf.fp, prf.fn) == (1, 1, 1, 0, 0, 0)


# ------------------------------------------------------------------ SLURP SLU-F1


def test_slot_distances() -> None:
    # words: [ceiling, light] vs [ceiling, lights]: 1 sub / 2 words
    assert word_distance("ceiling light", "ceiling lights") == pytest.approx(0.5)
    # capped at 1: "a" vs "b c d" = 3 edits / 1 word -> 1
    assert word_distance("a", "b c d") == 1.0
    # chars: "ceiling light" (13) vs "ceiling lights" (14): 1 edit / 14
    assert char_distance("ceiling light", "ceiling lights") == pytest.approx(1 / 14)
    # "kitten" vs "sitting": classic 3 edits / 7
    assert char_distance("kitten", "sitting") == pytest.approx(3 / 7)
    assert char_distance("", "") == 0.0
    assert word_distance("", "") == 0.0
    assert word_distance("", "x") == 1.0


def test_slu_f1_worked_example() -> None:
    ref = [
        [S("area", "kitchen"), S("name", "ceiling light")],
        [S("brightness", "fifty")],
        [],
    ]
    hyp = [
        [S("area", "kitchen"), S("name", "ceiling lights")],
        [S("area", "office")],
        [],
    ]
    # u1 area: d = 0 -> tp 1. u1 name: word d = 1/2, char d = 1/14 -> tp 1, fp d, fn d.
    # u2 area: type not in reference -> fp 1; brightness left over -> fn 1. u3: nothing.
    # word: tp = 2, fp = 0.5 + 1 = 1.5, fn = 1.5 -> P = R = 2 / 3.5 = 4/7 = F1
    # char: tp = 2, fp = fn = 1/14 + 1 = 15/14 -> P = R = 2 / (2 + 15/14) = 28/43 = F1
    # SLU: tp = 4, fp = fn = 1.5 + 15/14 = 36/14 -> P = R = 4 / (4 + 36/14) = 56/92 = 14/23
    result = slu_f1(ref, hyp)
    assert result.word == Confusion(2.0, 1.5, 1.5)
    assert result.char.tp == 2.0
    assert result.char.fp == pytest.approx(15 / 14)
    assert result.word_f1 == pytest.approx(4 / 7)
    assert result.char_f1 == pytest.approx(28 / 43)
    assert result.slu_f1 == pytest.approx(14 / 23)
    # per type: name tp 1, fp/fn 0.5; area tp 1, fp 1 (the office); brightness fn 1
    assert result.word_by_type["name"] == Confusion(1.0, 0.5, 0.5)
    assert result.word_by_type["area"] == Confusion(1.0, 1.0, 0.0)
    assert result.word_by_type["brightness"] == Confusion(0.0, 0.0, 1.0)
    assert list(result.word_by_type) == ["area", "brightness", "name"]


def test_slu_f1_picks_nearest_reference_of_the_type() -> None:
    # hyp "desk lamp" pairs with reference "desk lamp" (d = 0), not "bedroom lamp";
    # "bedroom lamp" is left over: tp 1, fp 0, fn 1 -> P 1, R 1/2, F1 2/3 (word and char)
    result = slu_f1(
        [[S("name", "bedroom lamp"), S("name", "desk lamp")]], [[S("name", "desk lamp")]]
    )
    assert result.word == Confusion(1.0, 0.0, 1.0)
    assert result.char == Confusion(1.0, 0.0, 1.0)
    assert result.slu_f1 == pytest.approx(2 / 3)


def test_slu_f1_no_slots_is_perfect() -> None:
    result = slu_f1([[]], [[]])
    assert (result.word_f1, result.char_f1, result.slu_f1) == (1.0, 1.0, 1.0)


# ------------------------------------------------------------------ SemER / exact frame


def test_semer_counts_each_error_kind() -> None:
    ref_intents = ["HassLightSet", "HassTurnOff"]
    ref_slots = [
        [S("area", "kitchen"), S("name", "lamp"), S("brightness", "fifty")],
        [S("area", "office")],
    ]
    hyp_intents = ["HassTurnOn", "HassTurnOff"]
    hyp_slots = [
        [S("area", "kitchen"), S("name", "light"), S("floor", "upstairs")],
        [S("area", "office")],
    ]
    # u1: intent wrong -> S 1; area correct; name lamp->light -> S 1; brightness -> D 1;
    #     floor -> I 1. Reference count 3 slots + 1 intent = 4.
    # u2: all correct. Reference count 1 + 1 = 2.
    # SemER = (2 + 1 + 1) / (4 + 2) = 4/6
    result = semer(ref_intents, ref_slots, hyp_intents, hyp_slots)
    assert (result.substitutions, result.deletions, result.insertions) == (2, 1, 1)
    assert result.reference_count == 6
    assert result.rate == pytest.approx(4 / 6)


def test_semer_prefers_exact_matches() -> None:
    # ref name=lamp, name=fan; hyp name=fan, name=lamps. Exact first: fan = fan,
    # then lamps vs lamp -> 1 substitution (greedy in order would give 2). (1) / (2 + 1)
    result = semer(
        ["HassTurnOn"],
        [[S("name", "lamp"), S("name", "fan")]],
        ["HassTurnOn"],
        [[S("name", "fan"), S("name", "lamps")]],
    )
    assert (result.substitutions, result.deletions, result.insertions) == (1, 0, 0)
    assert result.rate == pytest.approx(1 / 3)
    assert semer([], [], [], []).rate == 0.0


def test_exact_match_rate() -> None:
    ref_intents = ["A", "A", "B", "C"]
    ref_slots = [[S("x", "1"), S("y", "2")], [S("x", "1")], [], [S("x", "1")]]
    hyp_intents = ["A", "A", "B", "D"]
    # u1 same slots in another order (multiset) -> hit; u2 extra slot -> miss;
    # u3 hit; u4 wrong intent -> miss. 2 / 4
    hyp_slots = [[S("y", "2"), S("x", "1")], [S("x", "1"), S("x", "1")], [], [S("x", "1")]]
    assert exact_match_rate(ref_intents, ref_slots, hyp_intents, hyp_slots) == 0.5


# ------------------------------------------------------------------ calibration


def test_ece_two_bins_by_hand() -> None:
    conf = [0.9, 0.8, 0.3, 0.2]
    correct = [True, False, False, True]
    # bins (0, 0.5], (0.5, 1]:
    # high: mean conf (0.9 + 0.8) / 2 = 0.85, accuracy 1/2 -> gap 0.35, weight 2/4
    # low:  mean conf (0.3 + 0.2) / 2 = 0.25, accuracy 1/2 -> gap 0.25, weight 2/4
    # ECE = 0.5 * 0.35 + 0.5 * 0.25 = 0.30
    assert expected_calibration_error(conf, correct, n_bins=2) == pytest.approx(0.30)
    # 15 bins: every sample alone in its bin -> mean |conf - correct|
    # = (|0.9-1| + |0.8-0| + |0.3-0| + |0.2-1|) / 4 = (0.1 + 0.8 + 0.3 + 0.8) / 4 = 0.5
    assert expected_calibration_error(conf, correct) == pytest.approx(0.5)


def test_reliability_bins() -> None:
    bins = reliability_bins([0.9, 0.8, 0.3, 0.2, 0.0, 1.0], [1, 0, 0, 1, 0, 1], n_bins=2)
    assert [(b.lower, b.upper, b.count) for b in bins] == [(0.0, 0.5, 3), (0.5, 1.0, 3)]
    # low bin: 0.3, 0.2, 0.0 -> mean 0.5/3, accuracy 1/3; high: 0.9, 0.8, 1.0 -> 0.9, 2/3
    assert bins[0].mean_confidence == pytest.approx(0.5 / 3)
    assert bins[0].accuracy == pytest.approx(1 / 3)
    assert bins[1].mean_confidence == pytest.approx(0.9)
    assert bins[1].accuracy == pytest.approx(2 / 3)
    empty = reliability_bins([0.95], [True], n_bins=4)
    assert [b.count for b in empty] == [0, 0, 0, 1]
    assert expected_calibration_error([], []) == 0.0


def test_calibration_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="n_bins"):
        reliability_bins([0.5], [True], n_bins=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error([1.2], [True])


# ------------------------------------------------------------------ helpers and errors


def test_duration_bucket_boundaries() -> None:
    assert duration_bucket(0.0) == "<1.5s"
    assert duration_bucket(1.49) == "<1.5s"
    assert duration_bucket(1.5) == "1.5-2.5s"
    assert duration_bucket(2.5) == "2.5-4s"
    assert duration_bucket(3.99) == "2.5-4s"
    assert duration_bucket(4.0) == ">=4s"
    with pytest.raises(ValueError):
        duration_bucket(-0.1)
    with pytest.raises(ValueError):
        duration_bucket(float("nan"))


@pytest.mark.parametrize(
    "call",
    [
        lambda: wer(["a"], []),
        lambda: cer(["a", "b"], ["a"]),
        lambda: intent_accuracy(["A"], ["A", "B"]),
        lambda: slot_prf([[]], []),
        lambda: slu_f1([], [[]]),
        lambda: semer(["A"], [[]], ["A"], []),
        lambda: exact_match_rate(["A"], [[]], [], [[]]),
        lambda: expected_calibration_error([0.5], []),
        lambda: reliability_bins([0.5, 0.6], [True]),
    ],
)
def test_length_mismatch_raises(call) -> None:
    with pytest.raises(ValueError, match="same length"):
        call()
