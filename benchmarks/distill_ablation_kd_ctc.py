"""Distillation ablation: ground-truth CTC weight 1.0 and frame-level CTC-KD 0.3 (instead of
0.5 / 1.0), 45-minute budget, written to ``models/<profile>/student_ctcgt``. Committed as it
ran; the full-profile run was stopped after 5 epochs (worse than the chosen recipe on
validation at every epoch; its history: benchmarks/results/student_full_ablation_kdctc0.3_history.csv).

    uv run python benchmarks/distill_ablation_kd_ctc.py
"""

import logging

from model.training.student import run_distill_stage
from voiceloop.settings import load_settings

logging.basicConfig(level=logging.INFO)
s = load_settings(profile="full")
st = s.student
d = st.distill.model_copy(update={
    "weights": {"ctc": 1.0, "intent": 0.5, "parse": 0.5},
    "kd_weights": {"ctc": 0.3, "intent": 1.0, "parse": 1.0, "hidden": 0.0}})
t = st.train.model_copy(update={"max_minutes": 45})
s = s.model_copy(update={"student": st.model_copy(update={"distill": d, "train": t})})
out = run_distill_stage(s, progress=False, out_dir=s.models_dir / "student_ctcgt")
print(out.result, out.comparison.to_markdown())
