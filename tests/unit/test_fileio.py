"""model.fileio.atomic_path: all or nothing."""

from pathlib import Path

import pytest
import soundfile as sf

from model.fileio import atomic_path


def test_the_new_content_replaces_the_old_in_one_step(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "rows.jsonl"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.suffix == ".jsonl"
        tmp.write_text("one\n")
        assert not target.exists()  # nothing visible before the block ends
    assert target.read_text() == "one\n"
    with atomic_path(target, durable=True) as tmp:
        tmp.write_text("two\n")
    assert target.read_text() == "two\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["rows.jsonl"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "rows.jsonl"
    target.write_text("old\n")
    with pytest.raises(RuntimeError, match="disk"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]


def test_the_suffix_picks_the_format_and_tmp_dir_holds_the_temporary(tmp_path: Path) -> None:
    target, scratch = tmp_path / "out" / "a.wav", tmp_path / "scratch"
    with atomic_path(target, tmp_dir=scratch) as tmp:
        assert tmp.parent == scratch
        sf.write(tmp, [0.0, 0.5, -0.5], 16000, subtype="PCM_16")  # format from ".wav"
    assert sf.info(target).samplerate == 16000 and not list(scratch.iterdir())
