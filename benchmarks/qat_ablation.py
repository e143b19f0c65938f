"""What QAT buys over post-training quantisation of the same student.

The distill stage saves the student at the moment QAT starts (``pre_qat_model/``) and
then trains its last epochs with fake int8 quantisation. This script trains the SAME
pre-QAT student for the SAME number of epochs on the same learning-rate segment, but in
float (no fake quantisation), then quantises it after training (ONNX Runtime dynamic
int8, PTQ), and scores both int8 bundles — and their float twins — on the test split:

    float continuation → PTQ int8        vs        QAT continuation → int8 (deployed)

Caveat: the continuation starts with fresh AdamW moments (the stage does not keep the
optimiser state at QAT start); the deployed QAT arm kept its moments.

    uv run python benchmarks/qat_ablation.py --profile full

Prints a table and writes JSON (default ``benchmarks/results/qat_ablation.json``).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from model.evaluation.compare import folder_bytes
from model.evaluation.report import evaluate
from model.frontend.cache import load_split
from model.frontend.features import SpecAugment
from model.inference.batch import SLUPredictor
from model.inference.onnx import OnnxSLUPredictor
from model.nn.export import export_onnx, quantize_bundle
from model.nn.package import ModelPackage, load_package, save_package
from model.training.dataset import SLUDataset, make_batches
from model.training.fit import WarmupCosine
from model.training.student import student_losses, teacher_targets
from voiceloop.settings import load_settings

METRICS = ("intent_accuracy", "slot_f1", "wer", "semer", "exact_match")


def _score(rows, predictor, feats) -> dict:
    preds = predictor.predict_features([r.id for r in rows], feats)
    o = evaluate(rows, preds).overall
    return {m: round(float(getattr(o, m)), 4) for m in METRICS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="full")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/qat_ablation.json"))
    args = parser.parse_args()
    settings = load_settings(profile=args.profile)
    torch.set_num_threads(args.threads)
    root = settings.models_dir / "student"
    with (root / "history.csv").open(encoding="utf-8") as fh:
        history = list(csv.DictReader(fh))
    qat_epochs = sum(float(h["qat"]) > 0 for h in history)
    start_epoch = len(history) - qat_epochs
    teacher = load_package(settings.models_dir / "teacher" / "model")
    pre = load_package(root / "pre_qat_model")
    ts = settings.student.train
    raw_cfg = replace(teacher.features, normalise="none", mean=None, std=None)
    rows, raw = load_split(settings, "train", False, raw_cfg)
    train = SLUDataset(rows, raw, teacher.ctc_vocab, teacher.parse_vocab)
    targets = teacher_targets(teacher.model.eval(), teacher.features, train,
                              ts.batch_max_frames, True, settings.decode.max_parse_len, ts.bf16,
                              False, True)

    # The stage's LR schedule, as its checkpoint recorded it.
    per_epoch = len(make_batches(train.lengths, ts.batch_max_frames))
    total = torch.load(root / "checkpoints" / "last.pt", weights_only=False)["schedule_total"]
    schedule = WarmupCosine(ts.warmup_steps, total, ts.min_lr_ratio)
    offset = start_epoch * per_epoch
    student = pre.model.train()
    for p in student.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(student.parameters(), lr=ts.lr, weight_decay=ts.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule(s + offset))
    specaug = SpecAugment(**settings.features.specaugment.model_dump())
    rng = np.random.default_rng(settings.seed + start_epoch)
    gen = torch.Generator().manual_seed(settings.seed + start_epoch)
    projection = nn.Identity()
    start = time.perf_counter()
    for epoch in range(qat_epochs):
        for idx in tqdm(make_batches(train.lengths, ts.batch_max_frames, rng=rng),
                        desc=f"float continuation {epoch + 1}/{qat_epochs}", unit="batch"):
            _, total, _ = student_losses(student, train, idx, targets, pre.features, settings,
                                         specaug, gen, rng, projection)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            nn.utils.clip_grad_norm_(student.parameters(), ts.grad_clip)
            optimizer.step()
            scheduler.step()
    train_minutes = (time.perf_counter() - start) / 60
    student.eval()
    work = root.parent / "student_float_continuation"
    package = ModelPackage(student, pre.features, pre.parse_vocab, 0.0,
                           {"version": "student-float-continuation", "role": "ablation"},
                           pre.ctc_vocab)
    save_package(package, work / "model")
    export_onnx(package, work / "deploy_fp32")
    quantize_bundle(work / "deploy_fp32", work / "deploy")

    test_rows, test_feats = load_split(settings, "test", False, pre.features)
    batch, max_len = settings.decode.batch_size, settings.decode.max_parse_len
    arms = {
        "float continuation, fp32 (torch)": SLUPredictor(package, batch, max_len),
        "float continuation, PTQ int8 (ORT)": OnnxSLUPredictor(work / "deploy", 1, batch, max_len),
        "QAT continuation, fp32 weights (ORT)": OnnxSLUPredictor(root / "deploy_fp32", 1, batch,
                                                                max_len),
        "QAT continuation, int8 (ORT, deployed)": OnnxSLUPredictor(root / "deploy", 1, batch,
                                                                  max_len),
    }
    result = {"benchmark": "qat_ablation", "profile": args.profile,
              "continued_epochs": qat_epochs, "from_epoch": start_epoch,
              "float_continuation_minutes": round(train_minutes, 1), "arms": {}}
    print(f"\n{'arm':42}{'intent':>8}{'slotF1':>8}{'WER':>8}{'SemER':>8}")
    for name, predictor in arms.items():
        scores = _score(test_rows, predictor, test_feats)
        result["arms"][name] = scores
        print(f"{name:42}{scores['intent_accuracy']:>8.4f}{scores['slot_f1']:>8.4f}"
              f"{scores['wer']:>8.4f}{scores['semer']:>8.4f}", flush=True)
    result["bytes"] = {"ptq_int8": folder_bytes(work / "deploy"),
                       "qat_int8": folder_bytes(root / "deploy")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
