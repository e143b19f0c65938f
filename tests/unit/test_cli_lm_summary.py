"""`voiceloop lm`'s report line, for tagged models and for models with a parse decoder."""

from __future__ import annotations

from pathlib import Path

from model.decoding.beam import BeamConfig
from model.training.lm_stage import LMResult
from voiceloop.cli import lm_summary


def _result(semer: dict[str, float], beam_semer: float | None) -> LMResult:
    return LMResult(Path("/m/teacher/model/lm"), BeamConfig(order=5, lm_weight=0.75), 1000,
                    0.282, 0.139, {}, semer, "semer" if beam_semer is not None else "wer",
                    beam_semer)


def test_tagged_model_reports_its_beam_semer() -> None:
    # a tagged model has no copy-values comparison: its report once raised KeyError 'true'
    text = lm_summary(_result({}, 0.254))
    assert "order 5" in text and "28.2% greedy → 13.9% beam" in text
    assert "SemER 25.4% (tuned by semer)" in text and "copying" not in text


def test_parse_decoder_model_reports_copy_values() -> None:
    text = lm_summary(_result({"true": 0.40, "false": 0.45}, None))
    assert "with/without copying values 40.0% / 45.0%" in text and "tuned by" not in text
