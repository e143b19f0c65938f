"""Canary routing arithmetic and upload decoding (pure, no server)."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import soundfile as sf

from serving.audio_input import AudioRejected, decode_upload, level_dbfs
from serving.routing import BUCKETS, choose_route, device_bucket
from tests.support import tone, wav_bytes


def test_device_buckets_are_stable_and_spread() -> None:
    assert device_bucket("kitchen") == device_bucket("kitchen")
    buckets = [device_bucket(f"d{i}") for i in range(5000)]
    assert all(0 <= b < BUCKETS for b in buckets)
    # uniform enough: each tenth of the range holds 10 % ± 2 % of devices
    counts = np.bincount(np.array(buckets) * 10 // BUCKETS, minlength=10)
    assert counts.min() > 400 and counts.max() < 600


def test_sticky_routes_only_move_towards_the_canary_as_the_share_grows() -> None:
    devices = [f"dev-{i}" for i in range(2000)]
    at = {share: {d for d in devices if choose_route(d, share, True) == "canary"}
          for share in (0, 5, 25, 50, 100)}
    assert at[0] == set() and at[100] == set(devices)
    assert at[5] <= at[25] <= at[50]  # raising the share never sends a canary device back
    assert abs(len(at[25]) / len(devices) - 0.25) < 0.03


def test_random_routes_without_a_device_and_no_canary_means_production() -> None:
    rng = random.Random(0)
    routes = [choose_route(None, 20, True, rng) for _ in range(5000)]
    assert abs(routes.count("canary") / len(routes) - 0.2) < 0.02
    assert {choose_route("x", 80, False) for _ in range(10)} == {"production"}
    with pytest.raises(ValueError, match="150"):
        choose_route("x", 150, True)


def test_decode_upload_reads_formats_and_rejects_bad_audio() -> None:
    stereo = np.stack([tone(1.0, rate=8000), tone(1.0, 500.0, rate=8000)], axis=1)
    good = decode_upload(wav_bytes(stereo, rate=8000), 10)
    assert good.sample_rate == 8000 and good.samples.ndim == 1 and good.audio_format == "wav"
    assert abs(good.duration_s - 1.0) < 1e-3
    assert decode_upload(wav_bytes(tone(0.5), fmt="FLAC"), 10).audio_format == "flac"
    for body, code in ((b"", "empty_body"), (b"garbage" * 50, "not_audio"),
                       (wav_bytes(tone(3.0)), "audio_too_long")):
        with pytest.raises(AudioRejected) as err:
            decode_upload(body, 2.0)
        assert err.value.code == code


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("extra_chunk", [False, True])
def test_the_pcm16_wav_fast_path_decodes_exactly_as_libsndfile(channels: int,
                                                                extra_chunk: bool) -> None:
    from serving import audio_input

    rng = np.random.default_rng(channels)
    samples = rng.uniform(-1.1, 1.1, (16000, channels)).astype(np.float32)
    body = wav_bytes(samples if channels > 1 else samples[:, 0], rate=16000)
    if extra_chunk:  # a LIST chunk before the data, as some recorders write
        data_at = body.index(b"data")
        info = b"LIST" + (6).to_bytes(4, "little") + b"INFOab"
        body = body[:4] + (len(body) - 8 + len(info)).to_bytes(4, "little") + body[8:data_at] \
            + info + body[data_at:]
    assert audio_input._wav_pcm16(body) is not None  # the fast path takes it
    fast = decode_upload(body, 10)
    with sf.SoundFile(io.BytesIO(body)) as f:
        ref = f.read(dtype="float32", always_2d=True)
    want = ref[:, 0] if channels == 1 else ref.mean(axis=1).astype(np.float32)
    np.testing.assert_array_equal(fast.samples, want)
    assert fast.sample_rate == 16000 and fast.audio_format == "wav"
    if channels == 1:  # the exact int16 samples, for the traffic store
        np.testing.assert_array_equal(fast.pcm16, np.round(want * 32768).astype(np.int16))
    else:
        assert fast.pcm16 is None
    # Anything else goes to libsndfile: float WAV, 24-bit, a truncated data chunk.
    for other in (wav_bytes(samples[:, 0], subtype="FLOAT"), wav_bytes(samples[:, 0], subtype="PCM_24")):
        assert audio_input._wav_pcm16(other) is None
        assert decode_upload(other, 10).pcm16 is None
    with pytest.raises(AudioRejected) as err:
        decode_upload(body[:-100], 10)
    assert err.value.code == "truncated_audio"
    with pytest.raises(AudioRejected) as err:
        decode_upload(body, 0.5)
    assert err.value.code == "audio_too_long"


def test_level_dbfs() -> None:
    assert level_dbfs(np.zeros(100, np.float32)) == float("-inf")
    assert abs(level_dbfs(np.full(100, 0.1, np.float32)) + 20.0) < 1e-4
