"""CPU time of one prediction for several model bundles, measured interleaved in ONE
process so that the machine's drifting speed (±35 % within minutes here) falls on every
model alike: the ratio between models is the figure to read, not the milliseconds.

Each round times one ``predict_waveforms`` call (a 3-s utterance, one thread, the LM
beam when the bundle has one) per model in turn, cycling through the same utterances as
``benchmarks/serving_load.py`` (test-split audio of ``--profile`` when that corpus
exists, else espeak-ng sentences); the service's compute ceiling is cores ÷ this time.

    uv run python benchmarks/model_cost.py release/student OTHER_BUNDLE [--rounds 200]

Prints a table and writes JSON (default ``benchmarks/results/model_cost.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

_ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundles", nargs="+", type=Path, help="deploy bundles to compare")
    parser.add_argument("--profile", default="full", help="whose test split gives the audio")
    parser.add_argument("--utterances", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=200, help="timed calls per model")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=_ROOT / "benchmarks" / "results" / "model_cost.json")
    args = parser.parse_args()
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be >= 1, got {args.rounds}")
    sys.path.insert(0, str(_ROOT))
    sys.path.insert(0, str(_ROOT / "benchmarks"))
    from serving_load import _ModelCpu, _utterances, _wav

    with tempfile.TemporaryDirectory() as tmp:
        audio, source = _utterances(args.profile, args.utterances, args.seed, Path(tmp))
    bodies = [_wav(a) for a in audio]
    models = [_ModelCpu(b, bodies, args.warmup) for b in args.bundles]
    cpu: list[list[float]] = [[] for _ in models]
    start = time.perf_counter()
    for r in range(args.rounds):
        for i, m in enumerate(models):
            cpu[i] += m.measure(1)["cpu_s"]
        if (r + 1) % 50 == 0:
            print(f"  {r + 1}/{args.rounds} rounds", flush=True)
    base = float(np.median(cpu[0]))
    rows = [{"bundle": str(b), "version": m.version, "lm": m.lm,
             "cpu_ms_median": round(1000 * float(np.median(c)), 3),
             "cpu_ms_p10": round(1000 * float(np.percentile(c, 10)), 3),
             "cpu_ms_p90": round(1000 * float(np.percentile(c, 90)), 3),
             "ratio_to_first": round(float(np.median(c)) / base, 3)}
            for b, m, c in zip(args.bundles, models, cpu, strict=True)]
    print(f"\naudio: {source}; {args.rounds} interleaved calls per model, 1 thread\n")
    print(f"{'bundle':46} {'CPU ms p50':>10} {'p10':>7} {'p90':>7} {'× first':>8}")
    for r in rows:
        print(f"{r['bundle'][-46:]:46} {r['cpu_ms_median']:>10.2f} {r['cpu_ms_p10']:>7.2f} "
              f"{r['cpu_ms_p90']:>7.2f} {r['ratio_to_first']:>8.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "model_cost", "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "audio": source, "rounds": args.rounds, "threads": 1,
        "seconds": round(time.perf_counter() - start, 1), "models": rows}, indent=2) + "\n")
    print(f"\n→ {args.out}")


if __name__ == "__main__":
    main()
