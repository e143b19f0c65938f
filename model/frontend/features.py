"""Log-mel filterbank features, their normalisation (per utterance, global, causal), and
SpecAugment."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torchaudio
from torch import Tensor

__all__ = [
    "FeatureConfig",
    "FeatureExtractor",
    "SpecAugment",
    "causal_normalise",
    "global_stats",
    "normalise_features",
]


@dataclass(frozen=True)
class FeatureConfig:
    """Feature settings.

    Attributes:
        sample_rate: input rate in Hz.
        n_mels: mel bins F.
        win_ms: analysis window in ms (25 ms = 400 samples at 16 kHz).
        hop_ms: frame shift in ms (10 ms → 100 frames/s).
        normalise: ``utterance`` (mean/variance per utterance and bin: removes channel
            and gain, so works without any global statistics), ``global`` (fixed
            per-bin ``mean``/``std`` measured on training data: causal, so a streaming
            model can use it), ``causal`` (a running per-utterance mean blended with the
            global mean, divided by the global ``std``: removes channel and gain like
            ``utterance`` once enough audio has been heard, yet streamable; see
            :func:`causal_normalise`) or ``none``.
        mean, std: per-bin statistics (``n_mels`` each) for ``global`` and ``causal``.
        causal_prior_frames: for ``causal``, how many frames' worth of weight the global
            mean has in the running mean (``N0``; 100 frames = 1 s at a 10 ms hop).
    """

    sample_rate: int = 16000
    n_mels: int = 80
    win_ms: float = 25.0
    hop_ms: float = 10.0
    normalise: str = "utterance"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    causal_prior_frames: int = 100

    def __post_init__(self) -> None:
        if self.normalise not in ("utterance", "global", "causal", "none"):
            raise ValueError(
                "normalise must be 'utterance', 'global', 'causal' or 'none', "
                f"got {self.normalise!r}")
        if self.normalise in ("global", "causal"):
            if self.mean is None or self.std is None:
                raise ValueError(f"normalise={self.normalise!r} needs mean and std")
            if len(self.mean) != self.n_mels or len(self.std) != self.n_mels:
                raise ValueError(f"global mean/std must have {self.n_mels} values each")
        if not self.causal_prior_frames >= 0:
            raise ValueError(
                f"causal_prior_frames must be >= 0, got {self.causal_prior_frames}")
        # JSON round trips give lists; keep the dataclass hashable and comparable.
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(float(v) for v in value))


def normalise_features(raw: Tensor, cfg: FeatureConfig) -> Tensor:
    """Apply ``cfg.normalise`` to raw log-mel features ``(T, F)`` (or ``(B, T, F)`` for
    ``global``/``causal``/``none``: causal, so padding never reaches a valid frame);
    returns float32 of the same shape."""
    raw = raw.float()
    if cfg.normalise == "utterance":
        return (raw - raw.mean(-2, keepdim=True)) / (raw.std(-2, keepdim=True) + 1e-5)
    if cfg.normalise == "global":
        assert cfg.mean is not None and cfg.std is not None
        return (raw - torch.tensor(cfg.mean)) / torch.tensor(cfg.std)
    if cfg.normalise == "causal":
        return causal_normalise(raw, cfg)
    return raw


def causal_normalise(
    raw: Tensor, cfg: FeatureConfig, past_sum: Tensor | None = None, past_frames: int = 0
) -> Tensor:
    """Causal per-utterance mean normalisation (``normalise='causal'``).

    Frame t is centred on a running mean over frames ``0..t`` that starts from the global
    mean ``mu_g`` with the weight of ``N0 = cfg.causal_prior_frames`` frames::

        m_t = (N0 · mu_g + sum_{s <= t} x_s) / (N0 + t + 1)        (per bin)
        y_t = (x_t − m_t) / std_g

    so a speaker/channel offset is removed once a few ``N0`` frames have been heard, and
    frame t depends on no later frame (streamable, and padding cannot leak into a valid
    frame of a padded batch).

    Args:
        raw: ``(..., T, F)`` raw log-mel features.
        cfg: a ``causal`` configuration (``mean``/``std`` are ``mu_g``/``std_g``).
        past_sum: ``(F,)`` sum of the stream's earlier frames, for ``raw`` continuing a
            stream (:class:`~model.inference.streaming.StreamingFeatures`); None = none.
        past_frames: how many earlier frames ``past_sum`` covers.

    Returns:
        ``(..., T, F)`` float32.
    """
    if cfg.mean is None or cfg.std is None:
        raise ValueError(f"causal normalisation needs mean and std, got normalise={cfg.normalise!r}")
    # Running sums in float64: streamed chunks then match the whole-utterance pass to
    # rounding, and long utterances do not lose precision.
    x = raw.double()
    csum = x.cumsum(-2)
    if past_sum is not None:
        csum = csum + past_sum.double()
    count = past_frames + torch.arange(1, x.size(-2) + 1, dtype=torch.float64)
    n0 = float(cfg.causal_prior_frames)
    mean_g = torch.tensor(cfg.mean, dtype=torch.float64)
    running = (n0 * mean_g + csum) / (n0 + count)[:, None]
    return ((x - running) / torch.tensor(cfg.std, dtype=torch.float64)).float()


def global_stats(raw_feats: list[Tensor]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-bin mean and standard deviation over all frames of ``raw_feats`` ``[(T_i, F)]``."""
    total = sum(f.shape[0] for f in raw_feats)
    acc = torch.zeros(raw_feats[0].shape[1], dtype=torch.float64)
    acc2 = torch.zeros_like(acc)
    for f in raw_feats:
        f64 = f.double()
        acc += f64.sum(0)
        acc2 += (f64 * f64).sum(0)
    mean = acc / total
    std = (acc2 / total - mean * mean).clamp(min=1e-8).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


class FeatureExtractor:
    """Waveform ``(N,)`` float32 at ``sample_rate`` → features ``(T, F)`` float32.

    ``T = 1 + N // hop`` frames (centred STFT), ``F = n_mels``; values are natural-log
    mel energies, normalised as ``cfg.normalise`` says.
    """

    def __init__(self, cfg: FeatureConfig) -> None:
        self.cfg = cfg
        win = round(cfg.sample_rate * cfg.win_ms / 1000)
        self.hop = round(cfg.sample_rate * cfg.hop_ms / 1000)
        self.n_fft = 512
        self._mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=cfg.sample_rate, n_fft=self.n_fft, win_length=win, hop_length=self.hop,
            n_mels=cfg.n_mels, power=2.0,
        )

    def __call__(self, waveform: np.ndarray | Tensor) -> Tensor:
        x = torch.as_tensor(waveform, dtype=torch.float32)
        if x.dim() != 1:
            raise ValueError(f"waveform must be 1-D, got shape {tuple(x.shape)}")
        with torch.no_grad():
            feats = normalise_features(torch.log(self._mel(x) + 1e-6).T, self.cfg)  # (T, F)
        return feats.contiguous()

    def raw(self, waveform: np.ndarray | Tensor) -> Tensor:
        """Unnormalised log-mel ``(T, F)``."""
        x = torch.as_tensor(waveform, dtype=torch.float32)
        with torch.no_grad():
            return torch.log(self._mel(x) + 1e-6).T.contiguous()


class SpecAugment:
    """Frequency and time masking (Park et al. 2019), training only.

    Masks are drawn per utterance inside its valid length; masked values are set to 0
    (the mean after normalisation).

    Args:
        freq_masks: number of frequency masks, each up to ``freq_width`` bins.
        time_masks: number of time masks, each up to ``min(time_width_max,
            time_width_frac × length)`` frames.
    """

    def __init__(
        self,
        freq_masks: int = 2,
        freq_width: int = 15,
        time_masks: int = 2,
        time_width_frac: float = 0.05,
        time_width_max: int = 20,
    ) -> None:
        self.freq_masks, self.freq_width = freq_masks, freq_width
        self.time_masks, self.time_width_frac = time_masks, time_width_frac
        self.time_width_max = time_width_max

    def __call__(self, feats: Tensor, lengths: Tensor, generator: torch.Generator,
                 strength: float = 1.0) -> Tensor:
        """``(B, T, F)`` features, ``(B,)`` lengths → masked copy ``(B, T, F)``.

        ``strength`` in [0, 1] scales the widest mask (a ramp early in training).
        """
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must lie in [0, 1], got {strength}")
        out = feats.clone()
        n_freq = feats.size(-1)
        freq_width = round(self.freq_width * strength)
        for b in range(feats.size(0)):
            length = int(lengths[b])
            for _ in range(self.freq_masks):
                width = int(torch.randint(0, freq_width + 1, (1,), generator=generator))
                start = int(torch.randint(0, max(1, n_freq - width), (1,), generator=generator))
                out[b, :length, start : start + width] = 0.0
            max_t = int(strength * min(self.time_width_max, int(self.time_width_frac * length)))
            for _ in range(self.time_masks):
                width = int(torch.randint(0, max_t + 1, (1,), generator=generator))
                start = int(torch.randint(0, max(1, length - width), (1,), generator=generator))
                out[b, start : start + width, :] = 0.0
        return out
