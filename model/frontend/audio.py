"""Audio loading for inference and features: any WAV/FLAC, any rate, mono or stereo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

__all__ = ["AudioError", "load_audio", "prepare_waveform"]


class AudioError(ValueError):
    """Audio that cannot be used: unreadable, empty, or not finite."""


def prepare_waveform(audio: np.ndarray, sample_rate: int, target_rate: int = 16000) -> np.ndarray:
    """Down-mix to mono and resample: ``(T,)`` or ``(T, channels)`` → float32 ``(T',)``.

    Raises:
        AudioError: empty, non-finite, or more than two dimensions.
    """
    x = np.asarray(audio, dtype=np.float32)
    if x.ndim == 2:
        x = x.mean(axis=1)
    if x.ndim != 1:
        raise AudioError(f"audio must be 1-D or (frames, channels), got shape {x.shape}")
    if x.size == 0:
        raise AudioError("audio is empty")
    if not np.isfinite(x).all():
        raise AudioError("audio has NaN or infinite samples")
    if sample_rate != target_rate:
        x = AF.resample(torch.from_numpy(x), sample_rate, target_rate).numpy()
    return x


def load_audio(path: Path | str, target_rate: int = 16000) -> np.ndarray:
    """Read an audio file as float32 mono at ``target_rate`` Hz (soundfile; no FFmpeg).

    Raises:
        AudioError: the file is missing or cannot be decoded, with the reason.
    """
    try:
        audio, rate = sf.read(str(path), dtype="float32", always_2d=False)
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise AudioError(f"cannot read {path}: {exc}") from exc
    return prepare_waveform(audio, rate, target_rate)
