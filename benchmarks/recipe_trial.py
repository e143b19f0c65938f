"""Teacher recipe trials on a subset of the full corpus (exploratory, not acceptance).

Trains the teacher for 4 epochs on 6,000 random training utterances (about 1,000 steps),
validating on 400, on ONE thread, with one of these recipes:

- ``A``: subsampling 8 × CTC upsampling 4, learned uncertainty weights, no curriculum;
- ``B``: as A with a CTC-heavy weight schedule (intent/parse 0.3 → 0.5/1.0 over 3 epochs);
- ``C``: as A with subsampling 4 × CTC upsampling 2.

    uv run python benchmarks/recipe_trial.py A

Prints the best epoch's validation metrics and writes them to
``benchmarks/results/recipe_trial_<name>.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import yaml

from model.training.teacher import train_teacher
from voiceloop.settings import load_settings, repo_root

RECIPES = {
    "A": {},
    "B": {"loss": {"weighting": "schedule", "weights": {"ctc": 1.0, "intent": 0.3, "parse": 0.3},
                   "final_weights": {"ctc": 1.0, "intent": 0.5, "parse": 1.0},
                   "schedule_epochs": 3}},
    "C": {},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", choices=sorted(RECIPES))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    params = yaml.safe_load((repo_root() / "params.yaml").read_text())
    full = params["profiles"]["full"]
    full["model"] = ({"subsampling": 4, "ctc_upsample": 2} if args.recipe == "C"
                     else {"subsampling": 8, "ctc_upsample": 4})
    full["train"] = {"epochs": 4, "eval_max_utterances": 400, "max_train_utterances": 6000,
                     "curriculum_epochs": 0, "warmup_steps": 200, "min_epochs": 10,
                     "threads": 1, **RECIPES[args.recipe]}
    scratch = Path(tempfile.mkdtemp(prefix=f"recipe-{args.recipe}-"))
    (scratch / "params.yaml").write_text(yaml.safe_dump(params))
    workspace = load_settings(profile="full").workspace
    settings = load_settings(scratch / "params.yaml", "full", workspace)
    result = train_teacher(settings, progress=False, resume=False, out_dir=scratch / "run",
                           track=False)
    out = {"recipe": args.recipe, "best_valid": result.best_valid,
           "best_epoch": result.best_epoch, "wall_s": round(result.wall_s, 1)}
    print(json.dumps(out, indent=2))
    path = repo_root() / "benchmarks" / "results" / f"recipe_trial_{args.recipe}.json"
    path.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
