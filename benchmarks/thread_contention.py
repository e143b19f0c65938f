"""How torch's CPU threads behave when another process competes for a core.

Times a student-size forward pass (bf16 autocast, batch 28 × 209 frames) with 1 and 2
threads, alone and next to one busy-looping process, and with
``OMP_WAIT_POLICY=PASSIVE``. Each configuration runs in a fresh subprocess (OpenMP reads
its settings at start-up); the median and the worst of 10 timed passes after 2 warm-ups are reported.

    uv run python benchmarks/thread_contention.py

Prints a table and writes ``benchmarks/results/thread_contention.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

_CHILD = r"""
import sys, time, torch
from model.nn.network import EncoderConfig, ModelConfig, JointModel
torch.set_num_threads(int(sys.argv[1]))
m = JointModel(ModelConfig(EncoderConfig(d_model=96, layers=4, subsampling=8, causal_conv=True),
    n_chars=30, n_intents=42, n_parse_tokens=604, ctc_upsample=4, decoder_layers=1,
    decoder_ffn=384)).train()
x, l, p = torch.randn(28, 209, 80), torch.full((28,), 209), torch.randint(0, 604, (28, 12))
ts = []
for _ in range(12):
    t = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(x, l, p)
    ts.append(1000 * (time.perf_counter() - t))
print(sorted(ts[2:])[len(ts[2:]) // 2], max(ts[2:]))
"""


def _run(threads: int, busy: bool, passive: bool) -> tuple[float, float]:
    env = dict(os.environ)
    if passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        out = subprocess.run([sys.executable, "-c", _CHILD, str(threads)], env=env,
                             capture_output=True, text=True, check=True)
    finally:
        if hog:
            hog.kill()
    median, worst = out.stdout.strip().splitlines()[-1].split()
    return round(float(median), 1), round(float(worst), 1)


def main() -> None:
    rows = []
    print(f"{'threads':>8}{'wait policy':>13}{'alone ms (median/max)':>24}"
          f"{'+1 busy ms (median/max)':>26}")
    for threads, passive in ((1, False), (2, False), (2, True)):
        alone, busy = _run(threads, False, passive), _run(threads, True, passive)
        rows.append({"threads": threads, "omp_wait_policy": "PASSIVE" if passive else "default",
                     "alone_median_ms": alone[0], "alone_max_ms": alone[1],
                     "busy_median_ms": busy[0], "busy_max_ms": busy[1]})
        print(f"{threads:>8}{rows[-1]['omp_wait_policy']:>13}"
              f"{f'{alone[0]:.1f} / {alone[1]:.1f}':>24}{f'{busy[0]:.1f} / {busy[1]:.1f}':>26}")
    out = Path("benchmarks/results/thread_contention.json")
    out.write_text(json.dumps({"benchmark": "thread_contention", "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
