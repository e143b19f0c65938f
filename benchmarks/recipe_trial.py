"""Recipe trials of issue 12: each change against the recipe without it — teacher arms,
and student arms distilled from the released teacher (``--student``).

Every arm trains the teacher with the ``full`` profile's settings plus its overrides on
the same random subset of the training split (``--train`` utterances) for the same number
of epochs (``--epochs``), on ONE thread, and validates greedily (no LM) on the same
subsets of ``valid`` and of the held-out voice family's ``valid_heldout``. Equal epochs
rather than equal minutes: trials share the machine with other work, so wall time is
noisy; the per-epoch cost of each architecture is measured on its own by
``benchmarks/training_throughput.py`` and reported beside (``minutes_per_epoch`` here is
the noisy wall clock of this run).

    uv run python benchmarks/recipe_trial.py                 # every arm, in turn
    uv run python benchmarks/recipe_trial.py new no_warp     # some arms

Arms (overrides of the current recipe, named by what they change):

- ``new``: the recipe as configured (tagged-transcript CTC, 80 ms encoder, fixed loss
  weights, intermediate CTC, voice perturbation, SpecAugment ramp);
- ``old_recipe``: the previous teacher (40 ms encoder, parse decoder, character CTC,
  learned uncertainty weights, none of the new training-time additions);
- ``parse_decoder``: slots from a 2-layer parse decoder over character CTC instead of
  tags (option (b) of the issue, without the span constraint);
- ``enc_40ms``: subsampling 4 × CTC upsampling 2;
- ``learned_weights``: uncertainty weighting instead of fixed weights;
- ``no_inter_ctc``, ``no_warp``, ``no_ramp``: each addition removed.

Student arms (``--student``; distilled from ``release/teacher``, the student's settings
plus the arm's overrides, same subset / epochs / one thread, QAT off — the float student
is what is compared):

- ``student``: the ``full`` profile's student recipe (causal convolutions, causal
  running mean normalisation: streamable; since 2026-12-02 144 wide × 3 blocks,
  initialised from the teacher's first blocks — results before that date are of the
  96 × 4 student from random weights);
- ``student_full_context``: non-causal convolutions, global CMVN and full-context
  attention in every batch (no dynamic-chunk training: not streamable) — does
  streamability cost the student its acoustic model?
- ``student_noncausal``: the same without the CMVN change, for ``--init-from
  release/student_model`` (both arms then continue the released student, at the
  continuation's learning rate 0.0015 with 100 warm-up steps).

Writes ``benchmarks/results/recipe_trials.json`` (merged across runs) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from model.training.student import train_student
from model.training.teacher import train_teacher
from voiceloop.settings import Settings, load_settings

RESULTS = Path(__file__).resolve().parent / "results" / "recipe_trials.json"

ARMS: dict[str, dict[str, Any]] = {
    "new": {},
    "old_recipe": {
        "model": {"subsampling": 4, "ctc_upsample": 2, "conv_kernel": 15, "decoder_layers": 2,
                  "ctc_units": "char", "inter_ctc_layer": 0},
        "train": {"loss": {"weighting": "uncertainty",
                           "weights": {"ctc": 1.0, "intent": 0.5, "parse": 0.5}}},
        "features": {"warp": {"p": 0.0}, "specaugment": {"ramp_epochs": 0.0}},
    },
    "parse_decoder": {"model": {"decoder_layers": 2, "ctc_units": "char"}},
    "enc_40ms": {"model": {"subsampling": 4, "ctc_upsample": 2, "conv_kernel": 15}},
    "learned_weights": {"train": {"loss": {"weighting": "uncertainty"}}},
    "no_inter_ctc": {"model": {"inter_ctc_layer": 0}},
    "no_warp": {"features": {"warp": {"p": 0.0}}},
    "no_ramp": {"features": {"specaugment": {"ramp_epochs": 0.0}}},
}


STUDENT_ARMS: dict[str, dict[str, Any]] = {
    "student": {},
    "student_full_context": {"student": {"model": {"causal_conv": False},
                                         "normalise": "global",
                                         "streaming": {"full_context_p": 1.0}}},
    # For --init-from the released student (causal normalisation kept: its weights
    # expect that input scale).
    "student_noncausal": {"student": {"model": {"causal_conv": False},
                                      "streaming": {"full_context_p": 1.0}}},
}
TEACHER = Path(__file__).resolve().parent.parent / "release" / "teacher"


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def arm_settings(base: Settings, arm: str, train: int, valid: int, epochs: int,
                 out_root: Path) -> Settings:
    """``base`` with the arm's overrides and the trial's size, budget and thread count."""
    data = base.model_dump()
    budget = {"epochs": epochs, "max_train_utterances": train, "eval_max_utterances": valid,
              "max_minutes": None, "threads": 1, "min_epochs": epochs, "warmup_steps": 150}
    trial = {"train": budget, "decode": {"lm": {"enabled": False}, "calibrate": False}}
    if arm in STUDENT_ARMS:
        trial["student"] = {"train": budget, "qat": {"enabled": False}}
    data = _merge(_merge(data, trial), {**ARMS, **STUDENT_ARMS}[arm])
    data["workspace"] = base.workspace
    return Settings.model_validate(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("arms", nargs="*", default=None,
                        help=f"of {list(ARMS)}, or with --student of {list(STUDENT_ARMS)}")
    parser.add_argument("--student", action="store_true",
                        help="student arms, distilled from release/teacher")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="student arms: warm start from this float student package")
    parser.add_argument("--train", type=int, default=6000, help="training utterances")
    parser.add_argument("--valid", type=int, default=600, help="per validation split")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out-root", type=Path, default=None,
                        help="run folders (default: WORKSPACE/trials)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("model").setLevel(logging.INFO)
    torch.set_num_threads(1)
    base = load_settings(profile="full")
    out_root = args.out_root or base.workspace / "trials"
    results: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    known = STUDENT_ARMS if args.student else ARMS
    for arm in args.arms or list(known):
        if arm not in known:
            raise SystemExit(f"unknown arm {arm!r}; choose from {list(known)}")
        settings = arm_settings(base, arm, args.train, args.valid, args.epochs, out_root)
        if args.init_from is not None:
            train = settings.student.train.model_copy(update={"lr": 0.0015, "warmup_steps": 100})
            settings = settings.model_copy(update={"student": settings.student.model_copy(
                update={"train": train})})
        name = arm if args.init_from is None else f"{arm}@warm"
        start = time.perf_counter()
        if args.student:
            r = train_student(settings, TEACHER, progress=False, resume=False,
                              out_dir=out_root / name, init_from=args.init_from)
        else:
            r = train_teacher(settings, progress=False, resume=False, out_dir=out_root / arm)
        wall = time.perf_counter() - start
        results[name] = {
            "overrides": known[arm], "epochs": r.epochs_run, "best_epoch": r.best_epoch,
            "parameters": r.parameters, "minutes_per_epoch": wall / 60 / r.epochs_run,
            **{k: round(v, 4) for k, v in r.best_valid.items()},
            "command": f"uv run python benchmarks/recipe_trial.py {arm} --train {args.train} "
                       f"--valid {args.valid} --epochs {args.epochs}"
                       + (" --student" if args.student else "")
                       + (f" --init-from {args.init_from}" if args.init_from else ""),
        }
        # Merged with the file as it is now: arms may run in parallel processes.
        entry = results[name]
        results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        results[name] = entry
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2))
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    cols = ["select", "valid_semer", "valid_wer", "valid_intent_accuracy", "valid_slot_f1",
            "heldout_semer", "heldout_wer", "heldout_intent_accuracy", "minutes_per_epoch"]
    print("| arm | " + " | ".join(cols) + " |\n|---|" + "---:|" * len(cols))
    for arm, r in results.items():
        print(f"| {arm} | " + " | ".join(f"{r.get(c, float('nan')):.3f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
