"""The release's model card reads the training runs' own records."""

from __future__ import annotations

import json
from pathlib import Path

from voiceloop.release import _training, model_card


def _metrics(intent: float) -> dict:
    return {"n": 10, "intent_accuracy": intent, "slot_f1": 0.5, "wer": 0.2, "cer": 0.1,
            "semer": 0.4, "exact_match": 0.3, "slu_f1": 0.5, "ece": 0.02,
            "slices": {"engine": {"flite": {"n": 10, "intent_accuracy": intent, "slot_f1": 0.5,
                                            "wer": 0.2, "semer": 0.4}}}}


def test_training_record_comes_from_the_run_and_reaches_the_card(tmp_path: Path) -> None:
    (tmp_path / "train_metrics.json").write_text(json.dumps(
        {"wall_minutes": 55.7, "epochs_run": 8, "best_epoch": 7, "qat_start_epoch": 7,
         "valid_wer": 0.6}))
    run = _training(tmp_path)
    assert run == {"wall_minutes": 55.7, "epochs_run": 8, "best_epoch": 7, "qat_start_epoch": 7}
    assert _training(tmp_path / "missing") == {}
    card = {
        "released": "2026-12-01T00:00:00+00:00", "git_commit": "abc", "params_hash": "h",
        "profile": "full",
        "recipe": {"student": {"encoder_layers": 4, "d_model": 96}, "teacher_run": {},
                   "student_run": run, "note": "continued once"},
        "data": {"hours": 1.0, "hours_by_engine": {"flite": 1.0}, "voices": 3,
                 "utterances_by_split": {"train": 5}, "heldout_voice_family": None},
        "metrics": {"student_int8_test": _metrics(0.9), "student_int8_test_heldout": _metrics(0.8),
                    "teacher_fp16_test": _metrics(0.95)},
        "latency": {"student_int8_lm_p50_ms": 10.0, "teacher_fp32_lm_p50_ms": 50.0, "speedup": 5.0},
        "bytes": {"student": 1e6, "teacher": 6e6, "total": 7e6},
    }
    text = model_card(card)
    assert "55.7 min, 8 epochs (QAT from epoch 7), best epoch 7" in text
    assert "Teacher: no training record" in text and "continued once" in text
    assert "| student int8 + LM, held-out voices | 80.0% |" in text
    # the card says what the student's convolutions allow: a full-context one cannot stream
    assert "causal (streaming-capable) Conformer" in text
    assert "word 3-gram lexicon" in text  # a card without the order: the old default
    card["recipe"]["lm_order"] = 5
    assert "word 5-gram lexicon" in model_card(card)
    card["recipe"]["student"]["causal_conv"] = False
    text = model_card(card)
    assert "full-context (whole-utterance, not streaming) Conformer" in text
    assert "streaming-capable" not in text


def test_teacher_lm_links_to_the_students_identical_files(tmp_path: Path) -> None:
    from model.evaluation.compare import folder_bytes
    from model.nn.package import has_lm
    from voiceloop.release import _share_lm

    for role, weight in (("student", 1.0), ("teacher", 0.5)):
        lm = tmp_path / role / "lm"
        lm.mkdir(parents=True)
        (lm / "lexicon.txt").write_text("on\to n |\n")
        (lm / "lm.arpa").write_text("x" * 1000)
        (lm / "decoder.json").write_text(json.dumps({"lm_weight": weight}))
    (tmp_path / "teacher" / "lm" / "lexicon.txt").write_text("off\to f f |\n")  # differs
    assert _share_lm(tmp_path) == ["lm.arpa"]
    teacher_lm = tmp_path / "teacher" / "lm"
    assert (teacher_lm / "lm.arpa").is_symlink() and (teacher_lm / "lm.arpa").read_text() == "x" * 1000
    assert not (teacher_lm / "lexicon.txt").is_symlink()
    assert json.loads((teacher_lm / "decoder.json").read_text()) == {"lm_weight": 0.5}
    assert has_lm(tmp_path / "teacher")
    # counted once: the student's 1000-byte ARPA, both lexicons and both configs
    assert folder_bytes(tmp_path, (".arpa",)) == 1000


def test_a_broken_lm_link_is_warned_about(tmp_path: Path, caplog) -> None:
    from model.nn.package import has_lm

    lm = tmp_path / "teacher" / "lm"
    lm.mkdir(parents=True)
    (lm / "decoder.json").write_text("{}")
    (lm / "lexicon.txt").write_text("on\to n |\n")
    (lm / "lm.arpa").symlink_to(tmp_path / "student" / "lm" / "lm.arpa")  # copied without it
    with caplog.at_level("WARNING"):
        assert not has_lm(tmp_path / "teacher")
    assert "lm.arpa" in caplog.text and "broken link" in caplog.text
    assert not has_lm(tmp_path / "nothing")  # no lm/ folder at all: no warning needed
