"""The offline gate: may a retrained candidate replace the production model?

Both models are evaluated on the same utterances of each evaluation set: the fixed
golden set (``GateSettings.golden_set``) and, when there is one, recently labelled
traffic. :func:`evaluate_gate` turns the two :class:`~model.evaluation.report.
EvaluationReport` s, the per-utterance predictions behind them, and each model's p50
latency and size into a list of :class:`GateCheck` s; the gate passes when every check
passes. The checks:

- **no regression** per metric and set (``max_regression_pt``): the candidate may be
  worse than production by at most so many percentage points, e.g. intent accuracy
  ≥ production − 0.5 pt, SemER ≤ production + 1.0 pt;
- **per slice** (``slice_max_regression_pt``): the same, with looser limits, for every
  slice family/value (engine, voice, domain, augmentation, duration) that has at least
  ``min_slice_n`` utterances in both reports; smaller slices are skipped (and counted),
  because a handful of utterances cannot tell a regression from noise. Both models are
  scored on the *same* utterances, so a slice difference only comes from utterances on
  which they disagree, which keeps the noise well below that of two independent samples;
- **absolute floors** on the golden set (``floor``): minimum intent accuracy and maximum
  SemER, whatever production scores, so that a bad model cannot pass because production
  is bad too, and so that the very first model (no production: ``production=None``)
  is judged at all;
- **negative flips** per set (``max_negative_flip_rate``, see :func:`flip_counts`);
- **cost**: p50 latency and bundle size at most ``max_latency_increase`` /
  ``max_size_increase`` above production's (fractions: 0.2 = +20 %).

An utterance is **exactly right** when the prediction has no ``error``, its intent equals
the reference intent and its slot multiset equals the reference's (``(type, value)``
pairs, order ignored): the definition of ``MetricSet.exact_match``, applied to one
utterance. A **negative flip** is an utterance production gets exactly right and the
candidate does not; the **negative-flip rate** is their number over *all* utterances of
the set (the NFR of Yan et al., 2021, "Positive-Congruent Training"), so that it reads
on the same scale as the accuracies: a candidate 1 pt better overall can still break 3 %
of the commands that used to work, which is what users notice.

Nothing here imports MLflow or Prefect: :meth:`GateResult.to_tags` gives the flat
``gate.*`` version tags and :meth:`GateResult.to_markdown` the artifact people read; the
promotion flow logs them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict

from model.data.manifest import ManifestRow
from model.evaluation.metrics import exact_match_rate
from model.evaluation.report import EvaluationReport, MetricSet, evaluate
from model.inference.prediction import Prediction
from voiceloop.settings import GateSettings

__all__ = [
    "FlipCounts",
    "GateCheck",
    "GateInputs",
    "GateResult",
    "GateSet",
    "ModelCost",
    "evaluate_gate",
    "flip_counts",
]

# Metric → (label for people, higher is better). The keys are GateSettings' GateMetric.
_METRICS: dict[str, tuple[str, bool]] = {
    "intent_accuracy": ("intent accuracy", True),
    "slot_f1": ("slot F1", True),
    "slu_f1": ("SLU-F1", True),
    "exact_match": ("exact-frame accuracy", True),
    "semer": ("SemER", False),
    "wer": ("WER", False),
    "cer": ("CER", False),
}
# Metrics every summary and tag set reports, whatever the limits check.
_KEY_METRICS: tuple[str, ...] = ("intent_accuracy", "slot_f1", "semer", "wer")
# Set names become tag keys (gate.<set>.<metric>): MLflow accepts these characters.
_SET_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
# Float noise (0.925 − 0.005 computed in binary) must not fail a check sitting exactly on
# its limit.
_EPS = 1e-9
# MLflow model-version tags are cut at 5000 characters by voiceloop.registry.
_TAG_MAX = 5000

Unit = Literal["rate", "ms", "bytes"]
Kind = Literal["metric", "slice", "floor", "flips", "cost"]
Bound = Literal["min", "max"]


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class GateSet:
    """One evaluation set, scored for the candidate and (when there is one) production.

    Attributes:
        name: short name, letters, digits, ``_`` and ``-`` (it becomes part of tag keys),
            e.g. ``golden`` or ``traffic``.
        rows: reference utterances (ids unique).
        candidate: the candidate's predictions on ``rows`` (at most one per id).
        candidate_report: :func:`~model.evaluation.report.evaluate` of ``rows`` and
            ``candidate``.
        production: production's predictions on the same rows, or None (no production).
        production_report: the report of ``production``; given exactly when it is.

    :meth:`from_predictions` computes both reports.
    """

    name: str
    rows: Sequence[ManifestRow]
    candidate: Sequence[Prediction]
    candidate_report: EvaluationReport
    production: Sequence[Prediction] | None = None
    production_report: EvaluationReport | None = None

    def __post_init__(self) -> None:
        if not _SET_NAME.match(self.name):
            raise ValueError(f"set name {self.name!r}: use letters, digits, '_' and '-'")
        if not self.rows:
            raise ValueError(f"set {self.name!r} has no rows")
        if (self.production is None) != (self.production_report is None):
            raise ValueError(f"set {self.name!r}: production predictions and production "
                             "report must be given together")
        for side, report in (("candidate", self.candidate_report),
                             ("production", self.production_report)):
            if report is not None and report.n != len(self.rows):
                raise ValueError(f"set {self.name!r}: the {side} report covers {report.n} "
                                 f"utterances, the set has {len(self.rows)}")

    @classmethod
    def from_predictions(
        cls,
        name: str,
        rows: Sequence[ManifestRow],
        candidate: Sequence[Prediction],
        production: Sequence[Prediction] | None = None,
    ) -> GateSet:
        """Build a set, scoring both models with :func:`~model.evaluation.report.evaluate`.

        Raises:
            ValueError: as :func:`~model.evaluation.report.evaluate` (duplicate ids, a
                prediction for an unknown id) or a bad set name.
        """
        return cls(
            name=name, rows=rows, candidate=candidate,
            candidate_report=evaluate(rows, candidate),
            production=production,
            production_report=None if production is None else evaluate(rows, production),
        )


@dataclass(frozen=True)
class ModelCost:
    """What serving one model costs: ``latency_p50_ms`` (median latency of one utterance,
    milliseconds, measured the same way for both models) and ``size_bytes`` (the deployed
    bundle)."""

    latency_p50_ms: float
    size_bytes: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.latency_p50_ms) and self.latency_p50_ms > 0):
            raise ValueError(f"latency_p50_ms must be a positive number, got "
                             f"{self.latency_p50_ms}")
        if self.size_bytes <= 0:
            raise ValueError(f"size_bytes must be positive, got {self.size_bytes}")


@dataclass(frozen=True)
class GateInputs:
    """Everything the gate judges.

    Attributes:
        sets: the evaluation sets; one must be named ``GateSettings.golden_set``.
        candidate: the candidate's latency and size.
        production: production's, or None when there is no production model yet; then
            no set may carry production predictions (and only the floors are checked).
            When given, every set must carry production predictions.
        candidate_version, production_version: registry versions, for the record.
    """

    sets: Sequence[GateSet]
    candidate: ModelCost
    production: ModelCost | None = None
    candidate_version: str = ""
    production_version: str = ""

    def __post_init__(self) -> None:
        if not self.sets:
            raise ValueError("the gate needs at least one evaluation set")
        names = [s.name for s in self.sets]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"duplicate evaluation set names: {duplicated}")
        with_production = [s.name for s in self.sets if s.production is not None]
        if self.production is None and with_production:
            raise ValueError(f"sets {with_production} have production predictions but "
                             "production's latency and size are missing")
        if self.production is not None and len(with_production) != len(self.sets):
            missing = [s.name for s in self.sets if s.production is None]
            raise ValueError(f"production is given but sets {missing} have no production "
                             "predictions")


# --------------------------------------------------------------------------- flips


@dataclass(frozen=True)
class FlipCounts:
    """Per-utterance agreement of two models on one set.

    Attributes:
        n: utterances.
        production_right: utterances production gets exactly right.
        candidate_right: utterances the candidate gets exactly right.
        negative: exactly right for production, not for the candidate.
        positive: exactly right for the candidate, not for production.
    """

    n: int
    production_right: int
    candidate_right: int
    negative: int
    positive: int

    @property
    def negative_rate(self) -> float:
        """Negative flips over all utterances (0–1)."""
        return self.negative / self.n if self.n else 0.0

    @property
    def positive_rate(self) -> float:
        """Positive flips over all utterances (0–1)."""
        return self.positive / self.n if self.n else 0.0

    @property
    def broken_share(self) -> float:
        """Negative flips over the utterances production got right (0–1): of what used
        to work, how much breaks."""
        return self.negative / self.production_right if self.production_right else 0.0


def _by_id(rows: Sequence[ManifestRow], predictions: Sequence[Prediction],
           side: str) -> dict[str, Prediction]:
    ids = {row.id for row in rows}
    by_id: dict[str, Prediction] = {}
    for prediction in predictions:
        if prediction.id not in ids:
            raise ValueError(f"{side} prediction for unknown id {prediction.id!r}")
        if prediction.id in by_id:
            raise ValueError(f"more than one {side} prediction for id {prediction.id!r}")
        by_id[prediction.id] = prediction
    return by_id


def _exactly_right(row: ManifestRow, prediction: Prediction | None) -> bool:
    """Intent and slot multiset right, no error (a missing prediction is wrong)."""
    if prediction is None or prediction.error is not None:
        return False
    # The metric itself, on one utterance, so the definition cannot drift from it.
    return exact_match_rate([row.intent], [row.slots],
                            [prediction.intent], [prediction.slots]) == 1.0


def flip_counts(
    rows: Sequence[ManifestRow],
    production: Sequence[Prediction],
    candidate: Sequence[Prediction],
) -> FlipCounts:
    """Count negative and positive flips between production and the candidate.

    Args:
        rows: reference utterances.
        production: production's predictions (at most one per row id; a row without one
            counts as wrong).
        candidate: the candidate's predictions, likewise.

    Raises:
        ValueError: a prediction for an id that is not among the rows, or two for one id.
    """
    prod = _by_id(rows, production, "production")
    cand = _by_id(rows, candidate, "candidate")
    prod_right = cand_right = negative = positive = 0
    for row in rows:
        p = _exactly_right(row, prod.get(row.id))
        c = _exactly_right(row, cand.get(row.id))
        prod_right += p
        cand_right += c
        negative += p and not c
        positive += c and not p
    return FlipCounts(len(rows), prod_right, cand_right, negative, positive)


# --------------------------------------------------------------------------- result


def _fmt(value: float, unit: Unit) -> str:
    if unit == "rate":
        return f"{100 * value:.2f} %"
    if unit == "ms":
        return f"{value:.1f} ms"
    return f"{value / 1e6:.2f} MB"


class GateCheck(BaseModel):
    """One check of the gate.

    Attributes:
        name: what is checked, e.g. ``intent_accuracy``, ``floor_semer``,
            ``negative_flip_rate``, ``latency_p50_ms``, ``slice domain=timers
            intent_accuracy``.
        kind: ``metric`` (no regression), ``slice``, ``floor``, ``flips`` or ``cost``.
        set: the evaluation set, or None for model-level checks (latency, size).
        n: utterances the value is computed over, or None (cost checks).
        candidate: the candidate's value (``unit``).
        production: production's value, or None (floors of a first model, flips).
        limit: the bound the candidate's value must respect.
        bound: ``min`` (candidate ≥ limit) or ``max`` (candidate ≤ limit), Flagger's
            ``thresholdRange``.
        unit: ``rate`` (fraction, shown in %), ``ms`` or ``bytes``.
        passed: whether the candidate respects the limit.
        detail: one sentence for people.
    """

    model_config = ConfigDict(frozen=True)

    name: str
    kind: Kind
    set: str | None
    n: int | None = None
    candidate: float
    production: float | None
    limit: float
    bound: Bound
    unit: Unit
    passed: bool
    detail: str

    @property
    def reason(self) -> str:
        """The detail, prefixed with the set: what a failed check says."""
        return f"[{self.set}] {self.detail}" if self.set else self.detail


class GateResult(BaseModel):
    """The gate's verdict.

    Attributes:
        passed: every check passed.
        checks: every check, in evaluation order (floors, then per set: metrics, flips,
            slices; then cost).
        candidate_version, production_version: as given in :class:`GateInputs`.
        slices_skipped: slice comparisons skipped for having fewer than ``min_slice_n``
            utterances in either report.
        summary: flat key → value of the key numbers (see :meth:`to_tags`).
    """

    model_config = ConfigDict(frozen=True)

    passed: bool
    checks: list[GateCheck]
    candidate_version: str = ""
    production_version: str = ""
    slices_skipped: int = 0
    summary: dict[str, float | int | str]

    @property
    def failed_checks(self) -> list[GateCheck]:
        """The checks that failed."""
        return [c for c in self.checks if not c.passed]

    @property
    def failed(self) -> list[str]:
        """Readable reasons, one per failed check (empty when the gate passed)."""
        return [c.reason for c in self.failed_checks]

    def to_tags(self) -> dict[str, str]:
        """Flat ``gate.*`` tags for the candidate's registry version.

        ``gate.result`` (``pass``/``fail``), ``gate.reasons`` (``; ``-joined, ``none``
        when it passed, cut to fit a tag), ``gate.checks`` / ``gate.failed_checks``
        (counts), ``gate.production_version``, and every :attr:`summary` number as
        ``gate.<key>`` (e.g. ``gate.golden.intent_accuracy``,
        ``gate.golden.intent_accuracy.production``, ``gate.golden.negative_flip_rate``,
        ``gate.latency_p50_ms``). Rates are fractions.
        """
        tags = {
            "gate.result": "pass" if self.passed else "fail",
            "gate.reasons": _joined(self.failed, _TAG_MAX) if self.failed else "none",
            "gate.checks": str(len(self.checks)),
            "gate.failed_checks": str(len(self.failed_checks)),
            "gate.production_version": self.production_version or "none",
        }
        for key, value in self.summary.items():
            tags.setdefault(f"gate.{key}",
                            f"{value:.6g}" if isinstance(value, float) else str(value))
        return tags

    def to_markdown(self) -> str:
        """The gate as a markdown page (the artifact people read in the MLflow UI)."""
        verdict = "PASS" if self.passed else "FAIL"
        prod = f"`{self.production_version}`" if self.production_version else "none"
        lines = [
            f"# Offline gate: {verdict}",
            "",
            (f"Candidate `{self.candidate_version or '?'}` against production {prod}: "
             f"{len(self.checks)} checks, {len(self.failed_checks)} failed. Rates are "
             "percentages; a limit is the least (≥) or the most (≤) the candidate may score."),
            "",
        ]
        if self.failed:
            lines += ["## Why it failed", ""] + [f"- {r}" for r in self.failed] + [""]
        lines += [
            "## Checks",
            "",
            "| set | check | n | candidate | production | limit | result |",
            "|---|---|---:|---:|---:|---:|---|",
        ]
        lines += [_row(c) for c in self.checks if c.kind != "slice"]
        slices = [c for c in self.checks if c.kind == "slice"]
        failed_slices = [c for c in slices if not c.passed]
        lines += [
            "",
            "## Slices",
            "",
            (f"{len(slices)} slice checks, {len(failed_slices)} failed; "
             f"{self.slices_skipped} slice comparisons skipped for too few utterances."),
        ]
        if failed_slices:
            lines += [
                "",
                "| set | check | n | candidate | production | limit | result |",
                "|---|---|---:|---:|---:|---:|---|",
            ]
            lines += [_row(c) for c in failed_slices]
        return "\n".join(lines) + "\n"


def _row(check: GateCheck) -> str:
    op = "≥" if check.bound == "min" else "≤"
    prod = "–" if check.production is None else _fmt(check.production, check.unit)
    n = "" if check.n is None else str(check.n)
    result = "pass" if check.passed else "**FAIL**"
    return (f"| {check.set or 'model'} | {check.name} | {n} | "
            f"{_fmt(check.candidate, check.unit)} | {prod} | {op} "
            f"{_fmt(check.limit, check.unit)} | {result} |")


def _joined(reasons: Sequence[str], limit: int) -> str:
    """``; ``-joined reasons, cut (with a count of what was left out) to ``limit`` chars."""
    out: list[str] = []
    used = 0
    for i, reason in enumerate(reasons):
        more = f" … (+{len(reasons) - i} more)"
        if used + len(reason) + 2 + len(more) > limit:
            return "; ".join(out) + more
        out.append(reason)
        used += len(reason) + 2
    return "; ".join(out)


# --------------------------------------------------------------------------- checks


def _compare(
    *, name: str, kind: Kind, set_name: str | None, n: int | None, candidate: float,
    production: float | None, limit: float, bound: Bound, unit: Unit, what: str,
    note: str = "",
) -> GateCheck:
    passed = candidate >= limit - _EPS if bound == "min" else candidate <= limit + _EPS
    op = "≥" if bound == "min" else "≤"
    against = "" if production is None else f" vs production {_fmt(production, unit)}"
    verb = "within" if passed else "below" if bound == "min" else "above"
    detail = (f"{what} {_fmt(candidate, unit)}{against}: {verb} the limit "
              f"{op} {_fmt(limit, unit)}" + (f" ({note})" if note else ""))
    return GateCheck(name=name, kind=kind, set=set_name, n=n, candidate=candidate,
                     production=production, limit=limit, bound=bound, unit=unit,
                     passed=passed, detail=detail)


def _regression(
    metric: str, limit_pt: float, cand: MetricSet, prod: MetricSet, *, name: str,
    kind: Kind, set_name: str, what: str,
) -> GateCheck:
    label, higher_better = _METRICS[metric]
    c, p = getattr(cand, metric), getattr(prod, metric)
    allowed = limit_pt / 100.0
    limit = p - allowed if higher_better else p + allowed
    sign = "−" if higher_better else "+"
    return _compare(
        name=name, kind=kind, set_name=set_name, n=cand.n, candidate=c, production=p,
        limit=limit, bound="min" if higher_better else "max", unit="rate",
        what=f"{what}{label}", note=f"{sign}{limit_pt:g} pt allowed",
    )


def _floor_checks(gs: GateSet, settings: GateSettings) -> list[GateCheck]:
    cand = gs.candidate_report.overall
    prod = None if gs.production_report is None else gs.production_report.overall
    floor = settings.floor
    return [
        _compare(name="floor_intent_accuracy", kind="floor", set_name=gs.name, n=cand.n,
                 candidate=cand.intent_accuracy,
                 production=None if prod is None else prod.intent_accuracy,
                 limit=floor.min_intent_accuracy, bound="min", unit="rate",
                 what="intent accuracy", note="absolute floor"),
        _compare(name="floor_semer", kind="floor", set_name=gs.name, n=cand.n,
                 candidate=cand.semer, production=None if prod is None else prod.semer,
                 limit=floor.max_semer, bound="max", unit="rate",
                 what="SemER", note="absolute floor"),
    ]


def _slice_checks(gs: GateSet, settings: GateSettings) -> tuple[list[GateCheck], int]:
    """Slice regression checks of one set, and how many slice comparisons were skipped."""
    assert gs.production_report is not None
    checks: list[GateCheck] = []
    skipped = 0
    cand_slices, prod_slices = gs.candidate_report.slices, gs.production_report.slices
    for family, values in cand_slices.items():
        for value, cand in values.items():
            prod = prod_slices.get(family, {}).get(value)
            if prod is None or min(cand.n, prod.n) < settings.min_slice_n:
                skipped += 1
                continue
            for metric, limit_pt in settings.slice_max_regression_pt.items():
                checks.append(_regression(
                    metric, limit_pt, cand, prod, name=f"slice {family}={value} {metric}",
                    kind="slice", set_name=gs.name, what=f"slice {family}={value}: ",
                ))
    return checks, skipped


def _set_checks(gs: GateSet, settings: GateSettings) -> tuple[list[GateCheck], int, FlipCounts]:
    assert gs.production is not None and gs.production_report is not None
    cand, prod = gs.candidate_report.overall, gs.production_report.overall
    checks = [
        _regression(metric, limit_pt, cand, prod, name=metric, kind="metric",
                    set_name=gs.name, what="")
        for metric, limit_pt in settings.max_regression_pt.items()
    ]
    flips = flip_counts(gs.rows, gs.production, gs.candidate)
    flip_check = _compare(
        name="negative_flip_rate", kind="flips", set_name=gs.name, n=flips.n,
        candidate=flips.negative_rate, production=None,
        limit=settings.max_negative_flip_rate, bound="max", unit="rate",
        what="negative-flip rate",
        note=(f"{flips.negative} of {flips.n} utterances production got exactly right and "
              f"the candidate does not: {100 * flips.broken_share:.1f} % of the "
              f"{flips.production_right} it got right; {flips.positive} positive flips"),
    )
    slice_checks, skipped = _slice_checks(gs, settings)
    return [*checks, flip_check, *slice_checks], skipped, flips


def _cost_checks(cand: ModelCost, prod: ModelCost, settings: GateSettings) -> list[GateCheck]:
    return [
        _compare(name="latency_p50_ms", kind="cost", set_name=None, n=None,
                 candidate=cand.latency_p50_ms, production=prod.latency_p50_ms,
                 limit=prod.latency_p50_ms * (1 + settings.max_latency_increase),
                 bound="max", unit="ms", what="p50 latency",
                 note=f"+{100 * settings.max_latency_increase:g} % allowed"),
        _compare(name="size_bytes", kind="cost", set_name=None, n=None,
                 candidate=float(cand.size_bytes), production=float(prod.size_bytes),
                 limit=prod.size_bytes * (1 + settings.max_size_increase),
                 bound="max", unit="bytes", what="bundle size",
                 note=f"+{100 * settings.max_size_increase:g} % allowed"),
    ]


def _summary(inputs: GateInputs, passed: bool, checks: Sequence[GateCheck],
             flips: Mapping[str, FlipCounts]) -> dict[str, float | int | str]:
    summary: dict[str, float | int | str] = {"result": "pass" if passed else "fail"}
    for gs in inputs.sets:
        summary[f"{gs.name}.n"] = gs.candidate_report.n
        for metric in _KEY_METRICS:
            summary[f"{gs.name}.{metric}"] = float(getattr(gs.candidate_report.overall, metric))
            if gs.production_report is not None:
                summary[f"{gs.name}.{metric}.production"] = float(
                    getattr(gs.production_report.overall, metric))
        if gs.name in flips:
            summary[f"{gs.name}.negative_flip_rate"] = flips[gs.name].negative_rate
            summary[f"{gs.name}.positive_flip_rate"] = flips[gs.name].positive_rate
    summary["latency_p50_ms"] = float(inputs.candidate.latency_p50_ms)
    summary["size_bytes"] = int(inputs.candidate.size_bytes)
    if inputs.production is not None:
        summary["latency_p50_ms.production"] = float(inputs.production.latency_p50_ms)
        summary["size_bytes.production"] = int(inputs.production.size_bytes)
    summary["slice_checks"] = sum(c.kind == "slice" for c in checks)
    return summary


def evaluate_gate(inputs: GateInputs, settings: GateSettings) -> GateResult:
    """Judge a candidate against production (see the module docstring for every check).

    Args:
        inputs: the evaluation sets (with both models' predictions and reports) and both
            models' latency and size; without production, only the floors are checked.
        settings: the limits (``promotion.gate`` of ``params.yaml``).

    Returns:
        The :class:`GateResult`; ``passed`` only when every check passed.

    Raises:
        ValueError: no set is named ``settings.golden_set``; a prediction for an id that
            is not among its set's rows.
    """
    names = [gs.name for gs in inputs.sets]
    if settings.golden_set not in names:
        raise ValueError(f"no evaluation set named {settings.golden_set!r} (the golden set "
                         f"the floors apply to); got {names}")
    golden = inputs.sets[names.index(settings.golden_set)]
    checks = _floor_checks(golden, settings)
    skipped = 0
    flips: dict[str, FlipCounts] = {}
    if inputs.production is not None:
        for gs in inputs.sets:
            set_checks, set_skipped, flips[gs.name] = _set_checks(gs, settings)
            checks += set_checks
            skipped += set_skipped
        checks += _cost_checks(inputs.candidate, inputs.production, settings)
    passed = all(c.passed for c in checks)
    return GateResult(
        passed=passed, checks=checks, candidate_version=inputs.candidate_version,
        production_version=inputs.production_version, slices_skipped=skipped,
        summary=_summary(inputs, passed, checks, flips),
    )
