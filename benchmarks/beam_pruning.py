"""Beam pruning: WER and decode time of the LM beam search with and without pruning.

For the teacher and the student of a profile, CTC log-probabilities of a test-split
sample are computed once (``model.training.lm_stage.ctc_emissions``), then decoded with each
model's tuned LM settings, first unpruned (beam threshold 50 = flashlight's default,
every character tried per frame), then with the pruning of ``decode.lm``
(``beam_threshold``, ``beam_size_token``). One thread; time is the beam search alone.

    uv run python benchmarks/beam_pruning.py --profile full

Prints a table and writes JSON (default ``benchmarks/results/beam_pruning.json``).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import jiwer
import torch

from model.decoding.beam import BeamTranscriber, read_config
from model.frontend.cache import load_split, random_subset
from model.nn.package import load_package
from model.training.lm_stage import ctc_emissions
from voiceloop.settings import load_settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="full")
    parser.add_argument("--utterances", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/beam_pruning.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = load_settings(profile=args.profile)
    lm = settings.decode.lm
    result: dict = {"benchmark": "beam_pruning", "profile": args.profile, "rows": []}
    for role in ("teacher", "student"):
        folder = settings.models_dir / role / "model"
        package = load_package(folder)
        rows, feats = load_split(settings, "test", False, package.features)
        rows, feats = random_subset(rows, feats, args.utterances, settings.seed)
        emissions = ctc_emissions(package, feats, settings.decode.batch_size)
        refs = [r.transcript for r in rows]
        tuned = read_config(folder)
        for name, config in (
            ("unpruned", replace(tuned, beam_threshold=50.0, beam_size_token=None)),
            ("pruned", replace(tuned, beam_threshold=lm.beam_threshold,
                               beam_size_token=lm.beam_size_token)),
        ):
            transcriber = BeamTranscriber(folder, package.ctc_vocab, config)
            start = time.perf_counter()
            hyps = [transcriber.decode(e[None], torch.tensor([n]))[0] for e, n in emissions]
            ms = (time.perf_counter() - start) * 1000 / len(emissions)
            row = {"model": role, "setting": name, "n": len(rows),
                   "beam_size": config.beam_size, "beam_threshold": config.beam_threshold,
                   "beam_size_token": config.beam_size_token,
                   "wer": float(jiwer.wer(refs, hyps)), "ms_per_utterance": round(ms, 2)}
            result["rows"].append(row)
            print(row, flush=True)
    print(f"\n{'model':9}{'setting':10}{'WER':>8}{'ms/utt':>8}")
    for r in result["rows"]:
        print(f"{r['model']:9}{r['setting']:10}{r['wer']:>8.4f}{r['ms_per_utterance']:>8.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
