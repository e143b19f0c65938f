"""Slot errors of an evaluation: right value under the wrong type, or value missing.

Reads an evaluation's ``predictions.jsonl`` (``voiceloop evaluate`` / training's
``eval/<split>/``) and the split's manifest; for every reference slot, counts whether a
predicted slot has its value with the same type, with another type, or no predicted slot
has its value; lists the commonest (reference type → predicted type) confusions and the
types most often missed. No model is run.

    uv run python benchmarks/slot_errors.py \\
        --predictions workspace/models/full/student_fc/eval/test/predictions.jsonl \\
        --manifest workspace/corpus/full/manifests/test.jsonl

Prints a table and writes JSON (default ``benchmarks/results/slot_errors.json``).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from model.data.manifest import read_manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predictions", type=Path, required=True)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/slot_errors.json"))
    args = parser.parse_args()
    refs = {r.id: r for r in read_manifest(args.manifest)}
    outcome: Counter[str] = Counter()
    confusions: Counter[tuple[str, str]] = Counter()
    missed: Counter[str] = Counter()
    for line in args.predictions.read_text(encoding="utf-8").splitlines():
        pred = json.loads(line)
        ref = refs.get(pred["id"])
        if ref is None:
            raise ValueError(f"prediction {pred['id']!r} is not in {args.manifest}")
        by_value = {s["value"]: s["type"] for s in pred["slots"]}
        for slot in ref.slots:
            if slot.value not in by_value:
                outcome["value missing"] += 1
                missed[slot.type] += 1
            elif by_value[slot.value] == slot.type:
                outcome["value and type right"] += 1
            else:
                outcome["value right, type wrong"] += 1
                confusions[(slot.type, by_value[slot.value])] += 1
    total = sum(outcome.values())
    print(f"{total} reference slots")
    for name, n in outcome.most_common():
        print(f"  {name:26} {n:>6} ({n / total:.1%})")
    print(f"\n{'reference type → predicted type':44} {'n':>5}")
    for (ref_type, hyp_type), n in confusions.most_common(args.top):
        print(f"{ref_type + ' → ' + hyp_type:44} {n:>5}")
    print(f"\n{'type most often missed':44} {'n':>5}")
    for slot_type, n in missed.most_common(args.top):
        print(f"{slot_type:44} {n:>5}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "slot_errors", "predictions": str(args.predictions),
        "manifest": str(args.manifest), "reference_slots": total, "outcomes": dict(outcome),
        "confusions": [{"reference": a, "predicted": b, "n": n}
                       for (a, b), n in confusions.most_common()],
        "missed": dict(missed.most_common())}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
