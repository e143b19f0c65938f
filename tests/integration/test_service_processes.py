"""`voiceloop serve --processes 2`: two server processes behind one port (the supervisor
accepts and hands each connection to the process with the fewest open ones), started by
the real CLI against a tiny int8 bundle — every request answered, keep-alive connections
split evenly, Prometheus counts summed over the processes, every request in a committed
traffic batch after SIGINT."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from model.nn.export import export_onnx, quantize_bundle
from serving.traffic import list_batches, read_batch
from tests.support import free_port, tiny_package, tone, wav_bytes

pytestmark = pytest.mark.integration

_ROOT = Path(__file__).resolve().parents[2]
REQUESTS = 24


def _children(pid: int) -> list[tuple[int, str]]:
    """``(pid, command line)`` of the direct children of ``pid``."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                out.append((int(entry.name), cmd))
        except OSError:
            continue
    return out


def _cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _connection_owners(port: int, pids: list[int]) -> dict[int, int]:
    """Established server-side connections on ``port`` per process in ``pids`` (read
    from /proc/net/tcp and each process's open file descriptors)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, inode = fields[1], fields[3], fields[9]
        if int(local.split(":")[1], 16) == port and state == "01":  # 01: ESTABLISHED
            inodes.add(f"socket:[{inode}]")
    owners = {}
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        owners[pid] = sum(1 for fd in fd_dir.iterdir()
                          if os.path.exists(fd) and os.readlink(fd) in inodes)
    return owners


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if re.match(rf"{name}(\{{.*\}})? ", line))


def test_two_processes_answer_count_together_and_log_every_request(tmp_path: Path) -> None:
    bundle = quantize_bundle(export_onnx(tiny_package("procs"), tmp_path / "fp32").folder,
                             tmp_path / "int8")
    workspace, port = tmp_path / "ws", free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "voiceloop.cli", "serve", "--model", str(bundle.folder),
         "--processes", "2", "--host", "127.0.0.1", "--port", str(port), "--workspace",
         str(workspace), "--profile", "tiny", "--quiet"],
        cwd=_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the service did not get ready"
            time.sleep(0.3)
        workers = [pid for pid, cmd in _children(proc.pid) if "spawn_main" in cmd]
        assert len(workers) == 2, _children(proc.pid)
        cpu_before = {pid: _cpu(pid) for pid in workers}

        body = wav_bytes(tone(1.0, 300.0))

        def one(i: int) -> tuple[int, str]:
            # A connection per request: the kernel spreads them over the two sockets.
            r = httpx.post(f"{url}/v1/understand", content=body,
                           headers={"content-type": "audio/wav", "connection": "close"},
                           timeout=30)
            return r.status_code, r.json().get("request_id", "")

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(one, range(REQUESTS)))
        assert [status for status, _ in answers] == [200] * REQUESTS
        sent = {rid for _, rid in answers}
        assert len(sent) == REQUESTS
        # Both processes answered: each did a real share of the work (with one shared
        # socket, one process used to take every connection).
        used = {pid: _cpu(pid) - cpu_before[pid] for pid in workers}
        assert min(used.values()) >= 0.2 * max(used.values()), used

        # Keep-alive connections are split evenly (the kernel's SO_REUSEPORT hash split
        # 16 of them 9/7 or 10/6 as often as 8/8).
        clients = [httpx.Client(timeout=30) for _ in range(6)]
        try:
            for client in clients:
                r = client.post(f"{url}/v1/understand", content=body,
                                headers={"content-type": "audio/wav"})
                assert r.status_code == 200
                sent.add(r.json()["request_id"])
            assert sorted(_connection_owners(port, workers).values()) == [3, 3]
        finally:
            for client in clients:
                client.close()

        # Whichever process answers /metrics reports both processes' counts.
        deadline = time.monotonic() + 20
        while True:
            text = httpx.get(f"{url}/metrics", timeout=5).text
            if _metric(text, "voiceloop_traffic_logged") == len(sent):
                break
            assert time.monotonic() < deadline, text
            time.sleep(0.5)
        assert _metric(text, "voiceloop_requests_total") == len(sent)
        assert _metric(text, "voiceloop_traffic_dropped") == 0
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0
    root = str(workspace / "traffic")
    logged = {rec.request_id for info in list_batches(root) for rec in read_batch(root, info)
              if rec.kind == "request"}
    assert logged == sent


def test_several_processes_refuse_a_port_another_server_listens_on() -> None:
    from serving.service import ServeSpec, run_server

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"cannot listen on 127.0.0.1:{port}"):
            run_server(ServeSpec(processes=2), "127.0.0.1", port, quiet=True)
    with pytest.raises(ValueError, match="port 0"):
        run_server(ServeSpec(processes=2), "127.0.0.1", 0, quiet=True)
