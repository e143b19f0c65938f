"""LM order trial: does a longer word n-gram read slot types off the tagged transcript better?

A tagged CTC head writes ``<start_minutes> twenty one </> minutes timer``; the slot type
(the tag) is decided before the words that tell it apart (``minutes``, ``timer``). A
3-gram scores the tag from the two words before it only, so ``minutes`` vs ``hours`` vs
``start_minutes`` is left to the acoustic model. A 4- or 5-gram sees from the tag to the
unit word after a one- or two-word number.

For each model and each order, the model folder is copied to a temporary folder and
given its LM by the pipeline's own ``attach_lm`` (``decode.lm.order`` and the count
cut-off ``decode.lm.min_count`` overridden; LM
weight and word score tuned by validation SemER on ``--tune`` validation utterances),
then scored with the LM beam on *other* validation utterances (``--score``, disjoint from
the tuning ones) and on the held-out voice family's validation split: intent, slot F1,
WER, SemER, decode ms per utterance. One thread. The test split is not touched.

    uv run python benchmarks/lm_order_trial.py --model workspace/models/full/student_fc/model \\
        --model workspace/models/full/teacher/model
    uv run python benchmarks/lm_order_trial.py --model workspace/models/full/student_fc/model \\
        --orders 4 5 --min-counts 2 3 --out benchmarks/results/lm_order_trial_cutoff.json

Prints a table and writes JSON (default ``benchmarks/results/lm_order_trial.json``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from model.evaluation.report import evaluate
from model.frontend.cache import load_split, random_subset
from model.inference.batch import SLUPredictor
from model.nn.package import load_package
from model.training.lm_stage import attach_lm
from voiceloop.settings import load_settings


def _score(settings, folder: Path, split: str, limit: int, exclude: set[str]) -> dict:
    package = load_package(folder)
    rows, feats = load_split(settings, split, False, package.features)
    keep = [i for i, r in enumerate(rows) if r.id not in exclude]
    rows, feats = random_subset([rows[i] for i in keep], [feats[i] for i in keep], limit,
                                settings.seed + 1)
    predictor = SLUPredictor(package, settings.decode.batch_size, settings.decode.max_parse_len)
    start = time.perf_counter()
    preds = predictor.predict_features([r.id for r in rows], feats)
    ms = (time.perf_counter() - start) * 1000 / len(rows)
    o = evaluate(rows, preds).overall
    return {"n": len(rows), "intent_accuracy": o.intent_accuracy, "slot_f1": o.slot_f1,
            "wer": o.wer, "semer": o.semer, "exact_match": o.exact_match,
            "ms_per_utterance": round(ms, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="full")
    parser.add_argument("--model", type=Path, action="append", required=True,
                        help="a model folder (repeat for several)")
    parser.add_argument("--orders", type=int, nargs="+", default=[3, 4, 5])
    parser.add_argument("--min-counts", type=int, nargs="+", default=[1],
                        help="count cut-offs for n-grams of order >= 3 (decode.lm.min_count)")
    parser.add_argument("--tune", type=int, default=600, help="validation utterances to tune on")
    parser.add_argument("--score", type=int, default=1200,
                        help="other validation utterances to score on (and as many held-out)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lm_order_trial.json"))
    args = parser.parse_args()
    if any(o < 2 for o in args.orders):
        raise ValueError(f"--orders must be >= 2, got {args.orders}")
    torch.set_num_threads(1)
    base = load_settings(profile=args.profile)
    result: dict = {"benchmark": "lm_order_trial", "profile": args.profile, "tune": args.tune,
                    "rows": []}
    for model in args.model:
        for order, min_count in itertools.product(args.orders, args.min_counts):
            settings = load_settings(profile=args.profile, overrides=[
                f"decode.lm.order={order}", f"decode.lm.min_count={min_count}",
                f"decode.lm.tune_utterances={args.tune}"])
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(tmp) / "model"
                shutil.copytree(model, folder, ignore=shutil.ignore_patterns("lm"))
                start = time.perf_counter()
                lm = attach_lm(settings, folder, progress=False)
                tune_s = time.perf_counter() - start
                rows_v, _ = load_split(settings, "valid", False, load_package(folder).features)
                tuned_ids = {r.id for r in random_subset(rows_v, list(rows_v), args.tune,
                                                          settings.seed)[0]}
                row = {"model": str(model), "order": order, "min_count": min_count,
                       "lm_weight": lm.config.lm_weight, "word_score": lm.config.word_score,
                       "tune_semer": lm.beam_semer, "tune_s": round(tune_s, 1),
                       "arpa_bytes": (folder / "lm" / "lm.arpa").stat().st_size,
                       "valid": _score(settings, folder, "valid", args.score, tuned_ids)}
                if base.corpus.tts.heldout is not None:
                    row["valid_heldout"] = _score(settings, folder, "valid_heldout",
                                                  args.score, set())
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'model':44}{'order':>6}{'min':>4}{'MB':>6}{'split':>15}{'intent':>8}{'slotF1':>8}{'WER':>8}"
          f"{'SemER':>8}{'exact':>8}{'ms/utt':>8}")
    for r in result["rows"]:
        for split in ("valid", "valid_heldout"):
            if split in r:
                a = r[split]
                print(f"{r['model'][-44:]:44}{r['order']:>6}{r.get('min_count', 1):>4}"
                      f"{r['arpa_bytes'] / 1e6:>6.1f}{split:>15}"
                      f"{a['intent_accuracy']:>8.3f}{a['slot_f1']:>8.3f}{a['wer']:>8.3f}"
                      f"{a['semer']:>8.3f}{a['exact_match']:>8.3f}{a['ms_per_utterance']:>8.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
