"""Label-free performance estimate of the intent classifier on a window of traffic.

Production traffic has no labels when it is judged, so the accuracy of the intent is
*estimated* the way NannyML's CBPE (confidence-based performance estimation) does for a
classifier: if the confidences are calibrated, a prediction made with confidence ``c`` is
right with probability ``c``, so the expected accuracy of a window is the mean of its
confidences. The service's ``confidence`` is the temperature-scaled probability of the
predicted intent (``decode.calibrate``, fitted on held-out-voice validation data), which
is what makes this estimate usable on voices the model never heard; it is still only as
good as that calibration, and it cannot see errors the model is confident about (e.g. a
domain the model has never seen and confidently maps to a wrong intent). Where the
annotation store already has ground truth for some rows of the window, the realised
accuracy of those rows is reported beside the estimate (with how many there were and the
estimate on the same rows, the like-for-like comparison), and their expected calibration
error says how far the estimate can be trusted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from model.evaluation.metrics import expected_calibration_error

__all__ = ["AnnotationSource", "PerformanceEstimate", "estimate_performance"]


@runtime_checkable
class AnnotationSource(Protocol):
    """Anything that returns annotations by request id, like
    ``serving.annotations.AnnotationStore`` (objects with an ``intent`` attribute)."""

    def read(self, request_ids: Iterable[str] | None = None) -> Mapping[str, Any]: ...


class PerformanceEstimate(BaseModel):
    """Estimated (and, where labels exist, realised) intent accuracy of a window.

    Attributes:
        n: rows with a finite confidence.
        expected_accuracy: mean confidence of the window (0–1): CBPE's estimate.
        reference_expected_accuracy: the same over the reference (0–1), or None.
        expected_accuracy_drop: ``reference_expected_accuracy − expected_accuracy``
            (positive = worse than the reference), or None.
        n_labelled: rows of the window with ground truth in the annotation store.
        realised_accuracy: intent accuracy on those rows (0–1), or None without labels.
        expected_accuracy_labelled: the estimate on the same labelled rows (compare with
            ``realised_accuracy``), or None.
        labelled_ece: expected calibration error (15 bins) on the labelled rows, or None.
    """

    model_config = ConfigDict(frozen=True)

    n: int = Field(ge=0)
    expected_accuracy: float | None
    reference_expected_accuracy: float | None = None
    expected_accuracy_drop: float | None = None
    n_labelled: int = Field(0, ge=0)
    realised_accuracy: float | None = None
    expected_accuracy_labelled: float | None = None
    labelled_ece: float | None = None


def _confidences(frame: pd.DataFrame, column: str, side: str) -> pd.Series:
    if column not in frame.columns:
        raise ValueError(f"{side} frame has no {column!r} column")
    conf = pd.to_numeric(frame[column], errors="coerce")
    conf = conf[np.isfinite(conf)]
    if len(conf) and (conf.min() < 0.0 or conf.max() > 1.0):
        raise ValueError(f"{side} {column!r} must lie in [0, 1], got values in "
                         f"[{conf.min():.3f}, {conf.max():.3f}]")
    return conf


def _true_intent(annotation: Any) -> str | None:
    if isinstance(annotation, str):
        return annotation
    intent = getattr(annotation, "intent", None)
    if intent is None and isinstance(annotation, Mapping):
        intent = annotation.get("intent")
    return intent if isinstance(intent, str) and intent else None


def estimate_performance(
    current: pd.DataFrame,
    *,
    reference: pd.DataFrame | None = None,
    annotations: AnnotationSource | Mapping[str, Any] | None = None,
    confidence_column: str = "confidence",
    intent_column: str = "intent",
    id_column: str = "request_id",
) -> PerformanceEstimate:
    """CBPE for the intent: expected accuracy = mean calibrated confidence.

    Args:
        current: the window (needs ``confidence``; ``intent`` and ``request_id`` for the
            realised accuracy).
        reference: the reference frame; its mean confidence is the baseline the drop is
            measured against.
        annotations: ground truth by request id: an ``AnnotationStore`` (anything with
            ``read(request_ids)``) or a mapping ``request_id → Annotation | {"intent": …}
            | intent``. Only rows of the window found there count as labelled.
        confidence_column, intent_column, id_column: column names.

    Returns:
        The estimate; accuracies are None where there is nothing to average.

    Raises:
        ValueError: a missing confidence column or confidences outside [0, 1].
    """
    conf = _confidences(current, confidence_column, "current")
    expected = float(conf.mean()) if len(conf) else None
    ref_expected = None
    if reference is not None:
        ref_conf = _confidences(reference, confidence_column, "reference")
        ref_expected = float(ref_conf.mean()) if len(ref_conf) else None
    drop = (ref_expected - expected
            if ref_expected is not None and expected is not None else None)

    n_labelled, realised, expected_lab, ece = 0, None, None, None
    if annotations is not None and id_column in current.columns and intent_column in current.columns:
        rows = current.loc[conf.index, [id_column, intent_column]].assign(_conf=conf)
        ids = [str(i) for i in rows[id_column].dropna().unique()]
        found = (annotations.read(ids) if isinstance(annotations, AnnotationSource)
                 else annotations)
        truth = {rid: _true_intent(found[rid]) for rid in ids if rid in found}
        truth = {rid: intent for rid, intent in truth.items() if intent is not None}
        labelled = rows[rows[id_column].astype(str).isin(truth)]
        if len(labelled):
            correct = [truth[str(rid)] == pred for rid, pred
                       in zip(labelled[id_column], labelled[intent_column], strict=True)]
            confs = labelled["_conf"].to_numpy(dtype=float)
            n_labelled = len(labelled)
            realised = float(np.mean(correct))
            expected_lab = float(confs.mean())
            ece = expected_calibration_error(confs.tolist(), correct)
    return PerformanceEstimate(
        n=len(conf), expected_accuracy=expected, reference_expected_accuracy=ref_expected,
        expected_accuracy_drop=drop, n_labelled=n_labelled, realised_accuracy=realised,
        expected_accuracy_labelled=expected_lab, labelled_ece=ece,
    )
