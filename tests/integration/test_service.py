"""The inference service for real: uvicorn on 127.0.0.1, models resolved from a real
SQLite MLflow registry (tiny random-weight models, exported and registered exactly like
trained ones), the real traffic store.

Checks canary routing shares and stickiness, alias swaps under concurrent load, every bad
input's 4xx answer, the admin routes' authorisation, and that every request sent lands
in a committed traffic batch.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from serving.app import ADMIN_TOKEN_ENV
from serving.contracts import UnderstandResponse
from serving.service import build_app
from serving.traffic import list_batches, read_audio, read_batch
from tests.support import register_tiny, running_server, tone, wav_bytes
from voiceloop.registry import Registry
from voiceloop.settings import Settings, load_settings

pytestmark = pytest.mark.integration

torch.set_num_threads(1)
TOKEN = "test-token-1234"


def _settings(root: Path) -> Settings:
    settings = load_settings(profile="tiny", workspace=root / "ws")
    serving = settings.serving.model_copy(update={"poll_seconds": 0.3, "workers": 2})
    return settings.model_copy(update={"serving": serving})


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, dict[str, str]]:
    """Two registered versions: v1 `production`, v2 `canary`, share 20 %."""
    root = tmp_path_factory.mktemp("svc")
    settings = _settings(root)
    versions = {
        "v1": register_tiny(settings, root, "model-v1", "production", seed=1),
        "v2": register_tiny(settings, root, "model-v2", "canary", seed=2),
    }
    Registry(settings).set_canary_share(20)
    return settings, versions


@pytest.fixture(scope="module")
def server(registry: tuple[Settings, dict[str, str]]) -> tuple[str, Settings]:
    settings, _ = registry
    mp = pytest.MonkeyPatch()
    mp.setenv(ADMIN_TOKEN_ENV, TOKEN)
    app = build_app(settings)
    mp.undo()
    with running_server(app) as url:
        yield url, settings


def _post(client: httpx.Client, url: str, body: bytes, device: str | None = None,
          ctype: str = "audio/wav") -> httpx.Response:
    headers = {"content-type": ctype}
    if device:
        headers["x-device-id"] = device
    return client.post(f"{url}/v1/understand", content=body, headers=headers)


GOOD = wav_bytes(tone(1.2, 300.0))


def test_contract_health_ready_and_metrics(server: tuple[str, Settings]) -> None:
    url, _ = server
    with httpx.Client(timeout=30) as client:
        assert client.get(f"{url}/healthz").json() == {"status": "ok"}
        ready = client.get(f"{url}/readyz")
        assert ready.status_code == 200 and ready.json()["canary_share"] == 20
        r = _post(client, url, GOOD, "dev-x")
        assert r.status_code == 200
        answer = UnderstandResponse.model_validate(r.json())  # the contract, exactly
        assert answer.id == answer.request_id and answer.route in ("production", "canary")
        assert answer.model_version in ("model-v1", "model-v2") and answer.latency_ms > 0
        multipart = client.post(f"{url}/v1/understand",
                                files={"file": ("a.wav", GOOD, "audio/wav")})
        assert multipart.status_code == 200
        flac = _post(client, url, wav_bytes(tone(1.0), fmt="FLAC"), ctype="audio/flac")
        ogg = _post(client, url, wav_bytes(tone(1.0), fmt="OGG", subtype="VORBIS"),
                    ctype="audio/ogg")
        assert flac.status_code == 200 and ogg.status_code == 200
        text = client.get(f"{url}/metrics").text
        for name in ("voiceloop_requests_total", "voiceloop_request_latency_seconds_bucket",
                     "voiceloop_traffic_logged", "voiceloop_traffic_dropped",
                     "voiceloop_inference_queue_depth", "voiceloop_canary_share_percent"):
            assert name in text, name
        assert 'route="production"' in text or 'route="canary"' in text


def test_canary_share_and_sticky_devices(server: tuple[str, Settings]) -> None:
    url, _ = server
    with httpx.Client(timeout=30) as client, ThreadPoolExecutor(8) as pool:
        routes = list(pool.map(lambda i: _post(client, url, GOOD, f"device-{i}").json()["route"],
                               range(400)))
        share = Counter(routes)["canary"] / len(routes)
        assert 0.15 <= share <= 0.25, share
        # The same device always gets the same route, with or without load in between.
        for device in ("device-7", "device-123", "kitchen-speaker"):
            seen = {_post(client, url, GOOD, device).json()["route"] for _ in range(12)}
            assert len(seen) == 1, (device, seen)
        # No device id: random, so both routes appear at 20 %.
        anonymous = Counter(_post(client, url, GOOD).json()["route"] for _ in range(120))
        assert anonymous["canary"] > 5 and anonymous["production"] > 60


def test_bad_inputs_get_their_4xx_and_the_server_keeps_answering(
    server: tuple[str, Settings],
) -> None:
    url, settings = server
    s = settings.serving
    truncated = wav_bytes(tone(1.0))[:-8000]
    nan = tone(1.0)
    nan[100] = np.nan
    cases = {
        "empty_body": (b"", "audio/wav", 400),
        "not_audio": (b"this is not audio at all" * 10, "audio/wav", 415),
        "unsupported_format": (wav_bytes(tone(1.0), fmt="AIFF"), "audio/aiff", 415),
        "truncated_audio": (truncated, "audio/wav", 400),
        "no_samples": (wav_bytes(np.zeros(0, np.float32)), "audio/wav", 400),
        "invalid_samples": (wav_bytes(nan, subtype="FLOAT"), "audio/wav", 400),
        "audio_too_long": (wav_bytes(tone(s.max_duration_s + 2, rate=8000), rate=8000),
                           "audio/wav", 413),
        "unsupported_media_type": (GOOD, "text/plain", 415),
        "audio_too_short": (wav_bytes(tone(0.05)), "audio/wav", 400),
    }
    with httpx.Client(timeout=30) as client:
        for code, (body, ctype, status) in cases.items():
            r = _post(client, url, body, ctype=ctype)
            assert r.status_code == status, (code, r.status_code, r.text)
            error = r.json()["error"]
            assert error["code"] == code and error["message"], (code, error)
            assert client.get(f"{url}/healthz").status_code == 200
        # Too large: refused from Content-Length, before the body is read ...
        big = b"\0" * (s.max_audio_bytes + 1)
        r = _post(client, url, big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

        # ... and while streaming when the client sends no Content-Length (chunked).
        def chunks():
            for _ in range(s.max_audio_bytes // 65536 + 2):
                yield b"\0" * 65536

        r = client.post(f"{url}/v1/understand", content=chunks(),
                        headers={"content-type": "audio/wav"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        # Silence: a valid answer asking the user to repeat, not an error.
        quiet = _post(client, url, wav_bytes(np.zeros(16000, np.float32)))
        assert quiet.status_code == 200
        assert quiet.json()["clarify"] is True and quiet.json()["transcript"] == ""
        bad_feedback = client.post(f"{url}/v1/feedback", json={"request_id": "x", "kind": "meh"})
        assert bad_feedback.status_code == 422 and "error" in bad_feedback.json()
        assert _post(client, url, GOOD).status_code == 200  # still answering


def test_admin_routes_need_the_token_and_move_the_share(server: tuple[str, Settings]) -> None:
    url, settings = server
    registry = Registry(settings)
    with httpx.Client(timeout=30) as client:
        assert client.put(f"{url}/admin/canary", json={"share": 50}).status_code == 401
        wrong = client.put(f"{url}/admin/canary", json={"share": 50},
                           headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "unauthorized"
        assert client.post(f"{url}/admin/reload").status_code == 401
        auth = {"authorization": f"Bearer {TOKEN}"}
        bad = client.put(f"{url}/admin/canary", json={"share": 150}, headers=auth)
        assert bad.status_code == 422
        ok = client.put(f"{url}/admin/canary", json={"share": 35}, headers=auth)
        assert ok.status_code == 200 and ok.json()["canary_share"] == 35
        assert registry.canary_share() == 35  # the registry tag is the truth
        assert client.post(f"{url}/admin/reload", headers=auth).json()["canary_share"] == 35
        # A person changing the tag in the registry (MLflow UI) is picked up by polling.
        registry.set_canary_share(20)
        client.post(f"{url}/admin/reload", headers=auth)
        assert client.get(f"{url}/readyz").json()["canary_share"] == 20


def test_admin_routes_do_not_exist_without_a_token(
    registry: tuple[Settings, dict[str, str]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings, _ = registry
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    with running_server(build_app(settings, log_traffic=False)) as url, httpx.Client() as client:
        r = client.put(f"{url}/admin/canary", json={"share": 10},
                       headers={"authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_alias_swap_under_concurrent_load_fails_no_request(
    server: tuple[str, Settings], registry: tuple[Settings, dict[str, str]],
) -> None:
    url, settings = server
    _, versions = registry
    reg = Registry(settings)
    stop = threading.Event()

    def swapper() -> None:
        flip = False
        while not stop.is_set():
            flip = not flip
            reg.client.set_registered_model_alias(reg.name, "production",
                                                  versions["v2" if flip else "v1"])
            stop.wait(0.4)
        reg.client.set_registered_model_alias(reg.name, "production", versions["v1"])

    thread = threading.Thread(target=swapper)
    thread.start()
    try:
        with httpx.Client(timeout=60) as client, ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda i: _post(client, url, GOOD, f"load-{i}"), range(240)))
    finally:
        stop.set()
        thread.join()
    statuses = Counter(r.status_code for r in responses)
    assert statuses == {200: 240}, statuses
    production = {r.json()["model_version"] for r in responses if r.json()["route"] == "production"}
    assert production == {"model-v1", "model-v2"}  # the swap really happened during the load


def test_every_sent_request_is_in_a_committed_batch(
    registry: tuple[Settings, dict[str, str]], tmp_path: Path,
) -> None:
    settings, _ = registry
    traffic = settings.serving.traffic.model_copy(update={"root": str(tmp_path / "traffic"),
                                                          "batch_max_records": 16})
    s = settings.model_copy(update={"serving": settings.serving.model_copy(
        update={"traffic": traffic})})
    sent: list[str] = []
    with running_server(build_app(s)) as url, httpx.Client(timeout=30) as client:
        with ThreadPoolExecutor(4) as pool:
            sent = [r.json()["request_id"] for r in pool.map(
                lambda i: _post(client, url, GOOD, f"d{i % 7}"), range(90))]
        feedback = client.post(f"{url}/v1/feedback",
                               json={"request_id": sent[0], "kind": "repeat"})
        assert feedback.status_code == 202
        metrics = client.get(f"{url}/metrics").text
    # Shutdown flushed the writer: every request is in exactly one committed batch.
    root = str(tmp_path / "traffic")
    records = [r for b in list_batches(root) for r in read_batch(root, b)]
    requests = [r.request_id for r in records if r.kind == "request"]
    assert sorted(requests) == sorted(sent) and len(set(requests)) == len(requests)
    assert [r.request_id for r in records if r.kind == "feedback"] == [sent[0]]
    logged = next(line for line in metrics.splitlines()
                  if line.startswith("voiceloop_traffic_dropped "))
    assert float(logged.split()[1]) == 0.0
    one = next(r for r in records if r.kind == "request")
    audio, rate = read_audio(root, one)
    assert rate == 16000 and abs(len(audio) / rate - one.duration_s) < 0.01
    assert json.loads(one.model_dump_json())["route"] in ("production", "canary")
