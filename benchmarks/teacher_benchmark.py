"""Teacher benchmark: training throughput and single-thread inference latency.

Training throughput: runs the real training step (SpecAugment, bf16 autocast if
configured, all three losses, AdamW) on real corpus batches for ``--train-steps`` steps
with ``train.threads`` threads, and reports utterances/s and audio-seconds/s.

Inference latency: decodes 3-second utterances (real test-split audio cut or padded to
3.0 s) one at a time on ONE thread, end to end from waveform (features, encoder, CTC
greedy or the lexicon + LM beam search when the model has ``lm/``, intent, greedy
parse), and reports p50/p95 latency and the real-time factor
(latency / 3 s). Uses the trained model given by ``--model`` (the parse decoder stops at
``<eos>``, so an untrained model would be unrealistically slow).

    uv run python benchmarks/teacher_benchmark.py --profile full \\
        --model workspace/models/full/teacher/model

Prints a table and writes JSON (default ``benchmarks/results/teacher.json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from model.data.corpus import CorpusLayout
from model.data.grammar import Grammar
from model.data.manifest import read_manifest
from model.frontend.audio import load_audio
from model.frontend.cache import feature_config, load_features
from model.frontend.features import SpecAugment
from model.inference.batch import SLUPredictor
from model.training.dataset import SLUDataset, collate, make_batches
from model.training.fit import build_ctc_vocab, build_model, build_vocab
from model.training.losses import ctc_loss, intent_loss, make_weighting, parse_loss
from voiceloop.settings import load_settings


def _train_throughput(settings, steps: int) -> dict:
    ts = settings.train
    torch.set_num_threads(ts.threads)
    layout = CorpusLayout(settings.corpus_dir)
    rows = read_manifest(layout.manifest("train"))
    rng = np.random.default_rng(0)
    rows = [rows[i] for i in sorted(rng.choice(len(rows), min(len(rows), 1500), replace=False))]
    feats = load_features(rows, layout.manifests_dir, feature_config(settings), progress=False)
    vocab = build_vocab(Grammar.load(settings.corpus.language), rows)
    ctc_vocab = build_ctc_vocab(settings, vocab)
    data = SLUDataset(rows, feats, ctc_vocab, vocab)
    model = build_model(settings, vocab, ctc_vocab).train()
    weighting = make_weighting(ts.loss.weighting, ts.loss.weights, ts.loss.final_weights,
                               ts.loss.schedule_epochs)
    opt = torch.optim.AdamW([*model.parameters(), *weighting.parameters()], lr=ts.lr)
    specaug = SpecAugment(**settings.features.specaugment.model_dump())
    gen = torch.Generator().manual_seed(0)
    batches = make_batches(data.lengths, ts.batch_max_frames, rng=rng)
    utts = frames = 0
    elapsed = 0.0
    for i in range(steps + 2):
        batch = collate(data, batches[i % len(batches)])
        start = time.perf_counter()
        x = specaug(batch.feats, batch.lengths, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=ts.bf16):
            out = model(x, batch.lengths, batch.parse_in, batch.parse_pad_mask)
        losses = {
            "ctc": ctc_loss(out.ctc_logits, out.ctc_lengths, batch.ctc_targets, batch.ctc_lengths),
            "intent": intent_loss(out.intent_logits, batch.intents),
            "parse": parse_loss(out.parse_logits, batch.parse_out, ts.loss.label_smoothing),
        }
        total = weighting(losses).total
        opt.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), ts.grad_clip)
        opt.step()
        if i >= 2:  # the first steps warm up allocators and oneDNN kernels
            elapsed += time.perf_counter() - start
            utts += batch.size
            frames += int(batch.lengths.sum())
    hop_s = settings.features.hop_ms / 1000
    return {
        "threads": ts.threads, "bf16": ts.bf16, "steps": steps,
        "parameters": model.num_parameters(),
        "utt_per_s": round(utts / elapsed, 1),
        "audio_s_per_s": round(frames * hop_s / elapsed, 1),
    }


def _latency(settings, model_dir: Path, n: int, use_lm: bool) -> dict:
    torch.set_num_threads(1)
    predictor = SLUPredictor.load(model_dir, batch_size=1,
                                  max_parse_len=settings.decode.max_parse_len, use_lm=use_lm)
    layout = CorpusLayout(settings.corpus_dir)
    rows = read_manifest(layout.manifest("test"))[:n]
    rate = predictor.package.features.sample_rate
    clips = []
    for row in rows:
        audio = load_audio(row.audio_path(layout.manifests_dir), rate)[: 3 * rate]
        clips.append(np.pad(audio, (0, 3 * rate - audio.size)))
    for clip in clips[:3]:
        predictor.predict_waveforms(["warm"], [clip], [rate])
    times = []
    for clip in clips:
        start = time.perf_counter()
        predictor.predict_waveforms(["x"], [clip], [rate])
        times.append(time.perf_counter() - start)
    ms = np.array(times) * 1000
    return {
        "threads": 1, "utterances": len(clips), "audio_s": 3.0,
        "decoder": "lm" if predictor.transcriber is not None else "greedy",
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p95_ms": round(float(np.percentile(ms, 95)), 2),
        "mean_ms": round(float(ms.mean()), 2),
        "rtf_p50": round(float(np.percentile(ms, 50)) / 3000, 4),
        "parameters": predictor.model.num_parameters(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="full")
    parser.add_argument("--model", type=Path, help="trained model folder (for latency)")
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--latency-utterances", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/teacher.json"))
    args = parser.parse_args()
    settings = load_settings(profile=args.profile)

    result = {"benchmark": "teacher", "profile": args.profile,
              "machine": {"platform": platform.platform()}}
    result["training"] = _train_throughput(settings, args.train_steps)
    t = result["training"]
    print(f"\nTraining ({args.profile} model, {t['parameters'] / 1e6:.2f} M parameters, "
          f"{t['threads']} threads, bf16={t['bf16']}): {t['utt_per_s']} utterances/s, "
          f"{t['audio_s_per_s']} audio-s/s")
    if args.model:
        # Greedy CTC (the network alone) and, when the model carries lm/, the beam search.
        result["latency"] = _latency(settings, args.model, args.latency_utterances, False)
        result["latency_lm"] = _latency(settings, args.model, args.latency_utterances, True)
        print(f"\nInference, 1 thread, 3-s utterances (n={result['latency']['utterances']})")
        print(f"{'decoder':>10}{'p50 ms':>10}{'p95 ms':>10}{'mean ms':>10}{'RTF p50':>10}")
        for lat in (result["latency"], result["latency_lm"]):
            print(f"{lat['decoder']:>10}{lat['p50_ms']:>10.1f}{lat['p95_ms']:>10.1f}"
                  f"{lat['mean_ms']:>10.1f}{lat['rtf_p50']:>10.4f}")
    else:
        print("\n(no --model given: latency skipped)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
