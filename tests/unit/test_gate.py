"""The offline gate on crafted candidates: reports come from the real metric code
(``evaluate`` on synthetic manifest rows and predictions), only *which* utterances each
model gets wrong is chosen by the test."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from model.data.manifest import ManifestRow, Slot
from model.inference.prediction import Prediction
from monitoring.gate import (
    GateInputs,
    GateResult,
    GateSet,
    ModelCost,
    evaluate_gate,
    flip_counts,
)
from voiceloop.settings import GateFloorSettings, GateSettings

DOMAINS = ("lights", "climate", "media", "timers")
PER_DOMAIN = 100                     # 4 domains x 100 = 400 utterances
N = PER_DOMAIN * len(DOMAINS)
COST = ModelCost(latency_p50_ms=10.0, size_bytes=4_000_000)
# Every limit the tests rely on is spelled out, so that tuning params.yaml cannot
# change what these tests mean.
SETTINGS = GateSettings(
    golden_set="golden",
    max_regression_pt={"intent_accuracy": 0.5, "slot_f1": 1.0, "semer": 1.0, "wer": 1.0},
    slice_max_regression_pt={"intent_accuracy": 5.0, "semer": 5.0},
    min_slice_n=100,
    max_latency_increase=0.2,
    max_size_increase=0.2,
    max_negative_flip_rate=0.01,
    floor=GateFloorSettings(min_intent_accuracy=0.85, max_semer=0.55),
)


def golden_rows() -> list[ManifestRow]:
    """400 utterances; utterance i is in domain DOMAINS[i // 100], one slot each."""
    return [
        ManifestRow(
            id=f"u{i:03d}", audio=f"audio/u{i:03d}.wav", duration_s=2.0,
            transcript="turn on the kitchen light", intent="HassTurnOn",
            slots=[Slot(type="area", value="kitchen")], engine="espeak-ng", voice="en-us",
            split="test", template_id="t0", domain=DOMAINS[i // PER_DOMAIN],
        )
        for i in range(N)
    ]


ROWS = golden_rows()


def predictions(wrong: Iterable[int], version: str) -> list[Prediction]:
    """Every utterance right except ``wrong``, whose intent is wrong (transcript and slot
    stay right, so only intent accuracy, SemER and exact frames move)."""
    bad = set(wrong)
    return [
        Prediction(id=row.id, transcript=row.transcript,
                   intent="HassTurnOff" if i in bad else row.intent, slots=row.slots,
                   confidence=0.9, model_version=version)
        for i, row in enumerate(ROWS)
    ]


def spread(count: int, offset: int = 0) -> list[int]:
    """``count`` utterance indices spread evenly over the four domains."""
    per = count // len(DOMAINS)
    return [d * PER_DOMAIN + offset + k for d in range(len(DOMAINS)) for k in range(per)]


def gate(cand_wrong: Iterable[int], prod_wrong: Iterable[int], *,
         settings: GateSettings = SETTINGS, candidate_cost: ModelCost = COST) -> GateResult:
    golden = GateSet.from_predictions("golden", ROWS, predictions(cand_wrong, "2"),
                                      predictions(prod_wrong, "1"))
    inputs = GateInputs(sets=[golden], candidate=candidate_cost, production=COST,
                        candidate_version="2", production_version="1")
    return evaluate_gate(inputs, settings)


def failed_names(result: GateResult) -> set[str]:
    return {c.name for c in result.failed_checks}


def test_a_clearly_better_candidate_passes() -> None:
    prod_wrong = spread(40)                    # production: 90 % intent accuracy
    cand_wrong = prod_wrong[::2]               # candidate: a subset, 95 %, no new errors
    result = gate(cand_wrong, prod_wrong)
    assert result.passed, result.failed
    assert result.failed == []
    assert result.summary["golden.intent_accuracy"] == pytest.approx(0.95)
    assert result.summary["golden.intent_accuracy.production"] == pytest.approx(0.90)
    assert result.summary["golden.negative_flip_rate"] == 0.0
    kinds = {c.kind for c in result.checks}
    assert kinds == {"floor", "metric", "flips", "slice", "cost"}
    # The four domain slices (n = 100 = min_slice_n) are checked, two metrics each.
    domain_checks = [c for c in result.checks if c.name.startswith("slice domain=")]
    assert len(domain_checks) == 2 * len(DOMAINS)


def test_two_points_worse_on_intent_fails_that_check() -> None:
    prod_wrong = spread(20)                    # 95 %
    cand_wrong = prod_wrong + spread(8, offset=50)   # 93 %: -2 pt
    result = gate(cand_wrong, prod_wrong)
    assert not result.passed
    check = next(c for c in result.checks if c.name == "intent_accuracy")
    assert not check.passed
    assert check.candidate == pytest.approx(0.93)
    assert check.production == pytest.approx(0.95)
    assert check.limit == pytest.approx(0.945)   # production - 0.5 pt
    assert check.bound == "min"
    assert any("intent accuracy" in r and r.startswith("[golden]") for r in result.failed)


def test_a_slice_ten_points_worse_fails_when_large_enough_and_is_skipped_when_not() -> None:
    # Production: 10 errors in each of lights, climate, media; timers perfect.
    prod_wrong = [d * PER_DOMAIN + k for d in range(3) for k in range(10)]
    # Candidate: fixes all 30, but gets 10 timers utterances wrong: 97.5 % vs 92.5 %
    # overall, yet timers drops from 100 % to 90 %.
    cand_wrong = [3 * PER_DOMAIN + k for k in range(10)]
    # 10 negative flips = 2.5 %: allowed here, this test is about slices.
    loose_flips = SETTINGS.model_copy(update={"max_negative_flip_rate": 0.05})
    result = gate(cand_wrong, prod_wrong, settings=loose_flips)
    assert not result.passed
    assert failed_names(result) == {"slice domain=timers intent_accuracy"}
    check = result.failed_checks[0]
    assert (check.n, check.candidate, check.production) == (100, pytest.approx(0.9), 1.0)
    assert result.summary["golden.intent_accuracy"] > result.summary[
        "golden.intent_accuracy.production"]

    small_slices_skipped = loose_flips.model_copy(update={"min_slice_n": 101})
    result = gate(cand_wrong, prod_wrong, settings=small_slices_skipped)
    assert result.passed, result.failed
    assert not any(c.name.startswith("slice domain=") for c in result.checks)
    assert result.slices_skipped >= len(DOMAINS)


def test_equal_accuracy_with_three_percent_negative_flips_fails() -> None:
    prod_wrong = spread(12)                    # 3 per domain
    cand_wrong = spread(12, offset=50)         # 3 other ones per domain: same accuracy
    result = gate(cand_wrong, prod_wrong)
    assert not result.passed
    assert failed_names(result) == {"negative_flip_rate"}
    check = result.failed_checks[0]
    assert check.candidate == pytest.approx(0.03)
    assert result.summary["golden.positive_flip_rate"] == pytest.approx(0.03)
    assert "12 of 400 utterances" in check.detail


def test_flip_counts_definition() -> None:
    rows = ROWS[:4]
    prod = predictions([1], "1")[:4]
    # u0 right -> slot value wrong (negative), u1 wrong -> right (positive), u2 errored
    # (negative), u3 missing (negative).
    cand = [
        prod[0].model_copy(update={"slots": [Slot(type="area", value="garage")]}),
        Prediction(id=rows[1].id, intent=rows[1].intent, slots=rows[1].slots),
        prod[2].model_copy(update={"error": "decoder failed"}),
    ]
    flips = flip_counts(rows, prod, cand)
    assert (flips.n, flips.production_right, flips.candidate_right) == (4, 3, 1)
    assert (flips.negative, flips.positive) == (3, 1)
    assert flips.negative_rate == pytest.approx(0.75)
    assert flips.broken_share == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown id 'nope'"):
        flip_counts(rows, prod, [Prediction(id="nope")])


def test_the_floor_fails_a_bad_model_even_when_production_is_as_bad() -> None:
    wrong = spread(120)                        # both 70 % intent accuracy, identical
    result = gate(wrong, wrong)
    assert not result.passed
    assert failed_names(result) == {"floor_intent_accuracy"}
    check = result.failed_checks[0]
    assert check.limit == 0.85 and check.production == pytest.approx(0.70)


def test_a_first_model_without_production_is_judged_by_the_floors_only() -> None:
    good = GateSet.from_predictions("golden", ROWS, predictions(spread(20), "1"))
    result = evaluate_gate(GateInputs(sets=[good], candidate=COST), SETTINGS)
    assert result.passed
    assert {c.kind for c in result.checks} == {"floor"}
    bad = GateSet.from_predictions("golden", ROWS, predictions(spread(120), "1"))
    result = evaluate_gate(GateInputs(sets=[bad], candidate=COST), SETTINGS)
    assert not result.passed
    assert result.to_tags()["gate.production_version"] == "none"


def test_latency_fifty_percent_slower_fails() -> None:
    slower = ModelCost(latency_p50_ms=15.0, size_bytes=COST.size_bytes)
    result = gate(spread(20), spread(20), candidate_cost=slower)
    assert failed_names(result) == {"latency_p50_ms"}
    check = result.failed_checks[0]
    assert check.set is None and check.limit == pytest.approx(12.0)
    bigger = ModelCost(latency_p50_ms=10.0, size_bytes=int(COST.size_bytes * 1.19))
    assert gate(spread(20), spread(20), candidate_cost=bigger).passed


def test_every_set_is_checked_and_the_floors_only_on_the_golden_one() -> None:
    golden = GateSet.from_predictions("golden", ROWS, predictions(spread(20), "2"),
                                      predictions(spread(20), "1"))
    # Labelled traffic: the candidate is 2 pt worse there.
    traffic = GateSet.from_predictions("traffic", ROWS, predictions(spread(28), "2"),
                                       predictions(spread(20), "1"))
    result = evaluate_gate(GateInputs(sets=[golden, traffic], candidate=COST,
                                      production=COST), SETTINGS)
    failed = {(c.set, c.name) for c in result.failed_checks}
    assert ("traffic", "intent_accuracy") in failed
    assert not any(s == "golden" for s, _ in failed)
    assert {c.set for c in result.checks if c.kind == "floor"} == {"golden"}
    assert "gate.traffic.negative_flip_rate" in result.to_tags()


def test_tags_and_markdown_carry_the_verdict_and_the_reasons() -> None:
    result = gate(spread(20) + spread(8, offset=50), spread(20))
    tags = result.to_tags()
    assert tags["gate.result"] == "fail"
    assert "intent accuracy" in tags["gate.reasons"]
    assert "negative-flip rate" in tags["gate.reasons"]
    assert tags["gate.golden.intent_accuracy"] == "0.93"
    assert tags["gate.golden.intent_accuracy.production"] == "0.95"
    assert tags["gate.failed_checks"] == str(len(result.failed))
    assert all(isinstance(v, str) and len(v) <= 5000 for v in tags.values())
    md = result.to_markdown()
    assert md.startswith("# Offline gate: FAIL")
    for reason in result.failed:
        assert reason in md
    assert "| golden | intent_accuracy | 400 | 93.00 % | 95.00 % | ≥ 94.50 % | **FAIL** |" in md

    passing = gate(spread(20), spread(20))
    assert passing.to_tags()["gate.result"] == "pass"
    assert passing.to_tags()["gate.reasons"] == "none"
    assert "# Offline gate: PASS" in passing.to_markdown()


def test_bad_inputs_raise_value_errors_naming_them() -> None:
    cand = GateSet.from_predictions("traffic", ROWS, predictions([], "2"),
                                    predictions([], "1"))
    with pytest.raises(ValueError, match="no evaluation set named 'golden'"):
        evaluate_gate(GateInputs(sets=[cand], candidate=COST, production=COST), SETTINGS)
    with pytest.raises(ValueError, match="latency and size are missing"):
        GateInputs(sets=[cand], candidate=COST)
    with pytest.raises(ValueError, match="duplicate evaluation set names"):
        GateInputs(sets=[cand, cand], candidate=COST, production=COST)
    with pytest.raises(ValueError, match="set name 'gold en'"):
        GateSet.from_predictions("gold en", ROWS, predictions([], "2"))
    with pytest.raises(ValueError, match="latency_p50_ms must be a positive number"):
        ModelCost(latency_p50_ms=0.0, size_bytes=1)
    with pytest.raises(ValueError, match="limits must be non-negative"):
        GateSettings(max_regression_pt={"wer": -1.0})
