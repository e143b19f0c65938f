"""Evaluate predictions against manifest rows, overall and per slice, and write reports.

:func:`evaluate` joins predictions to references by ``id`` and computes one
:class:`MetricSet` for the whole set and one per slice. Slice families:

- ``engine``: TTS engine (or ``traffic``);
- ``voice``: ``engine/voice``;
- ``domain``: the row's coarse domain tag;
- ``augmentation``: ``clean`` for unaugmented audio, else *each* augmentation kind
  applied (``noise``, ``reverb``, ...). An utterance with noise and reverb is counted in
  both slices, so these slices overlap and their ``n`` can add up to more than the total;
  the question they answer is "how do we do on audio that had X applied?";
- ``duration``: :func:`model.evaluation.metrics.duration_bucket` of the audio duration.

The intent is deliberately not a slice family: the confusion matrix covers it.

:func:`write_report` writes the files the training code logs (this module does not
import MLflow): a flat ``metrics.json`` for DVC, the full ``evaluation.json``, a
markdown report and two plots.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from model.data.manifest import ManifestRow
from model.evaluation.metrics import (
    DURATION_BUCKETS,
    ReliabilityBin,
    cer,
    duration_bucket,
    exact_match_rate,
    expected_calibration_error,
    intent_accuracy,
    reliability_bins,
    semer,
    slot_prf,
    slu_f1,
    wer,
)
from model.inference.prediction import Prediction

__all__ = [
    "MISSING_PREDICTION",
    "NO_INTENT",
    "SLICE_FAMILIES",
    "EvaluationReport",
    "MetricSet",
    "evaluate",
    "write_report",
]

SLICE_FAMILIES: tuple[str, ...] = ("engine", "voice", "domain", "augmentation", "duration")
"""Slice families of :attr:`EvaluationReport.slices`, in report order."""

MISSING_PREDICTION = "missing prediction"
"""``error`` given to the stand-in prediction of a reference that has none."""

NO_INTENT = "(none)"
"""Confusion-matrix column for predictions without an intent (errors, missing)."""

_ECE_BINS = 15


class MetricSet(BaseModel):
    """Metrics of one set of utterances (the whole set or one slice).

    Rates are fractions (0.25 = 25 %). ``errors`` counts predictions with ``error`` set
    (including stand-ins for missing predictions); they are scored as empty outputs.
    ``ece`` is the expected calibration error of the intent confidence; ``clarify_rate``
    is the fraction of utterances where the model asked the user to repeat.
    """

    model_config = ConfigDict(frozen=True)

    n: int
    errors: int
    wer: float
    cer: float
    intent_accuracy: float
    slot_precision: float
    slot_recall: float
    slot_f1: float
    slu_f1: float
    semer: float
    exact_match: float
    ece: float
    clarify_rate: float


class EvaluationReport(BaseModel):
    """Result of :func:`evaluate`.

    Attributes:
        n: number of reference utterances.
        errors: predictions with ``error`` set, missing predictions included.
        overall: metrics over all utterances.
        slices: slice family → slice value → metrics (see the module docstring).
        confusion: reference intent → predicted intent → count; a prediction without an
            intent is counted under :data:`NO_INTENT`.
        reliability: overall intent-confidence bins for the reliability diagram.
    """

    model_config = ConfigDict(frozen=True)

    n: int
    errors: int
    overall: MetricSet
    slices: dict[str, dict[str, MetricSet]]
    confusion: dict[str, dict[str, int]]
    reliability: list[ReliabilityBin]


# --------------------------------------------------------------------------- evaluation


def _scored(prediction: Prediction) -> Prediction:
    """The prediction as scored: an errored one counts as empty and unconfident."""
    if prediction.error is None:
        return prediction
    return Prediction(id=prediction.id, error=prediction.error, clarify=prediction.clarify)


def _join(rows: Sequence[ManifestRow], predictions: Sequence[Prediction]) -> list[Prediction]:
    """Predictions in row order; a reference without one gets an errored stand-in."""
    row_ids = Counter(row.id for row in rows)
    duplicated = sorted(i for i, c in row_ids.items() if c > 1)
    if duplicated:
        raise ValueError(f"duplicate reference ids: {duplicated[:5]}")
    by_id: dict[str, Prediction] = {}
    for prediction in predictions:
        if prediction.id not in row_ids:
            raise ValueError(f"prediction for unknown id {prediction.id!r}")
        if prediction.id in by_id:
            raise ValueError(f"more than one prediction for id {prediction.id!r}")
        by_id[prediction.id] = prediction
    return [
        _scored(by_id.get(row.id) or Prediction(id=row.id, error=MISSING_PREDICTION))
        for row in rows
    ]


def _metric_set(rows: Sequence[ManifestRow], preds: Sequence[Prediction]) -> MetricSet:
    ref_intents = [r.intent for r in rows]
    hyp_intents = [p.intent for p in preds]
    ref_slots = [r.slots for r in rows]
    hyp_slots = [p.slots for p in preds]
    prf = slot_prf(ref_slots, hyp_slots)
    return MetricSet(
        n=len(rows),
        errors=sum(p.error is not None for p in preds),
        wer=wer([r.transcript for r in rows], [p.transcript for p in preds]),
        cer=cer([r.transcript for r in rows], [p.transcript for p in preds]),
        intent_accuracy=intent_accuracy(ref_intents, hyp_intents),
        slot_precision=prf.precision,
        slot_recall=prf.recall,
        slot_f1=prf.f1,
        slu_f1=slu_f1(ref_slots, hyp_slots).slu_f1,
        semer=semer(ref_intents, ref_slots, hyp_intents, hyp_slots).rate,
        exact_match=exact_match_rate(ref_intents, ref_slots, hyp_intents, hyp_slots),
        ece=expected_calibration_error(
            [p.confidence for p in preds],
            [r == h for r, h in zip(ref_intents, hyp_intents, strict=True)],
            _ECE_BINS,
        ),
        clarify_rate=sum(p.clarify for p in preds) / len(preds),
    )


def _slice_values(row: ManifestRow) -> dict[str, list[str]]:
    """Each slice family's values for one row (several for ``augmentation``)."""
    kinds = sorted({step.kind for step in row.augment})
    return {
        "engine": [row.engine],
        "voice": [f"{row.engine}/{row.voice}"],
        "domain": [row.domain],
        "augmentation": kinds or ["clean"],
        "duration": [duration_bucket(row.duration_s)],
    }


def _slice_order(family: str) -> Callable[[str], object]:
    # Durations read best in their natural order; everything else alphabetically.
    if family == "duration":
        return DURATION_BUCKETS.index
    return lambda value: value


def evaluate(rows: Sequence[ManifestRow], predictions: Sequence[Prediction]) -> EvaluationReport:
    """Score predictions against their manifest rows, overall and per slice.

    Nothing is skipped silently: a reference with no prediction is scored as an errored,
    empty prediction (``error = "missing prediction"``) and counted in ``errors``.

    Args:
        rows: reference utterances (ids unique).
        predictions: at most one prediction per reference id, in any order.

    Returns:
        The :class:`EvaluationReport`.

    Raises:
        ValueError: no rows; duplicate row ids; a prediction whose id is not among the
            rows, or two predictions for one id.
    """
    if not rows:
        raise ValueError("nothing to evaluate: no reference rows")
    preds = _join(rows, predictions)

    members: dict[str, dict[str, list[int]]] = {f: defaultdict(list) for f in SLICE_FAMILIES}
    for index, row in enumerate(rows):
        for family, values in _slice_values(row).items():
            for value in values:
                members[family][value].append(index)
    slices: dict[str, dict[str, MetricSet]] = {}
    for family in SLICE_FAMILIES:
        order = _slice_order(family)
        slices[family] = {
            value: _metric_set(
                [rows[i] for i in members[family][value]],
                [preds[i] for i in members[family][value]],
            )
            for value in sorted(members[family], key=order)
        }

    confusion: dict[str, Counter[str]] = defaultdict(Counter)
    for row, pred in zip(rows, preds, strict=True):
        confusion[row.intent][pred.intent or NO_INTENT] += 1

    correct = [r.intent == p.intent for r, p in zip(rows, preds, strict=True)]
    return EvaluationReport(
        n=len(rows),
        errors=sum(p.error is not None for p in preds),
        overall=_metric_set(rows, preds),
        slices=slices,
        confusion={ref: dict(sorted(c.items())) for ref, c in sorted(confusion.items())},
        reliability=reliability_bins([p.confidence for p in preds], correct, _ECE_BINS),
    )


# --------------------------------------------------------------------------- reports

# (field, heading, is_rate) for the markdown tables; rates print as percentages.
_COLUMNS: tuple[tuple[str, str, bool], ...] = (
    ("wer", "WER", True),
    ("cer", "CER", True),
    ("intent_accuracy", "intent acc", True),
    ("slot_f1", "slot F1", True),
    ("slu_f1", "SLU-F1", True),
    ("semer", "SemER", True),
    ("exact_match", "exact frame", True),
    ("ece", "ECE", True),
    ("clarify_rate", "clarify", True),
)
_OVERALL_ROWS: tuple[tuple[str, str], ...] = (
    ("n", "utterances"),
    ("errors", "errored predictions"),
    ("wer", "word error rate"),
    ("cer", "character error rate"),
    ("intent_accuracy", "intent accuracy"),
    ("slot_precision", "slot precision"),
    ("slot_recall", "slot recall"),
    ("slot_f1", "slot F1 (exact)"),
    ("slu_f1", "SLU-F1 (SLURP)"),
    ("semer", "semantic error rate"),
    ("exact_match", "exact-frame accuracy"),
    ("ece", "intent ECE"),
    ("clarify_rate", "clarify rate"),
)
_INT_FIELDS = frozenset({"n", "errors"})


def _cell(metrics: MetricSet, field: str) -> str:
    value = getattr(metrics, field)
    return str(int(value)) if field in _INT_FIELDS else f"{100 * value:.1f}%"


def _severity(metrics: MetricSet) -> tuple[float, float]:
    # Worst first: highest semantic error rate (the end-to-end SLU metric), then WER.
    return (-metrics.semer, -metrics.wer)


def _markdown(report: EvaluationReport, title: str) -> str:
    overall = report.overall
    lines = [
        f"# {title}",
        "",
        (
            f"{report.n} utterances, {report.errors} errored or missing predictions "
            "(scored as empty outputs). Rates are percentages."
        ),
        "",
        "## Overall",
        "",
        "| metric | value |",
        "|---|---:|",
    ]
    lines += [f"| {label} | {_cell(overall, field)} |" for field, label in _OVERALL_ROWS]
    header = "| slice | n | errors | " + " | ".join(h for _, h, _ in _COLUMNS) + " |"
    rule = "|---|---:|---:|" + "---:|" * len(_COLUMNS)
    for family, by_value in report.slices.items():
        lines += ["", f"## By {family}", ""]
        if family == "augmentation":
            lines += [
                (
                    "An utterance appears under every augmentation applied to it, so these "
                    "slices overlap."
                ),
                "",
            ]
        lines += ["Worst first (by SemER, then WER).", "", header, rule]
        for value, metrics in sorted(by_value.items(), key=lambda kv: (*_severity(kv[1]), kv[0])):
            cells = " | ".join(_cell(metrics, field) for field, _, _ in _COLUMNS)
            lines.append(f"| {value} | {metrics.n} | {metrics.errors} | {cells} |")
    confused = sorted(
        (
            (count, ref, hyp)
            for ref, row in report.confusion.items()
            for hyp, count in row.items()
            if hyp != ref
        ),
        key=lambda t: (-t[0], t[1], t[2]),
    )[:10]
    lines += ["", "## Most frequent intent confusions", ""]
    if confused:
        lines += ["| reference | predicted | count | of reference |", "|---|---|---:|---:|"]
        for count, ref, hyp in confused:
            share = count / sum(report.confusion[ref].values())
            lines.append(f"| {ref} | {hyp} | {count} | {100 * share:.1f}% |")
    else:
        lines.append("None: every intent was predicted correctly.")
    return "\n".join(lines) + "\n"


def _plot_confusion(confusion: dict[str, dict[str, int]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    from matplotlib.figure import Figure

    refs = sorted(confusion)
    hyps = {h for row in confusion.values() for h in row}
    # Square matrix over every label, so that the diagonal is the correct predictions;
    # "(none)" goes last, rows without references stay blank.
    labels = sorted((set(refs) | hyps) - {NO_INTENT}) + ([NO_INTENT] if NO_INTENT in hyps else [])
    position = {label: i for i, label in enumerate(labels)}
    counts = np.zeros((len(labels), len(labels)))
    for ref, row in confusion.items():
        for hyp, count in row.items():
            counts[position[ref], position[hyp]] = count
    totals = counts.sum(axis=1, keepdims=True)
    rates = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)

    k = len(labels)
    # ~0.25 inch per label keeps 42 intents legible at 7 pt; small sets get a floor size.
    side = max(6.0, 0.25 * k + 3.0)
    fontsize = 7 if k > 20 else 9
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(k), labels, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(k), labels, fontsize=fontsize)
    ax.set_xlabel("predicted intent")
    ax.set_ylabel("reference intent")
    ax.set_title(f"{title}: intent confusion (rows sum to 1)")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if counts[i, j]:
                    colour = "white" if rates[i, j] > 0.5 else "black"
                    ax.text(
                        j,
                        i,
                        f"{rates[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=fontsize - 1,
                        color=colour,
                    )
    fig.colorbar(image, ax=ax, shrink=0.6, label="fraction of reference row")
    fig.savefig(path, dpi=110)


def _plot_reliability(bins: Sequence[ReliabilityBin], ece: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    filled = [b for b in bins if b.count]
    width = bins[0].upper - bins[0].lower if bins else 1.0
    fig = Figure(figsize=(6.0, 7.0), layout="constrained")
    ax, ax_count = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    ax.bar(
        [b.lower for b in filled],
        [b.accuracy for b in filled],
        width=width,
        align="edge",
        edgecolor="black",
        color="tab:blue",
        alpha=0.8,
        label="accuracy",
    )
    # Red hatched bars span accuracy -> mean confidence: above the bar = over-confident.
    ax.bar(
        [b.lower for b in filled],
        [b.mean_confidence - b.accuracy for b in filled],
        bottom=[b.accuracy for b in filled],
        width=width,
        align="edge",
        edgecolor="tab:red",
        color="tab:red",
        alpha=0.3,
        hatch="//",
        label="gap to mean confidence",
    )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("intent accuracy")
    ax.set_title(f"{title}: reliability (ECE = {100 * ece:.1f}%)")
    ax.legend(loc="upper left")
    ax_count.bar(
        [b.lower for b in filled],
        [b.count for b in filled],
        width=width,
        align="edge",
        edgecolor="black",
        color="grey",
    )
    ax_count.set_xlabel("intent confidence")
    ax_count.set_ylabel("utterances")
    fig.savefig(path, dpi=110)


def write_report(report: EvaluationReport, out_dir: Path, title: str) -> dict[str, Path]:
    """Write the evaluation files into ``out_dir`` (created if missing).

    Files (keys of the returned mapping):

    - ``metrics``: ``metrics.json``, the overall :class:`MetricSet` as one flat object of
      numbers (what DVC's ``metrics`` reads);
    - ``evaluation``: ``evaluation.json``, the whole report with slices and confusion;
    - ``markdown``: ``evaluation.md``, tables for people (worst slices first);
    - ``confusion_matrix``: ``confusion_matrix.png``, row-normalised intent confusion;
    - ``reliability``: ``reliability.png``, reliability diagram with the ECE.

    Args:
        report: what :func:`evaluate` returned.
        out_dir: folder to write into.
        title: heading of the markdown report and the plots (e.g. model and split).

    Returns:
        File role → path written.
    """
    if not title.strip():
        raise ValueError("title must not be empty")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "metrics": out_dir / "metrics.json",
        "evaluation": out_dir / "evaluation.json",
        "markdown": out_dir / "evaluation.md",
        "confusion_matrix": out_dir / "confusion_matrix.png",
        "reliability": out_dir / "reliability.png",
    }
    paths["metrics"].write_text(
        json.dumps(report.overall.model_dump(), indent=2) + "\n", encoding="utf-8"
    )
    paths["evaluation"].write_text(
        json.dumps({"title": title, **report.model_dump(mode="json")}, indent=2) + "\n",
        encoding="utf-8",
    )
    paths["markdown"].write_text(_markdown(report, title), encoding="utf-8")
    _plot_confusion(report.confusion, paths["confusion_matrix"], title)
    _plot_reliability(report.reliability, report.overall.ece, paths["reliability"], title)
    return paths
