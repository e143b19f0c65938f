"""The whole loop on the tiny profile, for real: a tiny teacher and student trained on a
tiny corpus are the seed production model; the real service answers simulated users;
the Prefect flows ingest the traffic, retrain from it (teacher fine-tune + student
distillation with QAT, warm-started from production), and promote the candidate
through the offline gate and two canary steps on live traffic; a candidate that fails
the gate is rejected. The registry holds exactly one ``production`` throughout.

Accuracy means nothing at this size: the loop's efficacy is measured by
``benchmarks/loop_efficacy.py`` on the full profile.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from flows.ingest import ingest_flow
from flows.monitor import monitor_flow
from flows.promote import promote_flow
from flows.retrain import retrain_flow
from model.data.corpus import CorpusLayout
from model.data.manifest import read_manifest
from model.decoding.beam import read_lm_sentences
from model.nn.package import LM_SENTENCES
from model.training.fit import capped_threads
from model.training.lm_stage import LM_INHERITED_TEXT, LM_TEXT_MANIFEST
from serving.app import create_app
from serving.service import build_app, build_state
from serving.simulator import simulate
from tests.support import running_server
from voiceloop.registry import Registry
from voiceloop.settings import Settings, repo_root
from voiceloop.stages import distill_stage, seed_production

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def loop(tiny_workspace: Callable[[str], Settings], prefect_harness: None
         ) -> tuple[Settings, Path]:
    """Tiny corpus, teacher and student; the student seeded as production with its lineage."""
    torch.set_num_threads(capped_threads(2))
    settings = tiny_workspace("loop")
    ws = settings.workspace
    distill_stage(settings, progress=False, track=False)
    models = settings.models_dir
    version = seed_production(settings, models / "student" / "deploy")
    registry = Registry(settings)
    registry.tag_version(version, {"teacher": str(models / "teacher" / "model"),
                                   "student_package": str(models / "student" / "model")})
    serving = settings.serving.model_copy(update={"poll_seconds": 0.5, "workers": 2})
    return settings.model_copy(update={"serving": serving}), ws


def _params_with(ws: Path, overrides: dict) -> str:
    """A params.yaml for the flows with tiny-profile overrides (e.g. a stricter gate)."""
    params = yaml.safe_load((repo_root() / "params.yaml").read_text())
    tiny = params["profiles"]["tiny"]
    for key, value in overrides.items():
        tiny.setdefault(key, {}).update(value)
    path = ws / "params-strict.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return str(path)


def test_traffic_to_retrained_candidate_to_promotion(loop: tuple[Settings, Path]) -> None:
    settings, ws = loop
    registry = Registry(settings)
    seed = registry.alias("production")
    assert seed is not None
    state = build_state(settings)
    with running_server(create_app(state)) as url:
        first = simulate(url, "baseline", settings=settings, requests=24, rate=0, concurrency=2,
                         progress=False)
        assert first.answered == 24 and first.routes == {"production": 24}
        # Ingestion reads committed batches only: commit what the writer still holds (on
        # a busy machine its size/age triggers had not fired for the last 8 requests).
        assert state.traffic is not None and state.traffic.flush(30)
        report = ingest_flow("tiny", str(ws))
        assert report["accepted"] + report["quarantined"] == report["requests"] == 24
        # the monitor stores the model's reference; the retraining's novelty selection
        # reads it (a stored reference once reached the selection as a tuple)
        check = monitor_flow("tiny", str(ws))
        assert "drifted" in check
        out = retrain_flow("tiny", str(ws), reason="test")
        assert out["status"] == "registered", out
        candidate = out["version"]
        assert registry.alias("candidate").version == candidate
        tags = registry.version_tags(candidate)
        assert tags["parent_version"] == seed.version and tags["teacher"].startswith("runs:/")
        run = registry.client.get_run(registry.client.get_model_version(
            registry.name, candidate).run_id)
        for key in ("git_commit", "traffic_batches", "labels_used", "label_budget",
                    "parent_version", "manifest_sha"):
            assert key in run.data.tags, key
        assert int(run.data.tags["labels_used"]) <= int(run.data.tags["label_budget"])
        # The candidate's LM keeps its parent's whole LM text (the production teacher's
        # lm/sentences.txt.gz), not only the replayed sample's: an LM of the sample lost
        # words (WER rose), an LM of a smaller base corpus than the parent's lost slot F1.
        retrain_run = tags["retrain_run"]
        parent_file = settings.models_dir / "teacher" / "model" / "lm" / LM_SENTENCES
        manifests = CorpusLayout(ws / "corpus" / f"retrain-{retrain_run}").manifests_dir
        assert (manifests / LM_INHERITED_TEXT).read_bytes() == parent_file.read_bytes()
        assert not (manifests / f"{LM_TEXT_MANIFEST}.jsonl").exists()
        parent = read_lm_sentences(parent_file)
        child = read_lm_sentences(ws / "retrain" / retrain_run / "student" / "deploy" / "lm"
                                  / LM_SENTENCES)
        assert parent and child[:len(parent)] == parent
        assert not set(child[len(parent):]) & set(parent)  # nothing the parent knew, twice
        base = read_manifest(CorpusLayout(ws / "corpus" / settings.retrain.base_profile)
                             .manifest("train"))
        lexicon = ws / "retrain" / retrain_run / "student" / "deploy" / "lm" / "lexicon.txt"
        words = {line.split("\t")[0] for line in lexicon.read_text().splitlines() if line}
        missing = {w for r in base for w in r.transcript.split()} - words
        assert not missing, sorted(missing)

        stop = threading.Event()

        def users() -> None:
            while not stop.is_set():
                simulate(url, "baseline", settings=settings, requests=10, rate=0, concurrency=2,
                         progress=False)

        talker = threading.Thread(target=users)
        talker.start()
        try:
            result = promote_flow("tiny", str(ws))
        finally:
            stop.set()
            talker.join()
    assert result["status"] == "promoted", result
    assert registry.aliases() == {"production": candidate, "previous": seed.version}
    tags = registry.version_tags(candidate)
    assert tags["gate.result"] == "pass" and tags["rollout.status"] == "promoted"
    assert '"verdict":"pass"' in tags["canary.step1"] and "canary.step2" in tags
    # The new production version was adapted by a retraining: it is judged against its
    # own first live rows (monitoring.adapted_reference), and none is ingested yet.
    check = monitor_flow("tiny", str(ws))
    assert check["warming_up"] and check["live_rows"] == 0 and not check["drifted"], check


def test_a_candidate_failing_the_gate_is_rejected_and_never_serves(
    loop: tuple[Settings, Path],
) -> None:
    settings, ws = loop
    registry = Registry(settings)
    production = registry.alias("production")
    with running_server(build_app(settings)) as url:
        simulate(url, "baseline", settings=settings, requests=16, rate=0, concurrency=2,
                 progress=False)
    ingest_flow("tiny", str(ws))
    bad = retrain_flow("tiny", str(ws), corrupt_labels=True, reason="test: bad")
    assert bad["status"] == "registered"
    # An absolute floor no tiny model meets: the gate must reject the candidate.
    strict = _params_with(ws, {"promotion": {"gate": {"floor": {"min_intent_accuracy": 0.99,
                                                                "max_semer": 0.01}}}})
    result = promote_flow("tiny", str(ws), strict)
    assert result["status"] == "rejected" and "floor" in result["reason"]
    assert registry.alias("production") == production and registry.alias("canary") is None
    assert registry.version_tags(bad["version"])["rollout.status"] == "rejected"
    assert sum(1 for a in registry.aliases() if a == "production") == 1
