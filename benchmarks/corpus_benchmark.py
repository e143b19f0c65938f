"""Corpus benchmark: TTS synthesis throughput and corpus statistics.

Synthesis: draws N sentences from the grammar, assigns voices from params.yaml (the
engine mix of the chosen profile), renders them into a fresh temporary folder with the
corpus's worker pool, and reports utterances/s overall and per engine (each engine also
timed alone), plus seconds of audio per wall second. A small warm-up run first measures
the pool's one-time start-up, which is reported on its own row. Statistics: intents, slot types,
templates per split and hours of audio per engine of a built corpus (run
``voiceloop corpus -p PROFILE`` first; skipped with a note if absent).

    uv run python benchmarks/corpus_benchmark.py --utterances 240 --workers 2 --profile quick

Prints a table and writes JSON (default ``benchmarks/results/corpus.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from model.data.corpus import CorpusLayout, load_corpus_rows
from model.data.grammar import Grammar
from model.data.seeding import stable_rng
from model.data.stats import corpus_stats
from model.data.tts import SynthJob, VoiceSpec, sample_voice, synthesize
from voiceloop.settings import TTSSettings, load_settings


def _jobs(texts: list[str], voices: list[VoiceSpec], folder: Path) -> list[SynthJob]:
    return [
        SynthJob(f"b{i:05d}", text, voice, folder / f"b{i:05d}.wav")
        for i, (text, voice) in enumerate(zip(texts, voices, strict=True))
    ]


def _time_synthesis(jobs: list[SynthJob], workers: int, sample_rate: int) -> dict:
    start = time.perf_counter()
    results = synthesize(jobs, sample_rate=sample_rate, workers=workers, progress=False)
    wall = time.perf_counter() - start
    ok = [r for r in results if r.error is None]
    audio_s = sum(r.duration_s for r in ok)
    return {
        "utterances": len(jobs),
        "failed": len(jobs) - len(ok),
        "wall_s": round(wall, 3),
        "utt_per_s": round(len(ok) / wall, 2),
        "mean_duration_s": round(audio_s / max(len(ok), 1), 3),
        "audio_s_per_s": round(audio_s / wall, 2),
    }


def _only(tts: TTSSettings, engine: str) -> TTSSettings:
    weights = {e: (1.0 if e == engine else 0.0) for e in tts.engine_weights}
    return tts.model_copy(update={"engine_weights": weights})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--utterances", type=int, default=240, help="sentences in the mixed run")
    parser.add_argument("--per-engine", type=int, default=90, help="sentences per single-engine run")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--profile", default="quick", help="profile for voices and statistics")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/corpus.json"))
    args = parser.parse_args()

    settings = load_settings(profile=args.profile)
    tts = settings.corpus.tts
    grammar = Grammar.load(settings.corpus.language)
    rng = np.random.default_rng(args.seed)
    templates = [grammar.templates[i] for i in rng.permutation(len(grammar.templates))]
    sentences, _ = grammar.generate(templates[: args.utterances], 1, rng)
    texts = [s.text for s in sentences]

    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="voiceloop-bench-") as tmp:
        # One-time start-up (the worker pool's fork server imports scipy etc.) is timed
        # apart: a corpus build pays it once, not per utterance.
        warm = [sample_voice(tts, stable_rng(args.seed, "warm", i)) for i in range(2 * args.workers)]
        runs["startup"] = _time_synthesis(
            _jobs(texts[: len(warm)], warm, Path(tmp) / "warm"), args.workers, tts.sample_rate
        )
        voices = [sample_voice(tts, stable_rng(args.seed, "voice", i)) for i in range(len(texts))]
        runs["mix"] = _time_synthesis(
            _jobs(texts, voices, Path(tmp) / "mix"), args.workers, tts.sample_rate
        )
        for engine in tts.engine_weights:
            only = _only(tts, engine)
            subset = texts[: args.per_engine]
            voices = [sample_voice(only, stable_rng(args.seed, engine, i)) for i in range(len(subset))]
            runs[engine] = _time_synthesis(
                _jobs(subset, voices, Path(tmp) / engine), args.workers, tts.sample_rate
            )

    rows = load_corpus_rows(CorpusLayout(settings.corpus_dir))
    stats = corpus_stats(rows).model_dump() if rows else None

    print(f"\nTTS synthesis, {args.workers} worker(s), {platform.processor() or platform.machine()}")
    print(f"{'run':<12}{'utts':>6}{'failed':>8}{'wall s':>9}{'utt/s':>8}{'mean dur s':>12}{'audio s/s':>11}")
    for name, r in runs.items():
        print(f"{name:<12}{r['utterances']:>6}{r['failed']:>8}{r['wall_s']:>9.2f}"
              f"{r['utt_per_s']:>8.1f}{r['mean_duration_s']:>12.2f}{r['audio_s_per_s']:>11.1f}")
    if stats:
        print(f"\nCorpus '{args.profile}' ({settings.corpus_dir})")
        print(f"  utterances {stats['utterances']}: {stats['utterances_by_split']}")
        print(f"  templates per split: {stats['templates_by_split']}")
        print(f"  intents {stats['intents']} {stats['intents_by_split']}; slot types {len(stats['slot_types'])}")
        print("  hours by engine: " + ", ".join(f"{e} {h:.3f}" for e, h in stats["hours_by_engine"].items()))
        print(f"  total {stats['hours']:.3f} h; augmented {stats['augmented_fraction']:.0%}")
    else:
        print(f"\n(no corpus at {settings.corpus_dir}: statistics skipped)")

    result = {
        "benchmark": "corpus",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "workers": args.workers,
        "profile": args.profile,
        "synthesis": runs,
        "corpus_stats": stats,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
