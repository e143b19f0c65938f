"""The traffic simulator for real: scenario utterances rendered with the TTS engines and
the augmenter, and ``simulate`` driving a small HTTP server on 127.0.0.1.

The product service (``serving/app.py``) was being written at the same time, so the
server here is a stand-in started inside the test: a stdlib ``ThreadingHTTPServer``
implementing the wire contract (``POST /v1/understand`` with a WAV body and
``X-Device-Id`` → ``UnderstandResponse`` or ``{"error": {...}}``; ``POST /v1/feedback`` →
202; ``GET /healthz``). It answers every utterance with one fixed frame (so most answers
are wrong and feedback rates can be checked), refuses every fifth request with a 503, and
records what it received. The tiny profile keeps the whole module under a minute on one
core.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
import threading
import time
import uuid
from contextlib import closing
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self

import numpy as np
import pytest
import soundfile as sf
import yaml
from typer.testing import CliRunner

from model.data import tts
from model.data.grammar import DOMAINS
from model.data.manifest import Slot
from model.data.textnorm import is_spoken_form
from serving.annotations import AnnotationStore
from serving.contracts import Annotation, FeedbackRequest
from serving.scenarios import (
    RenderFailure,
    SimUtterance,
    load_scenario,
    render_utterances,
)
from serving.simulator import (
    SimulationReport,
    device_ids,
    feedback_kind,
    frame_correct,
    simulate,
)
from voiceloop.cli import app
from voiceloop.settings import FeedbackSettings, Settings, load_settings

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(any(shutil.which(e) is None for e in tts.ENGINES),
                       reason="a TTS engine is not installed"),
]

VALUES = Path(__file__).parents[2] / "model" / "data" / "values" / "en.yaml"
FIXED_INTENT = "HassTurnOn"


# -- a stand-in service -------------------------------------------------------------------


class FakeService:
    """Records requests and feedback; answers ``FIXED_INTENT`` with no slots."""

    def __init__(self, fail_every: int = 5, delay_s: float = 0.01) -> None:
        self.fail_every = fail_every
        self.delay_s = delay_s
        self.lock = threading.Lock()
        self.requests: list[dict] = []   # every /v1/understand call
        self.answers: dict[str, dict] = {}  # request_id -> answer
        self.feedback: list[FeedbackRequest] = []
        service = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _json(self, status: int, payload: dict) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == "/healthz":
                    self._json(200, {"status": "ok"})
                else:
                    self._json(404, {"error": {"code": "not_found", "message": self.path}})

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path == "/v1/understand":
                    service.understand(self, body)
                elif self.path == "/v1/feedback":
                    service.give_feedback(self, body)
                else:
                    self._json(404, {"error": {"code": "not_found", "message": self.path}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def understand(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        time.sleep(self.delay_s)
        audio, rate = sf.read(io.BytesIO(body), dtype="float32")
        device = handler.headers.get("X-Device-Id")
        with self.lock:
            n = len(self.requests)
            self.requests.append({"device": device, "rate": rate, "samples": len(audio),
                                  "content_type": handler.headers.get("Content-Type")})
            if self.fail_every and (n + 1) % self.fail_every == 0:
                handler._json(503, {"error": {"code": "overloaded", "message": "busy"}})
                return
            request_id = uuid.uuid4().hex
            answer = {
                "request_id": request_id, "id": request_id, "transcript": "turn on",
                "intent": FIXED_INTENT, "slots": [], "confidence": 0.5,
                "model_version": "fake-1", "clarify": False,
                "route": "canary" if n % 3 == 0 else "production", "latency_ms": 3.0,
            }
            self.answers[request_id] = answer
        handler._json(200, answer)

    def give_feedback(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        request = FeedbackRequest.model_validate_json(body)
        with self.lock:
            known = request.request_id in self.answers
            if known:
                self.feedback.append(request)
        if known:
            handler._json(202, {"status": "accepted"})
        else:
            handler._json(404, {"error": {"code": "unknown_request", "message": "?"}})

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return load_settings(profile="tiny", workspace=tmp_path_factory.mktemp("ws"))


@pytest.fixture()
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Temporary files of in-process rendering land here, so the test can see them go."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _render(settings: Settings, name: str, count: int, seed: int = 3, workers: int = 1
            ) -> list[SimUtterance | RenderFailure]:
    scenario = load_scenario(settings, name)
    stream = render_utterances(settings, scenario, count=count, seed=seed,
                               cache_dir=settings.simulations_dir, workers=workers,
                               prefetch=8, babble_utterances=3)
    with closing(stream):
        return list(stream)


# -- rendering ------------------------------------------------------------------------------


def test_every_scenario_renders_labelled_audio(settings: Settings, private_tmp: Path) -> None:
    training = settings.corpus.tts
    en_values = yaml.safe_load(VALUES.read_text(encoding="utf-8"))
    for name in settings.simulator.scenarios:
        items = _render(settings, name, count=4)
        assert [u.index for u in items] == [0, 1, 2, 3]
        utterances = [u for u in items if isinstance(u, SimUtterance)]
        assert len(utterances) >= 3, items
        for u in utterances:
            assert u.audio.dtype == np.float32 and u.audio.ndim == 1
            assert u.sample_rate == 16000
            assert 0.3 < u.duration_s < 15.0
            assert np.all(np.isfinite(u.audio)) and np.abs(u.audio).max() <= 1.0
            assert np.abs(u.audio).max() > 0.01  # not silent
            assert is_spoken_form(u.transcript)
            assert u.domain in DOMAINS and u.intent.startswith("Hass")
            for slot in u.slots:
                assert slot.value in u.transcript
            data, rate = sf.read(io.BytesIO(u.wav_bytes()), dtype="float32")
            assert rate == 16000 and len(data) == len(u.audio)
            if name == "accent_shift":
                accent = u.voice.split("+")[0]
                assert u.engine in ("espeak-ng", "festival")
                assert accent not in training.espeak_accents
                assert u.voice not in training.festival_voices
            if name == "noise_shift":
                assert u.augment  # augment p = 1
            if name == "new_values":
                new = {s.value for s in u.slots} - {
                    v for v in en_values["area"]} - {
                    v for names in en_values["name"].values() for v in names}
                assert new, f"{u.transcript!r} says no new value"
        if name == "ramp":
            assert {u.scenario for u in utterances} <= {"baseline", "accent_shift"}
    # every temporary WAV (TTS output, babble talkers) is gone
    assert list(private_tmp.iterdir()) == []


def test_rendering_is_deterministic_and_pool_matches_in_process(settings: Settings) -> None:
    first = _render(settings, "noise_shift", count=3, seed=11)
    again = _render(settings, "noise_shift", count=3, seed=11, workers=2)
    other = _render(settings, "noise_shift", count=3, seed=12)
    for a, b in zip(first, again, strict=True):
        assert isinstance(a, SimUtterance) and isinstance(b, SimUtterance)
        assert (a.transcript, a.voice, a.augment) == (b.transcript, b.voice, b.augment)
        np.testing.assert_array_equal(a.audio, b.audio)
    assert [u.transcript for u in first] != [u.transcript for u in other]


# -- simulate -------------------------------------------------------------------------------


def test_simulate_counts_feedback_annotations_devices(settings: Settings,
                                                       private_tmp: Path) -> None:
    feedback = FeedbackSettings(p_wrong=0.6, p_right=0.0, correction_share=0.5)
    with FakeService(fail_every=5) as service:
        report = simulate(service.url, "baseline", settings=settings, requests=20, rate=0,
                          seed=5, concurrency=3, max_seconds=60, timeout_s=10,
                          feedback=feedback, devices=7, progress=False)
    # count bound and balanced counts
    assert report.stopped_by == "count"
    assert report.requests == 20
    assert report.sent + report.render_failed + report.not_sent == 20
    assert report.not_sent == 0
    assert report.sent == len(service.requests) >= 18
    assert report.sent == report.answered + sum(report.errors.values())
    assert report.errors == {"503 overloaded": report.sent // 5}
    assert report.answered == len(service.answers)
    assert sum(report.routes.values()) == report.answered
    assert report.latency_ms is not None and report.latency_ms.p50 >= 10.0  # server sleeps
    assert report.server_latency_ms is not None and report.server_latency_ms.p50 == 3.0
    assert report.mixture["baseline"].sent == report.sent
    # uploads: WAV at 16 kHz from a stable pool of devices
    pool = set(device_ids(7))
    assert all(r["content_type"] == "audio/wav" and r["rate"] == 16000
               for r in service.requests)
    assert {r["device"] for r in service.requests} <= pool
    assert report.devices == len({r["device"] for r in service.requests})
    # annotations: one per answered request, keyed by the service's request ids, apart
    # from the traffic store
    store = AnnotationStore(settings.annotations_root)
    annotations = store.read()
    assert set(annotations) == set(service.answers)
    assert report.annotations_written == report.answered
    assert not Path(store.root).resolve().is_relative_to(Path(settings.traffic_root).resolve())
    files = store.files()
    assert len(files) == 1 and files[0].parent.name.startswith("dt=")
    assert files[0].name == f"{report.run_id}.jsonl"
    # accuracy and feedback, judged from the annotations
    wrong = {rid for rid, a in annotations.items()
             if not frame_correct(FIXED_INTENT, [], a.intent, a.slots)}
    assert report.wrong == len(wrong)
    assert report.frame_accuracy == pytest.approx(1 - len(wrong) / report.answered, abs=1e-3)
    got = {f.request_id for f in service.feedback}
    assert got <= wrong  # p_right = 0: no feedback on right answers
    assert sum(report.feedback.values()) == len(service.feedback)
    assert 0.2 * len(wrong) <= len(got) <= 0.95 * len(wrong)  # p_wrong = 0.6, ~16 wrong
    for f in service.feedback:
        if f.kind == "correction":
            assert f.text == annotations[f.request_id].transcript
        else:
            assert f.text is None
    assert list(private_tmp.iterdir()) == []


def test_simulate_stops_at_the_time_bound(settings: Settings) -> None:
    with FakeService(fail_every=0, delay_s=0.0) as service:
        start = time.monotonic()
        # 10 s, not less: the first TTS render alone took over 4 s once, with the suite's
        # two workers on the two cores, and nothing had been sent when time ran out.
        report = simulate(service.url, "ramp", settings=settings, requests=500, rate=2,
                          seed=6, concurrency=2, max_seconds=10.0, timeout_s=5,
                          progress=False)
        elapsed = time.monotonic() - start
    assert report.stopped_by == "time"
    assert 0 < report.sent < 500 and report.sent == len(service.requests)
    assert report.sent <= 2 * 10.0 + 1  # paced at 2/s, for at most 10 s
    assert report.sent + report.render_failed + report.not_sent == 500
    assert elapsed < 10.0 + 5.0
    # the start of a 500-request ramp is (almost) all baseline
    assert report.mixture["baseline"].sent >= report.sent - 2


def test_simulate_refuses_a_dead_service_and_bad_arguments(settings: Settings) -> None:
    with pytest.raises(ConnectionError, match="healthz"):
        simulate("http://127.0.0.1:9", "baseline", settings=settings, requests=1,
                 timeout_s=1, progress=False)
    with pytest.raises(ValueError, match="ftp://x"):
        simulate("ftp://x", "baseline", settings=settings, progress=False)
    with pytest.raises(ValueError, match="no_such_scenario"), FakeService() as service:
        simulate(service.url, "no_such_scenario", settings=settings, progress=False)
    with pytest.raises(ValueError, match="inside the traffic store"), FakeService() as service:
        simulate(service.url, "baseline", settings=settings, requests=1,
                 annotations_root=Path(settings.traffic_root) / "ann", progress=False)


def test_feedback_rates_follow_the_settings() -> None:
    fb = FeedbackSettings(p_wrong=0.6, p_right=0.02, correction_share=0.5)
    wrong = [feedback_kind(1, i, False, fb) for i in range(4000)]
    right = [feedback_kind(1, i, True, fb) for i in range(4000)]
    assert abs(sum(k is not None for k in wrong) / 4000 - 0.6) < 0.03
    assert abs(sum(k is not None for k in right) / 4000 - 0.02) < 0.01
    given = [k for k in wrong if k is not None]
    assert abs(given.count("correction") / len(given) - 0.5) < 0.05


def test_cli_simulate_prints_and_writes_the_report(settings: Settings) -> None:
    with FakeService(fail_every=0) as service:
        result = CliRunner().invoke(app, [
            "simulate", "--url", service.url, "--scenario", "domain_shift", "--requests", "4",
            "--rate", "0", "--seed", "9", "--profile", "tiny",
            "--workspace", str(settings.workspace), "--quiet",
        ])
    assert result.exit_code == 0, result.output
    assert "frame accuracy" in result.output and "domain_shift" in result.output
    (path,) = (settings.workspace / "simulations").glob("*-domain_shift.json")
    report = SimulationReport.model_validate_json(path.read_text(encoding="utf-8"))
    assert report.requests == 4 and report.sent == report.answered == 4
    assert report.seed == 9 and report.stopped_by == "count"
    bad = CliRunner().invoke(app, ["simulate", "--url", "http://127.0.0.1:9", "--scenario",
                                   "baseline", "--profile", "tiny", "--timeout", "1", "-q"])
    assert bad.exit_code == 1 and "healthz" in bad.output


# -- the annotation store -------------------------------------------------------------------


def _annotation(request_id: str, day: int, hour: int = 12, intent: str = "HassTurnOn"
                ) -> Annotation:
    return Annotation(request_id=request_id, transcript="turn on the lamp", intent=intent,
                      slots=[Slot(type="name", value="lamp")], scenario="baseline",
                      timestamp=datetime(2026, 1, day, hour, tzinfo=UTC))


def test_annotation_store_appends_partitions_and_reads(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture
                                                       ) -> None:
    root = tmp_path / "annotations"
    store = AnnotationStore(root, "run-1")
    assert store.read() == {} and store.files() == []
    assert store.write([_annotation("r1", 1, 23), _annotation("r2", 2)]) == 2
    assert store.write([_annotation("r1", 2, 13, intent="HassTurnOff")]) == 1  # re-annotated
    assert [f.parent.name for f in store.files()] == ["dt=2026-01-01", "dt=2026-01-02"]
    AnnotationStore(root, "run-2").write([_annotation("r3", 2)])
    got = AnnotationStore(root).read()
    assert set(got) == {"r1", "r2", "r3"}
    assert got["r1"].intent == "HassTurnOff"  # the latest annotation wins
    assert set(AnnotationStore(root).read(["r2", "nope"])) == {"r2"}
    assert set(AnnotationStore(root).read(run_id="run-2")) == {"r3"}  # one run's only
    assert [f.name for f in AnnotationStore(root).files("run-2")] == ["run-2.jsonl"]
    # a crash mid-line leaves a truncated last line: skipped with a warning
    with store.path_for("2026-01-02").open("a", encoding="utf-8") as fh:
        fh.write('{"request_id": "r9", "transc')
    with caplog.at_level("WARNING"):
        assert set(store.read()) == {"r1", "r2", "r3"}
    assert "unreadable annotation" in caplog.text
    # concurrent writers of one store never interleave lines
    threaded = AnnotationStore(tmp_path / "threads", "run-t")
    workers = [threading.Thread(target=lambda k=k: [
        threaded.write([_annotation(f"t{k}-{i}", 3)]) for i in range(40)]) for k in range(6)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(threaded.read()) == 240


def test_annotation_store_refuses_the_traffic_store_and_bad_run_ids(tmp_path: Path) -> None:
    traffic = tmp_path / "traffic"
    with pytest.raises(ValueError, match="inside the traffic store"):
        AnnotationStore(traffic / "annotations", "run", traffic_root=traffic)
    with pytest.raises(ValueError, match="inside the traffic store"):
        AnnotationStore(traffic, "run", traffic_root=traffic)
    AnnotationStore(tmp_path / "annotations", "run", traffic_root=traffic)  # apart: fine
    AnnotationStore(tmp_path / "annotations", "run", traffic_root="s3://bucket/traffic")
    with pytest.raises(ValueError, match="bad id"):
        AnnotationStore(tmp_path / "annotations", "bad id/..")
