"""Voice perturbation in the feature domain: speed, tempo, VTLP and spectral tilt.

Applied on the fly to cached **raw** log-mel features (natural-log mel power ``(T, F)``,
10 ms hop, the output of :meth:`FeatureExtractor.raw`) in the training data loader, so
the model hears many more voices than the TTS engine rendered without any re-synthesis.

Transforms (all vectorised; one interpolation along one axis each):

- :func:`warp_frequency` — vocal-tract-length perturbation (VTLP) / formant + pitch
  shift by ``alpha``: output bin k takes the input spectrum at ``f_k / alpha`` Hz, so
  content at ``f`` moves to ``alpha · f`` (``alpha > 1`` = shorter vocal tract, higher
  voice).
- :func:`stretch_time` — tempo change by ``beta``: output frame j takes the input at
  time ``j · beta`` (``beta > 1`` = faster speech, fewer frames).
- **Speed perturbation** (Kaldi's resampling by 0.9/1.0/1.1, ``y(t) = x(s·t)``) scales
  every frequency by ``s`` and every duration by ``1/s``, i.e. it *is*
  ``stretch_time(warp_frequency(x, s), s)`` up to the STFT/mel smoothing and a
  per-bin level change that the normalisation absorbs (measured in the tests).
- :func:`add_tilt` — a channel/microphone EQ: a smooth curve added in the log domain.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "LOG_POWER_PER_DB",
    "FeatureWarp",
    "add_tilt",
    "mel_bin_centres",
    "stretch_time",
    "warp_frequency",
]

# Natural-log power units per dB: 10·log10(P) dB = ln(P) · 10 / ln(10).
LOG_POWER_PER_DB = math.log(10.0) / 10.0


def _hz_to_mel(hz: Tensor) -> Tensor:
    # HTK mel scale: torchaudio's MelSpectrogram default, which FeatureExtractor uses.
    return 2595.0 * torch.log10(1.0 + hz / 700.0)


def _mel_to_hz(mel: Tensor) -> Tensor:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def _mel_grid(sample_rate: int, f_min: float, f_max: float | None) -> tuple[float, float]:
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be > 0 Hz, got {sample_rate}")
    # torchaudio's default f_max is sample_rate // 2 (integer division), copied exactly.
    top = float(sample_rate // 2) if f_max is None else float(f_max)
    if not 0.0 <= f_min < top:
        raise ValueError(f"need 0 <= f_min < f_max, got f_min={f_min}, f_max={top}")
    lo, hi = _hz_to_mel(torch.tensor([f_min, top], dtype=torch.float64)).tolist()
    return lo, hi


def mel_bin_centres(
    n_mels: int, sample_rate: int, f_min: float = 0.0, f_max: float | None = None
) -> Tensor:
    """Centre frequency in Hz of each mel bin ``(F,)`` float64, as torchaudio builds them.

    ``torchaudio.functional.melscale_fbanks`` spaces ``n_mels + 2`` points evenly on the
    HTK mel scale between ``f_min`` and ``f_max`` (default ``sample_rate // 2``); bin k is
    the triangle that peaks at point ``k + 1``.
    """
    if n_mels < 1:
        raise ValueError(f"n_mels must be >= 1, got {n_mels}")
    lo, hi = _mel_grid(sample_rate, f_min, f_max)
    mels = torch.linspace(lo, hi, n_mels + 2, dtype=torch.float64)[1:-1]
    return _mel_to_hz(mels)


def _lerp_index(x: Tensor, pos: Tensor, dim: int) -> Tensor:
    """``x`` read at fractional positions ``pos`` (1-D, float64) along ``dim`` with linear
    interpolation; positions are clamped to the edges (the edge value is repeated)."""
    size = x.size(dim)
    pos = pos.clamp(0.0, size - 1)
    lo = pos.floor().long().clamp(0, size - 1)
    hi = (lo + 1).clamp(max=size - 1)
    weight = (pos - lo).to(x.dtype)
    if dim % x.dim() != x.dim() - 1:
        weight = weight[:, None]  # the time axis: broadcast over the trailing bin axis
    return torch.lerp(x.index_select(dim, lo), x.index_select(dim, hi), weight)


def _check_factor(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite factor > 0, got {value}")


def warp_frequency(
    feats: Tensor, alpha: float, sample_rate: int, f_min: float = 0.0, f_max: float | None = None
) -> Tensor:
    """Warp the frequency axis of log-mel features by ``alpha`` (VTLP, formant shift).

    Args:
        feats: ``(..., F)`` log-mel features (natural-log mel power; any leading dims).
        alpha: frequency factor > 0; output bin k takes the input spectrum at
            ``f_k / alpha`` Hz (``f_k`` its centre frequency), so a peak at ``f`` moves to
            ``alpha · f``. Read by linear interpolation between the neighbouring bins at the
            fractional mel-bin index of ``f_k / alpha``; beyond the band edges the edge bin
            is repeated.
        sample_rate, f_min, f_max: the extractor's mel filterbank (torchaudio defaults).

    Returns:
        ``(..., F)`` in ``feats``' dtype (computed in float32).
    """
    _check_factor("alpha", alpha)
    n_mels = feats.size(-1)
    x = feats.float()
    if alpha == 1.0:
        return x.to(feats.dtype, copy=True)
    lo, hi = _mel_grid(sample_rate, f_min, f_max)
    step = (hi - lo) / (n_mels + 1)
    source_hz = mel_bin_centres(n_mels, sample_rate, f_min, f_max) / alpha
    # Fractional bin index of the source frequency: bin k is centred on mel point k + 1.
    pos = (_hz_to_mel(source_hz) - lo) / step - 1.0
    return _lerp_index(x, pos, -1).to(feats.dtype)


def stretch_time(feats: Tensor, beta: float) -> Tensor:
    """Change the tempo of features by ``beta`` (pitch and formants unchanged).

    Args:
        feats: ``(..., T, F)`` features, ``T >= 1`` frames.
        beta: tempo factor > 0; output frame j is the input linearly interpolated at
            frame position ``j · beta`` (clamped to the last frame). ``beta > 1`` is faster
            speech: ``T' = max(1, round(T / beta))`` frames.

    Returns:
        ``(..., T', F)`` in ``feats``' dtype (computed in float32).
    """
    _check_factor("beta", beta)
    frames = feats.size(-2)
    if frames < 1:
        raise ValueError(f"stretch_time needs at least one frame, got shape {tuple(feats.shape)}")
    x = feats.float()
    if beta == 1.0:
        return x.to(feats.dtype, copy=True)
    out_frames = max(1, round(frames / beta))
    pos = torch.arange(out_frames, dtype=torch.float64) * beta
    return _lerp_index(x, pos, -2).to(feats.dtype)


def add_tilt(feats: Tensor, curve: Tensor) -> Tensor:
    """Add a spectral curve ``(F,)`` in natural-log power units (``dB · LOG_POWER_PER_DB``)
    to every frame of ``(..., F)`` log-mel features; returns ``feats``' shape and dtype."""
    if curve.dim() != 1 or curve.size(0) != feats.size(-1):
        raise ValueError(
            f"curve must have shape ({feats.size(-1)},), got {tuple(curve.shape)}")
    return (feats.float() + curve.float()).to(feats.dtype)


def _check_range(name: str, value: tuple[float, float] | None) -> tuple[float, float] | None:
    if value is None:
        return None
    if len(value) != 2:
        raise ValueError(f"{name} must be a (low, high) pair or None, got {value!r}")
    lo, hi = float(value[0]), float(value[1])
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
        raise ValueError(f"{name} must satisfy 0 < low <= high, got {value!r}")
    return lo, hi


class FeatureWarp:
    """Random per-utterance voice perturbation of raw log-mel features.

    Each of three transforms is applied independently with probability ``p``, its factor
    drawn uniformly from its range with the caller's generator (reproducible):

    - speed ``s`` in ``speed``: frequency warp by ``s`` and time stretch by ``s`` (what
      resampling the audio by ``s`` does; Kaldi uses 0.9/1.0/1.1, here continuous);
    - VTLP ``a`` in ``vtlp``: frequency warp only (the two warps merge into one
      interpolation by ``s · a``);
    - spectral tilt: ``tilt_db · (x − ½)·t + c1·cos(2πx + φ1) + c2·cos(4πx + φ2)`` dB over
      the bins ``x ∈ [0, 1]``, with ``t`` uniform in [−1, 1] (a linear tilt of up to
      ±``tilt_db`` across the band) and ``c1, c2`` uniform in [0, ``tilt_db``/2]: a smooth
      channel EQ.

    Every call draws the same number of random values whatever is applied, so changing
    ``p`` or a range does not shift the generator stream of later draws.

    Args:
        n_mels: bins F of the features.
        sample_rate: audio rate in Hz (sets the mel bins' centre frequencies).
        speed: ``(low, high)`` speed factors, or None for no speed perturbation.
        vtlp: ``(low, high)`` frequency-warp factors, or None.
        tilt_db: tilt scale in dB (0 = none).
        p: probability of applying each transform.
    """

    _DRAWS = 10

    def __init__(
        self,
        n_mels: int,
        sample_rate: int,
        speed: tuple[float, float] | None,
        vtlp: tuple[float, float] | None,
        tilt_db: float,
        p: float,
    ) -> None:
        if n_mels < 1:
            raise ValueError(f"n_mels must be >= 1, got {n_mels}")
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be > 0 Hz, got {sample_rate}")
        if not (math.isfinite(tilt_db) and tilt_db >= 0):
            raise ValueError(f"tilt_db must be >= 0, got {tilt_db}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be a probability in [0, 1], got {p}")
        self.n_mels, self.sample_rate = n_mels, sample_rate
        self.speed, self.vtlp = _check_range("speed", speed), _check_range("vtlp", vtlp)
        self.tilt_db, self.p = float(tilt_db), float(p)
        self._x = torch.linspace(0.0, 1.0, n_mels, dtype=torch.float64)

    def __call__(
        self, feats: Tensor, generator: torch.Generator, time_stretch: bool = True
    ) -> Tensor:
        """Perturb one utterance.

        Args:
            feats: ``(T, F)`` raw log-mel features (any float dtype).
            generator: source of all random draws.
            time_stretch: False keeps the frame count (the speed factor then only warps
                frequency) — distillation needs targets aligned with the teacher's frames.

        Returns:
            ``(T', F)`` in ``feats``' dtype; ``T' = T`` unless speed is applied with
            ``time_stretch``.
        """
        if feats.dim() != 2 or feats.size(-1) != self.n_mels:
            raise ValueError(f"feats must be (T, {self.n_mels}), got {tuple(feats.shape)}")
        u = torch.rand(self._DRAWS, generator=generator, dtype=torch.float64).tolist()
        use_speed, use_vtlp, use_tilt = (v < self.p for v in u[:3])
        alpha, beta = 1.0, 1.0
        if self.speed is not None and use_speed:
            s = self.speed[0] + (self.speed[1] - self.speed[0]) * u[3]
            alpha, beta = s, (s if time_stretch else 1.0)
        if self.vtlp is not None and use_vtlp:
            alpha *= self.vtlp[0] + (self.vtlp[1] - self.vtlp[0]) * u[4]
        out = feats.float()
        if alpha != 1.0:
            out = warp_frequency(out, alpha, self.sample_rate)
        if beta != 1.0:
            out = stretch_time(out, beta)
        if self.tilt_db > 0 and use_tilt:
            out = add_tilt(out, self._tilt_curve(u[5:10]))
        return out.to(feats.dtype)

    def _tilt_curve(self, u: list[float]) -> Tensor:
        """``(F,)`` float32 curve in natural-log power units from five uniforms."""
        x, half = self._x, self.tilt_db / 2
        tilt = self.tilt_db * (2 * u[0] - 1) * (x - 0.5)
        ripple = (half * u[1] * torch.cos(2 * math.pi * x + 2 * math.pi * u[2])
                  + half * u[3] * torch.cos(4 * math.pi * x + 2 * math.pi * u[4]))
        return ((tilt + ripple) * LOG_POWER_PER_DB).float()
