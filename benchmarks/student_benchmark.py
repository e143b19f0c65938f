"""Student benchmark: teacher fp32 vs student (fp32, PTQ int8, QAT int8), streaming, and
the held-out voice family — every figure of issue 12's acceptance in one run.

Everything is measured in ONE run on ONE machine, latency on ONE thread:

- **Accuracy** on the test split (template-held-out) for: the teacher (fp32 torch), the
  student before QAT (fp32, torch), that same student after post-training dynamic int8
  quantisation (ONNX Runtime, PTQ), the deployed student (QAT, int8 ONNX bundle), and the
  streaming student at each chunk size of ``student.streaming.eval_chunks`` (the
  chunk-masked full pass, which the unit tests prove equal to chunk-by-chunk streaming).
- **Latency** per 3-s utterance, end to end from the waveform (features, encoder,
  transcript, intent, greedy parse): p50/p95 and real-time factor; **size** of the
  network weight files on disk (the LM folder, the same for both, is reported apart).
- **Streaming**: audio fed in chunk-sized pieces in real time order; per chunk a partial
  transcript; p50/p95 of the time from the last piece to the final result.
- **Voices never heard**: the deployed student and the teacher on ``test_heldout`` (the
  test sentences spoken by the held-out voice family) beside ``test``, with the intent
  ECE (calibration), and the previous recipe's student (session 3,
  ``benchmarks/results/student_session3.json``) in the same table.

Every figure is given for both transcript decoders when the models carry an ``lm/``
folder: ``greedy`` (CTC best path: the networks alone) and ``lm`` (lexicon + word
3-gram beam search, with slot values copied from the transcript when the model's
validation tuning chose it; the product default).

    uv run python benchmarks/student_benchmark.py --profile full

Prints tables and writes JSON (default ``benchmarks/results/student.json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from model.data.corpus import CorpusLayout
from model.data.manifest import read_manifest
from model.evaluation.compare import folder_bytes
from model.evaluation.report import evaluate
from model.frontend.audio import load_audio
from model.frontend.cache import load_split
from model.inference.batch import SLUPredictor
from model.inference.onnx import OnnxSLUPredictor
from model.inference.streaming import StreamingRecognizer
from model.nn.export import export_onnx, quantize_bundle
from model.nn.package import load_package
from voiceloop.settings import load_settings

METRICS = ("intent_accuracy", "slot_f1", "wer", "semer", "exact_match", "ece")
PREVIOUS = Path(__file__).resolve().parent / "results" / "student_session3.json"


def _clips(settings, n: int, rate: int) -> list[np.ndarray]:
    layout = CorpusLayout(settings.corpus_dir)
    rows = read_manifest(layout.manifest("test"))[:n]
    clips = []
    for row in rows:
        audio = load_audio(row.audio_path(layout.manifests_dir), rate)[: 3 * rate]
        clips.append(np.pad(audio, (0, 3 * rate - audio.size)))
    return clips


def _latency(predict: Callable[[np.ndarray], object], clips: list[np.ndarray]) -> dict:
    for clip in clips[:3]:
        predict(clip)
    times = []
    for clip in clips:
        start = time.perf_counter()
        predict(clip)
        times.append(time.perf_counter() - start)
    ms = np.array(times) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p95_ms": round(float(np.percentile(ms, 95)), 2),
            "rtf_p50": round(float(np.percentile(ms, 50)) / 3000, 4)}


def _accuracy(rows, predictor, feats) -> dict:
    preds = predictor.predict_features([r.id for r in rows], feats)
    o = evaluate(rows, preds).overall
    return {m: round(float(getattr(o, m)), 4) for m in METRICS}


def _streaming(package, clips: list[np.ndarray], chunk: int, use_lm: bool) -> dict:
    recognizer = StreamingRecognizer(package, chunk=chunk, use_lm=use_lm)
    rate = package.features.sample_rate
    piece = int(rate * recognizer.chunk_ms / 1000)
    finals, partials = [], []
    for clip in clips:
        session = recognizer.session()
        pieces = [clip[i : i + piece] for i in range(0, clip.size, piece)]
        updates = 0
        for p in pieces:
            before = session.partial().encoder_frames
            after = session.accept_audio(p).encoder_frames
            updates += after > before
        start = time.perf_counter()
        session.finish()
        finals.append((time.perf_counter() - start) * 1000)
        partials.append(updates / len(pieces))
    ms = np.array(finals[3:] or finals)
    return {"chunk_frames": chunk, "chunk_ms": recognizer.chunk_ms,
            "final_after_last_chunk_p50_ms": round(float(np.percentile(ms, 50)), 2),
            "final_after_last_chunk_p95_ms": round(float(np.percentile(ms, 95)), 2),
            "pieces_with_new_partial": round(float(np.mean(partials)), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="full")
    parser.add_argument("--teacher", type=Path, help="default: models/PROFILE/teacher/model")
    parser.add_argument("--student", type=Path, help="default: models/PROFILE/student")
    parser.add_argument("--test-utterances", type=int, default=0, help="0 = whole test split")
    parser.add_argument("--latency-utterances", type=int, default=100)
    parser.add_argument("--accuracy-threads", type=int, default=2,
                        help="threads for the accuracy passes (1 when the machine is shared)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/student.json"))
    args = parser.parse_args()
    settings = load_settings(profile=args.profile)
    teacher_dir = args.teacher or settings.models_dir / "teacher" / "model"
    student_root = args.student or settings.models_dir / "student"
    batch, max_len = settings.decode.batch_size, settings.decode.max_parse_len

    teacher = load_package(teacher_dir)
    student = load_package(student_root / "model")
    pre_qat = load_package(student_root / "pre_qat_model")
    # The pre-QAT student borrows the deployed student's LM (same lexicon and n-gram;
    # weights tuned on the final student), so PTQ vs QAT compares the networks only.
    pre_qat.lm_dir = student.lm_dir
    work = Path(tempfile.mkdtemp(prefix="student-bench-"))
    export_onnx(pre_qat, work / "ptq_fp32")
    quantize_bundle(work / "ptq_fp32", work / "ptq_int8")
    decoders = [d for d in ("greedy", "lm") if d == "greedy" or (
        teacher.lm_dir is not None and student.lm_dir is not None)]

    variants: dict[str, dict] = {
        "teacher fp32 (torch)": {"make": lambda t, lm: SLUPredictor(
                                     teacher, batch_size=t, max_parse_len=max_len, use_lm=lm),
                                 "features": teacher.features, "weights": teacher_dir},
        "student fp32 pre-QAT (torch)": {"make": lambda t, lm: SLUPredictor(
                                             pre_qat, batch_size=t, max_parse_len=max_len,
                                             use_lm=lm),
                                         "features": pre_qat.features,
                                         "weights": student_root / "pre_qat_model"},
        "student PTQ int8 (ORT)": {"make": lambda t, lm: OnnxSLUPredictor(
                                       work / "ptq_int8", threads=1, batch_size=t,
                                       max_parse_len=max_len, use_lm=lm),
                                   "features": pre_qat.features, "weights": work / "ptq_int8"},
        "student QAT int8 (ORT, deployed)": {"make": lambda t, lm: OnnxSLUPredictor(
                                                 student_root / "deploy", threads=1,
                                                 batch_size=t, max_parse_len=max_len, use_lm=lm),
                                             "features": student.features,
                                             "weights": student_root / "deploy"},
    }

    # Accuracy (2 threads: it is throughput work, not the latency measurement).
    torch.set_num_threads(args.accuracy_threads)
    rows_all = read_manifest(CorpusLayout(settings.corpus_dir).manifest("test"))
    keep = (sorted(np.random.default_rng(0).choice(len(rows_all), args.test_utterances,
                                                   replace=False))
            if args.test_utterances and args.test_utterances < len(rows_all) else None)
    cache: dict[str, tuple] = {}
    result: dict = {"benchmark": "student", "profile": args.profile,
                    "machine": {"platform": platform.platform()}, "decoders": decoders,
                    "teacher": str(teacher_dir), "student": str(student_root),
                    "variants": {}, "streaming_accuracy": {}, "streaming_latency": {}}
    for name, v in variants.items():
        key = repr(v["features"])
        if key not in cache:
            rows, feats = load_split(settings, "test", False, v["features"])
            if keep is not None:
                rows, feats = [rows[i] for i in keep], [feats[i] for i in keep]
            cache[key] = (rows, feats)
        rows, feats = cache[key]
        v["accuracy"] = {}
        for decoder in decoders:
            start = time.perf_counter()
            v["accuracy"][decoder] = _accuracy(rows, v["make"](batch, decoder == "lm"), feats)
            print(f"{name} [{decoder}]: {v['accuracy'][decoder]} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    # The held-out voice family: the deployed student and the teacher, LM decoder.
    result["heldout"] = {}
    heldout_decoder = "lm" if "lm" in decoders else "greedy"
    for name in ("teacher fp32 (torch)", "student QAT int8 (ORT, deployed)"):
        v = variants[name]
        rows_h, feats_h = load_split(settings, "test_heldout", False, v["features"])
        result["heldout"][name] = _accuracy(rows_h, v["make"](batch, heldout_decoder == "lm"),
                                            feats_h)
        print(f"{name} on test_heldout [{heldout_decoder}]: {result['heldout'][name]}",
              flush=True)
    rows, feats = cache[repr(student.features)]
    for decoder in decoders:
        result["streaming_accuracy"][decoder] = {}
        for chunk in settings.student.streaming.eval_chunks:
            predictor = SLUPredictor(student, batch_size=batch, max_parse_len=max_len,
                                     chunk=chunk or None, use_lm=decoder == "lm")
            result["streaming_accuracy"][decoder][str(chunk)] = {
                "chunk_ms": chunk * student.model.cfg.encoder.subsampling
                * student.features.hop_ms if chunk else None,
                **_accuracy(rows, predictor, feats)}
            print(f"streaming [{decoder}] chunk {chunk or 'full'}: "
                  f"{result['streaming_accuracy'][decoder][str(chunk)]}", flush=True)

    # Latency: one thread, one 3-s utterance at a time, from the waveform.
    torch.set_num_threads(1)
    rate = teacher.features.sample_rate
    clips = _clips(settings, args.latency_utterances, rate)
    for name, v in variants.items():
        v["latency"] = {}
        for decoder in decoders:
            predictor = v["make"](1, decoder == "lm")
            v["latency"][decoder] = _latency(
                lambda c, p=predictor: p.predict_waveforms(["x"], [c], [rate]), clips)
            print(f"{name} [{decoder}]: {v['latency'][decoder]}", flush=True)
        v["bytes"] = folder_bytes(Path(v["weights"]))  # network weights (.pt/.onnx) only
    # A full-context student (student.model.causal_conv false) cannot stream: nothing to time.
    streams = student.model.cfg.encoder.causal_conv
    for decoder in decoders if streams else ():
        result["streaming_latency"][decoder] = [
            _streaming(student, clips[:50], chunk, decoder == "lm") for chunk in (2, 1, 4)]
        print(f"streaming [{decoder}]: {result['streaming_latency'][decoder]}", flush=True)

    # The LM folder ships with both models (same lexicon and n-gram): reported apart.
    result["lm_bytes"] = folder_bytes(student.lm_dir, (".arpa", ".txt", ".json")) if (
        student.lm_dir) else 0
    teacher_v = variants["teacher fp32 (torch)"]
    for name, v in variants.items():
        result["variants"][name] = {
            "accuracy": v["accuracy"], "latency": v["latency"], "bytes": v["bytes"],
            "speedup_vs_teacher_p50": {d: round(teacher_v["latency"][d]["p50_ms"]
                                                / v["latency"][d]["p50_ms"], 2)
                                       for d in decoders},
            "size_ratio_vs_teacher": round(teacher_v["bytes"] / v["bytes"], 2),
        }
    deployed = result["variants"]["student QAT int8 (ORT, deployed)"]
    d = "lm" if "lm" in decoders else "greedy"
    s_acc, held = deployed["accuracy"][d], result["heldout"]["student QAT int8 (ORT, deployed)"]
    # Issue 12: the released int8 student with its LM, template-held-out test split.
    result["acceptance_issue12"] = {
        "intent_accuracy >= 0.96": s_acc["intent_accuracy"],
        "slot_f1 >= 0.80": s_acc["slot_f1"],
        "wer <= 0.12": s_acc["wer"],
        "semer <= 0.25": s_acc["semer"],
        "exact_match >= 0.60": s_acc["exact_match"],
        "speedup_p50 >= 4": deployed["speedup_vs_teacher_p50"][d],
        "p50_ms <= 15": deployed["latency"][d]["p50_ms"],
        "heldout_intent_gap_points <= 5": round(
            100 * (s_acc["intent_accuracy"] - held["intent_accuracy"]), 2),
        "heldout_wer_ratio <= 1.5": round(held["wer"] / max(s_acc["wer"], 1e-9), 3),
        "heldout_ece <= 0.05": held["ece"],
    }
    if PREVIOUS.exists():
        old = json.loads(PREVIOUS.read_text())["variants"]["student QAT int8 (ORT, deployed)"]
        result["previous_student_session3"] = {"accuracy_lm": old["accuracy"].get("lm"),
                                               "latency_lm": old["latency"].get("lm")}
    result["acceptance"] = {}
    for d in decoders:
        t_acc, s_acc = teacher_v["accuracy"][d], deployed["accuracy"][d]
        result["acceptance"][d] = {
            "speedup_p50 >= 4": deployed["speedup_vs_teacher_p50"][d],
            "size_ratio >= 4": deployed["size_ratio_vs_teacher"],
            "intent_drop_points <= 1.0": round(100 * (t_acc["intent_accuracy"]
                                                      - s_acc["intent_accuracy"]), 2),
            "slot_f1_drop_points <= 1.5": round(100 * (t_acc["slot_f1"] - s_acc["slot_f1"]), 2),
            "wer_relative_increase <= 0.15": round((s_acc["wer"] - t_acc["wer"])
                                                   / t_acc["wer"], 3),
            "rtf_p50 <= 0.01": deployed["latency"][d]["rtf_p50"],
            "streaming_final_p95_ms <= 50": result["streaming_latency"][d][0][
                "final_after_last_chunk_p95_ms"] if streams else "not streaming (full context)",
        }

    for d in decoders:
        print(f"\n[{d}] {'variant':36}{'intent':>8}{'slotF1':>8}{'WER':>8}{'SemER':>8}"
              f"{'p50 ms':>8}{'p95 ms':>8}{'RTF':>8}{'MB':>7}{'×speed':>7}{'×size':>7}")
        for name, v in result["variants"].items():
            a, lat = v["accuracy"][d], v["latency"][d]
            print(f"{'':{len(d) + 3}}{name:36}{a['intent_accuracy']:>8.3f}{a['slot_f1']:>8.3f}"
                  f"{a['wer']:>8.3f}{a['semer']:>8.3f}{lat['p50_ms']:>8.2f}{lat['p95_ms']:>8.2f}"
                  f"{lat['rtf_p50']:>8.4f}{v['bytes'] / 1e6:>7.2f}"
                  f"{v['speedup_vs_teacher_p50'][d]:>7.1f}{v['size_ratio_vs_teacher']:>7.1f}")
        print(f"\n[{d}] {'streaming chunk':18}{'ms':>6}{'intent':>8}{'slotF1':>8}{'WER':>8}"
              f"{'SemER':>8}")
        for chunk, a in result["streaming_accuracy"][d].items():
            print(f"{'':{len(d) + 3}}{chunk if chunk != '0' else 'full':18}{a['chunk_ms'] or 0:>6.0f}"
                  f"{a['intent_accuracy']:>8.3f}{a['slot_f1']:>8.3f}{a['wer']:>8.3f}"
                  f"{a['semer']:>8.3f}")
    print("\nacceptance (issue 4, teacher vs student):", json.dumps(result["acceptance"], indent=2))
    print("acceptance (issue 12, released student):",
          json.dumps(result["acceptance_issue12"], indent=2))
    if "previous_student_session3" in result:
        prev = result["previous_student_session3"]["accuracy_lm"] or {}
        print(f"\n{'figure':16}{'session 3':>12}{'this run':>12}")
        for m in ("intent_accuracy", "slot_f1", "wer", "semer", "exact_match"):
            print(f"{m:16}{prev.get(m, float('nan')):>12.4f}{s_acc[m]:>12.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
