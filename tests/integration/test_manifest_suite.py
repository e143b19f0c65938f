"""The GX manifest suite on tiny manifests with real WAV files.

Each planted error must come back as a RowFailure that names the row id and the bad
value; a manifest missing a column must give a table-level failure, not an exception.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from monitoring.manifest_suite import (
    ManifestValidationReport,
    RowFailure,
    manifest_frame,
    validate_manifests,
)
from voiceloop.settings import ValidationSettings

pytestmark = pytest.mark.integration

INTENTS = {"HassTurnOn", "HassTurnOff"}
SLOT_TYPES = {"name", "area"}
DOMAINS = {"lights", "climate"}
SETTINGS = ValidationSettings()  # 0.3-20 s, 0.05 s tolerance, 16 kHz


def _wav(path: Path, sample_rate: int = 16000, seconds: float = 1.0) -> Path:
    t = np.arange(int(sample_rate * seconds)) / sample_rate
    sf.write(path, 0.1 * np.sin(2 * np.pi * 440 * t), sample_rate)
    return path


def _row(uid: str, template: str, split: str = "train", **changes: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": uid,
        "audio": "audio/ok.wav",  # relative: resolved against the manifest's folder
        "duration_s": 1.0,
        "transcript": "turn on the kitchen light",
        "intent": "HassTurnOn",
        "slots": [{"type": "area", "value": "kitchen"}, {"type": "name", "value": "light"}],
        "engine": "espeak-ng",
        "voice": "en-gb+f3",
        "augment": [],
        "split": split,
        "template_id": template,
        "domain": "lights",
    }
    row.update(changes)
    return row


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    """A corpus folder with a 1 s 16 kHz WAV and a 1 s 8 kHz WAV under ``audio/``."""
    (tmp_path / "audio").mkdir()
    _wav(tmp_path / "audio" / "ok.wav")
    _wav(tmp_path / "audio" / "8k.wav", sample_rate=8000)
    return tmp_path


def _validate(*manifests: Path) -> ManifestValidationReport:
    return validate_manifests(list(manifests), SETTINGS, INTENTS, SLOT_TYPES, DOMAINS)


def _by_id(failures: list[RowFailure]) -> dict[str, list[RowFailure]]:
    out: dict[str, list[RowFailure]] = {}
    for failure in failures:
        out.setdefault(failure.row_id, []).append(failure)
    return out


def test_valid_manifest_passes(corpus: Path) -> None:
    rows = [_row(f"tr{i}", f"t{i}", "train") for i in range(4)]
    rows += [_row(f"te{i}", f"t{10 + i}", "test", intent="HassTurnOff") for i in range(2)]
    report = _validate(_write(corpus / "manifest.jsonl", rows))

    assert report.success, report.to_markdown()
    assert report.failures == [] and report.table_failures == []
    assert report.rows == 6
    assert report.expectations_evaluated > 20 and report.expectations_failed == 0
    assert "PASSED" in report.to_markdown()


def test_planted_errors_are_reported_by_row_id(corpus: Path) -> None:
    rows = [
        _row("good-1", "t1"),
        _row("good-2", "t2", "test"),
        _row("missing-audio", "t3", audio="audio/nope.wav"),
        _row("wrong-rate", "t4", audio="audio/8k.wav"),
        _row("bad-intent", "t5", intent="HassFly"),
        _row("leak-train", "t-leak", "train"),
        _row("leak-test", "t-leak", "test"),
        _row("bad-duration", "t6", duration_s=2.5),
    ]
    manifest = _write(corpus / "manifest.jsonl", rows)
    before = manifest.read_bytes()
    report = _validate(manifest)
    by_id = _by_id(report.failures)

    assert not report.success
    assert report.table_failures == []
    assert set(by_id) == {
        "missing-audio",
        "wrong-rate",
        "bad-intent",
        "leak-train",
        "leak-test",
        "bad-duration",
    }
    assert report.failures == sorted(report.failures, key=lambda f: f.row_id)

    def only(uid: str) -> RowFailure:
        assert len(by_id[uid]) == 1, by_id[uid]
        return by_id[uid][0]

    missing = only("missing-audio")  # reported once: not again as wrong rate/duration
    assert missing.column == "audio_exists"
    assert missing.reason == f"audio file missing: {corpus / 'audio' / 'nope.wav'}"

    rate = only("wrong-rate")
    assert rate.expectation == "expect_column_values_to_be_in_set"
    assert rate.column == "sample_rate"
    assert rate.reason == "sample_rate 8000 not in {16000}"

    intent = only("bad-intent")
    assert intent.column == "intent" and "'HassFly'" in intent.reason

    for uid in ("leak-train", "leak-test"):
        leak = only(uid)
        assert leak.column == "n_splits_of_template"
        assert leak.reason == "template t-leak appears in splits test, train"

    duration = only("bad-duration")
    assert duration.expectation == "expect_column_values_to_be_between"
    assert duration.column == "duration_error_s"
    assert "duration_s 2.5" in duration.reason and "1.000 s" in duration.reason

    markdown = report.to_markdown()
    for uid in by_id:
        assert f"| {uid} |" in markdown
    assert "good-1" not in markdown
    assert json.loads(json.dumps(report.to_json()))["failures"][0]["row_id"] == "bad-duration"
    assert manifest.read_bytes() == before


def test_markdown_caps_the_row_table(corpus: Path) -> None:
    rows = [_row(f"u{i:02d}", f"t{i}", intent="HassFly") for i in range(12)]
    report = _validate(_write(corpus / "manifest.jsonl", rows))

    markdown = report.to_markdown(max_rows=5)
    assert "| u04 |" in markdown and "| u05 |" not in markdown
    assert "... 7 more" in markdown


def test_missing_column_is_a_table_failure(corpus: Path) -> None:
    rows = [{k: v for k, v in _row(f"u{i}", f"t{i}").items() if k != "domain"} for i in range(3)]
    report = _validate(_write(corpus / "manifest.jsonl", rows))

    assert not report.success
    assert "missing required columns: domain" in report.table_failures
    assert report.failures == []
    assert "missing required columns: domain" in report.to_markdown()


def test_empty_manifest_and_bad_lines_do_not_crash(corpus: Path) -> None:
    empty = corpus / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    report = _validate(empty)
    assert not report.success and report.rows == 0
    assert "manifest has 0 rows" in report.table_failures

    bad = corpus / "bad.jsonl"
    bad.write_text(json.dumps(_row("ok", "t1")) + "\n{not json\n", encoding="utf-8")
    failures = _validate(bad).failures
    assert [(f.row_id, f.column) for f in failures] == [("line 2", "json_object")]


def test_frame_counts_template_splits_across_manifests(corpus: Path) -> None:
    train = _write(corpus / "train.jsonl", [_row("a", "t1", "train"), _row("b", "t2", "train")])
    test = _write(corpus / "test.jsonl", [_row("c", "t1", "test")])
    frame = manifest_frame([train, test])

    assert list(frame["id"]) == ["a", "b", "c"]
    assert list(frame["n_splits_of_template"]) == [2, 1, 2]
    assert frame["audio_exists"].all() and frame["audio_decodes"].all()
    assert list(frame["sample_rate"]) == [16000] * 3
    assert frame["duration_error_s"].max() < 1e-6
    assert frame.loc[0, "slot_types"] == ["area", "name"]

    report = _validate(train, test)
    assert {f.row_id for f in report.failures} == {"a", "c"}
