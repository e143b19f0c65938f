"""The corpus stage on the tiny profile: real hassil, real TTS engines, real GX.

One tiny corpus is built per module (a few seconds) and reused; each test reads it.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from model.data.augment import RIRBank, replay
from model.data.corpus import CorpusLayout, CorpusReport, load_corpus_rows
from model.data.manifest import read_manifest, write_manifest
from model.data.textnorm import is_spoken_form
from voiceloop.cli import app
from voiceloop.settings import Settings, load_settings
from voiceloop.stages import corpus_stage

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, CorpusReport]:
    workspace = tmp_path_factory.mktemp("ws")
    settings = load_settings(profile="tiny", workspace=workspace)
    report = corpus_stage(settings, progress=False)
    return settings, report


def test_tiny_corpus_is_valid_and_balanced(tiny: tuple[Settings, CorpusReport]) -> None:
    settings, report = tiny
    layout = CorpusLayout(settings.corpus_dir)
    assert report.validation_passed is True
    assert report.planned == report.written + report.quarantined
    assert 20 <= report.written <= 100
    rows = load_corpus_rows(layout)
    assert len(rows) == report.written
    assert {r.split for r in rows} == {"train", "valid", "test", "valid_heldout", "test_heldout"}
    for row in rows:
        info = sf.info(row.audio_path(layout.manifests_dir))
        assert info.samplerate == 16000 and info.channels == 1
        assert abs(info.duration - row.duration_s) < 0.01
        assert is_spoken_form(row.transcript)
    assert (layout.reports_dir / "stats.md").read_text().count("|") > 10
    assert json.loads((layout.root / "metrics.json").read_text())["utterances"] == report.written


def test_no_template_crosses_splits(tiny: tuple[Settings, CorpusReport]) -> None:
    settings, _ = tiny
    split_of: dict[str, set[str]] = {}
    for row in load_corpus_rows(CorpusLayout(settings.corpus_dir)):
        # A held-out-voice split re-speaks its template split's sentences.
        split_of.setdefault(row.template_id, set()).add(row.split.removesuffix("_heldout"))
    assert all(len(splits) == 1 for splits in split_of.values())


def test_heldout_voice_family_never_reaches_training(tiny: tuple[Settings, CorpusReport]) -> None:
    settings, _ = tiny
    held = settings.corpus.tts.heldout
    assert held is not None
    rows = load_corpus_rows(CorpusLayout(settings.corpus_dir))
    family = {(held.engine, v) for v in held.voices}
    heldout = [r for r in rows if r.split.endswith("_heldout")]
    assert heldout and all((r.engine, r.voice) in family for r in heldout)
    assert not [r for r in rows if not r.split.endswith("_heldout") and (r.engine, r.voice) in family]
    # The twins say the very sentences of their template split, so the gap is the voice's.
    by_id = {r.id: r for r in rows}
    for r in heldout:
        twin = by_id.get("u" + r.id[1:])
        assert twin is not None and twin.transcript == r.transcript
        assert twin.split == r.split.removesuffix("_heldout")


def test_engines_and_augmentation_recorded(tiny: tuple[Settings, CorpusReport]) -> None:
    settings, report = tiny
    rows = load_corpus_rows(CorpusLayout(settings.corpus_dir))
    assert {r.engine for r in rows} == {"espeak-ng", "flite", "festival"}
    augmented = [r for r in rows if r.augment]
    assert 0 < len(augmented) < len(rows)
    assert {s.kind for r in augmented for s in r.augment} <= {
        "noise", "reverb", "gain", "clip", "telephone"
    }
    assert report.stats.augmented_fraction == pytest.approx(len(augmented) / len(rows))


def test_augmented_audio_replays_from_clean_audio(tiny: tuple[Settings, CorpusReport]) -> None:
    settings, _ = tiny
    layout = CorpusLayout(settings.corpus_dir)
    cs = settings.corpus
    bank = RIRBank.build(cs.augment.reverb, settings.seed, cs.tts.sample_rate, layout.rir_dir)
    rows = [r for r in load_corpus_rows(layout) if r.augment]
    babble = sorted(layout.clean_dir.glob("*.wav"))
    for row in rows[:8]:
        clean, sr = sf.read(layout.clean_dir / f"{row.id}.wav", dtype="float32")
        stored, _ = sf.read(row.audio_path(layout.manifests_dir), dtype="float32")
        again = replay(clean, row.augment, sr, bank, babble)
        # The stored file is PCM16: equal up to one quantisation step.
        np.testing.assert_allclose(again, stored, atol=2 / 32768)


def test_rebuild_resumes_and_is_deterministic(
    tiny: tuple[Settings, CorpusReport], tmp_path: Path
) -> None:
    settings, first = tiny
    layout = CorpusLayout(settings.corpus_dir)
    before = {p.name: p.read_bytes() for p in layout.manifests_dir.glob("*.jsonl")}
    victim = min(layout.clean_dir.glob("*.wav"))
    victim.unlink()
    again = corpus_stage(settings, progress=False)
    assert again.resumed == first.planned - 1
    assert again.synthesized == 1
    after = {p.name: p.read_bytes() for p in layout.manifests_dir.glob("*.jsonl")}
    assert after == before


def test_cli_builds_same_corpus_in_another_workspace(
    tiny: tuple[Settings, CorpusReport], tmp_path: Path
) -> None:
    result = CliRunner().invoke(app, ["corpus", "--profile", "tiny", "-w", str(tmp_path), "-q"])
    assert result.exit_code == 0, result.output
    assert re.search(r"corpus 'tiny': \d+ utterances", result.output)
    # Same seed, different folder: the manifests (paths are relative) are byte-identical.
    settings, _ = tiny
    here = CorpusLayout(tmp_path / "corpus" / "tiny")
    there = CorpusLayout(settings.corpus_dir)
    for split in ("train", "valid", "test"):
        assert here.manifest(split).read_bytes() == there.manifest(split).read_bytes(), split


def test_validate_manifest_cli_names_planted_errors(
    tiny: tuple[Settings, CorpusReport], tmp_path: Path
) -> None:
    settings, _ = tiny
    layout = CorpusLayout(settings.corpus_dir)
    train = read_manifest(layout.manifest("train"))
    test = read_manifest(layout.manifest("test"))
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    # Keep audio paths valid from the new folder.
    train = [r.model_copy(update={"audio": str(r.audio_path(layout.manifests_dir))}) for r in train]
    test = [r.model_copy(update={"audio": str(r.audio_path(layout.manifests_dir))}) for r in test]
    wav8k = tmp_path / "eight_k.wav"
    sf.write(wav8k, np.zeros(8000, dtype=np.float32), 8000)
    shutil.copy(wav8k, tmp_path / "also_8k.wav")
    train[0] = train[0].model_copy(update={"audio": str(tmp_path / "missing.wav")})
    train[1] = train[1].model_copy(update={"audio": str(wav8k), "duration_s": 1.0})
    train[2] = train[2].model_copy(update={"intent": "HassMakeCoffee"})
    test[0] = test[0].model_copy(update={"template_id": train[3].template_id})
    write_manifest(manifests / "train.jsonl", train)
    write_manifest(manifests / "test.jsonl", test)

    result = CliRunner().invoke(
        app, ["validate-manifest", str(manifests / "train.jsonl"), str(manifests / "test.jsonl")]
    )
    assert result.exit_code == 1, result.output
    out = result.output
    assert "FAILED" in out
    for planted in (train[0].id, train[1].id, train[2].id, train[3].id, test[0].id):
        assert planted in out, planted
    assert "missing" in out and "8000" in out and "HassMakeCoffee" in out
    assert train[3].template_id in out
