"""The production-traffic store through a real background writer, on a local folder and
on fsspec's in-memory filesystem: committed batches hold every accepted record exactly
once, audio round-trips through WAV and FLAC in per-batch tar shards (a failed append
rewrites the shard, stores written before shards stay readable), crash leftovers stay
invisible, the queue bound and the sampling fraction hold, and the counters always balance:

    submitted = sampled_out + dropped + logged + failed + queue_depth
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import fsspec
import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from model.data.manifest import Slot
from serving import traffic
from serving.contracts import TrafficRecord
from serving.traffic import (
    TRAFFIC_SCHEMA,
    AudioRef,
    StoredAudio,
    TrafficStats,
    TrafficWriter,
    extract_audio,
    list_batches,
    read_audio,
    read_batch,
    read_batch_frame,
    uncommitted,
)
from voiceloop.settings import TrafficSettings

pytestmark = pytest.mark.integration

SR = 16000
# 09:58:45 + 300 records x 0.5 s = up to 10:01:15: two hour partitions.
T0 = datetime(2026, 3, 1, 9, 58, 45, tzinfo=UTC)


def _settings(**kw: object) -> TrafficSettings:
    base: dict[str, object] = {"sample": 1.0, "batch_max_records": 64,
                               "batch_max_seconds": 30.0, "queue_max": 4096}
    return TrafficSettings(**{**base, **kw})


def _record(i: int, ts: datetime = T0, **kw: object) -> TrafficRecord:
    fields: dict[str, object] = {
        "request_id": f"req-{i:05d}",
        "timestamp": ts,
        "route": "production",
        "model_version": "v1",
        "transcript": "turn on the kitchen light",
        "intent": "HassTurnOn",
        "slots": [Slot(type="area", value="kitchen")],
        "confidence": 0.9,
        "sample_rate": SR,
        "audio_format": "wav",
    }
    return TrafficRecord(**{**fields, **kw})


def _balanced(s: TrafficStats) -> bool:
    return s.submitted == s.sampled_out + s.dropped + s.logged + s.failed + s.queue_depth


def _all_records(root: str) -> list[TrafficRecord]:
    return [r for info in list_batches(root) for r in read_batch(root, info)]


@pytest.fixture
def memory_root() -> Iterator[str]:
    """A fresh root on fsspec's process-wide in-memory filesystem, removed afterwards."""
    name = f"traffic-{uuid.uuid4().hex}"
    yield f"memory://{name}"
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/{name}"):
        fs.rm(f"/{name}", recursive=True)


def test_schema_covers_the_record_contract() -> None:
    assert TRAFFIC_SCHEMA.names == list(TrafficRecord.model_fields)


@pytest.mark.parametrize("audio_format", ["wav", "flac"])
def test_300_records_round_trip(tmp_path, audio_format: str) -> None:
    root = str(tmp_path / "traffic")
    rng = np.random.default_rng(0)
    audio = {i: rng.uniform(-1.2, 1.2, 800 + i).astype(np.float32) for i in range(300)}
    records = {i: _record(i, T0 + timedelta(seconds=0.5 * i)) for i in range(300)}
    with TrafficWriter(root, _settings(batch_max_records=64, audio_format=audio_format)) as writer:
        accepted = [writer.submit(records[i], audio[i], SR) for i in range(300)]
    assert all(accepted)
    stats = writer.stats()
    assert stats == TrafficStats(submitted=300, sampled_out=0, dropped=0, logged=300,
                                 failed=0, batches=stats.batches, queue_depth=0,
                                 write_errors=0)
    assert _balanced(stats)

    infos = list_batches(root)
    assert len(infos) == stats.batches
    assert [i.batch_id for i in infos] == sorted(i.batch_id for i in infos)
    assert len({i.batch_id for i in infos}) == len(infos)
    assert uncommitted(root) == []
    # both hours are present, each batch lives in exactly one partition
    assert {(i.dt, i.hour) for i in infos} == {("2026-03-01", 9), ("2026-03-01", 10)}

    seen: list[str] = []
    stored = StoredAudio(root)
    for info in infos:
        assert info.path.startswith(f"batches/dt={info.dt}/hour={info.hour:02d}/")
        assert info.path.endswith(f"{info.batch_id}.parquet")
        assert re.fullmatch(r"\d{8}T\d{6}-[0-9a-f]{8}", info.batch_id)
        batch = read_batch(root, info)
        assert len(batch) == info.records <= 64
        # The batch's audio is one tar beside it, its members the batch's files in order.
        shard = f"audio/dt={info.dt}/hour={info.hour:02d}/{info.batch_id}.tar"
        with tarfile.open(tmp_path / "traffic" / shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        assert list(members) == [f"{r.request_id}.{audio_format}" for r in batch]
        for rec in batch:
            assert rec.timestamp.tzinfo is not None
            ts = rec.timestamp.astimezone(UTC)
            assert (ts.strftime("%Y-%m-%d"), ts.hour) == (info.dt, info.hour)
            assert rec.audio == shard and rec.audio_bytes > 0
            data = stored.read_bytes(AudioRef.of(rec))  # one ranged read, no tar index
            assert data == members[f"{rec.request_id}.{audio_format}"]
            assert sf.info(io.BytesIO(data)).format == audio_format.upper()
            seen.append(rec.request_id)
    assert sorted(seen) == sorted(r.request_id for r in records.values())  # exactly once

    by_id = {r.request_id: r for r in _all_records(root)}
    for i in (0, 1, 150, 299):
        rec = by_id[f"req-{i:05d}"]
        want = records[i].model_copy(update={"audio": rec.audio, "audio_offset": rec.audio_offset,
                                             "audio_bytes": rec.audio_bytes})
        assert rec == want  # every field survives Parquet (slots, UTC timestamp, …)
        samples, rate = read_audio(root, rec)
        quantised = np.clip(np.round(audio[i].astype(np.float64) * 32768), -32768, 32767)
        assert rate == SR and samples.dtype == np.float32
        np.testing.assert_array_equal(samples, (quantised / 32768).astype(np.float32))

    frame = read_batch_frame(root, infos[0])
    assert list(frame.columns) == TRAFFIC_SCHEMA.names
    assert str(frame["timestamp"].dtype) == "datetime64[us, UTC]"
    assert json.loads(frame["slots"].iloc[0]) == [{"type": "area", "value": "kitchen"}]
    assert pd.api.types.is_float_dtype(frame["confidence"])

    marker = json.loads((tmp_path / "traffic" / infos[0].marker).read_text())
    assert marker["records"] == marker["request_ids"] == infos[0].records
    assert marker["bytes"] == (tmp_path / "traffic" / infos[0].path).stat().st_size


def test_crash_leftovers_are_not_listed(tmp_path) -> None:
    root = str(tmp_path / "traffic")
    with TrafficWriter(root, _settings()) as writer:
        for i in range(3):
            writer.submit(_record(i))
    (committed,) = list_batches(root)
    part = tmp_path / "traffic" / "batches" / "dt=2026-03-01" / "hour=09"
    data = (tmp_path / "traffic" / committed.path).read_bytes()
    (part / "20260301T095900-deadbeef.parquet.tmp-0123").write_bytes(data[:100])
    (part / "20260301T095901-cafef00d.parquet").write_bytes(data)  # renamed, no marker
    (part / "20260301T095902-0badf00d.commit.json.tmp-4567").write_text("{")
    audio = tmp_path / "traffic" / "audio" / "dt=2026-03-01" / "hour=09"
    audio.mkdir(parents=True)
    (audio / "20260301T095903-feedf00d.tar").write_bytes(b"\0" * 512)  # a crash mid-batch

    assert list_batches(root) == [committed]
    assert uncommitted(root) == [
        "audio/dt=2026-03-01/hour=09/20260301T095903-feedf00d.tar",
        "batches/dt=2026-03-01/hour=09/20260301T095900-deadbeef.parquet.tmp-0123",
        "batches/dt=2026-03-01/hour=09/20260301T095901-cafef00d.parquet",
        "batches/dt=2026-03-01/hour=09/20260301T095902-0badf00d.commit.json.tmp-4567",
    ]


def test_full_queue_drops_without_blocking(tmp_path) -> None:
    root = str(tmp_path / "traffic")
    writer = TrafficWriter(root, _settings(queue_max=5))  # thread not started
    pcm = np.zeros(1600, np.float32)
    started = time.perf_counter()
    results = [writer.submit(_record(i), pcm, SR) for i in range(8)]
    assert time.perf_counter() - started < 1.0
    assert results == [True] * 5 + [False] * 3
    stats = writer.stats()
    assert (stats.submitted, stats.dropped, stats.queue_depth, stats.logged) == (8, 3, 5, 0)
    assert _balanced(stats)
    assert writer.flush(timeout=0.1) is False  # nothing can drain a writer never started

    assert writer.close(timeout=10)  # close drains what was accepted
    stats = writer.stats()
    assert (stats.logged, stats.queue_depth) == (5, 0) and _balanced(stats)
    assert {r.request_id for r in _all_records(root)} == {f"req-{i:05d}" for i in range(5)}
    assert writer.submit(_record(99)) is False  # closed: counted as a drop
    assert writer.stats().dropped == 4 and _balanced(writer.stats())


def test_sampling_is_deterministic_and_keeps_feedback(tmp_path) -> None:
    kept: list[set[str]] = []
    for run in range(2):
        root = str(tmp_path / f"traffic{run}")
        with TrafficWriter(root, _settings(sample=0.5, batch_max_records=256)) as writer:
            for i in range(1000):
                writer.submit(_record(i))
            for i in range(20):
                writer.submit(_record(5000 + i, kind="feedback", feedback_kind="repeat",
                                      route=None, transcript="", intent="", slots=[]))
        stats = writer.stats()
        assert _balanced(stats) and stats.dropped == 0 and stats.queue_depth == 0
        assert stats.logged + stats.sampled_out == 1020
        ids = {r.request_id for r in _all_records(root)}
        feedback = {f"req-{5000 + i:05d}" for i in range(20)}
        assert feedback <= ids  # feedback is never sampled out
        assert 440 <= len(ids - feedback) <= 560
        kept.append(ids)
    assert kept[0] == kept[1]  # the same ids both times


def test_close_is_idempotent_and_time_commit_needs_no_close(tmp_path) -> None:
    root = str(tmp_path / "traffic")
    writer = TrafficWriter(root, _settings(batch_max_seconds=0.2, batch_max_records=64))
    writer.start()
    writer.start()  # a no-op
    for i in range(3):
        assert writer.submit(_record(i))
    deadline = time.monotonic() + 10
    while not list_batches(root) and time.monotonic() < deadline:
        time.sleep(0.05)
    (info,) = list_batches(root)
    assert info.records == 3  # committed by time, not by size, with no flush or close

    assert writer.submit(_record(3))
    assert writer.flush(timeout=10)
    assert writer.stats().logged == 4
    assert writer.submit(_record(4))
    assert writer.close(timeout=10)
    assert writer.close(timeout=10)  # again: a no-op that still reports stopped
    stats = writer.stats()
    assert (stats.logged, stats.queue_depth, stats.batches) == (5, 0, 3) and _balanced(stats)
    with pytest.raises(RuntimeError):
        writer.start()


def test_write_errors_are_retried_once_then_failed(tmp_path, monkeypatch) -> None:
    root = str(tmp_path / "traffic")
    real = traffic._parquet_bytes
    calls = {"n": 0}

    def flaky(table, batch_id):  # fails on calls 1, 3 and 4: batch 1 retries and
        calls["n"] += 1          # commits, batch 2 fails twice
        if calls["n"] in (1, 3, 4):
            raise OSError(28, "No space left on device")
        return real(table, batch_id)

    monkeypatch.setattr(traffic, "_parquet_bytes", flaky)
    with TrafficWriter(root, _settings(batch_max_records=2)) as writer:
        for i in range(2):
            writer.submit(_record(i), np.zeros(160, np.float32), SR)
        assert writer.flush(timeout=10)
        for i in range(2, 4):
            writer.submit(_record(i))
        assert writer.flush(timeout=10)
        for i in range(4, 6):  # the thread survived
            writer.submit(_record(i))
    stats = writer.stats()
    assert (stats.logged, stats.failed, stats.write_errors, stats.batches) == (4, 2, 3, 2)
    assert _balanced(stats)
    ids = sorted(r.request_id for r in _all_records(root))
    assert ids == ["req-00000", "req-00001", "req-00004", "req-00005"]


def test_invalid_arguments(tmp_path) -> None:
    writer = TrafficWriter(str(tmp_path / "traffic"), _settings())
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        writer.submit(_record(0), np.zeros((2, 3), np.float32), SR)
    with pytest.raises(ValueError, match="int32"):
        writer.submit(_record(0), np.zeros(10, np.int32), SR)
    with pytest.raises(ValueError, match="0"):
        writer.submit(_record(0, sample_rate=0), np.zeros(10, np.float32))
    with pytest.raises(ValueError, match="a/b"):
        writer.submit(_record(0, request_id="a/b"), np.zeros(10, np.float32), SR)
    with pytest.raises(ValueError, match="''"):
        TrafficWriter("", _settings())
    with pytest.raises(ValueError, match="no stored audio"):
        read_audio(str(tmp_path), _record(0))
    assert writer.stats().submitted == 0  # rejected calls are not counted
    writer.close()


def test_memory_filesystem_url(memory_root: str) -> None:
    naive = datetime(2026, 3, 1, 23, 59, 59)  # naive: taken as UTC
    aware = datetime(2026, 3, 2, 1, 0, 0, tzinfo=timezone(timedelta(hours=1)))  # 00:00 UTC
    with TrafficWriter(memory_root, _settings()) as writer:
        assert writer.submit(_record(0, naive), np.full(400, 0.25, np.float32), SR)
        assert writer.submit(_record(1, aware), np.full(400, -0.5, np.float32), SR)
    infos = list_batches(memory_root)
    # one flush spanning midnight: one batch per partition
    assert sorted((i.dt, i.hour) for i in infos) == [("2026-03-01", 23), ("2026-03-02", 0)]
    recs = {r.request_id: r for r in _all_records(memory_root)}
    assert recs["req-00000"].timestamp == naive.replace(tzinfo=UTC)
    assert recs["req-00001"].timestamp == aware
    assert recs["req-00001"].audio.startswith("audio/dt=2026-03-02/hour=00/")
    samples, rate = read_audio(memory_root, recs["req-00001"])
    assert rate == SR and np.all(samples == -0.5)
    assert uncommitted(memory_root) == []
    fs = fsspec.filesystem("memory")
    assert fs.exists(f"{memory_root}/{infos[0].marker}")
    assert fs.exists(f"{memory_root}/{recs['req-00000'].audio}")


def test_failed_append_rewrites_the_shard_at_commit(tmp_path, monkeypatch) -> None:
    root = str(tmp_path / "traffic")
    real = traffic._AudioShard.add
    calls = {"n": 0}

    def flaky(self, name, data):  # the 3rd append fails after writing half its bytes
        calls["n"] += 1
        if calls["n"] == 3:
            self._file.write(data[: len(data) // 2])
            raise OSError(5, "Input/output error")
        return real(self, name, data)

    monkeypatch.setattr(traffic._AudioShard, "add", flaky)
    audio = {i: np.full(300 + i, (i + 1) / 10, np.float32) for i in range(5)}
    with TrafficWriter(root, _settings(batch_max_records=5)) as writer:
        for i in range(5):
            writer.submit(_record(i), audio[i], SR)
    stats = writer.stats()
    assert (stats.logged, stats.failed, stats.batches) == (5, 0, 1) and _balanced(stats)
    assert calls["n"] == 3 + 5  # appends stop at the failure; the commit appends all 5 again
    recs = _all_records(root)
    for rec in recs:
        samples, _ = read_audio(root, rec)
        np.testing.assert_allclose(samples, audio[int(rec.request_id[-5:])], atol=1 / 32768)
    with tarfile.open(tmp_path / "traffic" / recs[0].audio) as tar:  # whole and valid
        assert tar.getnames() == [f"{r.request_id}.wav" for r in recs]
    assert uncommitted(root) == []


def test_a_retry_after_the_shard_was_sealed_keeps_it(tmp_path, monkeypatch) -> None:
    """The Parquet write fails once after the shard was closed: the retry commits the
    batch without writing its audio again."""
    root = str(tmp_path / "traffic")
    real_parquet, real_add = traffic._parquet_bytes, traffic._AudioShard.add
    calls = {"parquet": 0, "add": 0}

    def flaky(table, batch_id):
        calls["parquet"] += 1
        if calls["parquet"] == 1:
            raise OSError(28, "No space left on device")
        return real_parquet(table, batch_id)

    def counted(self, name, data):
        calls["add"] += 1
        return real_add(self, name, data)

    monkeypatch.setattr(traffic, "_parquet_bytes", flaky)
    monkeypatch.setattr(traffic._AudioShard, "add", counted)
    with TrafficWriter(root, _settings(batch_max_records=4)) as writer:
        for i in range(4):
            writer.submit(_record(i), np.full(200, 0.5, np.float32), SR)
    stats = writer.stats()
    assert (stats.logged, stats.write_errors, calls["add"]) == (4, 1, 4)
    assert all(np.all(read_audio(root, r)[0] == 0.5) for r in _all_records(root))


def test_missing_audio_is_left_out_of_local_copies(tmp_path) -> None:
    root = str(tmp_path / "traffic")
    with TrafficWriter(root, _settings()) as writer:
        for i in range(2):
            writer.submit(_record(i), np.full(400, 0.25, np.float32), SR)
    (info,) = list_batches(root)
    frame = read_batch_frame(root, info)
    # Curated frames that join files from before shards hold NaN in the new columns.
    old = frame.iloc[[0]].assign(audio_offset=np.nan, audio_bytes=np.nan, request_id="old")
    gone = frame.iloc[[1]].assign(audio="audio/dt=2026-03-01/hour=09/missing.tar",
                                  request_id="gone")
    silent = frame.iloc[[1]].assign(audio="", request_id="silent")
    rows = pd.concat([frame, old, gone, silent], ignore_index=True)
    assert AudioRef.of(rows.iloc[2].to_dict()) == AudioRef(frame["audio"].iloc[0])  # whole file
    paths = extract_audio(root, rows, tmp_path / "local")
    assert [p.name if p else None for p in paths] == [
        "req-00000.wav", "req-00001.wav", "old.tar", None, None]


def test_stores_from_before_shards_stay_readable(tmp_path) -> None:
    """A v1 batch (no audio_offset / audio_bytes columns, one WAV file per request)."""
    root = tmp_path / "traffic"
    part = "dt=2026-03-01/hour=09"
    (root / "audio" / part).mkdir(parents=True)
    (root / "batches" / part).mkdir(parents=True)
    sf.write(root / "audio" / part / "req-00000.wav", np.full(320, 0.5, np.float32), SR,
             subtype="PCM_16")
    rec = _record(0, audio=f"audio/{part}/req-00000.wav")
    table = traffic._table([rec]).drop_columns(["audio_offset", "audio_bytes"])
    data = traffic._parquet_bytes(table, "20260301T095900-00000001")
    (root / "batches" / part / "20260301T095900-00000001.parquet").write_bytes(data)
    (root / "batches" / part / "20260301T095900-00000001.commit.json").write_text(json.dumps({
        "batch_id": "20260301T095900-00000001", "dt": "2026-03-01", "hour": 9, "records": 1,
        "created": T0.isoformat(), "file": f"batches/{part}/20260301T095900-00000001.parquet",
        "bytes": len(data)}))
    (info,) = list_batches(str(root))
    frame = read_batch_frame(str(root), info)
    assert list(frame.columns) == TRAFFIC_SCHEMA.names
    assert (frame["audio_offset"].tolist(), frame["audio_bytes"].tolist()) == ([0], [0])
    (old,) = read_batch(str(root), info)
    samples, rate = read_audio(str(root), old)
    assert rate == SR and np.all(samples == 0.5)
    (copy,) = extract_audio(str(root), frame, tmp_path / "local")
    assert copy == tmp_path / "local" / "req-00000.wav"
    assert copy.read_bytes() == (root / "audio" / part / "req-00000.wav").read_bytes()


def test_extract_audio_copies_members_to_local_files(tmp_path) -> None:
    root = str(tmp_path / "traffic")
    with TrafficWriter(root, _settings(audio_format="flac")) as writer:
        for i in range(3):
            writer.submit(_record(i), np.full(400, 0.1 * (i + 1), np.float32), SR)
    (info,) = list_batches(root)
    frame = read_batch_frame(root, info)
    paths = extract_audio(root, frame, tmp_path / "local")
    assert [p.name for p in paths] == ["req-00000.flac", "req-00001.flac", "req-00002.flac"]
    for i, path in enumerate(paths):
        samples, rate = sf.read(path, dtype="float32")
        assert rate == SR and np.allclose(samples, 0.1 * (i + 1), atol=1 / 32768)
    assert extract_audio(root, frame, tmp_path / "local") == paths  # again: kept as is
    with pytest.raises(ValueError, match="truncated"):
        StoredAudio(root).read_bytes(AudioRef(info.path.replace("batches", "audio").replace(
            ".parquet", ".tar"), offset=10**6, size=100))
