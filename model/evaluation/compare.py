"""Teacher vs student on a held-out split: what compression costs, in one table.

The student is scored as users get it — the int8 ONNX deploy bundle — and the teacher as
the fp32 torch package the ``evaluate`` stage scored (its ``metrics.json`` is reused when
present, so the two numbers come from the same predictions DVC tracks).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from model.evaluation.report import EvaluationReport, evaluate, write_report
from model.frontend.cache import load_split
from model.inference.batch import SLUPredictor
from model.inference.onnx import OnnxSLUPredictor
from model.inference.prediction import write_predictions
from model.nn.export import load_bundle_config
from model.nn.package import load_package
from voiceloop.settings import Settings

__all__ = ["COMPARED", "Comparison", "compare_models", "folder_bytes", "score_bundle"]

# Metrics compared; True where higher is better.
COMPARED: dict[str, bool] = {
    "intent_accuracy": True, "slot_f1": True, "slu_f1": True, "exact_match": True,
    "wer": False, "cer": False, "semer": False, "ece": False,
}


def folder_bytes(folder: Path, suffixes: tuple[str, ...] = (".pt", ".onnx")) -> int:
    """Bytes of the weight files in ``folder`` (what a deployment ships and loads); a
    link to a file counted elsewhere (the release's shared LM) adds nothing."""
    return sum(p.stat().st_size for p in folder.rglob("*")
               if p.suffix in suffixes and not p.is_symlink())


@dataclass(frozen=True)
class Comparison:
    """Teacher and student metrics on one split, with differences."""

    split: str
    teacher: dict[str, float]
    student: dict[str, float]
    teacher_bytes: int
    student_bytes: int
    teacher_parameters: int
    student_parameters: int

    def deltas(self) -> dict[str, float]:
        """``student − teacher`` for each compared metric (points ×100 for rates)."""
        return {k: self.student[k] - self.teacher[k] for k in COMPARED}

    def flat(self) -> dict[str, float]:
        """Flat metrics for MLflow / DVC: ``teacher_*``, ``student_*``, ``delta_*``."""
        out: dict[str, float] = {}
        for k in COMPARED:
            out[f"teacher_{k}"] = self.teacher[k]
            out[f"student_{k}"] = self.student[k]
            out[f"delta_{k}"] = self.deltas()[k]
        out["wer_relative_increase"] = (
            (self.student["wer"] - self.teacher["wer"]) / self.teacher["wer"]
            if self.teacher["wer"] > 0 else 0.0)
        out["size_ratio"] = self.teacher_bytes / max(1, self.student_bytes)
        out["teacher_bytes"], out["student_bytes"] = self.teacher_bytes, self.student_bytes
        out["teacher_parameters"] = self.teacher_parameters
        out["student_parameters"] = self.student_parameters
        return out

    def to_markdown(self) -> str:
        lines = [f"# Teacher (fp32) vs student (int8 deploy bundle) on `{self.split}`", "",
                 "| metric | teacher | student | student − teacher |", "|---|---:|---:|---:|"]
        for k, higher in COMPARED.items():
            d = self.deltas()[k]
            verdict = "" if abs(d) < 1e-12 else ("better" if (d > 0) == higher else "worse")
            lines.append(f"| {k} | {self.teacher[k]:.4f} | {self.student[k]:.4f} | "
                         f"{d:+.4f} {verdict} |")
        lines += [
            (f"| weights on disk (bytes) | {self.teacher_bytes:,} | {self.student_bytes:,} | "
            f"÷{self.teacher_bytes / max(1, self.student_bytes):.1f} |"),
            f"| parameters | {self.teacher_parameters:,} | {self.student_parameters:,} | |",
        ]
        return "\n".join(lines) + "\n"


def score_bundle(
    settings: Settings, bundle: Path, split: str, out_dir: Path, progress: bool, threads: int = 2
) -> EvaluationReport:
    """Predict ``split`` with an ONNX deploy bundle and write the evaluation report."""
    predictor = OnnxSLUPredictor(bundle, threads=threads, batch_size=settings.decode.batch_size,
                                 max_parse_len=settings.decode.max_parse_len)
    features = load_bundle_config(bundle).features
    rows, feats = load_split(settings, split, progress, features)
    preds = predictor.predict_features([r.id for r in rows], feats)
    report = evaluate(rows, preds)
    write_report(report, out_dir, f"{predictor.version} (int8 ONNX) on {settings.profile}/{split}")
    write_predictions(out_dir / "predictions.jsonl", preds)
    return report


def compare_models(
    settings: Settings, teacher_dir: Path, student_root: Path, split: str = "test",
    progress: bool = True,
) -> Comparison:
    """Score the student's deploy bundle on ``split``, fetch or compute the teacher's
    score, and write ``<student_root>/eval/<split>/comparison.{json,md}``."""
    out_dir = student_root / "eval" / split
    student_report = score_bundle(settings, student_root / "deploy", split, out_dir, progress)
    teacher_metrics_file = teacher_dir.parent / "eval" / split / "metrics.json"
    teacher_pkg = load_package(teacher_dir)
    if teacher_metrics_file.exists():
        teacher = json.loads(teacher_metrics_file.read_text(encoding="utf-8"))
    else:
        rows, feats = load_split(settings, split, progress, teacher_pkg.features)
        predictor = SLUPredictor(teacher_pkg, settings.decode.batch_size,
                                 settings.decode.max_parse_len)
        preds = predictor.predict_features([r.id for r in rows], feats)
        teacher = evaluate(rows, preds).overall.model_dump()
    student = student_report.overall.model_dump()
    student_pkg = load_package(student_root / "model")
    comparison = Comparison(
        split=split,
        teacher={k: float(teacher[k]) for k in COMPARED},
        student={k: float(student[k]) for k in COMPARED},
        teacher_bytes=folder_bytes(teacher_dir),
        student_bytes=folder_bytes(student_root / "deploy"),
        teacher_parameters=teacher_pkg.model.num_parameters(),
        student_parameters=student_pkg.model.num_parameters(),
    )
    (out_dir / "comparison.json").write_text(json.dumps(comparison.flat(), indent=2),
                                             encoding="utf-8")
    (out_dir / "comparison.md").write_text(comparison.to_markdown(), encoding="utf-8")
    return comparison
