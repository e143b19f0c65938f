"""Ingestion end to end on tiny real traffic: the real ``TrafficWriter``, a tiny real model
exported to ONNX, Great Expectations, Parquet and DVC; no mocks (a crash and a flaky
read are simulated by making one call raise once)."""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from dvc.repo import Repo

import monitoring.ingest as ingest_mod
from model.data.grammar import DOMAINS
from model.inference.batch import BatchPredictor
from model.inference.onnx import load_predictor
from model.nn.export import export_onnx
from monitoring.ingest import Ledger, curated_columns, curated_root, ingest
from monitoring.schema import (
    CATEGORICAL_FEATURES,
    EMBEDDING_PREFIX,
    IDENTITY_COLUMNS,
    PREDICTION_FEATURES,
    SIGNAL_FEATURES,
)
from serving.contracts import TrafficRecord
from serving.traffic import TrafficWriter, list_batches, read_batch_frame
from tests.support import tiny_package
from voiceloop.settings import Settings, TrafficSettings, load_settings

pytestmark = pytest.mark.integration

RATE = 16000
VERSION = "ingest-tiny-v1"


def _speech_like(seconds: float, seed: int, rate: int = RATE) -> np.ndarray:
    """Three 'syllables' of a harmonic tone with a syllable-rate envelope, short pauses
    and a -50 dBFS noise floor: loud, not clipped, not silent."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 120.0 + 40.0 * rng.random()
    voice = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6))
    envelope = np.clip(np.sin(2 * np.pi * 2.5 * t), 0.0, None)  # 2.5 syllables/s
    audio = 0.15 * voice * envelope + rng.normal(0.0, 0.003, t.size)
    return audio.astype(np.float32)


def _record(rid: str, hour: int, **fields: Any) -> TrafficRecord:
    base: dict[str, Any] = {
        "request_id": rid, "timestamp": datetime(2025, 3, 1, hour, 5, tzinfo=UTC),
        "device_id": "dev-1", "route": "production", "model_version": "serving-v7",
        "registry_version": "7", "transcript": "turn on the ceiling fan", "intent": "HassTurnOn",
        "slots": [{"type": "name", "value": "ceiling fan"}], "confidence": 0.8,
        "latency_ms": 20.0, "duration_s": 1.2, "sample_rate": RATE, "audio_format": "wav",
    }
    return TrafficRecord(**(base | fields))


def _write(root: str, items: list[tuple[TrafficRecord, np.ndarray | None, int | None]],
           commit_minute: int) -> None:
    """Submit through the real writer; every hour partition becomes one batch. The
    writer's clock (commit time → batch id) is pinned so that batch ids sort in the
    order the test writes them (real commits within one second sort at random)."""
    committed = datetime(2025, 3, 2, 0, commit_minute, tzinfo=UTC)
    with TrafficWriter(root, TrafficSettings(batch_max_records=1000, batch_max_seconds=60.0),
                       clock=lambda: committed) as writer:
        for record, audio, rate in items:
            assert writer.submit(record, audio, rate)
        assert writer.flush(30)
    assert writer.stats().failed == 0


def _files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.parquet"))}


def _quarantine_reasons(curated: Path) -> dict[str, list[str]]:
    frame = pd.concat([pd.read_parquet(p) for p in (curated / "quarantine").glob("*.parquet")])
    return {rid: list(r) for rid, r in zip(frame["request_id"], frame["reasons"], strict=True)
            if rid is not None}


def _curated(curated: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in sorted((curated / "traffic").rglob("*.parquet"))],
                     ignore_index=True)


def _raise(exc: Exception) -> Any:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise exc
    return fail


def _dvc_hash(curated: Path) -> str:
    return yaml.safe_load((curated / "traffic.dvc").read_text())["outs"][0]["md5"]


@pytest.fixture(scope="module")
def predictor(tmp_path_factory: pytest.TempPathFactory) -> BatchPredictor:
    # verify=False: export == eager is test_export's job; here it would cost seconds.
    bundle = export_onnx(tiny_package(VERSION), tmp_path_factory.mktemp("model") / "fp32",
                         verify=False)
    return load_predictor(Path(bundle.folder), batch_size=8, use_lm=False)


def _settings(workspace: Path) -> Settings:
    settings = load_settings(profile="tiny", workspace=workspace)
    fast = settings.monitoring.ingest.model_copy(update={"retry_backoff_s": 0.0})
    return settings.model_copy(update={
        "monitoring": settings.monitoring.model_copy(update={"ingest": fast})})


def test_ingest_validates_quarantines_versions_and_is_idempotent(
    tmp_path: Path, predictor: BatchPredictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(tmp_path / "ws")
    root = settings.traffic_root
    curated = curated_root(settings)
    speech = [_speech_like(1.2, seed) for seed in range(12)]

    # Batch 1 (hour 10): five good requests (one uploaded at 8 kHz), four bad ones and a
    # feedback row. Batch 2 (hour 11): two good, a request id batch 1 already brought,
    # an out-of-range confidence. Batch 3 (hour 12): good rows, Parquet corrupted later.
    loud = np.clip(speech[0] * 30, -1, 1)
    _write(root, [
        *[(_record(f"r{i}", 10), speech[i], RATE) for i in range(1, 5)],
        (_record("r8k", 10, sample_rate=8000), speech[5][::2].copy(), 8000),
        (_record("silent", 10), np.random.default_rng(1).normal(0, 1e-4, RATE).astype(np.float32),
         RATE),
        (_record("clipped", 10), loud, RATE),
        (_record("short", 10), speech[6][: RATE // 10], RATE),
        (_record("rate4k", 10, sample_rate=4000), speech[7][::4].copy(), 4000),
        (_record("broken", 10), speech[3], RATE),  # its stored file is corrupted below
        (_record("r1", 10, kind="feedback", route=None, model_version="", transcript="",
                 intent="", slots=[], feedback_kind="repeat"), None, None),
    ], commit_minute=1)
    _write(root, [
        (_record("r6", 11), speech[8], RATE),
        (_record("r7", 11), speech[9], RATE),
        (_record("r2", 11), speech[10], RATE),  # duplicate of batch 1's r2
        (_record("badconf", 11, confidence=1.2), speech[11], RATE),
        (_record("r7", 11), speech[9], RATE),  # the same request twice in one batch
    ], commit_minute=2)
    _write(root, [(_record("p1", 12), speech[1], RATE), (_record("p2", 12), speech[2], RATE)],
           commit_minute=3)
    batches = list_batches(root)
    assert [b.hour for b in batches] == [10, 11, 12]
    b1, b2, b3 = (b.batch_id for b in batches)
    (Path(root) / batches[2].path).write_bytes(b"PAR1 this is not a parquet file PAR1")
    stored = read_batch_frame(root, batches[0]).set_index("request_id").loc["broken"]
    with open(Path(root) / stored["audio"], "r+b") as shard:  # only its file in the shard
        shard.seek(int(stored["audio_offset"]))
        shard.write(b"fLaC but not really")

    # -- first run ------------------------------------------------------------------------
    first = ingest(settings, predictor)
    print(f"first ingest: {first.seconds} s")
    assert first.balanced()
    by_id = {b.batch_id: b for b in first.batches}
    assert [b.batch_id for b in first.batches] == [b1, b2, b3]
    assert (by_id[b1].records, by_id[b1].requests, by_id[b1].feedback) == (11, 10, 1)
    assert (by_id[b1].accepted, by_id[b1].quarantined) == (5, 5)
    assert (by_id[b2].accepted, by_id[b2].quarantined) == (2, 3)
    assert by_id[b3].status == "poison" and by_id[b3].quarantined == 2
    assert (by_id[b3].error or "").startswith("ArrowInvalid")  # not retried: not an OSError
    assert by_id[b3].attempts == 1
    assert (first.records, first.requests, first.feedback) == (18, 17, 1)
    assert (first.accepted, first.quarantined, first.poison_batches) == (7, 10, 1)

    reasons = _quarantine_reasons(curated)
    assert reasons["silent"] == ["silence share 1 above 0.8"]
    assert any(r.startswith("clipping share") and r.endswith("above 0.01")
               for r in reasons["clipped"])
    assert reasons["short"] == ["duration 0.1 s below 0.3 s"]
    assert reasons["rate4k"] == ["sample rate 4000 Hz outside [8000, 48000] Hz"]
    # One broken file, one reason (its facts are null, so no range check fires on it).
    assert len(reasons["broken"]) == 1 and reasons["broken"][0].startswith(
        "audio does not decode: "), reasons["broken"]
    assert reasons["r2"] == [f"request_id 'r2' already ingested in batch {b1}"]
    assert reasons["badconf"] == ["confidence 1.2 outside [0, 1]"]
    assert reasons["r7"] == ["request_id 'r7' repeats row 1 of this batch"]  # first one kept
    poison = pd.read_parquet(curated / "quarantine" / f"{b3}.parquet")
    assert len(poison) == 1 and poison["rows"].iloc[0] == 2  # one line for 2 unreadable rows
    assert poison["reasons"].iloc[0][0].startswith("poison batch: ")

    table = _curated(curated)
    dim = predictor.embedding_dim
    assert list(table.columns) == curated_columns(dim)
    assert list(table.columns) == [*IDENTITY_COLUMNS, *SIGNAL_FEATURES, *PREDICTION_FEATURES,
                                   *CATEGORICAL_FEATURES,
                                   *[f"{EMBEDDING_PREFIX}{i}" for i in range(dim)]]
    assert sorted(table["request_id"]) == sorted(["r1", "r2", "r3", "r4", "r8k", "r6", "r7"])
    assert set(table["embedding_model"]) == {VERSION}
    assert set(table["domain"]) == {"climate"}  # HassTurnOn + the ceiling fan (a fan)
    assert set(table["domain"]) <= set(DOMAINS)
    assert np.isfinite(table[[f"{EMBEDDING_PREFIX}{i}" for i in range(dim)]].to_numpy()).all()
    assert table["duration_s"].between(1.1, 1.3).all()
    assert str(table["timestamp"].dtype) == "datetime64[us, UTC]"
    feedback = pd.read_parquet(next((curated / "feedback").rglob("*.parquet")))
    assert list(feedback["request_id"]) == ["r1"] and feedback["batch_id"].iloc[0] == b1

    v1 = first.data_version
    assert v1 and v1.endswith(".dir") and first.data_version_changed
    assert v1 == _dvc_hash(curated)
    assert (tmp_path / "ws" / "dvc-remote" / "files" / "md5" / v1[:2] / v1[2:]).is_file()
    report = json.loads(Path(first.report_path or "").read_text())
    assert report["accepted"] == 7 and report["data_version"] == v1

    # -- a rerun ingests nothing and changes nothing ---------------------------------------
    before = _files(curated)
    again = ingest(settings, predictor)
    assert again.batches == [] and again.skipped == 3 and again.committed == 3
    assert again.data_version == v1 and not again.data_version_changed
    assert _files(curated) == before

    # -- a crash after the outputs, before the ledger line ---------------------------------
    # Batch 4 (hour 13): good. Batch 5 (hour 14): featurising raises (a stand-in for a bug
    # hit by odd data), for every run from here on.
    _write(root, [(_record("r10", 13), speech[3], RATE), (_record("r11", 13), speech[4], RATE)],
           commit_minute=4)
    _write(root, [(_record("x1", 14, intent="HassExplode"), speech[5], RATE),
                  (_record("x2", 14), speech[6], RATE)], commit_minute=5)
    real_domain = ingest_mod.predicted_domain

    def exploding_domain(intent: str, slots: Any, values: Any) -> str:
        if intent == "HassExplode":
            raise ValueError("featuriser bug")
        return real_domain(intent, slots, values)

    monkeypatch.setattr(ingest_mod, "predicted_domain", exploding_domain)
    b4, b5 = (b.batch_id for b in list_batches(root)[-2:])
    with pytest.MonkeyPatch.context() as crash:
        crash.setattr(Ledger, "append", _raise(OSError("simulated crash before the ledger")))
        with pytest.raises(OSError, match="simulated crash"):
            ingest(settings, predictor)
    assert (curated / "traffic" / "dt=2025-03-01" / "hour=13" / f"{b4}.parquet").is_file()
    assert b4 not in Ledger(curated / "ledger.jsonl").batches()

    # ... and a flaky store on the rerun: the first read fails with an OSError.
    real_read = ingest_mod.read_batch_frame
    calls = {"n": 0}

    def flaky_read(root_: str, info: Any) -> pd.DataFrame:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError("simulated flaky read")
        return real_read(root_, info)

    with pytest.MonkeyPatch.context() as flaky:
        flaky.setattr(ingest_mod, "read_batch_frame", flaky_read)
        recovered = ingest(settings, predictor)
    print(f"recovering ingest: {recovered.seconds} s")
    assert recovered.balanced()
    assert [b.batch_id for b in recovered.batches] == [b4, b5]
    assert recovered.batches[0].attempts == 2 and recovered.batches[0].accepted == 2
    assert set(recovered.batches[0].phase_seconds) == {"read", "validate", "embed", "write"}
    assert recovered.batches[1].status == "poison" and recovered.batches[1].quarantined == 2
    assert _quarantine_reasons(curated)["x2"] == ["poison batch: ValueError: featuriser bug"]
    table = _curated(curated)
    assert len(table) == 9 and table["request_id"].is_unique  # nothing lost, nothing twice
    ledger = Ledger(curated / "ledger.jsonl")
    ids = [e["batch_id"] for e in ledger.entries() if e["type"] == "batch"]
    assert sorted(ids) == sorted([b1, b2, b3, b4, b5]) and len(ids) == 5
    v2 = recovered.data_version
    assert v2 and v2 != v1 and recovered.data_version_changed and v2 == _dvc_hash(curated)
    assert ledger.last_version()["data_version"] == v2  # type: ignore[index]
    assert ledger.unversioned() == []

    # -- reproducible: another workspace ingesting the same store gets the same version -----
    other = ingest(_settings(tmp_path / "ws2"), predictor, traffic_root=root)
    print(f"fresh-workspace ingest: {other.seconds} s")
    assert other.balanced() and other.accepted == 9 and other.poison_batches == 2
    assert other.data_version == v2
    # The pushed version restores the curated folder byte for byte, from the remote alone.
    stored = _files(curated / "traffic")
    shutil.rmtree(curated / "traffic")
    shutil.rmtree(tmp_path / "ws" / "dvc-cache")
    with Repo(str(curated)) as repo:
        repo.pull()
    assert _files(curated / "traffic") == stored
