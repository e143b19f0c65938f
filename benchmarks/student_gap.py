"""Where the released student loses against its teacher (issue 12): the same utterances
through the int8 student and its fp32 torch package (both greedy: quantisation's share),
the int8 student with its LM beam, and the teacher greedy and with its LM; also the
teacher cut to its first ``--cut`` blocks, untrained (its intermediate-CTC block: what
``student.init: teacher`` starts a student from), and with ``--candidate`` a student
bundle not yet released, on the same utterances.

Nothing is trained; the models are the released ones (``release/``). The utterances are
a seeded sample of a test manifest — by default the demo's base corpus (the ``quick``
profile, whose test templates are held out of every profile's training), which ``make
demo`` builds.

    uv run python benchmarks/student_gap.py [--manifest workspace/demo/corpus/quick/manifests/test.jsonl]
        [--utterances 400] [--threads 2] [--cut 3] [--candidate workspace/models/full/student/deploy]

Prints a table and writes ``benchmarks/results/student_gap.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
_OUT = _ROOT / "benchmarks" / "results" / "student_gap.json"
_MANIFEST = _ROOT / "workspace" / "demo" / "corpus" / "quick" / "manifests" / "test.jsonl"
# (name, folder under release/, LM beam)
_ARMS = (("student int8, greedy", "student", False),
         ("student fp32 (torch), greedy", "student_model", False),
         ("student int8, LM beam", "student", True),
         ("teacher fp16, greedy", "teacher", False),
         ("teacher fp16, LM beam", "teacher", True))


def _cut_teacher(teacher: Path, blocks: int, out: Path) -> Path:
    """The torch package ``teacher`` cut to its first ``blocks`` blocks, saved to ``out``:
    a model of that depth initialised by ``init_from_teacher`` (the student's own
    mechanism), with the teacher's features, vocabularies and LM."""
    from dataclasses import replace

    from model.nn.network import JointModel
    from model.nn.package import load_package, save_package
    from model.training.student import init_from_teacher

    package = load_package(teacher)
    cfg = package.model.cfg
    if not 1 <= blocks <= cfg.encoder.layers:
        raise SystemExit(f"--cut must lie in 1..{cfg.encoder.layers}, got {blocks}")
    cut = JointModel(replace(cfg, encoder=replace(cfg.encoder, layers=blocks,
                                                  inter_ctc_layer=0))).eval()
    init_from_teacher(cut, package.model)
    save_package(replace(package, model=cut), out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", type=Path, default=_MANIFEST)
    parser.add_argument("--utterances", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cut", type=int, default=3,
                        help="also score the teacher cut to this many blocks (0: not)")
    parser.add_argument("--candidate", type=Path, default=None,
                        help="also score this student bundle (int8, greedy and LM beam)")
    parser.add_argument("--out", type=Path, default=_OUT)
    args = parser.parse_args()
    sys.path.insert(0, str(_ROOT))
    import numpy as np
    import torch

    from model.data.manifest import read_manifest
    from model.evaluation.report import evaluate
    from model.inference.onnx import load_predictor

    torch.set_num_threads(args.threads)
    if not args.manifest.is_file():
        raise SystemExit(f"no manifest at {args.manifest}: run `make demo` (it builds the "
                         "quick corpus) or pass --manifest")
    rows = read_manifest(args.manifest)
    pick = np.random.default_rng(args.seed).choice(len(rows), min(args.utterances, len(rows)),
                                                   replace=False)
    rows = [rows[i] for i in sorted(pick)]
    paths = [r.audio_path(args.manifest.parent) for r in rows]
    arms = [(name, _ROOT / "release" / folder, lm) for name, folder, lm in _ARMS]
    scratch = Path(tempfile.mkdtemp(prefix="student-gap-"))
    if args.cut:
        cut = _cut_teacher(_ROOT / "release" / "teacher", args.cut, scratch / "cut")
        arms += [(f"teacher's first {args.cut} blocks, untrained, {mode}", cut, lm)
                 for mode, lm in (("greedy", False), ("LM beam", True))]
    if args.candidate is not None:
        arms += [(f"candidate {mode}", args.candidate, lm)
                 for mode, lm in (("greedy", False), ("LM beam", True))]
    results = []
    for name, folder, lm in arms:
        start = time.perf_counter()
        predictor = load_predictor(folder, batch_size=16, threads=args.threads, use_lm=lm)
        o = evaluate(rows, predictor.predict_files([r.id for r in rows], paths)).overall
        model = folder.relative_to(_ROOT) if folder.is_relative_to(_ROOT) else folder.name
        results.append({"arm": name, "model": str(model), "lm": lm, "n": o.n,
                        "intent": o.intent_accuracy, "slot_f1": o.slot_f1, "wer": o.wer,
                        "semer": o.semer, "exact": o.exact_match,
                        "seconds": round(time.perf_counter() - start, 1)})
        print(f"  {name}: done", flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"\n{'arm':48} {'n':>4} {'intent':>7} {'slot F1':>7} {'WER':>7} {'SemER':>7} {'exact':>7}")
    for r in results:
        print(f"{r['arm']:48} {r['n']:>4} {r['intent']:>7.1%} {r['slot_f1']:>7.1%} "
              f"{r['wer']:>7.1%} {r['semer']:>7.1%} {r['exact']:>7.1%}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "student_gap", "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "manifest": str(args.manifest.relative_to(_ROOT) if args.manifest.is_relative_to(_ROOT)
                        else args.manifest),
        "utterances": len(rows), "seed": args.seed, "threads": args.threads,
        "results": results}, indent=2) + "\n", encoding="utf-8")
    print(f"\n→ {args.out}")


if __name__ == "__main__":
    main()
