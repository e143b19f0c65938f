"""Audio augmentation after synthesis: reverb, additive noise, telephone channel, gain, clipping.

Clean TTS audio is far too clean for a model that will hear real rooms and microphones, so
each utterance may pass through a random chain of transforms, always in the order

    reverb -> noise -> telephone -> gain -> clip

(the order of a real signal path: the room, then the background, then the channel, then
the recording level and the converter that saturates). Every transform that fires is
recorded as an :class:`~model.data.manifest.AugmentStep` whose ``params`` hold everything
needed to apply it again, so :func:`replay` turns a manifest row's ``augment`` list back
into the exact same audio. That is what makes the manifest auditable.

Randomness comes from :func:`augment_rng`, a generator derived from the corpus seed and the
utterance id only, so the result does not depend on the order (or the process) in which
utterances are augmented.

Conventions: audio is mono ``(T,)`` float at ``sample_rate`` Hz in ``[-1, 1]``; levels
are in dB; times in seconds.

Parameters recorded per step (``params``):

- ``reverb``: ``rir_index``, ``rir_seed`` (the bank's seed, checked on replay), ``rt60_s``
  (target RT60 of that room).
- ``noise``: ``noise`` (``white`` | ``pink`` | ``babble``), ``snr_db``, ``noise_seed``;
  babble adds ``sources`` (``|``-joined paths as given) and ``talkers``.
- ``telephone``: ``band_low_hz``, ``band_high_hz``, ``codec_rate_hz``.
- ``gain``: ``gain_db`` and the derived ``clipped_fraction`` (share of samples the gain
  pushed past full scale and that were therefore clipped at ±1).
- ``clip``: ``clip_level`` (threshold as a fraction of the peak) and the derived
  ``clipped_fraction``.
- ``reverb``/``noise``/``telephone`` add a derived ``peak_scale`` when their output
  exceeded full scale and was scaled down to peak 1 (a level change, not distortion).

Derived values are informative only: :func:`replay` recomputes them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyroomacoustics as pra
import soundfile as sf
from scipy import signal

from model.data.manifest import AugmentStep
from model.data.seeding import stable_rng
from model.fileio import atomic_path
from voiceloop.settings import AugmentSettings, ReverbSettings

__all__ = [
    "KINDS",
    "Augmenter",
    "RIRBank",
    "active_rms",
    "augment_rng",
    "replay",
]

#: Transform kinds, in the order they are applied.
KINDS: tuple[str, ...] = ("reverb", "noise", "telephone", "gain", "clip")

# Bumped whenever room sampling or simulation changes, so stale cached RIRs are not reused.
_RIR_CACHE_VERSION = 1
# The image-source count grows with max_order**3; uncapped, a small room at RT60 0.8 s
# needs order ~160 (3 s per room). Order 100 keeps a room under ~1 s; the tail it drops
# is far below the direct path (pyroomacoustics overshoots long RT60 targets anyway).
_MAX_ISM_ORDER = 100
# Room size ranges (metres): living rooms to small halls.
_ROOM_DIMS_M = ((3.5, 9.0), (3.0, 7.0), (2.5, 3.5))
# Source and microphone keep this far from walls (metres).
_WALL_MARGIN_M = 0.5

_TELEPHONE_BAND_HZ = (300.0, 3400.0)
_TELEPHONE_CODEC_HZ = 8000
_TELEPHONE_ORDER = 4

# Active-level estimate: 20 ms frames, a frame is "active" within 40 dB of the loudest.
_FRAME_S = 0.02
_ACTIVE_RANGE_DB = 40.0

SOURCE_SEP = "|"


# --------------------------------------------------------------------------------------
# Room impulse responses
# --------------------------------------------------------------------------------------


class RIRBank:
    """Bank of synthetic room impulse responses, simulated once and cached on disk.

    Each room is a pyroomacoustics shoebox (image method) of random size, with the wall
    absorption that Sabine's formula gives for an RT60 drawn uniformly from
    ``settings.rt60_s`` (:func:`pyroomacoustics.inverse_sabine`), and random source and
    microphone positions at least 0.5 m from the walls. Room ``i`` depends only on
    ``(seed, i)``, so a bank of 16 rooms starts with the bank of 2.

    RIRs are cached as ``.npy`` files under ``cache_dir`` named after
    ``(version, seed, sample_rate, rt60 range, index)``; files are written to a temporary
    name and renamed, so concurrent builders at worst simulate a room twice and never read
    a half-written file.

    Attributes:
        seed: seed the bank was built from.
        sample_rate: sample rate of the RIRs in Hz.
        rt60_range: ``(low, high)`` target RT60 range in seconds.
    """

    def __init__(
        self,
        rirs: Sequence[np.ndarray],
        rt60s: Sequence[float],
        *,
        seed: int,
        sample_rate: int,
        rt60_range: tuple[float, float],
    ) -> None:
        """Wrap already simulated RIRs; normally called through :meth:`build`.

        Args:
            rirs: one float array ``(L_i,)`` per room, direct path = largest magnitude.
            rt60s: target RT60 of each room in seconds.
            seed: seed the bank was built from (recorded in reverb steps).
            sample_rate: sample rate of the RIRs in Hz.
            rt60_range: ``(low, high)`` target RT60 range in seconds.

        Raises:
            ValueError: empty bank, mismatched lengths, or an RIR that is not 1-D, finite
                and non-zero.
        """
        if not rirs or len(rirs) != len(rt60s):
            raise ValueError(f"need one rt60 per RIR and at least one RIR, got "
                             f"{len(rirs)} RIRs and {len(rt60s)} rt60s")
        checked = []
        for i, rir in enumerate(rirs):
            arr = np.asarray(rir, dtype=np.float32)
            if arr.ndim != 1 or arr.size == 0 or not np.all(np.isfinite(arr)) \
                    or not np.any(arr):
                raise ValueError(f"RIR {i} must be a finite, non-zero 1-D array")
            checked.append(arr)
        self._rirs = checked
        self._rt60s = [float(r) for r in rt60s]
        # The direct path is the RIR's peak; reverb aligns the output on it.
        self._peaks = [int(np.argmax(np.abs(r))) for r in checked]
        self.seed = int(seed)
        self.sample_rate = int(sample_rate)
        self.rt60_range = (float(rt60_range[0]), float(rt60_range[1]))

    @classmethod
    def build(
        cls,
        settings: ReverbSettings,
        seed: int,
        sample_rate: int,
        cache_dir: Path,
        progress: bool = False,
    ) -> RIRBank:
        """Load ``settings.bank_size`` rooms from ``cache_dir``, simulating missing ones.

        Args:
            settings: reverb settings (``bank_size``, ``rt60_s``).
            seed: non-negative seed of the bank.
            sample_rate: RIR sample rate in Hz.
            cache_dir: folder of the ``.npy`` cache (created if missing).
            progress: show a tqdm bar while loading/simulating.

        Raises:
            ValueError: negative seed, non-positive sample rate or non-positive RT60.
        """
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        low, high = settings.rt60_s
        if low <= 0:
            raise ValueError(f"rt60_s must be positive, got {settings.rt60_s}")
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        indices: Sequence[int] = range(settings.bank_size)
        if progress:
            from tqdm import tqdm

            indices = tqdm(indices, desc="RIR bank", unit="room")
        rirs, rt60s = [], []
        for index in indices:
            rng = np.random.default_rng([seed, index])
            # Drawn first and cheaply, so a cached room gets its target RT60 back exactly.
            rt60 = round(float(rng.uniform(low, high)), 4)
            path = cache_dir / _rir_cache_name(seed, index, sample_rate, (low, high))
            rir = _load_rir(path)
            if rir is None:
                rir = _simulate_room(rng, rt60, sample_rate)
                _save_atomic(path, rir)
            rirs.append(rir)
            rt60s.append(rt60)
        return cls(rirs, rt60s, seed=seed, sample_rate=sample_rate, rt60_range=(low, high))

    def __len__(self) -> int:
        return len(self._rirs)

    def get(self, index: int) -> tuple[np.ndarray, float]:
        """Room ``index``: its RIR (float32 ``(L,)``, peak magnitude 1) and target RT60 (s).

        The RT60 is the target the room was designed for; pyroomacoustics rooms measure
        somewhat longer for long targets. The array is shared: do not modify it.

        Raises:
            ValueError: index out of range.
        """
        if not 0 <= index < len(self._rirs):
            raise ValueError(f"rir index {index} out of range for a bank of {len(self)}")
        return self._rirs[index], self._rt60s[index]

    def peak_index(self, index: int) -> int:
        """Sample index of the direct path (largest magnitude) of RIR ``index``."""
        self.get(index)
        return self._peaks[index]


def _rir_cache_name(seed: int, index: int, sample_rate: int, rt60: tuple[float, float]) -> str:
    return (f"rir_v{_RIR_CACHE_VERSION}_seed{seed}_sr{sample_rate}"
            f"_rt{rt60[0]:.3f}-{rt60[1]:.3f}_{index:05d}.npy")


def _load_rir(path: Path) -> np.ndarray | None:
    """The cached RIR at ``path``, or None when missing or unreadable (then re-simulated)."""
    if not path.is_file():
        return None
    try:
        rir = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if rir.ndim != 1 or rir.size == 0 or rir.dtype != np.float32 or not np.all(np.isfinite(rir)):
        return None
    return rir


def _save_atomic(path: Path, rir: np.ndarray) -> None:
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        np.save(fh, rir, allow_pickle=False)


def _simulate_room(rng: np.random.Generator, rt60: float, sample_rate: int) -> np.ndarray:
    """Simulate one random shoebox room for target ``rt60`` (s); float32 ``(L,)``, peak 1."""
    dims = np.array([rng.uniform(lo, hi) for lo, hi in _ROOM_DIMS_M])
    for _ in range(20):
        try:
            absorption, max_order = pra.inverse_sabine(rt60, dims.tolist())
            break
        except ValueError:
            # Too large a room for so short an RT60 (absorption would exceed 1): shrink it.
            dims = np.maximum(dims * 0.85, 2 * _WALL_MARGIN_M + 0.5)
    else:
        raise ValueError(f"no shoebox room reaches RT60 {rt60} s; raise rt60_s")
    room = pra.ShoeBox(
        dims.tolist(),
        fs=sample_rate,
        materials=pra.Material(float(absorption)),
        max_order=min(int(max_order), _MAX_ISM_ORDER),
    )
    mic = _random_position(rng, dims)
    source = _random_position(rng, dims)
    for _ in range(50):
        # A source on top of the microphone would make the RIR a pure direct path.
        if np.linalg.norm(source - mic) >= 1.0:
            break
        source = _random_position(rng, dims)
    room.add_source(source.tolist())
    room.add_microphone(mic.tolist())
    room.compute_rir()
    rir = np.asarray(room.rir[0][0], dtype=np.float64)
    return (rir / np.max(np.abs(rir))).astype(np.float32)


def _random_position(rng: np.random.Generator, dims: np.ndarray) -> np.ndarray:
    # Heights of a standing/sitting talker or a device on a shelf, within the room.
    x = rng.uniform(_WALL_MARGIN_M, dims[0] - _WALL_MARGIN_M)
    y = rng.uniform(_WALL_MARGIN_M, dims[1] - _WALL_MARGIN_M)
    z = rng.uniform(min(1.0, dims[2] - _WALL_MARGIN_M), min(2.0, dims[2] - _WALL_MARGIN_M))
    return np.array([x, y, z])


# --------------------------------------------------------------------------------------
# Signal helpers
# --------------------------------------------------------------------------------------


def active_rms(audio: np.ndarray, sample_rate: int) -> float:
    """RMS of the active (non-silent) part of ``audio`` ``(T,)``: the speech level for SNR.

    The signal is cut into 20 ms frames; frames within 40 dB of the loudest frame count as
    active, so leading/trailing TTS silence does not lower the level (and so does not make
    the noise quieter than the SNR says). Signals shorter than one frame use the whole
    signal. Returns 0.0 for silence.
    """
    frame = max(1, round(_FRAME_S * sample_rate))
    n_frames = audio.size // frame
    if n_frames == 0:
        return float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))
    energy = np.mean(np.square(audio[: n_frames * frame].reshape(n_frames, frame),
                               dtype=np.float64), axis=1)
    loudest = float(energy.max())
    if loudest <= 0.0:
        return 0.0
    active = energy[energy >= loudest * 10.0 ** (-_ACTIVE_RANGE_DB / 10.0)]
    return float(np.sqrt(active.mean()))


def _rms(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))


def _limit_peak(audio: np.ndarray, derived: dict[str, float | int | str]) -> np.ndarray:
    """Scale ``audio`` down to peak 1 when it exceeds full scale; note it in ``derived``."""
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if peak > 1.0:
        derived["peak_scale"] = round(1.0 / peak, 6)
        return audio / peak
    return audio


def _white(rng: np.random.Generator, length: int) -> np.ndarray:
    return rng.standard_normal(length)


def _pink(rng: np.random.Generator, length: int) -> np.ndarray:
    # 1/f power spectrum: shape white noise by 1/sqrt(f) in the frequency domain. DC is
    # dropped so the noise has zero mean.
    spectrum = np.fft.rfft(rng.standard_normal(length))
    freqs = np.arange(spectrum.size, dtype=np.float64)
    freqs[0] = np.inf
    return np.fft.irfft(spectrum / np.sqrt(freqs), n=length)


# --------------------------------------------------------------------------------------
# Transforms (shared by Augmenter and replay)
# --------------------------------------------------------------------------------------

Params = dict[str, float | int | str]


class _Context:
    """What applying a recorded step needs besides its params: rate, RIRs, babble audio."""

    def __init__(
        self,
        sample_rate: int,
        rir_bank: RIRBank | None,
        babble_sources: Sequence[Path],
    ) -> None:
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        if rir_bank is not None and rir_bank.sample_rate != sample_rate:
            raise ValueError(f"RIR bank is at {rir_bank.sample_rate} Hz, audio at "
                             f"{sample_rate} Hz")
        self.sample_rate = sample_rate
        self.rir_bank = rir_bank
        self.babble_sources = [Path(p) for p in babble_sources]
        for p in self.babble_sources:
            if SOURCE_SEP in str(p):
                raise ValueError(f"babble source path must not contain {SOURCE_SEP!r}: {p}")
        self._babble_cache: dict[str, np.ndarray] = {}
        self._sos_cache: dict[tuple[float, float], np.ndarray] = {}

    # Babble audio is read once per process and kept: a corpus reuses each source often.
    def babble_audio(self, key: str) -> np.ndarray:
        """Mono float64 audio ``(L,)`` at ``sample_rate`` of babble source ``key``."""
        cached = self._babble_cache.get(key)
        if cached is not None:
            return cached
        path = self._resolve_source(key)
        data, rate = sf.read(str(path), dtype="float64", always_2d=True)
        audio = data.mean(axis=1)
        if rate != self.sample_rate:
            g = math.gcd(int(rate), self.sample_rate)
            audio = signal.resample_poly(audio, self.sample_rate // g, int(rate) // g)
        if audio.size == 0 or not np.any(audio):
            raise ValueError(f"babble source {path} is empty or silent")
        self._babble_cache[key] = audio
        return audio

    def _resolve_source(self, key: str) -> Path:
        # Recorded paths are the strings the corpus builder passed; when the corpus has
        # moved, fall back to a unique file name among the given sources.
        for p in self.babble_sources:
            if str(p) == key:
                return p
        by_name = [p for p in self.babble_sources if p.name == Path(key).name]
        if len(by_name) == 1:
            return by_name[0]
        if Path(key).is_file():
            return Path(key)
        raise ValueError(f"babble source {key!r} is not among the given babble_sources")

    def bandpass(self, low: float, high: float) -> np.ndarray:
        """Second-order sections of the telephone band-pass (Butterworth)."""
        sos = self._sos_cache.get((low, high))
        if sos is None:
            if not 0 < low < high < self.sample_rate / 2:
                raise ValueError(f"telephone band {low}-{high} Hz invalid at "
                                 f"{self.sample_rate} Hz")
            sos = signal.butter(_TELEPHONE_ORDER, [low, high], btype="bandpass",
                                fs=self.sample_rate, output="sos")
            self._sos_cache[(low, high)] = sos
        return sos


def _apply_reverb(x: np.ndarray, params: Params, ctx: _Context) -> tuple[np.ndarray, Params]:
    bank = ctx.rir_bank
    if bank is None:
        raise ValueError("reverb step needs a rir_bank")
    if "rir_seed" in params and int(params["rir_seed"]) != bank.seed:
        raise ValueError(f"reverb step was drawn from RIR bank seed {params['rir_seed']}, "
                         f"got a bank with seed {bank.seed}")
    index = int(params["rir_index"])
    rir, _ = bank.get(index)
    peak = bank.peak_index(index)
    # Full convolution is T + L - 1 long; starting at the direct-path sample keeps the
    # speech where it was (labels stay aligned) and drops the tail past T.
    wet = signal.fftconvolve(x, rir.astype(np.float64))[peak: peak + x.size]
    dry_rms, wet_rms = _rms(x), _rms(wet)
    if wet_rms > 0.0:
        wet = wet * (dry_rms / wet_rms)
    derived: Params = {}
    return _limit_peak(wet, derived), derived


def _make_noise(length: int, params: Params, ctx: _Context) -> np.ndarray:
    kind = str(params["noise"])
    rng = np.random.default_rng(int(params["noise_seed"]))
    if kind == "white":
        return _white(rng, length)
    if kind == "pink":
        return _pink(rng, length)
    if kind == "babble":
        keys = str(params["sources"]).split(SOURCE_SEP)
        mix = np.zeros(length)
        for key in keys:
            talker = ctx.babble_audio(key)
            # Random start, looped to cover the utterance: talkers do not start together.
            start = int(rng.integers(talker.size))
            segment = talker[(start + np.arange(length)) % talker.size]
            level = active_rms(segment, ctx.sample_rate)
            if level > 0.0:
                # Equal level per talker: one loud file must not dominate the babble.
                mix += segment / level
        return mix
    raise ValueError(f"unknown noise kind {kind!r}")


def _apply_noise(x: np.ndarray, params: Params, ctx: _Context) -> tuple[np.ndarray, Params]:
    noise = _make_noise(x.size, params, ctx)
    speech_rms = active_rms(x, ctx.sample_rate)
    noise_rms = _rms(noise)
    derived: Params = {}
    if speech_rms == 0.0 or noise_rms == 0.0:
        # SNR is undefined against silence: leave it silent rather than invent a level.
        return x.copy(), derived
    target = speech_rms / 10.0 ** (float(params["snr_db"]) / 20.0)
    y = x + noise * (target / noise_rms)
    return _limit_peak(y, derived), derived


def _apply_telephone(x: np.ndarray, params: Params, ctx: _Context) -> tuple[np.ndarray, Params]:
    low, high = float(params["band_low_hz"]), float(params["band_high_hz"])
    codec = int(params["codec_rate_hz"])
    if high >= codec / 2:
        raise ValueError(f"telephone band edge {high} Hz must be below {codec / 2} Hz")
    # Zero-phase so the speech does not shift in time relative to its labels.
    y = signal.sosfiltfilt(ctx.bandpass(low, high), x)
    if codec < ctx.sample_rate:
        g = math.gcd(codec, ctx.sample_rate)
        up, down = codec // g, ctx.sample_rate // g
        narrow = signal.resample_poly(y, up, down)
        y = signal.resample_poly(narrow, down, up)
        # Down-and-up can add a sample when T is not a multiple of the ratio.
        y = y[: x.size] if y.size >= x.size else np.pad(y, (0, x.size - y.size))
    derived: Params = {}
    return _limit_peak(y, derived), derived


def _apply_gain(x: np.ndarray, params: Params, ctx: _Context) -> tuple[np.ndarray, Params]:
    y = x * 10.0 ** (float(params["gain_db"]) / 20.0)
    over = np.abs(y) > 1.0
    # Gain past full scale is what a real recording chain does: it clips at ±1.
    derived: Params = {"clipped_fraction": round(float(over.mean()), 6)}
    return np.clip(y, -1.0, 1.0), derived


def _apply_clip(x: np.ndarray, params: Params, ctx: _Context) -> tuple[np.ndarray, Params]:
    level = float(params["clip_level"])
    if not 0.0 < level <= 1.0:
        raise ValueError(f"clip_level must be in (0, 1], got {level}")
    threshold = level * float(np.max(np.abs(x)))
    derived: Params = {"clipped_fraction": round(float(np.mean(np.abs(x) > threshold)), 6)}
    return np.clip(x, -threshold, threshold), derived


_APPLY: dict[str, Callable[[np.ndarray, Params, _Context], tuple[np.ndarray, Params]]] = {
    "reverb": _apply_reverb,
    "noise": _apply_noise,
    "telephone": _apply_telephone,
    "gain": _apply_gain,
    "clip": _apply_clip,
}


def _check_audio(audio: np.ndarray) -> np.ndarray:
    """Validate mono float audio ``(T,)``; return it as float64 for the transforms."""
    if not isinstance(audio, np.ndarray):
        raise TypeError(f"audio must be a numpy array, got {type(audio).__name__}")
    if audio.ndim != 1:
        raise ValueError(f"audio must be mono (T,), got shape {audio.shape}")
    if not np.issubdtype(audio.dtype, np.floating):
        raise ValueError(f"audio must be floating point, got {audio.dtype}")
    if audio.size == 0:
        raise ValueError("audio is empty")
    if not np.all(np.isfinite(audio)):
        raise ValueError("audio contains NaN or inf")
    # float64 inside: the chain of filters and convolutions stays exact enough that replay
    # reproduces float32 output bit for bit.
    return audio.astype(np.float64)


def _finish(y: np.ndarray) -> np.ndarray:
    return np.clip(y, -1.0, 1.0).astype(np.float32)


def _run(x: np.ndarray, kind: str, params: Params, ctx: _Context) -> tuple[np.ndarray, Params]:
    try:
        return _APPLY[kind](x, params, ctx)
    except KeyError as exc:
        if kind not in _APPLY:
            raise ValueError(f"unknown augment kind {kind!r}; expected one of {KINDS}") from exc
        raise ValueError(f"{kind} step is missing parameter {exc.args[0]!r}") from exc


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def augment_rng(seed: int, utterance_id: str) -> np.random.Generator:
    """Generator for one utterance, from ``(seed, utterance_id)`` alone.

    The pair is hashed (see :func:`model.data.seeding.stable_rng`), so
    the draws do not depend on which other utterances were augmented before, in which
    order, or in which worker process.

    Raises:
        ValueError: ``utterance_id`` is not a non-empty string.
    """
    if not isinstance(utterance_id, str) or not utterance_id:
        raise ValueError(f"utterance_id must be a non-empty string, got {utterance_id!r}")
    return stable_rng(seed, "augment", utterance_id)


class Augmenter:
    """Draws and applies a random augmentation chain to one utterance at a time.

    With probability ``settings.p`` an utterance is augmented; then each transform fires
    with its own probability (``reverb.p``, ``noise.p``, ``telephone_p``, ``gain_p``,
    ``clip_p``). If none fired, one transform with ``p > 0`` is forced (chosen uniformly),
    so an augmented utterance always differs from the clean one. Transforms that cannot
    run are never chosen: reverb without a ``rir_bank``, babble noise without
    ``babble_sources`` (and noise altogether when babble was its only kind).

    Args:
        settings: augmentation settings.
        sample_rate: audio sample rate in Hz (must match the RIR bank's).
        rir_bank: rooms for reverb, or None to disable reverb.
        babble_sources: audio files mixed into babble noise (other TTS utterances); read
            with soundfile on first use and kept in memory.

    Raises:
        ValueError: bad sample rate, a bank at another rate, or a babble path with ``|``.
    """

    def __init__(
        self,
        settings: AugmentSettings,
        sample_rate: int,
        rir_bank: RIRBank | None,
        babble_sources: Sequence[Path],
    ) -> None:
        self.settings = settings
        self._ctx = _Context(sample_rate, rir_bank, babble_sources)
        if settings.telephone_p > 0:
            # Fail now, not on the first telephone draw, when the rate is too low.
            self._ctx.bandpass(*_TELEPHONE_BAND_HZ)
        kinds = list(settings.noise.kinds)
        if not self._ctx.babble_sources:
            kinds = [k for k in kinds if k != "babble"]
        self._noise_kinds = kinds
        self._prob = {
            "reverb": settings.reverb.p if rir_bank is not None and len(rir_bank) else 0.0,
            "noise": settings.noise.p if kinds else 0.0,
            "telephone": settings.telephone_p,
            "gain": settings.gain_p,
            "clip": settings.clip_p,
        }

    @property
    def sample_rate(self) -> int:
        return self._ctx.sample_rate

    def __call__(
        self, audio: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, list[AugmentStep]]:
        """Augment one utterance.

        Args:
            audio: mono float audio ``(T,)`` in ``[-1, 1]`` at ``sample_rate``; not modified.
            rng: the utterance's generator, normally :func:`augment_rng`.

        Returns:
            ``(out, steps)``: a new float32 array ``(T,)`` in ``[-1, 1]`` and the steps
            applied, in order (empty, with ``out`` a copy of ``audio``, when the
            utterance was not augmented).

        Raises:
            ValueError: audio not a finite, non-empty, 1-D float array.
            TypeError: audio not a numpy array or rng not a numpy Generator.
        """
        x = _check_audio(audio)
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy Generator, got {type(rng).__name__}")
        if rng.random() >= self.settings.p:
            return audio.astype(np.float32, copy=True), []
        # One draw per kind whether or not it can run, so the stream (and thus every
        # other utterance-level choice) does not shift when e.g. no RIR bank is given.
        fired = [kind for kind, u in zip(KINDS, rng.random(len(KINDS)), strict=True)
                 if u < self._prob[kind]]
        if not fired:
            candidates = [kind for kind in KINDS if self._prob[kind] > 0]
            if not candidates:
                return audio.astype(np.float32, copy=True), []
            fired = [candidates[int(rng.integers(len(candidates)))]]
        steps = []
        for kind in KINDS:
            if kind not in fired:
                continue
            params = self._draw(kind, rng)
            x, derived = _run(x, kind, params, self._ctx)
            steps.append(AugmentStep(kind=kind, params={**params, **derived}))
        return _finish(x), steps

    def _draw(self, kind: str, rng: np.random.Generator) -> Params:
        """Sample the parameters of one transform. Levels are rounded to 0.01 dB (and clip
        levels to 0.001) before use, so the manifest is readable and replay is exact."""
        s = self.settings
        if kind == "reverb":
            bank = self._ctx.rir_bank
            if bank is None:  # unreachable: reverb has p = 0 without a bank
                raise ValueError("reverb needs a rir_bank")
            index = int(rng.integers(len(bank)))
            return {"rir_index": index, "rir_seed": bank.seed, "rt60_s": bank.get(index)[1]}
        if kind == "noise":
            noise = self._noise_kinds[int(rng.integers(len(self._noise_kinds)))]
            params: Params = {
                "noise": noise,
                "snr_db": round(float(rng.uniform(*s.noise.snr_db)), 2),
                "noise_seed": int(rng.integers(2**31 - 1)),
            }
            if noise == "babble":
                sources = self._ctx.babble_sources
                low, high = s.noise.babble_talkers
                talkers = min(int(rng.integers(low, high + 1)), len(sources))
                chosen = rng.choice(len(sources), size=talkers, replace=False)
                params["sources"] = SOURCE_SEP.join(str(sources[i]) for i in chosen)
                params["talkers"] = talkers
            return params
        if kind == "telephone":
            return {"band_low_hz": _TELEPHONE_BAND_HZ[0], "band_high_hz": _TELEPHONE_BAND_HZ[1],
                    "codec_rate_hz": _TELEPHONE_CODEC_HZ}
        if kind == "gain":
            return {"gain_db": round(float(rng.uniform(*s.gain_db)), 2)}
        if kind == "clip":
            return {"clip_level": round(float(rng.uniform(*s.clip_level)), 3)}
        raise ValueError(f"unknown augment kind {kind!r}")


def replay(
    audio: np.ndarray,
    steps: Sequence[AugmentStep],
    sample_rate: int,
    rir_bank: RIRBank | None,
    babble_sources: Sequence[Path],
) -> np.ndarray:
    """Re-apply recorded ``steps`` to clean ``audio``, reproducing the augmented output.

    Args:
        audio: the clean mono float audio ``(T,)`` the steps were drawn for.
        steps: the recorded steps (a manifest row's ``augment``), in order.
        sample_rate: sample rate in Hz.
        rir_bank: the bank the reverb steps came from (same seed), or None if no reverb.
        babble_sources: files that babble ``sources`` refer to (matched by path, then by
            unique file name).

    Returns:
        float32 audio ``(T,)`` in ``[-1, 1]``; a copy of ``audio`` when ``steps`` is empty.

    Raises:
        ValueError: bad audio, unknown kind, missing parameter, missing bank or source.
        TypeError: audio not a numpy array.
    """
    x = _check_audio(audio)
    if not steps:
        return audio.astype(np.float32, copy=True)
    ctx = _Context(sample_rate, rir_bank, babble_sources)
    for step in steps:
        x, _ = _run(x, step.kind, step.params, ctx)
    return _finish(x)


def _benchmark(n: int = 200, seconds: float = 2.0, sample_rate: int = 16000) -> None:
    """Print RIR bank build time and mean augmentation time; ``python -m model.data.augment``."""
    import tempfile

    settings = AugmentSettings(p=1.0)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        bank = RIRBank.build(settings.reverb, 0, sample_rate, Path(tmp))
        t_build = time.perf_counter() - t0
        t0 = time.perf_counter()
        RIRBank.build(settings.reverb, 0, sample_rate, Path(tmp))
        t_cached = time.perf_counter() - t0
        t = np.arange(int(seconds * sample_rate)) / sample_rate
        audio = (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2
                 ).astype(np.float32)
        sources = []
        for i in range(4):
            path = Path(tmp) / f"babble{i}.wav"
            sf.write(path, np.roll(audio, 1000 * (i + 1)), sample_rate)
            sources.append(path)
        aug = Augmenter(settings, sample_rate, bank, sources)
        aug(audio, augment_rng(0, "warm-up"))
        counts: dict[str, int] = {}
        t0 = time.perf_counter()
        for i in range(n):
            _, steps = aug(audio, augment_rng(0, f"utt{i}"))
            for step in steps:
                counts[step.kind] = counts.get(step.kind, 0) + 1
        t_aug = (time.perf_counter() - t0) / n
    print(f"RIR bank of {len(bank)} rooms: built in {t_build:.2f} s, loaded from cache in "
          f"{t_cached * 1000:.1f} ms")
    print(f"augment {seconds:g}-s utterance (p=1, default per-transform p): "
          f"{t_aug * 1000:.2f} ms mean over {n}; steps {counts}")


if __name__ == "__main__":
    _benchmark()
