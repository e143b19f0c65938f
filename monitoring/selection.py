"""What the retraining flow learns from: active learning within a labelling budget, plus
teacher pseudo-labels.

Every curated traffic sample gets three scores, each turned into a rank percentile so
they combine on one scale:

- **uncertainty**: 1 − the production model's calibrated confidence;
- **disagreement**: the teacher answers differently (another intent, or a transcript
  word error rate between the two);
- **novelty**: how far the sample's pooled embedding lies from the reference (the
  production model's own validation data) — drifted regions of the embedding space —
  measured as the distance to the nearest reference embeddings in a PCA space fitted on
  the reference.

The ``budget`` highest-ranked samples go to annotators (the annotation store stands for
them); samples not sent, whose teacher confidence is at least ``pseudo_threshold``,
get the teacher's answer as a pseudo-label. Everything is returned with its scores, so
the flow can log why each sample was chosen.
"""

from __future__ import annotations

from dataclasses import dataclass

import jiwer
import numpy as np
import pandas as pd

from model.inference.prediction import Prediction
from monitoring.schema import EMBEDDING_PREFIX

__all__ = ["Selection", "SelectionWeights", "labelling_budget", "select_for_training"]


@dataclass(frozen=True)
class SelectionWeights:
    """Relative weights of the three scores (any non-negative numbers)."""

    uncertainty: float = 1.0
    disagreement: float = 1.0
    novelty: float = 1.0


@dataclass
class Selection:
    """The samples chosen for labelling and for pseudo-labels.

    Attributes:
        scores: one row per pool sample: ``request_id``, ``uncertainty``,
            ``disagreement``, ``novelty``, their combined ``priority`` and ``chosen``
            (``label`` / ``pseudo`` / ``none``).
        label_ids: request ids sent to annotators (in priority order), at most the budget.
        pseudo: request id → the teacher's prediction used as its label.
        budget: how many labels the budget allowed.
    """

    scores: pd.DataFrame
    label_ids: list[str]
    pseudo: dict[str, Prediction]
    budget: int


def labelling_budget(pool_size: int, fraction: float, maximum: int) -> int:
    """Labels allowed for a pool: ``fraction`` of it, at most ``maximum``.

    Raises:
        ValueError: ``fraction`` outside [0, 1] or a negative ``maximum``.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"labelling fraction must lie in [0, 1], got {fraction}")
    if maximum < 0:
        raise ValueError(f"maximum labels must be >= 0, got {maximum}")
    return min(maximum, int(pool_size * fraction))


def _novelty(pool: pd.DataFrame, reference: pd.DataFrame, k: int, components: int) -> np.ndarray:
    """Mean distance to the ``k`` nearest reference embeddings in a whitened PCA space
    fitted on the reference ``(N,)``; 0 when either side has no embeddings."""
    cols = [c for c in pool.columns if c.startswith(EMBEDDING_PREFIX)]
    if not cols or reference.empty or any(c not in reference.columns for c in cols):
        return np.zeros(len(pool))
    ref = reference[cols].to_numpy(np.float64)
    mean = ref.mean(axis=0)
    _, s, vt = np.linalg.svd(ref - mean, full_matrices=False)
    n = min(components, vt.shape[0])
    scale = s[:n] / np.sqrt(max(1, len(ref) - 1)) + 1e-9
    project = lambda x: ((x - mean) @ vt[:n].T) / scale
    a, b = project(pool[cols].to_numpy(np.float64)), project(ref)
    d2 = (a**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2 * a @ b.T
    nearest = np.sort(np.sqrt(np.maximum(d2, 0.0)), axis=1)[:, : max(1, min(k, len(ref)))]
    return nearest.mean(axis=1)


def _rank(values: np.ndarray) -> np.ndarray:
    """Rank percentile in [0, 1] (ties share their mean rank)."""
    if len(values) <= 1:
        return np.zeros(len(values))
    return pd.Series(values).rank(method="average").to_numpy(np.float64) / len(values)


def select_for_training(
    pool: pd.DataFrame, teacher: dict[str, Prediction], reference: pd.DataFrame,
    budget: int, pseudo_threshold: float, weights: SelectionWeights = SelectionWeights(),
    k: int = 5, components: int = 16,
) -> Selection:
    """Rank ``pool`` (curated rows: ``request_id``, ``confidence``, ``intent``,
    ``transcript``, ``emb_*``) and choose samples to label and to pseudo-label.

    Args:
        pool: the candidate samples (the production model's answers and embeddings).
        teacher: the teacher's prediction per request id (calibrated confidence).
        reference: the reference frame (its ``emb_*`` columns) for novelty.
        budget: labels allowed (:func:`labelling_budget`).
        pseudo_threshold: minimum teacher confidence for a pseudo-label.

    Raises:
        ValueError: ``budget`` < 0, a threshold outside [0, 1], or pool rows without a
            teacher prediction.
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    if not 0.0 <= pseudo_threshold <= 1.0:
        raise ValueError(f"pseudo_threshold must lie in [0, 1], got {pseudo_threshold}")
    missing = [r for r in pool["request_id"] if r not in teacher]
    if missing:
        raise ValueError(f"{len(missing)} pool rows have no teacher prediction, e.g. {missing[:3]}")
    ids = pool["request_id"].astype(str).tolist()
    uncertainty = 1.0 - pool["confidence"].astype(float).to_numpy()
    disagreement = np.array([
        float(teacher[i].intent != intent) + min(1.0, jiwer.wer(t or "<empty>", teacher[i].transcript or "<empty>"))
        for i, intent, t in zip(ids, pool["intent"], pool["transcript"], strict=True)])
    novelty = _novelty(pool, reference, k, components)
    priority = (weights.uncertainty * _rank(uncertainty) + weights.disagreement * _rank(disagreement)
                + weights.novelty * _rank(novelty))
    order = np.argsort(-priority, kind="stable")
    label_ids = [ids[i] for i in order[:budget]]
    chosen = dict.fromkeys(ids, "none") | dict.fromkeys(label_ids, "label")
    pseudo = {i: teacher[i] for i in ids if chosen[i] == "none"
              and teacher[i].confidence >= pseudo_threshold and teacher[i].intent}
    for i in pseudo:
        chosen[i] = "pseudo"
    scores = pd.DataFrame({"request_id": ids, "uncertainty": uncertainty,
                           "disagreement": disagreement, "novelty": novelty,
                           "priority": priority, "chosen": [chosen[i] for i in ids]})
    return Selection(scores, label_ids, pseudo, budget)
