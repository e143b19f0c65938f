"""Prefect flow: promote the ``candidate`` — offline gate, then canary stages with
automatic rollback (thin orchestration over ``monitoring.gate``, ``monitoring.canary``
and the registry helper's journalled alias moves).

1. **Offline gate**: candidate vs production on the fixed golden set (the base corpus'
   test split, and its held-out-voice twin) and on recent labelled traffic: per metric,
   per slice, an absolute floor and the negative-flip rate. The verdict is written as
   version tags and an MLflow artifact; a failed gate rejects the candidate (it never
   serves).
2. **Canary stages** (``promotion.canary.steps``): the canary alias and share are set
   in the registry (the service follows within a poll); each step waits for
   ``min_samples`` answers per route, then analyses canary against production traffic;
   the analysis is tagged on the version. A failed step — or a step that never gathers
   enough traffic — rolls back at once: share 0, ``canary`` removed, the version tagged
   with the reason, production untouched all along.
3. **Promotion**: ``production`` moves to the candidate, the old one becomes
   ``previous``. Exactly one ``production`` exists at every moment (the journal finishes
   an interrupted move on the next run).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.common import flow_settings
from model.data.corpus import CorpusLayout
from model.data.manifest import ManifestRow, read_manifest
from model.evaluation.compare import folder_bytes
from model.frontend.audio import load_audio
from model.inference.batch import BatchPredictor
from model.inference.onnx import load_predictor
from monitoring.alerts import AlertStore
from monitoring.canary import CanaryAnalysis, analyse_step, collect_traffic
from monitoring.gate import GateInputs, GateResult, GateSet, ModelCost, evaluate_gate
from monitoring.ingest import curated_root
from serving.annotations import AnnotationStore, labelled_rows
from voiceloop.registry import Registry, VersionRef
from voiceloop.settings import Settings

__all__ = ["PromotionOutcome", "gate_candidate", "promote_flow", "run_canary"]


@dataclass
class PromotionOutcome:
    """How the promotion went."""

    version: str
    status: str  # promoted | rejected | rolled_back | nothing
    reason: str
    production: str


def _golden_rows(settings: Settings, limit: int) -> list[ManifestRow]:
    layout = CorpusLayout(settings.workspace / "corpus" / settings.retrain.base_profile)
    rows: list[ManifestRow] = []
    for split in ("test", "test_heldout"):
        if layout.manifest(split).exists():
            rows += [r.model_copy(update={"audio": str(r.audio_path(layout.manifests_dir))})
                     for r in read_manifest(layout.manifest(split))]
    if not rows:
        raise FileNotFoundError(f"no golden set: build the base corpus ({layout.root})")
    if len(rows) > limit:  # a fixed subset: the same seed every time
        keep = np.random.default_rng(0).choice(len(rows), limit, replace=False)
        rows = [rows[i] for i in sorted(keep)]
    return rows


def _labelled_traffic(settings: Settings, limit: int) -> list[ManifestRow]:
    """The most recent curated traffic samples that annotators labelled, their audio
    copied out of the traffic store (:attr:`Settings.traffic_audio_cache`)."""
    import pyarrow.parquet as pq

    files = sorted((curated_root(settings) / "traffic").rglob("*.parquet"), key=lambda p: p.stem,
                   reverse=True)
    store = AnnotationStore(settings.annotations_root)
    wanted = ("request_id", "audio", "audio_offset", "audio_bytes", "duration_s")
    rows: list[ManifestRow] = []
    for path in files:
        present = set(pq.read_schema(path).names)  # older files lack the shard columns
        frame = pq.read_table(path, columns=[c for c in wanted if c in present]).to_pandas()
        rows += labelled_rows(settings.traffic_root, frame,
                              store.read(frame["request_id"].tolist()),
                              settings.traffic_audio_cache)
        if len(rows) >= limit:
            break
    return rows[:limit]


def _predict(predictor: BatchPredictor, rows: list[ManifestRow]) -> list:
    return predictor.predict_files([r.id for r in rows], [Path(r.audio) for r in rows])


def _p50_ms(predictor: BatchPredictor, rows: list[ManifestRow], n: int = 30) -> float:
    rate = predictor.feature_config.sample_rate
    clips = [load_audio(Path(r.audio), rate) for r in rows[:n]]
    times = []
    for clip in clips:
        start = time.perf_counter()
        predictor.predict_waveforms(["x"], [clip], [rate])
        times.append((time.perf_counter() - start) * 1000)
    return float(np.percentile(times[3:] or times, 50))


def _bundle_bytes(folder: Path) -> int:
    return folder_bytes(folder, (".onnx",))


@task(name="offline-gate")
def gate_candidate(settings: Settings, registry: Registry, candidate: VersionRef,
                   production: VersionRef | None) -> GateResult:
    """Score candidate and production on the golden set and labelled traffic; the gate."""
    cand_dir = registry.model_folder(candidate)
    cand = load_predictor(cand_dir, batch_size=settings.decode.batch_size, threads=1)
    prod_dir = registry.model_folder(production) if production else None
    prod = (load_predictor(prod_dir, batch_size=settings.decode.batch_size, threads=1)
            if prod_dir is not None else None)
    sets = []
    for name, rows in (("golden", _golden_rows(settings, 800)),
                       ("traffic", _labelled_traffic(settings, 400))):
        if not rows:
            continue
        sets.append(GateSet.from_predictions(name, rows, _predict(cand, rows),
                                             _predict(prod, rows) if prod else None))
    golden = sets[0].rows
    cost = ModelCost(_p50_ms(cand, golden), _bundle_bytes(cand_dir))
    prod_cost = ModelCost(_p50_ms(prod, golden), _bundle_bytes(prod_dir)) if prod and prod_dir else None
    return evaluate_gate(GateInputs(sets, cost, prod_cost, candidate.version,
                                    production.version if production else ""),
                         settings.promotion.gate)


def run_canary(settings: Settings, registry: Registry, candidate: VersionRef,
               production: VersionRef, logger: Any) -> tuple[bool, str, list[CanaryAnalysis]]:
    """The canary stages; returns (passed, reason, analyses). Rolls back on failure."""
    c = settings.promotion.canary
    analyses: list[CanaryAnalysis] = []
    previous_start: datetime | None = None
    for number, share in enumerate(c.steps, start=1):
        start = datetime.now(UTC)
        registry.start_canary(candidate.version, share)
        logger.info("canary step %d: %g %% of traffic to version %s", number, share,
                    candidate.version)
        deadline = time.monotonic() + c.step.max_wait_s
        while True:
            time.sleep(c.step.interval_s)
            frame = collect_traffic(settings.traffic_root, previous_start or start)
            analysis = analyse_step(frame, number, share, candidate.version, production.version,
                                    start, c, production_since=previous_start if share >= 100 else None)
            if not analysis.inconclusive or time.monotonic() > deadline:
                break
            logger.info("canary step %d: %d canary / %d production answers so far", number,
                        analysis.n_canary, analysis.n_production)
        key, value = analysis.to_tag()
        registry.tag_version(candidate.version, {key: value})
        analyses.append(analysis)
        if not analysis.passed:
            reason = (f"canary step {number} ({share:g} %): "
                      + ("; ".join(analysis.reasons) if not analysis.inconclusive
                         else f"too few answers after {c.step.max_wait_s:g} s "
                              f"({analysis.n_canary} canary, {analysis.n_production} production)"))
            registry.rollback(reason)
            return False, reason, analyses
        previous_start = start
    return True, f"canary passed {len(c.steps)} steps ({', '.join(f'{s:g} %' for s in c.steps)})", analyses


@flow(name="voiceloop-promote", log_prints=True)
def promote_flow(profile: str | None = None, workspace: str | None = None,
                 params: str | None = None, version: str | None = None) -> dict[str, Any]:
    """Gate, canary and promote (or roll back) the ``candidate`` (or ``version``)."""
    logger = get_run_logger()
    settings = flow_settings(profile, workspace, params)
    registry = Registry(settings)
    if registry.recover():
        logger.warning("finished an interrupted registry change first")
    candidate = (VersionRef(registry.name, version, None, "") if version
                 else registry.alias("candidate"))
    production = registry.alias("production")
    if candidate is None:
        logger.info("no candidate to promote")
        return {"status": "nothing"}
    gate = gate_candidate(settings, registry, candidate, production)
    registry.tag_version(candidate.version, gate.to_tags())
    _log_to_candidate_run(settings, registry, candidate, "gate.md", gate.to_markdown())
    create_markdown_artifact(gate.to_markdown(), key="voiceloop-gate",
                             description=f"Offline gate of version {candidate.version}")
    if not gate.passed:
        reason = "offline gate: " + "; ".join(gate.failed)
        registry.reject(candidate.version, reason[:5000])
        outcome = PromotionOutcome(candidate.version, "rejected", reason,
                                   production.version if production else "")
    elif production is None:
        registry.promote(candidate.version, "first model: gate floors met")
        outcome = PromotionOutcome(candidate.version, "promoted", "first model", candidate.version)
    else:
        passed, reason, analyses = run_canary(settings, registry, candidate, production, logger)
        _log_to_candidate_run(settings, registry, candidate, "canary.md",
                              "\n\n".join(a.to_markdown() for a in analyses))
        if passed:
            registry.promote(candidate.version, reason)
            AlertStore.for_workspace(settings.workspace, settings.monitoring.alerts).supersede(
                candidate.version)
            outcome = PromotionOutcome(candidate.version, "promoted", reason, candidate.version)
        else:
            outcome = PromotionOutcome(candidate.version, "rolled_back", reason, production.version)
    create_markdown_artifact(
        f"# Version {outcome.version}: {outcome.status}\n\n{outcome.reason}\n\n"
        f"Production is version {outcome.production}.\n",
        key="voiceloop-promotion", description="Promotion outcome")
    logger.info("version %s %s: %s", outcome.version, outcome.status, outcome.reason)
    return {"status": outcome.status, "version": outcome.version, "reason": outcome.reason,
            "production": outcome.production, "gate": gate.summary}


def _log_to_candidate_run(settings: Settings, registry: Registry, candidate: VersionRef,
                          name: str, text: str) -> None:
    run_id = registry.client.get_model_version(registry.name, candidate.version).run_id
    if run_id:
        registry.client.log_text(run_id, text, f"promotion/{name}")
