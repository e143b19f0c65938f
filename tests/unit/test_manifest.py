"""Manifest round trip and settings parsing."""

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from model.data.manifest import (
    AugmentStep,
    ManifestRow,
    Slot,
    iter_raw_manifest,
    read_manifest,
    write_manifest,
)
from voiceloop.settings import load_settings


def _row(i: int) -> ManifestRow:
    return ManifestRow(
        id=f"u{i}",
        audio=f"../audio/u{i}.wav",
        duration_s=1.5 + i,
        transcript="turn on the kitchen lights",
        intent="HassTurnOn",
        slots=[Slot(type="area", value="kitchen")],
        engine="espeak-ng",
        voice="en-gb-scotland+f3",
        augment=[AugmentStep(kind="noise", params={"noise": "pink", "snr_db": 12.5})],
        split="train",
        template_id="HassTurnOn-0123abcd",
        domain="lights",
        rate=1.1,
        pitch=40,
    )


def test_manifest_round_trip(tmp_path: Path) -> None:
    rows = [_row(i) for i in range(3)]
    path = tmp_path / "m" / "train.jsonl"
    assert write_manifest(path, rows) == 3
    assert read_manifest(path) == rows
    raw = list(iter_raw_manifest(path))
    assert raw[0]["slots"] == [{"type": "area", "value": "kitchen"}]
    assert raw[0]["augment"][0]["params"]["snr_db"] == 12.5
    assert [p.name for p in path.parent.iterdir()] == ["train.jsonl"]  # no temporary left


def test_manifest_audio_path_resolves_relative_to_manifest(tmp_path: Path) -> None:
    row = _row(0)
    assert row.audio_path(tmp_path / "manifests") == tmp_path / "manifests" / "../audio/u0.wav"
    absolute = row.model_copy(update={"audio": "/data/x.wav"})
    assert absolute.audio_path(tmp_path) == Path("/data/x.wav")


def test_manifest_rejects_unknown_fields_and_reports_bad_json(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        ManifestRow.model_validate({**_row(0).model_dump(), "surprise": 1})
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(_row(0).model_dump()) + "\n{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_manifest(path)


def test_profiles_parse_and_override_base() -> None:
    tiny = load_settings(profile="tiny")
    full = load_settings(profile="full")
    assert tiny.corpus.max_templates is not None
    assert full.corpus.utterances_per_template > tiny.corpus.utterances_per_template
    # a profile overrides only what it names
    assert tiny.corpus.tts.flite_voices == full.corpus.tts.flite_voices


def test_unknown_profile_and_bad_values_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown profile 'huge'"):
        load_settings(profile="huge")
    params = tmp_path / "params.yaml"
    params.write_text(
        "profile: x\nseed: 1\nbase:\n  corpus:\n    tts: {espeak_accents: [en], espeak_variants: [m1], rate: [1.5, 1.0]}\n"
        "profiles:\n  x: {}\n"
    )
    with pytest.raises(ValidationError, match="rate"):
        load_settings(params)


def test_workspace_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOICELOOP_WORKSPACE", str(tmp_path / "ws"))
    settings = load_settings(profile="tiny")
    assert settings.corpus_dir == tmp_path / "ws" / "corpus" / "tiny"
