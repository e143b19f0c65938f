"""Canary routing arithmetic and upload decoding (pure, no server)."""

from __future__ import annotations

import random

import numpy as np
import pytest

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


def test_level_dbfs() -> None:
    assert level_dbfs(np.zeros(100, np.float32)) == float("-inf")
    assert abs(level_dbfs(np.full(100, 0.1, np.float32)) + 20.0) < 1e-4
