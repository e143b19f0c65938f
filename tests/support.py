"""Shared test helpers: tiny real models in a real MLflow registry, a real uvicorn server
on loopback, and audio bytes. Nothing here is a mock: the models are random-weight
networks exported, int8-quantised and registered exactly as training does it."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import uvicorn
from fastapi import FastAPI

from model.frontend.features import FeatureConfig
from model.nn.export import export_onnx, quantize_bundle
from model.nn.network import EncoderConfig, JointModel, ModelConfig
from model.nn.package import ModelPackage
from model.nn.tokens import ParseVocab, TaggedCharVocab
from serving.pyfunc import log_pyfunc, register_pyfunc
from voiceloop.settings import Settings
from voiceloop.tracking import RunLogger

__all__ = [
    "VOCAB", "free_port", "register_tiny", "running_server", "tiny_package", "tone", "wav_bytes",
]

VOCAB = ParseVocab.build(["HassTurnOn", "HassTurnOff", "HassLightSet"], ["area", "name"],
                         ["turn on the kitchen light", "turn off the lamp"])


def tiny_package(version: str, seed: int = 0) -> ModelPackage:
    """A random-weight tagged-CTC model (no parse decoder), like the real recipe, tiny."""
    torch.manual_seed(seed)
    ctc = TaggedCharVocab(VOCAB.slot_types)
    cfg = ModelConfig(
        EncoderConfig(d_model=32, layers=1, heads=2, ffn_mult=2, conv_kernel=5, subsampling=8,
                      causal_conv=True, frontend_channels=8),
        n_chars=len(ctc), n_intents=len(VOCAB.intents), n_parse_tokens=len(VOCAB),
        decoder_layers=0, ctc_upsample=4,
    )
    return ModelPackage(JointModel(cfg).eval(), FeatureConfig(), VOCAB, 0.2,
                        {"version": version, "role": "student"}, ctc)


def register_tiny(settings: Settings, root: Path, version: str, alias: str | None,
                  seed: int = 0) -> str:
    """Export, int8-quantise, log as a pyfunc and register a tiny model; returns the
    registry version number (``alias`` pointed at it when given)."""
    fp32 = export_onnx(tiny_package(version, seed), root / f"{version}-fp32")
    int8 = quantize_bundle(fp32.folder, root / f"{version}-int8")
    logger = RunLogger.start(settings, f"test-{version}")
    info = log_pyfunc(logger.client, logger.run_id, int8.folder)
    logger.finish()
    return register_pyfunc(logger.client, info, settings.tracking.registered_model, alias)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running_server(app: FastAPI, timeout_s: float = 60.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn on 127.0.0.1 in a thread; yields the base URL and shuts
    the server down (running the app's shutdown, e.g. the traffic flush) on exit."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=timeout_s)


def wav_bytes(samples: np.ndarray, rate: int = 16000, fmt: str = "WAV",
              subtype: str | None = "PCM_16") -> bytes:
    """``samples`` encoded as an audio file in memory."""
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def tone(seconds: float, freq: float = 440.0, rate: int = 16000, level: float = 0.3) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    noise = np.random.default_rng(int(freq)).normal(0, 0.02, t.size)
    return (level * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)

