"""Column contract of the curated traffic dataset and of drift references.

The ingestion flow writes one row per accepted request with these columns; the drift
monitor reads windows of them and compares with a *reference* of the same columns,
computed once per production model version from that model's own validation data.
Embedding columns are ``emb_0 … emb_{D-1}``: the mean-pooled encoder output of the model
named in ``embedding_model`` (rows embedded by another model are not comparable and are
left out of embedding drift).
"""

from __future__ import annotations

__all__ = [
    "CATEGORICAL_FEATURES",
    "EMBEDDING_PREFIX",
    "IDENTITY_COLUMNS",
    "PREDICTION_FEATURES",
    "SIGNAL_FEATURES",
    "embedding_columns",
]

IDENTITY_COLUMNS: tuple[str, ...] = (
    "request_id", "timestamp", "batch_id", "device_id", "route", "model_version",
    "registry_version", "embedding_model", "audio", "audio_offset", "audio_bytes",
    "transcript", "slots",
)
"""Who and what: not compared for drift. ``audio`` / ``audio_offset`` / ``audio_bytes``
locate the request's audio in the traffic store (see ``serving.traffic.AudioRef``)."""

SIGNAL_FEATURES: tuple[str, ...] = (
    "duration_s",            # seconds of audio
    "level_dbfs",            # RMS level, dBFS
    "snr_db",                # estimated speech-to-noise ratio, dB
    "speaking_rate",         # words of the (predicted) transcript per second of speech
    "spectral_centroid_hz",  # mean spectral centroid of the voiced frames, Hz
    "silence_share",         # share of 10 ms frames 40 dB below the loudest
    "clipping_share",        # share of samples at full scale
)
"""Numerical features of the audio itself (column drift)."""

PREDICTION_FEATURES: tuple[str, ...] = ("confidence", "latency_ms")
"""Numerical features of the answer: ``confidence`` counts towards data drift like the
signal features, ``latency_ms`` is a service signal (:data:`SERVICE_FEATURES`)."""

SERVICE_FEATURES: tuple[str, ...] = ("latency_ms",)
"""Numerical features of how the answer was *served*, not of the data or the model's
judgement: server load moves them (a demo's post-promotion check found latency "drift"
between the canary phase and a busier minute). The drift report scores them, but they
never vote for data drift: a retraining cannot answer them (the canary's latency check
and the service's metrics can)."""

CATEGORICAL_FEATURES: tuple[str, ...] = ("intent", "domain", "clarify")
"""Categorical features of the answer (prediction drift on their distribution)."""

EMBEDDING_PREFIX = "emb_"


def embedding_columns(dim: int) -> list[str]:
    """``emb_0 … emb_{dim-1}``."""
    if dim < 1:
        raise ValueError(f"embedding dimension must be positive, got {dim}")
    return [f"{EMBEDDING_PREFIX}{i}" for i in range(dim)]
