"""Training-step cost of teacher architectures: utterances per second and where the time
goes (``torch.profiler``), on synthetic batches shaped like the corpus.

Compares the encoder frame rate (40 ms = subsampling 4 vs 80 ms = subsampling 8), the
front end's channel count, and the parse decoder against reading slots off a tagged CTC
transcript. Each arm runs the same number of forward+backward+AdamW steps on the same
batches (25 utterances of 2.4 s, ~6,000 padded frames, like ``train.batch_max_frames``).

    uv run python benchmarks/training_throughput.py --threads 1 --steps 12

Prints a table and writes ``benchmarks/results/training_throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from model.nn.network import EncoderConfig, JointModel, ModelConfig
from model.training.losses import ctc_loss, intent_loss, parse_loss

RESULTS = Path(__file__).resolve().parent / "results" / "training_throughput.json"

ARMS: dict[str, dict] = {
    "40ms_ch32_decoder (old teacher)": {"subsampling": 4, "upsample": 2, "channels": 32, "decoder": 2},
    "40ms_ch32_tagged": {"subsampling": 4, "upsample": 2, "channels": 32, "decoder": 0},
    "80ms_ch32_tagged": {"subsampling": 8, "upsample": 4, "channels": 32, "decoder": 0},
    "80ms_ch16_tagged": {"subsampling": 8, "upsample": 4, "channels": 16, "decoder": 0},
    "80ms_ch32_decoder": {"subsampling": 8, "upsample": 4, "channels": 32, "decoder": 2},
}


def build(arm: dict) -> JointModel:
    enc = EncoderConfig(n_mels=80, d_model=144, layers=6, heads=4, ffn_mult=4,
                        conv_kernel=15 if arm["subsampling"] == 4 else 9,
                        subsampling=arm["subsampling"], frontend_channels=arm["channels"],
                        inter_ctc_layer=3)
    return JointModel(ModelConfig(encoder=enc, n_chars=54, n_intents=42, n_parse_tokens=600,
                                  decoder_layers=arm["decoder"], ctc_upsample=arm["upsample"]))


def run_arm(arm: dict, steps: int, batch: int, frames: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = build(arm).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    feats = torch.randn(batch, frames, 80)
    lengths = torch.full((batch,), frames)
    targets = torch.randint(1, 54, (batch * 30,))
    target_lengths = torch.full((batch,), 30)
    intents = torch.randint(0, 42, (batch,))
    parse_in = torch.randint(4, 600, (batch, 12))
    parse_out = torch.randint(4, 600, (batch, 12))

    def step() -> None:
        decoder = model.parse_decoder is not None
        out = model(feats, lengths, parse_in if decoder else None)
        loss = ctc_loss(out.ctc_logits, out.ctc_lengths, targets, target_lengths)
        loss = loss + 0.3 * intent_loss(out.intent_logits, intents)
        if out.inter_ctc_logits is not None:
            loss = loss + 0.3 * ctc_loss(out.inter_ctc_logits, out.ctc_lengths, targets,
                                         target_lengths)
        if out.parse_logits is not None:
            loss = loss + parse_loss(out.parse_logits, parse_out)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        step()
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    conv2d = sum(e.self_cpu_time_total for e in prof.key_averages()
                 if "conv" in e.key and ("2d" in e.key or "convolution" in e.key)
                 and "depthwise" not in e.key)
    return {
        "step_s": seconds, "utt_per_s": batch / seconds,
        "parameters": float(model.num_parameters()),
        "conv_share": conv2d / total if total else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--frames", type=int, default=240, help="10 ms frames per utterance")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    print("| arm | utt/s | step s | params | conv2d share of CPU time |\n|---|---:|---:|---:|---:|")
    for name, arm in ARMS.items():
        r = run_arm(arm, args.steps, args.batch, args.frames)
        results[name] = {**arm, **r}
        print(f"| {name} | {r['utt_per_s']:.1f} | {r['step_s']:.3f} | {r['parameters'] / 1e6:.2f} M "
              f"| {r['conv_share']:.0%} |", flush=True)
    base = results["40ms_ch32_decoder (old teacher)"]["utt_per_s"]
    for name, r in results.items():
        r["speedup_vs_old"] = r["utt_per_s"] / base
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": args.threads, "steps": args.steps,
                                    "batch": args.batch, "frames": args.frames,
                                    "cpu": torch.backends.cpu.get_cpu_capability(),
                                    "arms": results}, indent=2))
    print("speed-up vs the old teacher: " + ", ".join(
        f"{k} ×{v['speedup_vs_old']:.2f}" for k, v in results.items()))


if __name__ == "__main__":
    main()
