"""``voiceloop release``: package a trained profile's models as the repository's released
model, with a model card — produced from the pipeline's outputs, never assembled by hand.

``release/`` (committed, ≤ 15 MB in all):

- ``student/`` — the int8 ONNX deploy bundle with its transcript LM: what
  ``voiceloop predict`` and ``voiceloop serve`` use when no model is given, and the seed
  ``production`` model of the loop;
- ``student_model/`` — the same student as a torch package (fp16 weights, no LM): the
  retraining flow warm-starts new students from it;
- ``teacher/`` — the teacher it was distilled from, fp16 weights (the retraining flow
  fine-tunes it and distils new students from it), with its own LM;
- ``MODEL_CARD.md`` and ``release.json`` — data, recipe, params hash, git commit, test
  metrics overall and per slice on the template-held-out test split and on the held-out
  voice family, latency, sizes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.data.corpus import CorpusLayout, load_corpus_rows
from model.data.manifest import read_manifest
from model.data.stats import corpus_stats
from model.decoding.beam import read_config
from model.evaluation.compare import folder_bytes, score_bundle
from model.evaluation.report import EvaluationReport, evaluate, write_report
from model.frontend.audio import load_audio
from model.frontend.cache import load_split
from model.inference.batch import SLUPredictor
from model.inference.onnx import OnnxSLUPredictor
from model.nn.export import is_bundle
from model.nn.package import LM_DIRNAME, LM_SENTENCES, load_package, save_package
from voiceloop.settings import Settings, repo_root

__all__ = [
    "RELEASE_DIR", "ReleaseReport", "default_model", "make_release", "model_card", "released_models",
]

log = logging.getLogger(__name__)

RELEASE_DIR = repo_root() / "release"
MAX_RELEASE_BYTES = 15 * 1024 * 1024
_METRICS = ("intent_accuracy", "slot_f1", "wer", "cer", "semer", "exact_match", "slu_f1", "ece")


def default_model() -> Path | None:
    """The released student bundle, when the repository has one."""
    folder = RELEASE_DIR / "student"
    return folder if is_bundle(folder) else None


def released_models() -> dict[str, Path] | None:
    """The released student bundle, student torch package and teacher (None when the
    repository has no complete release)."""
    parts = {"bundle": RELEASE_DIR / "student", "student": RELEASE_DIR / "student_model",
             "teacher": RELEASE_DIR / "teacher"}
    ok = is_bundle(parts["bundle"]) and all((parts[k] / "weights.pt").is_file()
                                            for k in ("student", "teacher"))
    return parts if ok else None


def _git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=repo_root(), check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "model", "voiceloop",
                                "params.yaml"], capture_output=True, text=True,
                               cwd=repo_root(), check=True).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def params_hash(settings: Settings) -> str:
    """SHA-256 of the settings that shape the models (corpus, features, model, training,
    student, decoding) — equal hashes, equal recipe."""
    keep = {k: settings.model_dump(mode="json")[k]
            for k in ("seed", "corpus", "features", "model", "train", "student", "decode")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def _p50_ms(predictor: Any, clips: list[np.ndarray], rate: int) -> float:
    for clip in clips[:3]:
        predictor.predict_waveforms(["w"], [clip], [rate])
    times = []
    for clip in clips:
        start = time.perf_counter()
        predictor.predict_waveforms(["x"], [clip], [rate])
        times.append(time.perf_counter() - start)
    return round(float(np.percentile(np.array(times) * 1000, 50)), 2)


def _clips(settings: Settings, n: int, rate: int) -> list[np.ndarray]:
    """``n`` test utterances cut or padded to 3 s (the latency figure's unit)."""
    layout = CorpusLayout(settings.corpus_dir)
    clips = []
    for row in read_manifest(layout.manifest("test"))[:n]:
        audio = load_audio(row.audio_path(layout.manifests_dir), rate)[: 3 * rate]
        clips.append(np.pad(audio, (0, 3 * rate - audio.size)))
    return clips


def _summary(report: EvaluationReport) -> dict[str, Any]:
    o = report.overall.model_dump()
    return {"n": o["n"], **{m: round(float(o[m]), 4) for m in _METRICS},
            "slices": {family: {value: {"n": m.n, "intent_accuracy": round(m.intent_accuracy, 4),
                                        "slot_f1": round(m.slot_f1, 4), "wer": round(m.wer, 4),
                                        "semer": round(m.semer, 4)}
                                for value, m in by_value.items()}
                       for family, by_value in report.slices.items()}}


def _half_package(folder: Path, out: Path, keep_lm: bool = True) -> None:
    """A torch package with fp16 weights (load_package casts them back to fp32)."""
    package = load_package(folder)
    if not keep_lm:
        package.lm_dir = None
    package.model.half()
    save_package(package, out)
    package.model.float()


_RELEASED_SUFFIXES = (".onnx", ".pt", ".arpa", ".txt", ".gz", ".json")  # what the size counts
_SHARED_LM_FILES = ("lexicon.txt", "lm.arpa", LM_SENTENCES)  # each model keeps its own decoder.json (weights)


def _share_lm(release: Path) -> list[str]:
    """Replace the teacher's lexicon and n-gram by relative links to the student's when
    they are byte-identical (both are built from the same training text): a 5-gram ARPA
    is ~3 MB, and two copies would not fit the 15 MB release. Readers follow the links;
    copies (``shutil.copytree``, MLflow artifacts) get the file itself.

    Returns:
        The shared file names."""
    shared = []
    for name in _SHARED_LM_FILES:
        teacher = release / "teacher" / LM_DIRNAME / name
        student = release / "student" / LM_DIRNAME / name
        if teacher.is_file() and student.is_file() and teacher.read_bytes() == student.read_bytes():
            teacher.unlink()
            teacher.symlink_to(Path("..", "..", "student", LM_DIRNAME, name))
            shared.append(name)
    return shared


@dataclass
class ReleaseReport:
    """What was released: the folder, its size and the card's figures."""

    folder: Path
    bytes: int
    card: dict[str, Any]


def _training(run_root: Path) -> dict[str, Any]:
    """What a training run's own ``train_metrics.json`` says about it (wall minutes,
    epochs, best epoch, QAT start), not what params.yaml asked for."""
    path = run_root / "train_metrics.json"
    if not path.is_file():
        return {}
    m = json.loads(path.read_text(encoding="utf-8"))
    return {k: m[k] for k in ("wall_minutes", "epochs_run", "best_epoch", "qat_start_epoch",
                              "parameters", "train_utt_per_s") if k in m}


def make_release(settings: Settings, out: Path | None = None, progress: bool = True,
                 latency_utterances: int = 100, note: str = "") -> ReleaseReport:
    """Build ``release/`` from ``settings.profile``'s teacher and student. ``note``: the
    training history that the model folders cannot tell (e.g. a warm-started
    continuation), written into the card as given.

    Raises:
        FileNotFoundError: the profile has no trained student or teacher.
        ValueError: the release would exceed 15 MB.
    """
    out = out or RELEASE_DIR
    student_root = settings.models_dir / "student"
    teacher_dir = settings.models_dir / "teacher" / "model"
    bundle = student_root / "deploy"
    for path in (bundle / "encoder.onnx", teacher_dir / "weights.pt"):
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: train the {settings.profile} profile "
                                    f"first (voiceloop train / distill -p {settings.profile})")
    torch.set_num_threads(1)
    staging = Path(tempfile.mkdtemp(prefix="release-", dir=out.parent))
    try:
        shutil.copytree(bundle, staging / "student")
        _half_package(student_root / "model", staging / "student_model", keep_lm=False)
        _half_package(teacher_dir, staging / "teacher")
        shared_lm = _share_lm(staging)
        size = folder_bytes(staging, _RELEASED_SUFFIXES)
        if size > MAX_RELEASE_BYTES:
            raise ValueError(f"release would be {size / 1e6:.1f} MB > 15 MB")
        metrics: dict[str, Any] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for split in ("test", "test_heldout"):
                report = score_bundle(settings, staging / "student", split, Path(tmp) / split,
                                      progress, threads=2)
                metrics[f"student_int8_{split}"] = _summary(report)
                log.info("released student on %s: %s", split,
                         {k: v for k, v in metrics[f"student_int8_{split}"].items() if k != "slices"})
            teacher = load_package(staging / "teacher")
            rows, feats = load_split(settings, "test", progress, teacher.features)
            preds = SLUPredictor(teacher, settings.decode.batch_size,
                                 settings.decode.max_parse_len).predict_features(
                                     [r.id for r in rows], feats)
            teacher_report = evaluate(rows, preds)
            write_report(teacher_report, Path(tmp) / "teacher", "teacher")
            metrics["teacher_fp16_test"] = _summary(teacher_report)
        rate = teacher.features.sample_rate
        clips = _clips(settings, latency_utterances, rate)
        latency = {
            "student_int8_lm_p50_ms": _p50_ms(OnnxSLUPredictor(staging / "student", threads=1,
                                                               batch_size=1), clips, rate),
            "teacher_fp32_lm_p50_ms": _p50_ms(SLUPredictor(load_package(teacher_dir),
                                                           batch_size=1), clips, rate),
            "utterance_s": 3.0, "threads": 1, "utterances": len(clips),
        }
        latency["speedup"] = round(latency["teacher_fp32_lm_p50_ms"]
                                   / latency["student_int8_lm_p50_ms"], 2)
        stats = corpus_stats(load_corpus_rows(CorpusLayout(settings.corpus_dir)))
        student_cfg = json.loads((staging / "student" / "config.json").read_text())
        card = {
            "released": datetime.now(UTC).isoformat(timespec="seconds"),
            "git_commit": _git_commit(), "params_hash": params_hash(settings),
            "profile": settings.profile,
            "student_version": student_cfg["metadata"].get("version"),
            "teacher_version": teacher.version,
            "data": {"utterances_by_split": stats.utterances_by_split,
                     "hours": round(stats.hours, 2), "hours_by_engine": {
                         k: round(v, 2) for k, v in stats.hours_by_engine.items()},
                     "voices": stats.voices,
                     "heldout_voice_family": settings.corpus.tts.heldout.model_dump()
                     if settings.corpus.tts.heldout else None,
                     "espeak_accents": settings.corpus.tts.espeak_accents},
            "recipe": {"teacher": settings.model.model_dump(), "student": settings.student.model.model_dump(),
                       "student_normalise": settings.student.normalise,
                       "teacher_minutes": settings.train.max_minutes,
                       "student_minutes": settings.student.train.max_minutes,
                       "teacher_run": _training(settings.models_dir / "teacher"),
                       "student_run": _training(student_root),
                       "note": note,
                       "lm_order": read_config(staging / "student").order,
                       "intent_temperature": student_cfg.get("intent_temperature"),
                       "clarify_threshold": student_cfg.get("clarify_threshold")},
            "metrics": metrics, "latency": latency,
            "bytes": {"student": folder_bytes(staging / "student", _RELEASED_SUFFIXES),
                      "teacher": folder_bytes(staging / "teacher", _RELEASED_SUFFIXES),
                      "total": size, "teacher_lm_links_to_student": shared_lm},
        }
        (staging / "release.json").write_text(json.dumps(card, indent=2), encoding="utf-8")
        (staging / "MODEL_CARD.md").write_text(model_card(card), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        staging.chmod(0o755)  # mkdtemp makes it private; a release is for everyone to read
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ReleaseReport(out, size, card)


def _run_text(run: dict[str, Any]) -> str:
    if not run:
        return "no training record"
    text = f"{run.get('wall_minutes', '?')} min, {run.get('epochs_run', '?')} epochs"
    if run.get("qat_start_epoch") is not None:
        text += f" (QAT from epoch {run['qat_start_epoch']})"
    return text + f", best epoch {run.get('best_epoch', '?')}"


def _context_text(student: dict[str, Any]) -> str:
    """How much audio the student's encoder sees: causal convolutions stream, full-context
    ones need the whole utterance (``student.model.causal_conv``)."""
    if student.get("causal_conv", True):
        return "causal (streaming-capable)"
    return "full-context (whole-utterance, not streaming)"


def model_card(card: dict[str, Any]) -> str:
    """The release's model card as markdown."""
    m = card["metrics"]
    s, h, t = m["student_int8_test"], m["student_int8_test_heldout"], m["teacher_fp16_test"]
    lines = [
        "# voiceloop released model", "",
        (f"Released {card['released']} from git commit `{card['git_commit']}`, params hash "
         f"`{card['params_hash']}` (profile `{card['profile']}`), by `voiceloop release`."), "",
        "## What it is", "",
        ("A joint speech-recognition + language-understanding model for English voice-assistant "
         "commands (the Home Assistant intents): 16 kHz audio in; transcript, intent, slots and "
         "an intent confidence out. `student/` is the deployed model: a "
         f"{card['recipe']['student']['encoder_layers']}-block {_context_text(card['recipe']['student'])} "
         f"Conformer (D={card['recipe']['student']['d_model']}), int8 ONNX, with a "
         f"word {card['recipe'].get('lm_order', 3)}-gram lexicon beam search whose "
         "transcripts carry slot tags. `teacher/` is the model it was distilled from (fp16)."), "",
        "## Data", "",
        (f"Synthetic speech only: {card['data']['hours']} h, "
         + ", ".join(f"{k} {v} h" for k, v in card['data']['hours_by_engine'].items())
         + f"; {card['data']['voices']} voices. Splits: "
         + ", ".join(f"{k} {v}" for k, v in card['data']['utterances_by_split'].items())
         + ". Test templates (phrasings) are never seen in training; the held-out voice family "
         f"({card['data']['heldout_voice_family']}) is never trained on."), "",
        "## Training", "",
        (f"Teacher: {_run_text(card['recipe'].get('teacher_run', {}))}. Student (distilled "
         f"from it, QAT): {_run_text(card['recipe'].get('student_run', {}))}."
         + (f" {card['recipe']['note']}" if card["recipe"].get("note") else "")), "",
        "## Test metrics", "",
        "| | intent | slot F1 | WER | SemER | exact | ECE |", "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in (("student int8 + LM, test", s), ("student int8 + LM, held-out voices", h),
                    ("teacher fp16 + LM, test", t)):
        lines.append(f"| {name} | {r['intent_accuracy']:.1%} | {r['slot_f1']:.1%} | "
                     f"{r['wer']:.1%} | {r['semer']:.1%} | {r['exact_match']:.1%} | {r['ece']:.3f} |")
    lines += ["", "### Student on test, per slice (worst SemER first within each family)", ""]
    for family, by_value in s["slices"].items():
        lines += [f"**{family}**", "", "| slice | n | intent | slot F1 | WER | SemER |",
                  "|---|---:|---:|---:|---:|---:|"]
        for value, r in sorted(by_value.items(), key=lambda kv: -kv[1]["semer"]):
            lines.append(f"| {value} | {r['n']} | {r['intent_accuracy']:.1%} | {r['slot_f1']:.1%} "
                         f"| {r['wer']:.1%} | {r['semer']:.1%} |")
        lines.append("")
    lat = card["latency"]
    lines += [
        "## Speed and size", "",
        (f"One thread, 3-s utterance, from the waveform, LM beam included: student int8 p50 "
         f"{lat['student_int8_lm_p50_ms']} ms, teacher fp32 p50 {lat['teacher_fp32_lm_p50_ms']} ms "
         f"(×{lat['speedup']}). On disk: student {card['bytes']['student'] / 1e6:.2f} MB, "
         f"teacher {card['bytes']['teacher'] / 1e6:.2f} MB."), "",
        "## Limits", "",
        ("Trained on synthetic voices (espeak-ng, flite, festival) only; human speech, other "
         "languages and commands outside the Home Assistant intents are out of scope. "
         "Confidences are temperature-scaled on the held-out voice family; `clarify` marks "
         "answers below the threshold chosen on validation data."),
    ]
    return "\n".join(lines) + "\n"
