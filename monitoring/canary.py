"""Canary analysis: is the canary route as healthy as the production route?

Vocabulary from Flagger's ``spec.analysis`` and Argo Rollouts' AnalysisRun: the rollout
walks through ``steps`` (canary traffic shares in percent, Flagger's stepWeights); at
each step the flow calls :func:`analyse_step` every ``step.interval_s`` seconds on the
traffic logged since the step began, until both routes have ``step.min_samples``
requests (before that the analysis is *inconclusive*) or ``step.max_wait_s`` has passed.
Each analysis runs six metric checks, each a template with a limit (a ``min`` or ``max``
bound, Flagger's ``thresholdRange``), comparing the canary with production over the same
period; the step **fails** when more than ``failure_limit`` checks fail (Argo's
``failureLimit``), and **passes** otherwise. Unlike Argo, which counts failed
measurements over repeated runs, one analysis judges the whole step's traffic at once:
the window only grows, so a later analysis sees everything an earlier one saw.

The traffic store only holds requests the service *answered* (a 4xx/5xx answer is never
logged; the service counts those in Prometheus), and the two routes answer *different*
requests. So the metrics are defined from what an answered request carries:

- ``error_rate``: share of answers that are malformed: no intent although the model did
  not ask to clarify (silence is answered with ``clarify`` and no intent, which is not
  an error), or a confidence that is not a number in [0, 1]. canary ≤ production + limit.
- ``latency_p95``: the 95th percentile of the server-side ``latency_ms``.
  canary ≤ min(production × ratio, absolute maximum), or a p95 above that limit that is
  not significant: with a canary p95 ≤ limit at most 5 % of its requests would be
  slower than the limit, so the check fails only when the count that is slower is
  unlikely under that share (one-sided binomial test, :func:`tail_excess_p_value`,
  p < ``rate_alpha``) and, for the relative limit, also unlikely when the canary's
  latencies divided by the ratio are reshuffled with production's (a permutation test
  at the boundary "canary = production × ratio": the limit comes from production's own
  sample, whose p95 is noisy when it is small). The reported p is the larger of the two.
  The p95 of ~30 canary requests is their second-slowest: a demo run rolled a candidate
  back at 10 % for a p95 of 46.6 ms against 20.8 ms, from two stalls (86 and 185 ms)
  among 34 requests whose median equalled production's; a CI run of the tiny loop
  rolled one back for 2 slow answers among 5, against a production p95 of 5 answers.
- ``clarify_rate``: share of answers asking the user to repeat. canary ≤ production + limit.

  Each rate check (error, clarify, feedback) fails only when the excess over the limit
  is also significant: a one-sided two-proportion z-test (:func:`excess_p_value`) gives
  p < ``rate_alpha``. A first demo run rolled a candidate back for 51.5 % clarify over
  33 canary answers against 38.1 % over 211 (±9 pt of noise at that size).
- ``intent_distance``: the Jensen–Shannon distance (natural log, 0–0.83) between the two
  routes' distributions of answered intents (answers without an intent, i.e. silence and
  malformed answers, are left to the checks above). It
  stands for *disagreement* because the routes split one population at random (sticky
  by device hash, or a coin per request): both see the same distribution of requests,
  so if the candidate answered a share ``d`` of requests differently from production,
  the two intent distributions could differ by at most ``d`` in total variation. A large
  distance therefore proves that the models disagree on many requests (a small one does
  not prove they agree: disagreements can cancel out). The sample distance is biased
  upwards (two samples of 200 requests from one distribution over 40 intents lie ~0.2
  apart), so the check fails only when the distance exceeds the limit *and* a
  permutation test (requests reshuffled between the routes) finds it significant
  (p < ``intent_alpha``).
- ``feedback_rate``: share of a route's requests that drew implicit feedback (a feedback
  row whose ``request_id`` is the request's). canary ≤ production + limit. Feedback
  arrives after the answer, so the newest requests of both routes have had less time to
  draw it; both routes are equally affected.
- ``confidence``: mean calibrated confidence of the answers that have an intent: the
  label-free accuracy estimate of :mod:`monitoring.performance` (CBPE).
  canary ≥ production − limit, or a drop beyond it that is not significant (one-sided
  z-test of the two means, p ≥ ``rate_alpha``; the demo's second run rolled back a
  candidate for 70.9 % vs 78.0 % over 39 and 41 answers).

Rows are selected by time (``timestamp`` at or after ``since``), route and model
version; a version matches a row's ``model_version`` (the package's version string) or
its ``registry_version`` (the registry's number), so the caller may pass either. At a
share of 100 % production answers nothing: pass ``production_since`` (e.g. the start of
the previous step) so that the canary is compared with production's last window.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict
from scipy.spatial.distance import jensenshannon
from scipy.stats import binom

from monitoring.performance import estimate_performance
from serving.traffic import TRAFFIC_SCHEMA, list_batches, read_batch_frame
from voiceloop.settings import CanarySettings

__all__ = [
    "CANARY_CHECKS",
    "CanaryAnalysis",
    "CanaryCheck",
    "analyse_step",
    "collect_traffic",
    "excess_p_value",
    "tail_excess_p_value",
]

CANARY_CHECKS: tuple[str, ...] = (
    "error_rate", "latency_p95", "clarify_rate", "intent_distance", "feedback_rate",
    "confidence",
)
"""Names of the metric checks, in the order :func:`analyse_step` runs them."""

_REQUIRED = ("request_id", "timestamp", "route", "model_version", "intent", "confidence",
             "clarify", "latency_ms")
# The largest Jensen–Shannon distance (natural log): sqrt(ln 2), disjoint distributions.
_MAX_JS = math.sqrt(math.log(2))
# Float noise must not fail a check sitting exactly on its limit.
_EPS = 1e-9
# One reason in the JSON tag at most this long: the tag stays far below the 5000
# characters voiceloop.registry keeps, so it is never cut into invalid JSON.
_REASON_MAX = 300
# The permutation test is seeded: the same traffic always gets the same verdict.
_SEED = 0

Unit = Literal["rate", "ms", "distance"]
Bound = Literal["min", "max"]


def _utc(ts: datetime | pd.Timestamp) -> pd.Timestamp:
    # The store's contract: timestamps are UTC, a naive one is taken at its word.
    t = pd.Timestamp(ts)
    return t.tz_localize(UTC) if t.tzinfo is None else t.tz_convert(UTC)


# --------------------------------------------------------------------------- reading


def collect_traffic(traffic_root: str, since: datetime, *, slack_s: float = 300.0) -> pd.DataFrame:
    """Committed traffic rows (requests and feedback) with ``timestamp`` at or after ``since``.

    A record is stamped when its request arrives and committed a few seconds later, in a
    batch whose marker records the commit time (``created``). So every record at or
    after ``since`` lies in a batch created at or after ``since``; batches created more
    than ``slack_s`` seconds before ``since`` are skipped unread (the slack covers clocks
    of several service replicas that disagree), and the rows of the batches read are
    filtered by their own ``timestamp``.

    Args:
        traffic_root: the store root (folder or fsspec URL).
        since: the earliest request time wanted (naive = UTC).
        slack_s: seconds of clock disagreement tolerated between replicas.

    Returns:
        One frame, the :data:`~serving.traffic.TRAFFIC_SCHEMA` columns (``timestamp`` as
        ``datetime64[us, UTC]``, ``slots`` a JSON string), sorted by ``timestamp``, with a
        fresh index; empty (same columns) when nothing matches.

    Raises:
        ValueError: ``slack_s`` is negative.
    """
    if not slack_s >= 0:
        raise ValueError(f"slack_s must be a non-negative number of seconds, got {slack_s}")
    start = _utc(since)
    oldest = start - timedelta(seconds=slack_s)
    frames = [read_batch_frame(traffic_root, info) for info in list_batches(traffic_root)
              if _utc(info.created) >= oldest]
    frames = [f[f["timestamp"] >= start] for f in frames]
    frames = [f for f in frames if len(f)]
    if not frames:
        return TRAFFIC_SCHEMA.empty_table().to_pandas()
    out = pd.concat(frames, ignore_index=True)
    return out.sort_values("timestamp", kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------- result


def _fmt(value: float, unit: Unit) -> str:
    if unit == "rate":
        return f"{100 * value:.2f} %"
    if unit == "ms":
        return f"{value:.1f} ms"
    return f"{value:.3f}"


class CanaryCheck(BaseModel):
    """One metric check of a canary step.

    Attributes:
        name: one of :data:`CANARY_CHECKS`.
        canary: the canary's value (``unit``); for ``intent_distance`` the distance
            between the two routes.
        production: production's value, or None (``intent_distance``).
        limit: the bound the canary's value must respect.
        bound: ``min`` (canary ≥ limit) or ``max`` (canary ≤ limit).
        unit: ``rate`` (fraction), ``ms`` or ``distance``.
        passed: whether the check passed.
        p_value: for a value beyond its limit, the significance test's p-value: the
            permutation test of ``intent_distance``, the one-sided z-test of a rate
            (:func:`excess_p_value`).
        detail: one sentence for people.
    """

    model_config = ConfigDict(frozen=True)

    name: str
    canary: float
    production: float | None
    limit: float
    bound: Bound
    unit: Unit
    passed: bool
    p_value: float | None = None
    detail: str


class CanaryAnalysis(BaseModel):
    """The analysis of one canary step.

    Attributes:
        step: the step's number, 1 for the first of ``CanarySettings.steps``.
        share: the canary's traffic share during the step (percent).
        canary_version, production_version: the versions compared.
        since: the step's start (UTC); canary rows at or after it count.
        production_since: production rows at or after it count (``since`` by default).
        n_canary, n_production: requests counted per route.
        min_samples: requests each route needs for a verdict.
        failure_limit: failed checks tolerated.
        checks: the metric checks (empty when a route has no request at all).
        failed_checks: how many checks failed.
        passed: a verdict was reached and at most ``failure_limit`` checks failed.
        inconclusive: too few requests on a route for a verdict (then neither passed nor
            failed; the checks are still reported).
        reasons: why it failed or is inconclusive, and failures tolerated by the limit.
    """

    model_config = ConfigDict(frozen=True)

    step: int
    share: float
    canary_version: str
    production_version: str
    since: datetime
    production_since: datetime
    n_canary: int
    n_production: int
    min_samples: int
    failure_limit: int
    checks: list[CanaryCheck]
    failed_checks: int
    passed: bool
    inconclusive: bool
    reasons: list[str]

    @property
    def failed(self) -> bool:
        """A verdict was reached and more than ``failure_limit`` checks failed."""
        return not self.passed and not self.inconclusive

    @property
    def verdict(self) -> Literal["pass", "fail", "inconclusive"]:
        """``pass``, ``fail`` or ``inconclusive``."""
        return "inconclusive" if self.inconclusive else "pass" if self.passed else "fail"

    @property
    def tag_key(self) -> str:
        """The version tag this analysis is stored under: ``canary.step<N>``."""
        return f"canary.step{self.step}"

    def to_tag(self) -> tuple[str, str]:
        """``(canary.step<N>, compact JSON)`` for the canary's registry version.

        The JSON holds the verdict, share, versions, start, request counts, each check
        as ``[canary, production, limit, passed]`` and the reasons (each cut to 300
        characters, so the value stays well inside a registry tag).
        """
        def num(x: float | None) -> float | None:
            return None if x is None else float(f"{x:.6g}")

        value = {
            "verdict": self.verdict,
            "step": self.step,
            "share": self.share,
            "canary_version": self.canary_version,
            "production_version": self.production_version,
            "since": self.since.isoformat(),
            "n_canary": self.n_canary,
            "n_production": self.n_production,
            "failed_checks": self.failed_checks,
            "failure_limit": self.failure_limit,
            "checks": {c.name: [num(c.canary), num(c.production), num(c.limit), c.passed]
                       for c in self.checks},
            "reasons": [r[:_REASON_MAX] for r in self.reasons],
        }
        return self.tag_key, json.dumps(value, separators=(",", ":"), ensure_ascii=False)

    def to_markdown(self) -> str:
        """The analysis as a markdown section."""
        lines = [
            f"## Canary step {self.step} ({self.share:g} %): {self.verdict.upper()}",
            "",
            (f"Canary `{self.canary_version}` ({self.n_canary} requests) against production "
             f"`{self.production_version}` ({self.n_production} requests) since "
             f"{self.since.isoformat()}; at least {self.min_samples} requests per route, "
             f"{self.failed_checks} failed checks of {len(self.checks)} "
             f"(failure limit {self.failure_limit})."),
            "",
        ]
        if self.reasons:
            lines += [f"- {r}" for r in self.reasons] + [""]
        if self.checks:
            lines += ["| check | canary | production | limit | result |",
                      "|---|---:|---:|---:|---|"]
            for c in self.checks:
                op = "≥" if c.bound == "min" else "≤"
                prod = "–" if c.production is None else _fmt(c.production, c.unit)
                lines.append(f"| {c.name} | {_fmt(c.canary, c.unit)} | {prod} | "
                             f"{op} {_fmt(c.limit, c.unit)} | "
                             f"{'pass' if c.passed else '**FAIL**'} |")
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- metrics


def _bad_answer(rows: pd.DataFrame) -> pd.Series:
    """Malformed answers: no intent without a clarify, or a confidence outside [0, 1]."""
    conf = pd.to_numeric(rows["confidence"], errors="coerce")
    bad_conf = ~(np.isfinite(conf) & (conf >= 0.0) & (conf <= 1.0))
    no_intent = (rows["intent"].fillna("") == "") & ~rows["clarify"].astype(bool)
    return no_intent | bad_conf


def excess_p_value(canary: float, n_canary: int, production: float, n_production: int,
                   allowed: float) -> float:
    """One-sided p-value of "the canary's rate exceeds production's by at most
    ``allowed``" (a two-proportion z-test against that margin, unpooled variance): small
    when the observed excess over ``allowed`` is unlikely to be sampling noise.

    Raises:
        ValueError: a sample size below 1.
    """
    if n_canary < 1 or n_production < 1:
        raise ValueError(f"sample sizes must be >= 1, got {n_canary} and {n_production}")
    excess = canary - production - allowed
    se = math.sqrt(canary * (1 - canary) / n_canary + production * (1 - production) / n_production)
    if se == 0.0:  # both rates 0 or 1: no noise at all
        return 0.0 if excess > _EPS else 1.0
    return 0.5 * math.erfc(excess / se / math.sqrt(2.0))


def _rate_check(name: str, what: str, canary: pd.Series, production: pd.Series,
                allowed: float, alpha: float) -> CanaryCheck:
    """canary rate ≤ production rate + ``allowed``, or an excess that is not significant
    (p ≥ ``alpha``). ``canary``/``production``: one boolean per answer."""
    c, p = float(canary.mean()), float(production.mean())
    limit = p + allowed
    p_value: float | None = None
    passed = c <= limit + _EPS
    if not passed:
        p_value = excess_p_value(c, len(canary), p, len(production), allowed)
        passed = p_value >= alpha
    head = f"{what} {_fmt(c, 'rate')} vs production {_fmt(p, 'rate')}: "
    if p_value is None:
        why = "within the limit"
    elif passed:
        why = (f"above the limit but not significant over {len(canary)} canary answers "
               f"(p = {p_value:.3f} ≥ {alpha:g})")
    else:
        why = f"above the limit and significant (p = {p_value:.3f} < {alpha:g})"
    return CanaryCheck(
        name=name, canary=c, production=p, limit=limit, bound="max", unit="rate",
        passed=passed, p_value=p_value,
        detail=f"{head}{why}; limit ≤ {_fmt(limit, 'rate')} (+{100 * allowed:g} pt allowed)",
    )


def tail_excess_p_value(slower: int, n: int, share: float = 0.05) -> float:
    """One-sided p-value of "at most ``share`` of the requests are slower than the limit"
    when ``slower`` of ``n`` were: the binomial probability of ``slower`` or more.

    Raises:
        ValueError: ``n`` below 1, ``slower`` outside 0..n, or ``share`` outside (0, 1).
    """
    if n < 1 or not 0 <= slower <= n:
        raise ValueError(f"need 0 <= slower <= n and n >= 1, got slower={slower}, n={n}")
    if not 0.0 < share < 1.0:
        raise ValueError(f"share must be in (0, 1), got {share}")
    return float(binom.sf(slower - 1, n, share))


def _tail_permutation_p_value(canary: np.ndarray, production: np.ndarray, ratio: float,
                              permutations: int) -> float:
    """One-sided permutation p-value of "the canary's latencies (ms) are at most ``ratio``
    × production's", for the count of canary requests slower than production's p95 ×
    ``ratio``. At that boundary the canary's latencies divided by ``ratio`` are
    exchangeable with production's, so those are reshuffled between the routes (sizes
    kept) and production's p95 recomputed from each reshuffled sample: the noise of a
    p95 estimated from few production requests is part of the null distribution."""
    def slower(c: np.ndarray, p: np.ndarray) -> int:
        return int((c > float(np.percentile(p, 95)) + _EPS).sum())

    scaled = canary / ratio
    observed = slower(scaled, production)
    pooled = np.concatenate([scaled, production])
    rng = np.random.default_rng(_SEED)
    n_c = len(canary)
    hits = 0
    for _ in range(permutations):
        order = rng.permutation(len(pooled))
        hits += slower(pooled[order[:n_c]], pooled[order[n_c:]]) >= observed
    return (1 + hits) / (1 + permutations)


def _latency_check(canary: pd.DataFrame, production: pd.DataFrame,
                   settings: CanarySettings) -> CanaryCheck:
    m = settings.metrics
    latencies = canary["latency_ms"].to_numpy(dtype=float)
    prod = production["latency_ms"].to_numpy(dtype=float)
    c = float(np.percentile(latencies, 95))
    p = float(np.percentile(prod, 95))
    relative = p * m.max_latency_p95_ratio
    limit = min(relative, m.max_latency_p95_ms)
    absolute = relative > m.max_latency_p95_ms
    which = "the absolute maximum" if absolute else f"production × {m.max_latency_p95_ratio:g}"
    # NaN latencies (a broken writer) fail the check instead of passing silently.
    passed = bool(c <= limit + _EPS)
    p_value: float | None = None
    why = "within"
    if not passed and np.isfinite(latencies).all() and np.isfinite(prod).all() \
            and math.isfinite(limit):
        slower = int((latencies > limit + _EPS).sum())
        # Is more than 5 % of the canary slower than the limit? ...
        p_value = tail_excess_p_value(slower, len(latencies))
        if not absolute:
            # ... and is that more than chance gives when the limit itself comes from a
            # production sample? With 5 production requests their p95 is about their
            # slowest, and 2 canary stalls of 5 were significant by the first test alone
            # (a CI run rolled back a candidate of the same size for that). Failing only
            # when both tests reject keeps each one's false-rollback rate.
            p_value = max(p_value, _tail_permutation_p_value(
                latencies, prod, m.max_latency_p95_ratio, m.permutations))
        passed = p_value >= m.rate_alpha
        why = (f"above, but {slower} of {len(latencies)} canary requests slower than the "
               f"limit is not significant (p = {p_value:.3f} ≥ {m.rate_alpha:g}); "
               if passed else
               f"above, and {slower} of {len(latencies)} canary requests slower than the "
               f"limit is significant (p = {p_value:.3f} < {m.rate_alpha:g}); ")
    elif not passed:
        why = "above"
    return CanaryCheck(
        name="latency_p95", canary=c, production=p, limit=limit, bound="max", unit="ms",
        passed=passed, p_value=p_value,
        detail=(f"p95 latency {_fmt(c, 'ms')} vs production {_fmt(p, 'ms')}: "
                f"{why} the limit ≤ {_fmt(limit, 'ms')} ({which})"),
    )


def _js_distance(a: np.ndarray, b: np.ndarray) -> float:
    d = float(jensenshannon(a / a.sum(), b / b.sum()))
    # Identical distributions can round to sqrt(-tiny) = NaN.
    return 0.0 if math.isnan(d) else d


def _intent_check(canary: pd.DataFrame, production: pd.DataFrame,
                  settings: CanarySettings) -> CanaryCheck:
    m = settings.metrics
    # Answers with an intent only: silence and malformed answers are the business of
    # clarify_rate and error_rate, and counting them here too would fail two checks for
    # one fault (which would make failure_limit count faults twice).
    cand = canary["intent"].fillna("")
    prod = production["intent"].fillna("")
    cand, prod = cand[cand != ""], prod[prod != ""]
    n_c = len(cand)
    if n_c == 0 or len(prod) == 0:
        return CanaryCheck(
            name="intent_distance", canary=_MAX_JS, production=None,
            limit=m.max_intent_distance, bound="max", unit="distance", passed=False,
            detail=(f"no intent to compare: canary answered {n_c} requests with an intent, "
                    f"production {len(prod)}"),
        )
    codes, _ = pd.factorize(pd.concat([cand, prod], ignore_index=True), sort=True)
    k = int(codes.max()) + 1
    total = np.bincount(codes, minlength=k).astype(float)
    counts_c = np.bincount(codes[:n_c], minlength=k).astype(float)
    distance = _js_distance(counts_c, total - counts_c)
    p_value: float | None = None
    passed = distance <= m.max_intent_distance + _EPS
    if not passed:
        # Permutation test: reassign the pooled requests to the routes at random (sizes
        # kept) and see how often chance alone gives a distance this large.
        rng = np.random.default_rng(_SEED)
        null = np.empty(m.permutations)
        for i in range(m.permutations):
            pick = rng.choice(len(codes), size=n_c, replace=False)
            perm_c = np.bincount(codes[pick], minlength=k).astype(float)
            null[i] = _js_distance(perm_c, total - perm_c)
        p_value = float((1 + np.sum(null >= distance - _EPS)) / (1 + m.permutations))
        passed = p_value >= m.intent_alpha
    if p_value is None:
        why = "within the limit"
    elif passed:
        why = (f"above the limit but not significant (p = {p_value:.3f} ≥ "
               f"{m.intent_alpha:g}: sampling noise)")
    else:
        why = f"above the limit and significant (p = {p_value:.3f} < {m.intent_alpha:g})"
    return CanaryCheck(
        name="intent_distance", canary=distance, production=None,
        limit=m.max_intent_distance, bound="max", unit="distance", passed=passed,
        p_value=p_value,
        detail=(f"intent distributions {distance:.3f} apart (Jensen–Shannon) over "
                f"{k} intents: {why}; limit ≤ {m.max_intent_distance:g}"),
    )


def _confidence_check(canary: pd.DataFrame, production: pd.DataFrame,
                      settings: CanarySettings) -> CanaryCheck:
    def answered(rows: pd.DataFrame) -> pd.DataFrame:
        # Answers with an intent and a valid confidence: silence (no intent, confidence 0)
        # says nothing about the model, and malformed answers are error_rate's business.
        return rows[(rows["intent"].fillna("") != "") & ~_bad_answer(rows)]

    cr, pr = answered(canary), answered(production)
    estimate = estimate_performance(cr, reference=pr)
    # A route without a single answer with an intent estimates to 0 accuracy.
    c = estimate.expected_accuracy or 0.0
    p = estimate.reference_expected_accuracy or 0.0
    allowed = settings.metrics.max_confidence_drop
    alpha = settings.metrics.rate_alpha
    limit = p - allowed
    p_value: float | None = None
    passed = c >= limit - _EPS
    if not passed and len(cr) > 1 and len(pr) > 1:
        # One-sided z-test of "the drop is at most `allowed`", as for the rates: ~40
        # answers a route put ±3.5 pt of noise on a mean confidence.
        conf_c = pd.to_numeric(cr["confidence"], errors="coerce").to_numpy(float)
        conf_p = pd.to_numeric(pr["confidence"], errors="coerce").to_numpy(float)
        se = math.sqrt(conf_c.var(ddof=1) / len(conf_c) + conf_p.var(ddof=1) / len(conf_p))
        excess = p - c - allowed
        p_value = (0.5 * math.erfc(excess / se / math.sqrt(2.0)) if se > 0
                   else (0.0 if excess > _EPS else 1.0))
        passed = p_value >= alpha
    head = (f"mean calibrated confidence (estimated intent accuracy) {_fmt(c, 'rate')} vs "
            f"production {_fmt(p, 'rate')}: ")
    if p_value is None:
        why = "within the limit" if passed else "below the limit"
    elif passed:
        why = (f"below the limit but not significant over {len(cr)} canary answers "
               f"(p = {p_value:.3f} ≥ {alpha:g})")
    else:
        why = f"below the limit and significant (p = {p_value:.3f} < {alpha:g})"
    return CanaryCheck(
        name="confidence", canary=c, production=p, limit=limit, bound="min", unit="rate",
        passed=passed, p_value=p_value,
        detail=f"{head}{why}; limit ≥ {_fmt(limit, 'rate')} (−{100 * allowed:g} pt allowed)",
    )


def _checks(canary: pd.DataFrame, production: pd.DataFrame, feedback_ids: set[str],
            settings: CanarySettings) -> list[CanaryCheck]:
    m = settings.metrics

    def fed_back(rows: pd.DataFrame) -> pd.Series:
        return rows["request_id"].astype(str).isin(feedback_ids)

    return [
        _rate_check("error_rate", "malformed answers", _bad_answer(canary),
                    _bad_answer(production), m.max_error_rate_increase, m.rate_alpha),
        _latency_check(canary, production, settings),
        _rate_check("clarify_rate", "clarify rate", canary["clarify"].astype(bool),
                    production["clarify"].astype(bool), m.max_clarify_rate_increase,
                    m.rate_alpha),
        _intent_check(canary, production, settings),
        _rate_check("feedback_rate", "requests with feedback", fed_back(canary),
                    fed_back(production), m.max_feedback_rate_increase, m.rate_alpha),
        _confidence_check(canary, production, settings),
    ]


# --------------------------------------------------------------------------- analysis


def _select(requests: pd.DataFrame, route: str, version: str,
            since: pd.Timestamp) -> pd.DataFrame:
    versions = requests["model_version"].astype(str) == version
    if "registry_version" in requests.columns:
        versions |= requests["registry_version"].astype(str) == version
    chosen = requests[(requests["route"] == route) & versions & (requests["_ts"] >= since)]
    # A request logged twice (a retried batch) counts once.
    return chosen.drop_duplicates("request_id")


def analyse_step(
    frame: pd.DataFrame,
    step: int,
    share: float,
    canary_version: str,
    production_version: str,
    since: datetime,
    settings: CanarySettings,
    *,
    production_since: datetime | None = None,
) -> CanaryAnalysis:
    """Analyse one canary step on the traffic logged since it began.

    Args:
        frame: traffic rows, requests and feedback (``kind``), as
            :func:`~serving.traffic.read_batch_frame` returns them (e.g. from
            :func:`collect_traffic`); not modified.
        step: the step's number, 1 for the first of ``settings.steps``.
        share: the canary's traffic share during the step, percent in (0, 100].
        canary_version, production_version: the versions compared (a row's
            ``model_version`` or ``registry_version``).
        since: when the step began (naive = UTC): requests before it do not count.
        settings: ``promotion.canary`` of ``params.yaml``.
        production_since: when production's requests start to count (default ``since``);
            at a share of 100 % pass the previous step's start.

    Returns:
        The :class:`CanaryAnalysis`: inconclusive while either route has fewer than
        ``settings.step.min_samples`` requests, else passed when at most
        ``settings.failure_limit`` checks failed.

    Raises:
        ValueError: ``step`` outside ``1..len(settings.steps)``; ``share`` outside
            (0, 100]; an empty version or the same version on both sides; ``frame``
            lacks a column the analysis needs.
    """
    if not 1 <= step <= len(settings.steps):
        raise ValueError(f"step must lie in 1..{len(settings.steps)} (the canary steps "
                         f"{settings.steps}), got {step}")
    if not 0 < share <= 100:
        raise ValueError(f"share must lie in (0, 100] percent, got {share}")
    if not canary_version or not production_version:
        raise ValueError(f"versions must be non-empty, got canary {canary_version!r}, "
                         f"production {production_version!r}")
    if canary_version == production_version:
        raise ValueError(f"canary and production are the same version {canary_version!r}")
    missing = [c for c in _REQUIRED if c not in frame.columns]
    if missing:
        raise ValueError(f"traffic frame lacks columns {missing}")

    start = _utc(since)
    prod_start = _utc(production_since) if production_since is not None else start
    # Work on a copy with a UTC timestamp column of our own: the caller's frame is
    # never modified.
    rows = frame.assign(_ts=pd.to_datetime(frame["timestamp"], utc=True))
    kind = rows["kind"].fillna("request") if "kind" in rows.columns else None
    requests = rows if kind is None else rows[kind == "request"]
    feedback_ids = (set() if kind is None
                    else set(rows.loc[kind == "feedback", "request_id"].astype(str)))
    canary = _select(requests, "canary", canary_version, start)
    production = _select(requests, "production", production_version, prod_start)

    min_samples = settings.step.min_samples
    checks = (_checks(canary, production, feedback_ids, settings)
              if len(canary) and len(production) else [])
    failed = [c for c in checks if not c.passed]
    short = [f"{route}: {n} requests < {min_samples} needed"
             for route, n in (("canary", len(canary)), ("production", len(production)))
             if n < min_samples]
    inconclusive = bool(short)
    passed = not inconclusive and len(failed) <= settings.failure_limit
    if inconclusive:
        reasons = [f"inconclusive, too few requests ({'; '.join(short)})"]
        # What already looks wrong, for people watching; it decides nothing yet.
        reasons += [f"so far: {c.detail}" for c in failed]
    elif passed:
        reasons = [f"tolerated (failure limit {settings.failure_limit}): {c.detail}"
                   for c in failed]
    else:
        reasons = [c.detail for c in failed]
    return CanaryAnalysis(
        step=step, share=share, canary_version=canary_version,
        production_version=production_version, since=start.to_pydatetime(),
        production_since=prod_start.to_pydatetime(), n_canary=len(canary),
        n_production=len(production), min_samples=min_samples,
        failure_limit=settings.failure_limit, checks=checks, failed_checks=len(failed),
        passed=passed, inconclusive=inconclusive, reasons=reasons,
    )
