"""Load test of the HTTP service: the int8 student with its LM, traffic logging on,
closed-loop clients over loopback, against the compute ceiling measured in the same run.

What runs:

1. **Audio**: ``--utterances`` real test-split utterances
   (``workspace/corpus/<profile>/manifests/test.jsonl``), zero-padded or cut to 3 s and
   sent as 16-bit WAV bodies; without a corpus, sentences synthesised with espeak-ng.
2. **Compute ceiling**: ``time.process_time()`` around ``predictor.predict_waveforms``
   of one 3-s utterance (torch and ONNX Runtime at 1 thread); ceiling =
   ``os.cpu_count()`` ÷ the median CPU time: the requests per second the machine could
   answer if every core did nothing but run the model. Taken literally — *every* core
   running the model — the timing runs in one process per core, all predicting at once
   (:class:`_LoadedCeiling`): with both cores busy, a prediction here cost up to 1.5×
   the CPU time it cost with the other core idle, and the service is measured with
   both cores busy. The single-process timing (this process, the other core idle,
   ``--ceiling-runs`` before the load and half as many after) is reported beside it.
   The all-cores timing runs before and after the load and ``--bracket-runs`` times per
   process right before and right after each level: each level's share of the ceiling
   is taken against its own bracket, because this machine's speed drifts by ±20 % within
   a minute (shared cores).
3. **Server**: ``python -m voiceloop.cli serve --model BUNDLE --host 127.0.0.1 --port P
   --workspace TMP --quiet --processes N --set serving.max_batch=B`` as a separate process
   (traffic logging on, into ``TMP/traffic``; ``--processes`` / ``--max-batch`` default to
   ``serving.processes`` / ``serving.max_batch``), ready when ``/readyz`` answers 200. Its
   CPU time is that of the whole process tree (the worker processes included).
4. **Load**: for each ``--levels`` N, N closed-loop clients (one keep-alive connection
   each, a minimal HTTP/1.1 client on asyncio so that the load generator, which shares
   the machine's cores with the server, costs as little CPU as possible) send
   ``POST /v1/understand`` until ``--requests`` were sent or ``--max-seconds`` passed.
   Per level: throughput, client-side p50/p95/p99 latency, server-reported
   ``latency_ms`` p50/p95/p99, errors (anything but 200), CPU seconds per request of the
   server process and of the client, and the throughput as a share of the ceiling.
   The first answer to each utterance is remembered: a later, different answer to the
   same audio (at any concurrency) is counted as a mismatch.
5. **Traffic**: ``/metrics`` is read after the last level (``voiceloop_traffic_dropped``),
   the server is stopped with SIGINT (it flushes its traffic writer), and the committed
   batches are read back (``serving.traffic.list_batches`` / ``read_batch``): every
   request answered 200 must be in a committed batch or counted as dropped, and none
   dropped.

The levels run ``--rounds`` times in turn (1, 4, 16, 1, 4, 16, …), each against its own
bracket: one level of a few seconds on a shared 2-core machine swings by ±10 points.

Targets (printed as pass/fail): at 16 clients, the median over rounds of the throughput
as a share of the ceiling ≥ 70 % and the client p99 of all rounds' requests ≤ 150 ms; no
errors at any level; no traffic lost.

    uv run python benchmarks/serving_load.py [--model release/student] [--requests 400]
        [--max-seconds 60] [--levels 1 4 16] [--rounds 3]

Without ``--model`` it serves ``release/student``, else ``workspace/models/<profile>/
student/deploy``, else (development only, flagged in the output) a tiny random model.
Prints a table and writes ``benchmarks/results/serving_load.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

_ROOT = Path(__file__).resolve().parent.parent
_OUT = _ROOT / "benchmarks" / "results" / "serving_load.json"
_SECONDS = 3.0
_RATE = 16000
_TARGET_SHARE = 0.70
_TARGET_P99_MS = 150.0
_TARGET_LEVEL = 16


# -- the model and the audio ---------------------------------------------------------------


def _pick_model(arg: Path | None, profile: str, tmp: Path) -> tuple[Path, str]:
    """The bundle to serve and what it is (``release``, ``workspace``, ``given``, or
    ``tiny-dev``: a random tiny model, for developing this script only)."""
    if arg is not None:
        return arg.resolve(), "given"
    release = _ROOT / "release" / "student"
    if release.is_dir():
        return release, "release"
    deploy = _ROOT / "workspace" / "models" / profile / "student" / "deploy"
    if deploy.is_dir():
        return deploy, "workspace"
    from model.nn.export import export_onnx, quantize_bundle
    from tests.support import tiny_package

    print("no release/student and no workspace student: building a TINY random model "
          "(numbers are for developing this script only)", flush=True)
    fp32 = export_onnx(tiny_package("tiny-dev"), tmp / "tiny-fp32")
    return quantize_bundle(fp32.folder, tmp / "tiny-int8").folder, "tiny-dev"


def _fit(samples: np.ndarray) -> np.ndarray:
    n = int(_SECONDS * _RATE)
    samples = samples[:n]
    return np.pad(samples, (0, n - samples.size)).astype(np.float32)


def _utterances(profile: str, count: int, seed: int, tmp: Path) -> tuple[list[np.ndarray], str]:
    """``count`` 3-s mono 16-kHz utterances and where they come from."""
    from model.frontend.audio import load_audio

    manifest = _ROOT / "workspace" / "corpus" / profile / "manifests" / "test.jsonl"
    if manifest.is_file():
        rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()
                if line.strip()]
        rng = np.random.default_rng(seed)
        pick = rng.choice(len(rows), size=min(count, len(rows)), replace=False)
        audio = [_fit(load_audio((manifest.parent / rows[i]["audio"]).resolve(), _RATE))
                 for i in sorted(pick)]
        return audio, f"{manifest.relative_to(_ROOT)} ({len(audio)} utterances, seed {seed})"
    from model.data.tts import SynthJob, VoiceSpec, synthesize

    sentences = ["turn on the kitchen light", "set the bedroom temperature to twenty degrees",
                 "what is the weather like today", "add milk to my shopping list",
                 "start a timer for ten minutes", "turn off the lamp in the living room",
                 "pause the music", "is the garage door open"]
    voices = ["en-us", "en-gb", "en-gb-scotland+f3", "en-us+m3"]
    jobs = [SynthJob(f"s{i}", sentences[i % len(sentences)],
                     VoiceSpec("espeak-ng", voices[i % len(voices)]), tmp / "tts" / f"s{i}.wav")
            for i in range(count)]
    results = synthesize(jobs, sample_rate=_RATE, workers=1, progress=False)
    audio = [_fit(load_audio(r.out_path, _RATE)) for r in results if r.error is None]
    return audio, f"espeak-ng ({len(audio)} sentences)"


def _wav(samples: np.ndarray) -> bytes:
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, samples, _RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


# -- the compute ceiling -------------------------------------------------------------------


class _ModelCpu:
    """CPU seconds of one ``predict_waveforms`` call on one thread (the audio decoded from
    the very WAV bodies the clients send), measured in this process."""

    def __init__(self, bundle: Path, bodies: list[bytes], warmup: int) -> None:
        import io

        import soundfile as sf
        import torch

        from model.inference.onnx import load_predictor

        torch.set_num_threads(1)
        self.predictor = load_predictor(bundle, batch_size=1, threads=1)
        self.waves = [sf.read(io.BytesIO(b), dtype="float32")[0] for b in bodies]
        self.version = self.predictor.version
        self.lm = self.predictor.transcriber is not None
        for i in range(warmup):
            self.predictor.predict_waveforms(["w"], [self.waves[i % len(self.waves)]], [_RATE])

    def measure(self, runs: int) -> dict[str, list[float]]:
        cpu, wall = [], []
        for i in range(runs):
            w = self.waves[i % len(self.waves)]
            c0, t0 = time.process_time(), time.perf_counter()
            self.predictor.predict_waveforms([f"c{i}"], [w], [_RATE])
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - t0)
        return {"cpu_s": cpu, "wall_s": wall}


_WORKER_CPU: _ModelCpu | None = None


def _init_loaded_worker(bundle: str, bodies: list[bytes], warmup: int) -> None:
    global _WORKER_CPU
    _WORKER_CPU = _ModelCpu(Path(bundle), bodies, warmup)


def _loaded_worker_run(runs: int) -> list[float]:
    assert _WORKER_CPU is not None
    return _WORKER_CPU.measure(runs)["cpu_s"]


class _LoadedCeiling:
    """The model's CPU time per prediction with *every* core running it: one process per
    core, each timing ``predict_waveforms`` at once. On this machine a core running the
    model alone was up to 1.5× faster than with its sibling busy too (shared physical
    cores, turbo), so the single-process timing overstated what the cores can do
    together — which is what the service, both cores busy, is compared with."""

    def __init__(self, bundle: Path, bodies: list[bytes], cores: int, warmup: int = 10) -> None:
        import multiprocessing

        self.cores = cores
        self._pool = multiprocessing.get_context("spawn").Pool(
            cores, initializer=_init_loaded_worker, initargs=(str(bundle), bodies, warmup))

    def measure(self, runs: int) -> list[float]:
        """CPU seconds per prediction, ``runs`` in each process, all processes at once."""
        per_process = self._pool.map(_loaded_worker_run, [runs] * self.cores, chunksize=1)
        return [t for times in per_process for t in times]

    def close(self) -> None:
        self._pool.terminate()
        self._pool.join()


# -- the server ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    import httpx

    r = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=timeout)
    return r.status_code, r.text


def _wait_ready(proc: subprocess.Popen[bytes], port: int, log_path: Path, timeout: float) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}):\n"
                               + log_path.read_text(errors="replace")[-3000:])
        with contextlib.suppress(Exception):  # not listening yet
            if _get(port, "/readyz", 1.0)[0] == 200:
                return time.perf_counter() - start
        time.sleep(0.2)
    raise RuntimeError(f"/readyz not 200 after {timeout:.0f} s:\n"
                       + log_path.read_text(errors="replace")[-3000:])


def _metric(text: str, name: str) -> float:
    """Sum of the samples of one metric (all label sets) in Prometheus text."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and re.match(rf"{re.escape(name)}(\{{.*\}})? ", line):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _machine_busy() -> float:
    """CPU seconds all processes of the machine have been busy since boot (/proc/stat)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _tree_cpu(pid: int) -> dict[int, float]:
    """User + system CPU seconds of a process and of each of its live descendants (the
    worker processes of a multi-process server), all their threads, by pid."""
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stats[int(entry.name)] = (entry / "stat").read_text().rsplit(")", 1)[1].split()
    tree, grew = {pid}, True
    while grew:  # descendants: processes whose parent (field 4 → index 1) is in the tree
        more = {p for p, f in stats.items() if int(f[1]) in tree} - tree
        tree |= more
        grew = bool(more)
    tick = os.sysconf("SC_CLK_TCK")
    return {p: (int(stats[p][11]) + int(stats[p][12])) / tick for p in tree if p in stats}


# -- the clients ---------------------------------------------------------------------------


class _Conn:
    """One keep-alive HTTP/1.1 connection; the bare minimum to POST and read a response
    with a ``Content-Length``."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                f"Content-Length: {len(body)}\r\n"
                + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n")
        self.writer.write(head.encode("latin-1"))
        self.writer.write(body)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length, close = 0, False
        for line in lines[1:]:
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key == "content-length":
                length = int(value)
            elif key == "connection" and value.strip().lower() == "close":
                close = True
            elif key == "transfer-encoding":
                raise RuntimeError("chunked responses are not supported by this client")
        payload = await self.reader.readexactly(length)
        if close:
            self.close()
        return status, payload

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


@dataclass
class _Level:
    clients: int
    round: int = 0
    latencies_s: list[float] = field(default_factory=list)
    server_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    ok_ids: list[str] = field(default_factory=list)
    mismatches: int = 0
    sent: int = 0
    wall_s: float = 0.0
    server_cpu_s: float = 0.0
    process_shares: list[float] = field(default_factory=list)
    client_cpu_s: float = 0.0
    other_cpu_s: float = 0.0
    ceiling_cpu_s: list[float] = field(default_factory=list)  # model CPU right around it


async def _drive(port: int, bodies: list[bytes], level: _Level, requests: int,
                 max_seconds: float, timeout: float, answers: dict[int, tuple[Any, ...]]) -> None:
    counter = itertools.count()
    start = time.perf_counter()
    deadline = start + max_seconds

    async def client(i: int) -> None:
        conn = _Conn(port)
        headers = {"Content-Type": "audio/wav", "X-Device-Id": f"bench-{i}"}
        try:
            while True:
                k = next(counter)
                if k >= requests or time.perf_counter() >= deadline:
                    return
                utt = k % len(bodies)
                level.sent += 1
                t0 = time.perf_counter()
                try:
                    status, payload = await asyncio.wait_for(
                        conn.post("/v1/understand", bodies[utt], headers), timeout)
                except Exception as exc:  # noqa: BLE001 - counted, connection renewed
                    conn.close()
                    key = type(exc).__name__
                    level.errors[key] = level.errors.get(key, 0) + 1
                    continue
                elapsed = time.perf_counter() - t0
                if status != 200:
                    key = str(status)
                    level.errors[key] = level.errors.get(key, 0) + 1
                    continue
                answer = json.loads(payload)
                level.latencies_s.append(elapsed)
                level.server_ms.append(float(answer["latency_ms"]))
                level.ok_ids.append(answer["request_id"])
                said = (answer["transcript"], answer["intent"],
                        json.dumps(answer["slots"], sort_keys=True))
                if answers.setdefault(utt, said) != said:
                    level.mismatches += 1
        finally:
            conn.close()

    await asyncio.gather(*(client(i) for i in range(level.clients)))
    level.wall_s = time.perf_counter() - start


def _run_level(pid: int, port: int, bodies: list[bytes], clients: int, requests: int,
               max_seconds: float, timeout: float, answers: dict[int, tuple[Any, ...]]) -> _Level:
    level = _Level(clients)
    tree0, client0, busy0 = _tree_cpu(pid), time.process_time(), _machine_busy()
    asyncio.run(_drive(port, bodies, level, requests, max_seconds, timeout, answers))
    used = {p: cpu - tree0.get(p, 0.0) for p, cpu in _tree_cpu(pid).items()}
    level.server_cpu_s = sum(used.values())
    # How the work split between the server's processes (the supervisor of a
    # multi-process server does next to nothing): shares of the level's server CPU.
    level.process_shares = sorted((round(c / level.server_cpu_s, 3) for c in used.values()
                                   if level.server_cpu_s > 0 and c / level.server_cpu_s >= 0.02),
                                  reverse=True)
    level.client_cpu_s = time.process_time() - client0
    level.other_cpu_s = max(0.0, _machine_busy() - busy0 - level.server_cpu_s
                            - level.client_cpu_s)
    return level


# -- reporting -----------------------------------------------------------------------------


def _pct(values: list[float], q: float, scale: float = 1.0) -> float | None:
    return round(float(np.percentile(values, q)) * scale, 2) if values else None


def _level_row(level: _Level, cores: int, single_ceiling_rps: float) -> dict[str, Any]:
    ok = len(level.latencies_s)
    rps = ok / level.wall_s if level.wall_s > 0 else 0.0
    ceiling_rps = cores / float(np.median(level.ceiling_cpu_s))
    return {
        "round": level.round,
        "clients": level.clients,
        "sent": level.sent,
        "ok": ok,
        "errors": sum(level.errors.values()),
        "error_kinds": level.errors,
        "answer_mismatches": level.mismatches,
        "wall_s": round(level.wall_s, 2),
        "throughput_rps": round(rps, 2),
        "ceiling_rps": round(ceiling_rps, 2),
        "share_of_ceiling": round(rps / ceiling_rps, 3),
        "share_of_single_process_ceiling": round(rps / single_ceiling_rps, 3),
        "client_p50_ms": _pct(level.latencies_s, 50, 1000),
        "client_p95_ms": _pct(level.latencies_s, 95, 1000),
        "client_p99_ms": _pct(level.latencies_s, 99, 1000),
        "client_max_ms": _pct(level.latencies_s, 100, 1000),
        "server_p50_ms": _pct(level.server_ms, 50),
        "server_p95_ms": _pct(level.server_ms, 95),
        "server_p99_ms": _pct(level.server_ms, 99),
        "server_cpu_ms_per_request": round(1000 * level.server_cpu_s / max(ok, 1), 2),
        "client_cpu_ms_per_request": round(1000 * level.client_cpu_s / max(ok, 1), 2),
        "server_cpu_cores_busy": round(level.server_cpu_s / level.wall_s, 2) if level.wall_s else 0,
        "server_process_cpu_shares": level.process_shares,
        "other_processes_cpu_cores_busy": (round(level.other_cpu_s / level.wall_s, 2)
                                           if level.wall_s else 0),
    }


def _summary_row(clients: int, levels: list[_Level], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One concurrency over all rounds: the median, lowest and highest share of the
    ceiling (each round against its own bracket) and latency percentiles of every
    request of every round."""
    shares = [r["share_of_ceiling"] for r in rows]
    latencies = [x for lv in levels for x in lv.latencies_s]
    return {
        "clients": clients, "rounds": len(rows), "ok": sum(r["ok"] for r in rows),
        "errors": sum(r["errors"] for r in rows),
        "throughput_rps_median": round(float(np.median([r["throughput_rps"] for r in rows])), 2),
        "share_median": round(float(np.median(shares)), 3),
        "share_min": min(shares), "share_max": max(shares),
        "client_p50_ms": _pct(latencies, 50, 1000), "client_p99_ms": _pct(latencies, 99, 1000),
        "server_cpu_ms_per_request_median": round(float(np.median(
            [r["server_cpu_ms_per_request"] for r in rows])), 2),
    }


def _table(result: dict[str, Any]) -> str:
    c, m, srv = result["ceiling"], result["model"], result["server"]
    lines = [
        (f"model {m['path']} ({m['kind']}, version {m['version']}, "
         f"LM {'on' if m['lm'] else 'off'})"),
        (f"ceiling, one process timing alone: {c['cores']} cores ÷ {c['cpu_ms_median']:.2f} ms "
         f"CPU per prediction (median of {c['runs']}; before {c['cpu_ms_median_before']:.2f}, "
         f"after {c['cpu_ms_median_after']:.2f}) = {c['ceiling_rps']:.1f} req/s"),
        (f"ceiling, every core predicting at once: {c['cores']} cores ÷ "
         f"{c['all_cores']['cpu_ms_median']:.2f} ms = {c['all_cores']['ceiling_rps']:.1f} req/s "
         "(each level's share: against its own bracket of these)"),
        (f"server: {srv['processes']} processes × {srv['workers']} inference threads, "
         f"batches of up to {srv['max_batch']}, model_threads {srv['model_threads']}, "
         f"loop {srv['loop']}, http {srv['http']}; load average at start "
         f"{result['machine']['loadavg_start']}, end {result['machine']['loadavg_end']}"),
        "",
        (f"{'round':>5} {'clients':>7} {'ok':>5} {'err':>4} {'req/s':>7} {'ceil':>6} {'ceil%':>6} {'p50':>7} {'p95':>7} "
         f"{'p99':>7} {'srv p50':>8} {'srv p99':>8} {'srv CPU/req':>11} {'cli CPU/req':>11} "
         f"{'others':>6}  split"),
    ]
    for r in result["levels"]:
        lines.append(
            f"{r['round']:>5} {r['clients']:>7} {r['ok']:>5} {r['errors']:>4} {r['throughput_rps']:>7.1f} "
            f"{r['ceiling_rps']:>6.1f} {100 * r['share_of_ceiling']:>5.1f}% {r['client_p50_ms']:>7.1f} "
            f"{r['client_p95_ms']:>7.1f} {r['client_p99_ms']:>7.1f} {r['server_p50_ms']:>8.1f} "
            f"{r['server_p99_ms']:>8.1f} {r['server_cpu_ms_per_request']:>9.2f}ms "
            f"{r['client_cpu_ms_per_request']:>9.2f}ms {r['other_processes_cpu_cores_busy']:>6.2f}  "
            + "/".join(f"{100 * x:.0f}" for x in r["server_process_cpu_shares"]))
    lines.append(f"\nover {result['setup']['rounds']} rounds:")
    lines.append(f"{'clients':>7} {'ok':>6} {'err':>4} {'req/s (median)':>15} "
                 f"{'ceil% median [min–max]':>24} {'p50':>7} {'p99':>7} {'srv CPU/req':>11}")
    for r in result["summary"]:
        spread = (f"{100 * r['share_median']:.1f}% [{100 * r['share_min']:.1f}–"
                  f"{100 * r['share_max']:.1f}]")
        lines.append(f"{r['clients']:>7} {r['ok']:>6} {r['errors']:>4} "
                     f"{r['throughput_rps_median']:>15.1f} {spread:>24} {r['client_p50_ms']:>7.1f} "
                     f"{r['client_p99_ms']:>7.1f} {r['server_cpu_ms_per_request_median']:>9.2f}ms")
    t = result["traffic"]
    lines.append(f"\ntraffic: sent (200) {t['sent']} = logged {t['logged']} + dropped "
                 f"{t['dropped']}; missing {t['missing']}; {t['batches']} committed batches; "
                 f"server stopped with SIGINT in {t['shutdown_s']:.1f} s (exit {t['exit_code']})")
    lines.append("")
    lines.append("(latencies in ms; ceil = the level's ceiling in req/s, from the model CPU time "
                 "measured right before and after it; srv = latency_ms the server reports; CPU/req = CPU time of "
                 "the server process / of this client per answered request; others = cores "
                 "busy with other processes during the level; split = % of the server's CPU "
                 "per server process)")
    for name, target in result["targets"].items():
        lines.append(f"  [{'PASS' if target['pass'] else 'FAIL'}] {name}: {target['value']} "
                     f"(target {target['target']})")
    return "\n".join(lines)


def _machine() -> dict[str, Any]:
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": model, "cores": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)), "python": platform.python_version()}


def _cpu_pressure() -> str | None:
    """The kernel's CPU pressure line (share of time runnable tasks waited for a core)."""
    try:
        return Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except OSError:
        return None


def _versions() -> dict[str, str]:
    import fastapi
    import onnxruntime
    import torch
    import uvicorn

    return {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "fastapi": fastapi.__version__, "uvicorn": uvicorn.__version__}


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# -- main ----------------------------------------------------------------------------------


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from serving.service import inference_threads, server_processes
    from serving.traffic import list_batches, read_batch
    from voiceloop.settings import load_settings

    loadavg_start = [round(x, 2) for x in os.getloadavg()]
    pressure_start = _cpu_pressure()
    bundle, kind = _pick_model(args.model, args.profile, tmp)
    audio, source = _utterances(args.profile, args.utterances, args.seed, tmp)
    bodies = [_wav(a) for a in audio]
    print(f"serving {bundle} ({kind}); audio: {source}", flush=True)

    model_cpu = _ModelCpu(bundle, bodies, warmup=10)
    before = model_cpu.measure(args.ceiling_runs)
    cores = os.cpu_count() or 1
    loaded = _LoadedCeiling(bundle, bodies, cores)
    loaded_before = loaded.measure(max(args.ceiling_runs // cores, 10))
    print(f"model CPU per prediction: {1000 * np.median(before['cpu_s']):.2f} ms "
          f"(wall {1000 * np.median(before['wall_s']):.2f} ms)", flush=True)

    workspace = tmp / "workspace"
    settings = load_settings(None, args.profile, workspace)
    processes = server_processes(settings, args.processes)
    workers = inference_threads(settings, processes, args.workers)
    port = _free_port()
    cmd = [sys.executable, "-m", "voiceloop.cli", "serve", "--model", str(bundle),
           "--host", "127.0.0.1", "--port", str(port), "--workspace", str(workspace),
           "--profile", args.profile, "--quiet"]
    if args.workers:
        cmd += ["--workers", str(args.workers)]
    max_batch = settings.serving.max_batch if args.max_batch is None else args.max_batch
    cmd += ["--processes", str(processes), "--set", f"serving.max_batch={max_batch}"]
    log_path = tmp / "server.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(cmd, cwd=_ROOT, stdout=log_file, stderr=subprocess.STDOUT)
    levels: list[_Level] = []
    warm = _Level(0)
    answers: dict[int, tuple[Any, ...]] = {}
    try:
        ready_s = _wait_ready(proc, port, log_path, args.start_timeout)
        print(f"server pid {proc.pid} ready in {ready_s:.1f} s on port {port}", flush=True)
        warm = _run_level(proc.pid, port, bodies, 2, args.warmup, 30, args.timeout, answers)
        for rnd in range(1, args.rounds + 1):
            for n in args.levels:
                # The machine's speed drifts within a run (shared cores): each level's
                # share is taken against the ceiling measured right before and after it.
                bracket = loaded.measure(args.bracket_runs)
                level = _run_level(proc.pid, port, bodies, n, args.requests, args.max_seconds,
                                   args.timeout, answers)
                level.ceiling_cpu_s = bracket + loaded.measure(args.bracket_runs)
                level.round = rnd
                levels.append(level)
                ok = len(level.latencies_s)
                share = ok / level.wall_s * float(np.median(level.ceiling_cpu_s)) / cores
                print(f"  round {rnd}, {n:>2} clients: {ok} ok, "
                      f"{sum(level.errors.values())} errors, {ok / level.wall_s:.1f} req/s "
                      f"({100 * share:.1f} % of its ceiling), p99 "
                      f"{_pct(level.latencies_s, 99, 1000)} ms", flush=True)
        metrics = _get(port, "/metrics")[1]
    finally:
        stop = time.perf_counter()
        proc.send_signal(signal.SIGINT)
        try:
            exit_code = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            exit_code = proc.wait()
        shutdown_s = time.perf_counter() - stop
    server_log = log_path.read_text(errors="replace")

    after = model_cpu.measure(max(args.ceiling_runs // 2, 10))
    loaded_all = loaded_before + loaded.measure(max(args.ceiling_runs // cores, 10))
    loaded.close()
    cpu_all = before["cpu_s"] + after["cpu_s"]
    cpu_median = float(np.median(cpu_all))
    ceiling = cores / cpu_median
    loaded_median = float(np.median(loaded_all))

    # Traffic: every 200 answer must be in a committed batch, or counted as dropped.
    sent_ids = set(warm.ok_ids).union(*(lv.ok_ids for lv in levels))
    root = settings.traffic_root
    batches = list_batches(root)
    logged_ids = {rec.request_id for info in batches for rec in read_batch(root, info)
                  if rec.kind == "request"}
    dropped = int(_metric(metrics, "voiceloop_traffic_dropped"))
    logged = len(sent_ids & logged_ids)
    missing = len(sent_ids - logged_ids)

    rows = [_level_row(lv, cores, ceiling) for lv in levels]
    summary = [_summary_row(n, [lv for lv in levels if lv.clients == n],
                            [r for r in rows if r["clients"] == n]) for n in args.levels]
    errors = sum(r["errors"] for r in rows) + sum(warm.errors.values())
    at = next((r for r in summary if r["clients"] == _TARGET_LEVEL), None)
    targets = {
        f"throughput at {_TARGET_LEVEL} clients ≥ {_TARGET_SHARE:.0%} of ceiling (median of rounds)": {
            "value": None if at is None else f"{at['share_median']:.1%}",
            "target": f"≥ {_TARGET_SHARE:.0%}",
            "pass": at is not None and at["share_median"] >= _TARGET_SHARE},
        f"p99 at {_TARGET_LEVEL} clients ≤ {_TARGET_P99_MS:.0f} ms (all rounds' requests)": {
            "value": None if at is None else f"{at['client_p99_ms']} ms",
            "target": f"≤ {_TARGET_P99_MS:.0f} ms",
            "pass": at is not None and at["client_p99_ms"] <= _TARGET_P99_MS},
        "errors (all levels and warm-up)": {"value": errors, "target": 0, "pass": errors == 0},
        "traffic lost (sent − logged − dropped; dropped)": {
            "value": f"{len(sent_ids) - logged - dropped}; {dropped}", "target": "0; 0",
            "pass": logged == len(sent_ids) and dropped == 0},
    }
    import uvicorn  # noqa: F401 - only to report its automatic choices

    return {
        "benchmark": "serving_load",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {**_machine(), "loadavg_start": loadavg_start,
                    "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                    "cpu_pressure_start": pressure_start, "cpu_pressure_end": _cpu_pressure()},
        "versions": _versions(),
        "model": {"path": str(bundle), "kind": kind, "version": model_cpu.version,
                  "lm": model_cpu.lm, "int8": _is_int8(bundle)},
        "audio": {"source": source, "seconds": _SECONDS, "sample_rate": _RATE,
                  "body_bytes": len(bodies[0]), "format": "WAV PCM_16 mono"},
        "setup": {"levels": args.levels, "rounds": args.rounds,
                  "requests_per_level": args.requests,
                  "max_seconds_per_level": args.max_seconds, "warmup_requests": args.warmup,
                  "timeout_s": args.timeout, "client": "asyncio raw HTTP/1.1, one keep-alive "
                  "connection per client, closed loop", "loopback": True},
        "server": {"command": " ".join(cmd[1:]), "workers": workers,
                   "model_threads": settings.serving.model_threads,
                   "processes": processes, "max_batch": max_batch,
                   "loop": "uvloop" if _installed("uvloop") else "asyncio",
                   "http": "httptools" if _installed("httptools") else "h11",
                   "traffic": {"root": "TMP/workspace/traffic",
                               **settings.serving.traffic.model_dump(exclude={"root"})},
                   "ready_s": round(ready_s, 1),
                   "log_tail": server_log[-1500:]},
        "ceiling": {
            "definition": "cores ÷ median process CPU time of one predict_waveforms call "
                          "(one 3-s utterance, 1 thread, in-process)",
            "cores": cores, "runs": len(cpu_all),
            "cpu_ms_median": round(1000 * cpu_median, 3),
            "cpu_ms_median_before": round(1000 * float(np.median(before["cpu_s"])), 3),
            "cpu_ms_median_after": round(1000 * float(np.median(after["cpu_s"])), 3),
            "cpu_ms_p10": round(1000 * float(np.percentile(cpu_all, 10)), 3),
            "cpu_ms_p90": round(1000 * float(np.percentile(cpu_all, 90)), 3),
            "wall_ms_median": round(1000 * float(np.median(before["wall_s"] + after["wall_s"])), 3),
            "ceiling_rps": round(ceiling, 2),
            "all_cores": {
                "definition": "cores ÷ median CPU time of one prediction measured with one "
                              "process per core all predicting at once (the levels' "
                              "ceilings and the target use this, from brackets around "
                              "each level)",
                "runs": len(loaded_all), "cpu_ms_median": round(1000 * loaded_median, 3),
                "ceiling_rps": round(cores / loaded_median, 2)}},
        "levels": rows,
        "summary": summary,
        "warmup": {"ok": len(warm.ok_ids), "errors": warm.errors},
        "traffic": {"sent": len(sent_ids), "logged": logged, "dropped": dropped,
                    "missing": missing, "batches": len(batches),
                    "records_in_store": len(logged_ids),
                    "metrics_logged": int(_metric(metrics, "voiceloop_traffic_logged")),
                    "shutdown_s": round(shutdown_s, 2), "exit_code": exit_code},
        "targets": targets,
        "all_pass": all(t["pass"] for t in targets.values()),
    }


def _is_int8(bundle: Path) -> bool | None:
    try:
        return bool(json.loads((bundle / "config.json").read_text())["onnx"]["int8"])
    except (OSError, KeyError, ValueError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="deploy bundle to serve (default: "
                        "release/student, else the workspace student, else a tiny dev model)")
    parser.add_argument("--profile", default="full", help="params.yaml profile (corpus, "
                        "workspace student, server settings)")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=800, help="requests per level at most")
    parser.add_argument("--rounds", type=int, default=3,
                        help="the levels run this many times in turn (1, 4, 16, 1, 4, 16, …); "
                             "the targets use the median share and the p99 of all rounds")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="seconds per level at most")
    parser.add_argument("--warmup", type=int, default=40, help="requests before the first level")
    parser.add_argument("--utterances", type=int, default=64)
    parser.add_argument("--ceiling-runs", type=int, default=100,
                        help="model calls timed before the load (and half as many after)")
    parser.add_argument("--bracket-runs", type=int, default=20,
                        help="model calls timed per core, all cores at once, right before "
                             "and right after each level: that level's ceiling")
    parser.add_argument("--workers", type=int, default=0,
                        help="inference threads per server process (default: serving.workers)")
    parser.add_argument("--processes", type=int, default=None,
                        help="server processes sharing the port (default serving.processes; "
                             "0 = one per core)")
    parser.add_argument("--max-batch", type=int, default=None,
                        help="requests waiting together run as one model call of up to this "
                             "many (default serving.max_batch)")
    parser.add_argument("--timeout", type=float, default=30.0, help="per request, seconds")
    parser.add_argument("--start-timeout", type=float, default=180.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=_OUT)
    args = parser.parse_args()
    sys.path.insert(0, str(_ROOT))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="serving_load-") as tmp:
        result = run(args, Path(tmp))
    result["setup"]["wall_s"] = round(time.perf_counter() - start, 1)
    print()
    print(_table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"\n→ {args.out} ({result['setup']['wall_s']} s)")


if __name__ == "__main__":
    main()
