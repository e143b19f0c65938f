"""Loop efficacy: one retraining cycle per drift scenario, measured (issue 11's targets).

For each drift scenario, in a scratch workspace of its own:

1. **Production** is the released model (``release/``), seeded into a fresh MLflow
   registry exactly as ``make demo`` seeds it (:func:`voiceloop.stages.seed_production`),
   its drift reference built on the base corpus' ``valid`` split.
2. **Drifted traffic**: ``--pool`` utterances of the scenario (:mod:`serving.scenarios`:
   TTS + augmentation) answered by production (the service's predictor and LM decoding,
   batched), written through the real :class:`serving.traffic.TrafficWriter`, their
   ground truth into the :class:`serving.annotations.AnnotationStore` (the annotators
   the labelling step asks), and ingested by :func:`monitoring.ingest.ingest` (GX suite,
   quarantine, embeddings). No HTTP hop and no Prefect: those are tested elsewhere and
   change nothing measured here.
3. **One cycle**: :func:`voiceloop.retrain.plan_retraining` (active learning within the
   labelling budget, teacher pseudo-labels, replay, manifest suite) and
   :func:`voiceloop.retrain.train_candidate` (warm-start teacher fine-tune, student
   distillation with QAT, int8 export) — the retraining flow's own functions.
4. **Scores**, production and candidate on the same utterances (paired): a held-out
   draw of the drifted scenario (``--eval``, another seed: none of it was in the pool),
   a baseline draw (``--eval``, the pre-drift figure the drifted one is compared with)
   and the gate's golden set (the base corpus' test + held-out-voice test splits, the
   subset the promotion flow uses). Intent accuracy, slot F1, WER, SemER and the
   negative-flip rate (:func:`monitoring.gate.flip_counts`: utterances production got
   exactly right that the candidate gets wrong).

Targets (issue 11, ``full`` profile): drifted-traffic intent and slot F1 within 2 points
of pre-drift after the cycle, golden-set regression ≤ 0.5 points, negative flips ≤ 1 %,
≤ 5 % of the drifted traffic labelled.

Costs: rendering (~0.1 s per utterance and core) and the two fine-tunes (the retrain
section of ``params.yaml``: minutes each) dominate; rendered audio is cached under
``<bench workspace>/cache`` between runs.

    uv run python benchmarks/loop_efficacy.py [--scenarios accent_shift noise_shift]
        [--profile full] [--pool 600] [--eval 300]

Prints a table and writes ``benchmarks/results/loop_efficacy.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import soundfile as sf

from flows.promote import _golden_rows
from model.data.manifest import ManifestRow, read_manifest, write_manifest
from model.evaluation.report import EvaluationReport, evaluate
from model.inference.onnx import BatchPredictor, load_predictor
from monitoring.drift import ReferenceStore
from monitoring.gate import flip_counts
from monitoring.ingest import ingest
from monitoring.reference import build_reference
from serving.annotations import AnnotationStore
from serving.contracts import Annotation, TrafficRecord
from serving.scenarios import render_successes
from serving.traffic import TrafficWriter
from voiceloop.settings import Settings, TrafficSettings, load_settings

log = logging.getLogger("loop_efficacy")

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ("accent_shift", "noise_shift", "domain_shift", "new_values")
TARGETS = {"drift_gap_pt": 2.0, "golden_regression_pt": 0.5, "negative_flip_rate": 0.01,
           "labelled_share": 0.05}
# Seeds: pool, held-out drifted draw and baseline draw never share an utterance.
_SEEDS = {"pool": 1101, "eval": 2202, "baseline": 3303}


@dataclass
class Pool:
    """Rendered utterances with ground truth, written as WAV files and manifest rows."""

    name: str
    rows: list[ManifestRow]


def render(settings: Settings, scenario: str, count: int, seed: int, folder: Path,
           workers: int) -> Pool:
    """``count`` utterances of ``scenario`` (render failures left out), as WAVs under
    ``folder`` and manifest rows (split ``test``) pointing at them; cached: a folder that
    already holds the manifest is read back."""
    manifest = folder / "rows.jsonl"
    if not manifest.exists():
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        items, _ = render_successes(settings, scenario, count=count, seed=seed,
                                    cache_dir=folder.parent, workers=workers, log_every=100)
        rows = []
        for u in items:
            path = folder / f"{u.id}.wav"
            sf.write(path, u.audio, u.sample_rate, subtype="PCM_16")
            rows.append(ManifestRow(
                id=u.id, audio=str(path), duration_s=len(u.audio) / u.sample_rate,
                transcript=u.transcript, intent=u.intent, slots=list(u.slots), engine=u.engine,
                voice=u.voice, split="test", template_id=u.template_id, domain=u.domain))
        write_manifest(manifest, rows)
        log.info("rendered %d %s utterances in %.0f s", len(rows), scenario,
                 time.perf_counter() - t0)
    rows = read_manifest(manifest)
    return Pool(scenario, rows)


def scores(report: EvaluationReport) -> dict[str, float]:
    """The four headline metrics, as fractions."""
    m = report.overall
    return {"intent": m.intent_accuracy, "slot_f1": m.slot_f1, "wer": m.wer, "semer": m.semer,
            "exact": m.exact_match, "n": m.n}


def paired(rows: list[ManifestRow], prod: BatchPredictor, cand: BatchPredictor | None
           ) -> dict[str, Any]:
    """Production's (and the candidate's) scores on ``rows``, and the flips between them."""
    ids, paths = [r.id for r in rows], [Path(r.audio) for r in rows]
    p = prod.predict_files(ids, paths)
    out: dict[str, Any] = {"n": len(rows), "production": scores(evaluate(rows, p))}
    if cand is not None:
        c = cand.predict_files(ids, paths)
        out["candidate"] = scores(evaluate(rows, c))
        flips = flip_counts(rows, p, c)
        out["negative_flip_rate"] = flips.negative_rate
        out["positive_flip_rate"] = flips.positive_rate
    return out


def serve_pool(settings: Settings, pool: Pool, prod: BatchPredictor, batch: int = 16) -> int:
    """Production answers the pool; answers + audio through the real traffic writer, the
    ground truth into the annotation store, keyed by request id. Returns records written."""
    start = datetime.now(UTC) - timedelta(seconds=len(pool.rows) + 60)
    cfg = TrafficSettings(batch_max_records=settings.serving.traffic.batch_max_records,
                          batch_max_seconds=60.0, queue_max=len(pool.rows) + 1)
    annotations = AnnotationStore(settings.annotations_root, "loop-efficacy",
                                  traffic_root=settings.traffic_root)
    with TrafficWriter(settings.traffic_root, cfg) as writer:
        for lo in range(0, len(pool.rows), batch):
            part = pool.rows[lo:lo + batch]
            t0 = time.perf_counter()
            preds = prod.predict_files([r.id for r in part], [Path(r.audio) for r in part])
            per = 1000.0 * (time.perf_counter() - t0) / len(part)
            labels = []
            for k, (row, p) in enumerate(zip(part, preds, strict=True)):
                wave, rate = sf.read(row.audio, dtype="float32")
                rid = f"req-{row.id}"
                record = TrafficRecord(
                    request_id=rid, timestamp=start + timedelta(seconds=lo + k), device_id=None,
                    route="production", model_version=prod.version, transcript=p.transcript,
                    intent=p.intent, slots=list(p.slots), confidence=p.confidence,
                    clarify=p.clarify, latency_ms=per, duration_s=len(wave) / rate,
                    sample_rate=rate, audio_format="wav")
                if not writer.submit(record, wave, rate):
                    raise RuntimeError(f"the traffic writer refused {rid}")
                labels.append(Annotation(request_id=rid, transcript=row.transcript,
                                         intent=row.intent, slots=row.slots, domain=row.domain,
                                         scenario=pool.name, engine=row.engine, voice=row.voice))
            annotations.write(labels)
        if not writer.flush(600):
            raise RuntimeError("the traffic writer did not commit within 600 s")
    return len(pool.rows)


def cycle(base: Settings, scenario: str, args: argparse.Namespace, bench: Path,
          shared: dict[str, Any]) -> dict[str, Any]:
    """One scenario's cycle in a fresh workspace; returns its figures."""
    from voiceloop.registry import Registry
    from voiceloop.retrain import plan_retraining, production_lineage, train_candidate
    from voiceloop.stages import seed_production

    ws = bench / "runs" / scenario
    profile = base.retrain.base_profile
    settings = base.model_copy(update={
        "workspace": ws,
        "serving": base.serving.model_copy(update={
            "traffic": base.serving.traffic.model_copy(update={"root": None})}),
        "monitoring": base.monitoring.model_copy(update={
            "ingest": base.monitoring.ingest.model_copy(update={"dvc": False})})})
    times: dict[str, float] = {}
    cache = bench / "cache" / base.profile
    finished = sorted((ws / "retrain").glob("*/metrics.json")) if args.resume else []
    if finished:  # --resume: the cycle trained already; score it again
        from voiceloop.retrain import RetrainSpec

        run_dir = finished[-1].parent
        spec = RetrainSpec.load(run_dir)
        metrics = json.loads(finished[-1].read_text(encoding="utf-8"))
        log.info("[%s] resuming the trained cycle %s", scenario, run_dir)
        held = render(settings, scenario, args.eval, _SEEDS["eval"], cache / f"{scenario}-eval",
                      args.render_workers)
        return _scores(scenario, spec, metrics, run_dir / "student" / "deploy", held, shared,
                       args, times | {"teacher_s": metrics["teacher_minutes"] * 60,
                                      "student_s": metrics["student_minutes"] * 60},
                       version=spec.parent_version, quarantined=None)
    shutil.rmtree(ws, ignore_errors=True)
    (ws / "corpus").mkdir(parents=True)
    (ws / "corpus" / profile).symlink_to(shared["base_corpus"], target_is_directory=True)

    t0 = time.perf_counter()
    version = seed_production(settings)
    _, _, student_dir = production_lineage(settings, Registry(settings))
    prod = shared["prod"]
    ReferenceStore.for_workspace(ws).save(
        shared["reference"], prod.version, source_split=settings.monitoring.reference_split)
    times["seed_registry_s"] = time.perf_counter() - t0
    log.info("[%s] production = registry version %s (%s)", scenario, version, student_dir)

    t0 = time.perf_counter()
    pool = render(settings, scenario, args.pool, _SEEDS["pool"], cache / f"{scenario}-pool",
                  args.render_workers)
    held = render(settings, scenario, args.eval, _SEEDS["eval"], cache / f"{scenario}-eval",
                  args.render_workers)
    times["render_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    serve_pool(settings, pool, prod)
    times["serve_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = ingest(settings, shared["embedder"], progress=False)
    times["ingest_s"] = time.perf_counter() - t0
    log.info("[%s] %d requests served and ingested: %d accepted, %d quarantined", scenario,
             len(pool.rows), report.accepted, report.quarantined)

    t0 = time.perf_counter()
    spec = plan_retraining(settings, progress=False)
    times["select_and_label_s"] = time.perf_counter() - t0
    if spec is None:
        raise RuntimeError(f"{scenario}: the retraining found too few new samples")
    log.info("[%s] retraining %s: %d labelled of budget %d, %d pseudo, %d replay", scenario,
             spec.run_id, spec.labelled, spec.budget, spec.pseudo, spec.replay)
    t0 = time.perf_counter()
    outputs = train_candidate(settings, Path(spec.run_dir), progress=False)
    times["train_s"] = time.perf_counter() - t0
    times["teacher_s"] = outputs.metrics["teacher_minutes"] * 60
    times["student_s"] = outputs.metrics["student_minutes"] * 60

    return _scores(scenario, spec, outputs.metrics, outputs.bundle, held, shared, args, times,
                   version=version, quarantined=report.quarantined)


def _scores(scenario: str, spec: Any, metrics: dict[str, float], bundle: Path, held: Pool,
            shared: dict[str, Any], args: argparse.Namespace, times: dict[str, float], *,
            version: str | None, quarantined: int | None) -> dict[str, Any]:
    """Production and the candidate bundle on the three sets; the cycle's figures."""
    prod = shared["prod"]
    t0 = time.perf_counter()
    cand = load_predictor(bundle, batch_size=16, threads=args.threads)
    sets = {"drifted": paired(held.rows, prod, cand),
            "baseline": paired(shared["baseline"].rows, prod, cand),
            "golden": paired(shared["golden"], prod, cand)}
    times["evaluate_s"] = time.perf_counter() - t0
    labelled_share = spec.labelled / max(1, spec.pool)
    return {"scenario": scenario, "registry_version": version, "retrain_run": spec.run_id,
            "pool": spec.pool, "quarantined": quarantined,
            "labels": {"used": spec.labelled, "requested": spec.requested,
                       "budget": spec.budget, "share_of_pool": labelled_share},
            "pseudo_labels": spec.pseudo, "replay": spec.replay, "sets": sets,
            "seconds": {k: round(v, 1) for k, v in times.items()},
            "resumed": not any(k == "serve_s" for k in times),
            "candidate_valid": metrics}


def verdicts(run: dict[str, Any]) -> dict[str, Any]:
    """Each target's measured value and whether it is met."""
    s = run["sets"]
    pre = s["baseline"]["production"]
    after = s["drifted"]["candidate"]
    golden = s["golden"]
    gap_intent = 100 * (pre["intent"] - after["intent"])
    gap_slot = 100 * (pre["slot_f1"] - after["slot_f1"])
    reg = {m: 100 * (golden["production"][m] - golden["candidate"][m])
           for m in ("intent", "slot_f1")}
    reg |= {m: 100 * (golden["candidate"][m] - golden["production"][m]) for m in ("wer", "semer")}
    return {
        "drifted_intent_gap_pt": {"value": gap_intent, "met": gap_intent <= TARGETS["drift_gap_pt"]},
        "drifted_slot_f1_gap_pt": {"value": gap_slot, "met": gap_slot <= TARGETS["drift_gap_pt"]},
        "golden_worst_regression_pt": {
            "value": max(reg.values()), "by_metric": reg,
            "met": max(reg.values()) <= TARGETS["golden_regression_pt"]},
        "golden_negative_flip_rate": {
            "value": golden["negative_flip_rate"],
            "met": golden["negative_flip_rate"] <= TARGETS["negative_flip_rate"]},
        "labelled_share": {"value": run["labels"]["share_of_pool"],
                           "met": run["labels"]["share_of_pool"] <= TARGETS["labelled_share"]},
    }


def _pct(x: float) -> str:
    return f"{100 * x:5.1f}"


def table(result: dict[str, Any]) -> str:
    lines = [f"loop efficacy — profile {result['profile']}, production {result['model']}",
             f"{'scenario':<13} {'set':<9} {'metric':<8} {'prod %':>7} {'cand %':>7} {'Δ pt':>6}"]
    for run in result["runs"]:
        for name in ("baseline", "drifted", "golden"):
            st = run["sets"][name]
            for m in ("intent", "slot_f1", "wer", "semer"):
                p, c = st["production"][m], st["candidate"][m]
                lines.append(f"{run['scenario']:<13} {name:<9} {m:<8} {_pct(p):>7} {_pct(c):>7} "
                             f"{100 * (c - p):+6.1f}")
            lines.append(f"{run['scenario']:<13} {name:<9} {'neg flip':<8} "
                         f"{'':>7} {_pct(st['negative_flip_rate']):>7}")
        lab = run["labels"]
        lines.append(f"{run['scenario']:<13} labels {lab['used']}/{lab['budget']} budget of "
                     f"{run['pool']} pooled ({100 * lab['share_of_pool']:.1f} %), "
                     f"{run['pseudo_labels']} pseudo, {run['replay']} replay")
        lines.append(f"{run['scenario']:<13} seconds " + ", ".join(
            f"{k[:-2]} {v:.0f}" for k, v in run["seconds"].items()))
        for name, v in run["verdicts"].items():
            lines.append(f"{run['scenario']:<13} target {name}: {v['value']:.3g} "
                         f"{'met' if v['met'] else 'NOT met'}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Writes a table to stdout and JSON to --out.")
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS,
                   help="drift scenarios, one cycle each (default: all four)")
    p.add_argument("--profile", default="full",
                   help="settings profile: its retrain section is the recipe (default full)")
    p.add_argument("--pool", type=int, default=600,
                   help="drifted requests served before the retraining (default 600)")
    p.add_argument("--eval", type=int, default=300,
                   help="utterances of each held-out draw: drifted and baseline (default 300)")
    p.add_argument("--golden", type=int, default=800,
                   help="golden-set utterances, the promotion gate's subset (default 800)")
    p.add_argument("--render-workers", type=int, default=2, help="TTS processes (default 2)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (default 1)")
    p.add_argument("--base-corpus", type=Path, default=None,
                   help="an already built corpus of retrain.base_profile (its folder, holding "
                        "manifests/) instead of building one (minutes)")
    p.add_argument("--workspace", type=Path, default=None,
                   help="bench folder (default <workspace>/benchmarks/loop_efficacy)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "loop_efficacy.json")
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. the recipe)")
    p.add_argument("--resume", action="store_true",
                   help="score a scenario whose cycle already trained (its workspace under "
                        "runs/) instead of running it again; its stage times other than "
                        "training are then not measured")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    for name in ("pool", "eval", "golden", "render_workers", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    # force: an imported library (Prefect) may have configured the root logger already
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        force=True)
    for noisy in ("evidently", "dvc", "great_expectations", "monitoring.ingest", "httpx",
                  "mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from voiceloop.release import released_models
    from voiceloop.stages import corpus_stage

    released = released_models()
    if released is None:
        raise FileNotFoundError("no released model (release/): the cycle starts from it")
    settings = load_settings(profile=args.profile)
    bench = (args.workspace or settings.workspace / "benchmarks" / "loop_efficacy").resolve()
    bench.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    # The base corpus (replay data + golden set), built once and shared by every cycle.
    base = settings.model_copy(update={"profile": settings.retrain.base_profile,
                                       "workspace": bench / "shared"})
    t0 = time.perf_counter()
    if args.base_corpus is not None:
        if not (args.base_corpus / "manifests" / "train.jsonl").is_file():
            raise FileNotFoundError(f"--base-corpus {args.base_corpus}: no manifests/train.jsonl")
        base.corpus_dir.parent.mkdir(parents=True, exist_ok=True)
        if not base.corpus_dir.exists():
            base.corpus_dir.symlink_to(args.base_corpus.resolve(), target_is_directory=True)
    else:
        corpus_stage(base, progress=True)
    corpus_s = time.perf_counter() - t0
    prod = load_predictor(released["bundle"], batch_size=16, threads=args.threads)
    embedder = load_predictor(released["bundle"], batch_size=settings.monitoring.ingest.embed_batch_size,
                              threads=args.threads, use_lm=False)
    t0 = time.perf_counter()
    reference = build_reference(base, prod, settings.monitoring.reference_split,
                                settings.monitoring.reference_rows)
    reference_s = time.perf_counter() - t0
    baseline = render(settings, "baseline", args.eval, _SEEDS["baseline"],
                      bench / "cache" / settings.profile / "baseline-eval", args.render_workers)
    golden = _golden_rows(base, args.golden)
    shared = {"base_corpus": base.corpus_dir, "prod": prod, "embedder": embedder,
              "reference": reference, "baseline": baseline, "golden": golden}
    runs = []
    for scenario in args.scenarios:
        log.info("=== %s: one cycle", scenario)
        run = cycle(settings, scenario, args, bench, shared)
        run["verdicts"] = verdicts(run)
        runs.append(run)
        log.info("[%s] done: %s", scenario, {k: round(v["value"], 4) for k, v in run["verdicts"].items()})

    result = {
        "benchmark": "loop_efficacy", "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "profile": args.profile, "model": str(released["bundle"].relative_to(ROOT)),
        "production_version": prod.version, "note": args.note,
        "retrain": settings.retrain.model_dump(),
        "sizes": {"pool": args.pool, "eval": args.eval, "golden": len(golden)},
        "targets": TARGETS, "runs": runs,
        "shared_seconds": {"base_corpus": round(corpus_s, 1), "reference": round(reference_s, 1)},
        "wall_s": round(time.perf_counter() - started, 1),
        "machine": {"platform": platform.platform(), "cores": os.cpu_count(),
                    "loadavg_end": os.getloadavg()},
    }
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=float), encoding="utf-8")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
