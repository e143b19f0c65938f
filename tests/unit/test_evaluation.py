"""evaluate() joins, slices and confusion; write_report() files."""

import json
from pathlib import Path

import pytest

from model.data.manifest import AugmentStep, ManifestRow, Slot
from model.evaluation.report import MISSING_PREDICTION, NO_INTENT, evaluate, write_report
from model.inference.prediction import Prediction


def _row(
    uid: str,
    *,
    intent: str = "HassTurnOn",
    slots: tuple[tuple[str, str], ...] = (("area", "kitchen"),),
    transcript: str = "turn on the kitchen",
    engine: str = "espeak-ng",
    voice: str = "en-us",
    domain: str = "lights",
    augment: tuple[str, ...] = (),
    duration_s: float = 1.0,
) -> ManifestRow:
    return ManifestRow(
        id=uid,
        audio=f"audio/{uid}.wav",
        duration_s=duration_s,
        transcript=transcript,
        intent=intent,
        slots=[Slot(type=t, value=v) for t, v in slots],
        engine=engine,
        voice=voice,
        augment=[AugmentStep(kind=k) for k in augment],
        split="test",
        template_id="t0",
        domain=domain,
    )


def _perfect(row: ManifestRow, confidence: float = 0.9, **update: object) -> Prediction:
    prediction = Prediction(
        id=row.id,
        transcript=row.transcript,
        intent=row.intent,
        slots=row.slots,
        confidence=confidence,
        model_version="1",
    )
    return prediction.model_copy(update=update)


@pytest.fixture
def rows() -> list[ManifestRow]:
    return [
        # u1 clean, short, espeak: predicted perfectly
        _row("u1"),
        # u2 noise + reverb, flite: intent wrong, transcript 1 of 4 words wrong
        _row(
            "u2",
            engine="flite",
            voice="kal16",
            augment=("noise", "reverb", "noise"),
            duration_s=2.0,
        ),
        # u3 reverb only, climate: the prediction is missing
        _row(
            "u3",
            intent="HassClimateSetTemperature",
            slots=(("temperature", "twenty"),),
            transcript="set it to twenty",
            domain="climate",
            augment=("reverb",),
            duration_s=4.5,
        ),
        # u4 clean, climate: the model errored
        _row(
            "u4",
            intent="HassClimateGetTemperature",
            slots=(),
            transcript="how warm is it",
            domain="climate",
            duration_s=3.0,
        ),
    ]


@pytest.fixture
def predictions(rows: list[ManifestRow]) -> list[Prediction]:
    return [
        _perfect(
            rows[1],
            confidence=0.6,
            intent="HassTurnOff",
            transcript="turn of the kitchen",
            clarify=True,
        ),
        _perfect(rows[0]),
        # an errored prediction keeps whatever it says out of the scores
        Prediction(
            id="u4", intent="HassClimateGetTemperature", confidence=0.99, error="audio unreadable"
        ),
    ]


def test_evaluate_overall_and_missing_prediction(
    rows: list[ManifestRow], predictions: list[Prediction]
) -> None:
    report = evaluate(rows, predictions)
    overall = report.overall
    # u3 missing + u4 errored: both count as errors with empty outputs
    assert report.n == overall.n == 4
    assert report.errors == overall.errors == 2
    # intents: u1 right, u2 wrong, u3/u4 empty -> 1/4
    assert overall.intent_accuracy == pytest.approx(0.25)
    # words: u1 0/4, u2 1/4 (on->of), u3 4 deletions / 4, u4 4 deletions / 4 -> 9/16
    assert overall.wer == pytest.approx(9 / 16)
    # slots: u1 tp 1, u2 tp 1, u3 fn 1 (u4 has none) -> P 1, R 2/3
    assert overall.slot_precision == 1.0
    assert overall.slot_recall == pytest.approx(2 / 3)
    # SemER: u2 intent S, u3 intent S + temperature D, u4 intent S = 4 over (2+2+2+1) = 4/7
    assert overall.semer == pytest.approx(4 / 7)
    # exact frame: only u1
    assert overall.exact_match == pytest.approx(0.25)
    assert overall.clarify_rate == pytest.approx(0.25)
    # ECE (15 bins): u1 0.9 right (gap 0.1), u2 0.6 wrong (0.6), u3/u4 conf 0 wrong (0)
    # -> (0.1 + 0.6) / 4; the errored u4's confidence 0.99 is not used
    assert overall.ece == pytest.approx(0.7 / 4)
    # confusion: missing/errored predictions land in the "(none)" column
    assert report.confusion == {
        "HassClimateGetTemperature": {NO_INTENT: 1},
        "HassClimateSetTemperature": {NO_INTENT: 1},
        "HassTurnOn": {"HassTurnOff": 1, "HassTurnOn": 1},
    }
    assert sum(b.count for b in report.reliability) == 4
    assert MISSING_PREDICTION == "missing prediction"


def test_evaluate_slices(rows: list[ManifestRow], predictions: list[Prediction]) -> None:
    slices = evaluate(rows, predictions).slices
    assert list(slices) == ["engine", "voice", "domain", "augmentation", "duration"]
    assert "intent" not in slices
    assert {k: m.n for k, m in slices["engine"].items()} == {"espeak-ng": 3, "flite": 1}
    assert list(slices["voice"]) == ["espeak-ng/en-us", "flite/kal16"]
    assert {k: m.n for k, m in slices["domain"].items()} == {"climate": 2, "lights": 2}
    # u2 is in both noise and reverb (once each despite two noise steps); u3 in reverb
    assert {k: m.n for k, m in slices["augmentation"].items()} == {
        "clean": 2,
        "noise": 1,
        "reverb": 2,
    }
    # natural order of the buckets, only those that occur
    assert list(slices["duration"]) == ["<1.5s", "1.5-2.5s", "2.5-4s", ">=4s"]
    assert slices["engine"]["espeak-ng"].errors == 2
    assert slices["engine"]["espeak-ng"].intent_accuracy == pytest.approx(1 / 3)
    assert slices["augmentation"]["noise"].intent_accuracy == 0.0
    # lights slice: u1 perfect, u2 intent wrong only -> SemER 1 / (2 + 2)
    assert slices["domain"]["lights"].semer == pytest.approx(0.25)


def test_evaluate_rejects_bad_joins(rows: list[ManifestRow]) -> None:
    with pytest.raises(ValueError, match="unknown id"):
        evaluate(rows, [Prediction(id="nope")])
    with pytest.raises(ValueError, match="more than one"):
        evaluate(rows, [Prediction(id="u1"), Prediction(id="u1")])
    with pytest.raises(ValueError, match="duplicate reference"):
        evaluate([rows[0], rows[0]], [])
    with pytest.raises(ValueError, match="no reference rows"):
        evaluate([], [])


def test_evaluate_with_no_predictions_scores_everything_wrong(rows: list[ManifestRow]) -> None:
    report = evaluate(rows, [])
    assert report.errors == 4
    assert report.overall.wer == 1.0
    assert report.overall.intent_accuracy == 0.0


def test_write_report_files(
    rows: list[ManifestRow], predictions: list[Prediction], tmp_path: Path
) -> None:
    report = evaluate(rows, predictions)
    paths = write_report(report, tmp_path / "eval", "student v1 / test")
    assert set(paths) == {"metrics", "evaluation", "markdown", "confusion_matrix", "reliability"}
    for path in paths.values():
        assert path.is_file() and path.stat().st_size > 0
    for key in ("confusion_matrix", "reliability"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    metrics = json.loads(paths["metrics"].read_text())
    assert all(isinstance(v, int | float) and not isinstance(v, bool) for v in metrics.values())
    assert metrics["n"] == 4 and metrics["errors"] == 2
    assert metrics["wer"] == pytest.approx(9 / 16)
    assert {"cer", "intent_accuracy", "slot_f1", "slu_f1", "semer", "ece"} <= set(metrics)

    full = json.loads(paths["evaluation"].read_text())
    assert full["title"] == "student v1 / test"
    assert full["slices"]["augmentation"]["reverb"]["n"] == 2
    assert full["confusion"]["HassTurnOn"]["HassTurnOff"] == 1

    markdown = paths["markdown"].read_text()
    assert markdown.startswith("# student v1 / test")
    assert "| word error rate | 56.2% |" in markdown  # 9/16 = 56.25 %
    assert "| utterances | 4 |" in markdown
    for family in ("engine", "voice", "domain", "augmentation", "duration"):
        assert f"## By {family}" in markdown
    # worst first: climate (SemER 3/3) before lights (1/4)
    assert markdown.index("| climate |") < markdown.index("| lights |")
    assert "| HassTurnOn | HassTurnOff | 1 | 50.0% |" in markdown


def test_write_report_confusion_plot_scales_to_many_intents(tmp_path: Path) -> None:
    # 42 intents (the grammar's count), each confused with the next one once
    rows = [_row(f"u{i}", intent=f"HassIntentNumber{i:02d}") for i in range(42)]
    preds = [_perfect(r, intent=f"HassIntentNumber{(i + 1) % 42:02d}") for i, r in enumerate(rows)]
    paths = write_report(evaluate(rows, preds), tmp_path, "many")
    assert paths["confusion_matrix"].stat().st_size > 0
