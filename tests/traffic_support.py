"""Synthetic curated traffic for the drift and UI tests: every column of
:mod:`monitoring.schema`, with knobs for the shifts the monitor must see."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from monitoring.schema import embedding_columns

__all__ = ["DIM", "DOMAINS", "INTENTS", "synthetic_traffic"]

INTENTS = [f"Hass{name}" for name in (
    "TurnOn", "TurnOff", "LightSet", "ClimateSetTemperature", "StartTimer", "CancelTimer",
    "ShoppingListAddItem", "ListAddItem", "MediaPause", "MediaUnpause", "GetWeather",
    "GetCurrentTime", "Toggle", "SetVolume", "MediaNext", "GetState")]
DOMAINS = ["lights", "lights", "lights", "climate", "timers", "timers", "shopping_list",
           "todo_list", "media", "media", "weather", "clock", "general", "media", "media",
           "general"]
DIM = 96
# A fixed low-rank mixing: embeddings have a few strong directions plus isotropic noise,
# like mean-pooled encoder states.
_MIX = np.random.default_rng(1234).normal(size=(8, DIM))


def synthetic_traffic(n: int, seed: int, *, snr_shift: float = 0.0, level_shift: float = 0.0,
                      intent_p: np.ndarray | None = None, emb_shift: float = 0.0,
                      dim: int = DIM, embeddings: bool = True,
                      model_version: str = "v1",
                      slots_p: tuple[float, ...] = (0.35, 0.4, 0.2, 0.05)) -> pd.DataFrame:
    """``n`` rows of synthetic curated traffic with every schema column.

    Args:
        snr_shift, level_shift: added to ``snr_db`` / ``level_dbfs`` (dB).
        intent_p: intent probabilities (default uniform).
        emb_shift: added to embedding dimensions 0-2 (in units of the noise std 0.5).
        embeddings: add ``dim`` embedding columns.
        model_version: the ``model_version`` and ``embedding_model`` of every row.
        slots_p: probabilities of answers with 0, 1, 2, … slots (``slots``, JSON).
    """
    rng = np.random.default_rng(seed)
    p = np.full(len(INTENTS), 1 / len(INTENTS)) if intent_p is None else intent_p
    idx = rng.choice(len(INTENTS), n, p=p)
    confidence = rng.beta(8, 1.5, n)
    frame = pd.DataFrame({
        "request_id": [f"req-{seed}-{i}" for i in range(n)],
        "timestamp": pd.Timestamp("2026-03-01", tz="UTC") + pd.to_timedelta(
            np.arange(n) * 3 + seed * 100_000, unit="s"),
        "model_version": model_version,
        "embedding_model": model_version,
        "duration_s": rng.gamma(6.0, 0.4, n),
        "level_dbfs": rng.normal(-25.0, 4.0, n) + level_shift,
        "snr_db": rng.normal(20.0, 6.0, n) + snr_shift,
        "speaking_rate": rng.normal(2.5, 0.5, n),
        "spectral_centroid_hz": rng.normal(1500.0, 250.0, n),
        "silence_share": rng.beta(2.0, 5.0, n),
        "clipping_share": np.where(rng.random(n) < 0.02, rng.random(n) * 0.01, 0.0),
        "confidence": confidence,
        "latency_ms": rng.lognormal(3.0, 0.3, n),
        "intent": [INTENTS[i] for i in idx],
        "domain": [DOMAINS[i] for i in idx],
        "clarify": confidence < 0.5,
        "slots": [json.dumps([{"type": "name", "value": "lamp"}] * k)
                  for k in rng.choice(len(slots_p), n, p=np.asarray(slots_p))],
    })
    if not embeddings:
        return frame
    z = rng.normal(size=(n, 8)) @ _MIX[:, :dim] + rng.normal(scale=0.5, size=(n, dim))
    z[:, :3] += emb_shift * 0.5
    return pd.concat([frame, pd.DataFrame(z, columns=embedding_columns(dim))], axis=1)
