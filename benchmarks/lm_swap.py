"""LM swap: is a candidate's regression its acoustic model or its language model?

Scores two int8 deploy bundles A and B on one split of a profile's corpus, then each
bundle's network with the *other's* LM folder (``lm/``: lexicon, n-gram, tuned weights):
four rows, intent / slot F1 / WER / SemER. If "A weights + B LM" matches B, the
difference is the LM. A session probe doing the same settled why the demo's first
5-gram candidate was rejected (its LM had been rebuilt from the small base corpus); on
a demo's latest candidate:

    uv run python benchmarks/lm_swap.py --profile quick --workspace workspace/demo \\
        --a release/student --b workspace/demo/retrain/<run>/student/deploy

Prints a table and writes JSON (default ``benchmarks/results/lm_swap.json``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from model.evaluation.compare import score_bundle
from model.nn.package import LM_DIRNAME, copy_lm_folder
from voiceloop.settings import load_settings


def _with_lm(bundle: Path, lm_from: Path, out: Path) -> Path:
    """A copy of ``bundle`` carrying ``lm_from``'s LM folder (links followed)."""
    shutil.copytree(bundle, out, ignore=shutil.ignore_patterns(LM_DIRNAME))
    copy_lm_folder(lm_from / LM_DIRNAME, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--workspace", type=Path, default=None)
    parser.add_argument("--split", default="test")
    parser.add_argument("--a", type=Path, required=True, help="deploy bundle A (e.g. production)")
    parser.add_argument("--b", type=Path, required=True, help="deploy bundle B (e.g. a candidate)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lm_swap.json"))
    args = parser.parse_args()
    for bundle in (args.a, args.b):
        if not (bundle / LM_DIRNAME).is_dir():
            raise ValueError(f"{bundle} is not a deploy bundle with an LM folder")
    torch.set_num_threads(args.threads)
    settings = load_settings(profile=args.profile,
                             workspace=args.workspace.resolve() if args.workspace else None)
    result: dict = {"benchmark": "lm_swap", "profile": args.profile, "split": args.split,
                    "a": str(args.a), "b": str(args.b), "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        arms = [("A", args.a), ("B", args.b),
                ("A weights + B LM", _with_lm(args.a, args.b, Path(tmp) / "a_b")),
                ("B weights + A LM", _with_lm(args.b, args.a, Path(tmp) / "b_a"))]
        for i, (name, bundle) in enumerate(arms):
            o = score_bundle(settings, bundle, args.split, Path(tmp) / f"eval{i}", False,
                             args.threads).overall
            row = {"arm": name, "n": o.n, "intent_accuracy": o.intent_accuracy,
                   "slot_f1": o.slot_f1, "wer": o.wer, "semer": o.semer}
            result["rows"].append(row)
            print(row, flush=True)
    print(f"\n{'arm':20}{'intent':>8}{'slotF1':>8}{'WER':>8}{'SemER':>8}")
    for r in result["rows"]:
        print(f"{r['arm']:20}{r['intent_accuracy']:>8.3f}{r['slot_f1']:>8.3f}{r['wer']:>8.3f}"
              f"{r['semer']:>8.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
