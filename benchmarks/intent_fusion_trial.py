"""Trial: does a text intent classifier on the LM transcript add to the acoustic intent head?

A TF-IDF (word 1–2-gram) logistic regression is trained on the *training* transcripts;
on 1,500 validation and 1,500 test utterances it reads each model's LM-beam transcript,
and its log-posteriors are added to the acoustic intent head's with weight w:
``argmax log P_acoustic + w · log P_text``. Reports intent accuracy per source.

    uv run python benchmarks/intent_fusion_trial.py --profile full

Prints a table and writes JSON (default ``benchmarks/results/intent_fusion_trial.json``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from model.data.manifest import read_manifest
from model.frontend.cache import load_split, random_subset
from model.inference.batch import SLUPredictor, length_sorted_batches
from model.nn.package import load_package
from voiceloop.settings import load_settings

WEIGHTS = (0.3, 0.5, 1.0)


def _acoustic_and_text(predictor: SLUPredictor, feats: list) -> tuple[np.ndarray, list[str]]:
    probs: dict[int, np.ndarray] = {}
    texts: dict[int, str] = {}
    for idx in length_sorted_batches([f.shape[0] for f in feats], 16):
        batch = [feats[i].float() for i in idx]
        lengths = torch.tensor([f.shape[0] for f in batch])
        out = predictor._decode_batch(
            torch.nn.utils.rnn.pad_sequence(batch, batch_first=True), lengths)
        for j, i in enumerate(idx):
            probs[i], texts[i] = out.intent_probs[j].numpy(), out.transcripts[j]
    return np.stack([probs[i] for i in range(len(feats))]), [texts[i] for i in range(len(feats))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="full")
    parser.add_argument("--utterances", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/intent_fusion_trial.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = load_settings(profile=args.profile)
    train = read_manifest(settings.corpus_dir / "manifests" / "train.jsonl")
    result: dict = {"benchmark": "intent_fusion_trial", "profile": args.profile, "rows": []}
    for role in ("teacher", "student"):
        package = load_package(settings.models_dir / role / "model")
        intents = list(package.parse_vocab.intents)
        vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
        x = vectorizer.fit_transform([r.transcript for r in train])
        classifier = LogisticRegression(max_iter=300, C=10).fit(
            x, [intents.index(r.intent) for r in train])
        for split in ("valid", "test"):
            rows, feats = load_split(settings, split, False, package.features)
            rows, feats = random_subset(rows, feats, args.utterances, settings.seed)
            acoustic, texts = _acoustic_and_text(SLUPredictor(package), feats)
            text = np.zeros_like(acoustic)
            text[:, classifier.classes_] = classifier.predict_proba(vectorizer.transform(texts))
            ref = np.array([intents.index(r.intent) for r in rows])
            row = {"model": role, "split": split, "n": len(rows),
                   "acoustic": float((acoustic.argmax(1) == ref).mean()),
                   "text": float((text.argmax(1) == ref).mean())}
            for w in WEIGHTS:
                fused = np.log(acoustic + 1e-9) + w * np.log(text + 1e-9)
                row[f"fused_w{w}"] = float((fused.argmax(1) == ref).mean())
            result["rows"].append(row)
            print(row, flush=True)
    print(f"\n{'model':9}{'split':7}{'acoustic':>10}{'text':>8}"
          + "".join(f"{'w=' + str(w):>8}" for w in WEIGHTS))
    for r in result["rows"]:
        print(f"{r['model']:9}{r['split']:7}{r['acoustic']:>10.4f}{r['text']:>8.4f}"
              + "".join(f"{r[f'fused_w{w}']:>8.4f}" for w in WEIGHTS))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
