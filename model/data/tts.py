"""Speech synthesis: render sentences to 16 kHz mono PCM16 WAV with three offline engines.

Engines and how they are driven:

- ``espeak-ng``: one process per utterance (it starts in ~10 ms). Voices are
  ``accent+variant`` (``en-gb-scotland+f3``); the rate factor maps to words per minute
  around the default 175 and ``pitch`` is espeak's 0–99 setting.
- ``flite``: one process per utterance; voices ``kal16``, ``awb``, ``rms``; the rate factor
  becomes ``duration_stretch = 1 / rate``.
- ``festival``: one batched ``festival -b`` session per chunk of utterances, because
  starting festival and loading a diphone database costs far more than one utterance.
  Voices ``kal`` and ``ked`` (the kal/ked diphone voices); ``Duration_Stretch = 1 / rate``.

Every engine's output is post-processed the same way (see :func:`_finish`): resampled to
``sample_rate`` with a polyphase filter, edge silence trimmed to ~120 ms margins, levelled
to a common RMS with a peak cap, and written atomically (temp file + ``os.replace``) so that
a killed run never leaves a truncated file that a resumed run would take as finished.

The engines are deterministic and nothing here draws random numbers, so the same
:class:`SynthJob` always yields the same WAV bytes. :func:`synthesize` never raises for one
bad utterance: failures come back as a :class:`SynthResult` with ``error`` set.
"""

from __future__ import annotations

import functools
import math
import os
import re
import subprocess
import tempfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly
from tqdm import tqdm

from model.data.parallel import pool_context
from model.fileio import atomic_path
from voiceloop.settings import TTSSettings

__all__ = [
    "ENGINES",
    "FESTIVAL_VOICES",
    "SynthJob",
    "SynthResult",
    "VoiceSpec",
    "check_voice",
    "sample_heldout_voice",
    "sample_voice",
    "synthesize",
]

ENGINES: tuple[str, ...] = ("espeak-ng", "flite", "festival")
"""Supported engines, in the fixed order :func:`sample_voice` draws from."""

FESTIVAL_VOICES: dict[str, str] = {"kal": "voice_kal_diphone", "ked": "voice_ked_diphone"}
"""Short festival voice name -> the Scheme function that selects it."""

_ESPEAK_DEFAULT_WPM = 175
_RATE_RANGE = (0.5, 2.0)  # espeak-ng clamps below 80 wpm, so rate < ~0.46 would be ignored
_TRIM_MARGIN_S = 0.12  # silence kept before the first and after the last loud frame
_TRIM_FLOOR_DB = -45.0  # frames this far below the loudest frame count as silence
_TARGET_RMS = 0.1  # -20 dBFS over the trimmed utterance
_PEAK_CAP = 0.9  # never exceed this after levelling (headroom for later augmentation)
_ESPEAK_TIMEOUT_S = 60.0
_FLITE_TIMEOUT_S = 60.0
_FESTIVAL_TIMEOUT_S = 60.0  # plus _FESTIVAL_TIMEOUT_PER_UTT_S per utterance of a session
_FESTIVAL_TIMEOUT_PER_UTT_S = 5.0
_MAX_CHUNK = 32  # espeak-ng / flite jobs per worker task (progress granularity)
_MAX_FESTIVAL_CHUNK = 128  # utterances per festival session


@dataclass(frozen=True)
class VoiceSpec:
    """One engine voice with its prosody settings.

    Attributes:
        engine: ``"espeak-ng"``, ``"flite"`` or ``"festival"``.
        voice: espeak-ng ``accent`` or ``accent+variant`` (``"en-gb-scotland+f3"``);
            flite ``"kal16"``, ``"awb"`` or ``"rms"``; festival ``"kal"`` or ``"ked"``.
        rate: speaking-rate factor, 1.0 = the engine's default speed, >1 faster;
            must lie in [0.5, 2.0].
        pitch: espeak-ng pitch 0–99 (None = espeak's default 50); must be None for the
            other engines, which have no such setting.

    Raises:
        ValueError: unknown engine, empty voice, rate or pitch out of range. Whether the
            voice is installed is checked by :func:`check_voice` (it runs the engines).
    """

    engine: str
    voice: str
    rate: float = 1.0
    pitch: int | None = None

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"unknown TTS engine {self.engine!r}; expected one of {ENGINES}")
        if not self.voice:
            raise ValueError(f"empty voice for engine {self.engine!r}")
        if not _RATE_RANGE[0] <= self.rate <= _RATE_RANGE[1]:
            raise ValueError(f"rate {self.rate} outside {_RATE_RANGE}")
        if self.pitch is not None:
            if self.engine != "espeak-ng":
                raise ValueError(f"pitch is an espeak-ng setting; got pitch for {self.engine}")
            if not 0 <= self.pitch <= 99:
                raise ValueError(f"espeak-ng pitch {self.pitch} outside 0-99")


@dataclass(frozen=True)
class SynthJob:
    """One utterance to render.

    Attributes:
        id: utterance id, echoed in the result.
        text: the sentence to speak.
        voice: engine voice and prosody.
        out_path: destination of the 16 kHz mono PCM16 WAV; its folder is created.
    """

    id: str
    text: str
    voice: VoiceSpec
    out_path: Path


@dataclass(frozen=True)
class SynthResult:
    """Outcome of one :class:`SynthJob`.

    Attributes:
        id: the job's id.
        out_path: the job's output path.
        duration_s: audio duration in seconds; 0.0 when synthesis failed.
        skipped: True when ``out_path`` already held a valid WAV and nothing was rendered.
        error: None on success, otherwise a readable reason.
    """

    id: str
    out_path: Path
    duration_s: float
    skipped: bool
    error: str | None


# --------------------------------------------------------------------------- voices


def sample_voice(settings: TTSSettings, rng: np.random.Generator) -> VoiceSpec:
    """Draw a random voice from ``settings``.

    The draws happen in a fixed order (engine, voice, rate, then pitch for espeak-ng only),
    so the result is a pure function of the generator's state. Engines with weight 0 are
    never chosen. The rate is rounded to 3 decimals so that a value read back from the
    manifest re-renders identically.

    Args:
        settings: voice lists, engine weights, rate range (factor) and espeak pitch range.
        rng: the generator to draw from (advanced in place).

    Raises:
        ValueError: the drawn engine has an empty voice list.
    """
    weights_by_engine: dict[str, float] = dict(settings.engine_weights)
    engines = [e for e in ENGINES if weights_by_engine.get(e, 0.0) > 0]
    weights = np.array([weights_by_engine[e] for e in engines], dtype=float)
    engine = engines[int(rng.choice(len(engines), p=weights / weights.sum()))]
    if engine == "espeak-ng":
        if not settings.espeak_accents or not settings.espeak_variants:
            raise ValueError("espeak-ng has weight > 0 but no accents or variants")
        accent = settings.espeak_accents[int(rng.integers(len(settings.espeak_accents)))]
        variant = settings.espeak_variants[int(rng.integers(len(settings.espeak_variants)))]
        voice = f"{accent}+{variant}"
    else:
        voices: list[str] = list(
            settings.flite_voices if engine == "flite" else settings.festival_voices
        )
        if not voices:
            raise ValueError(f"{engine} has weight > 0 but no voices")
        voice = voices[int(rng.integers(len(voices)))]
    low, high = settings.rate
    rate = round(float(rng.uniform(low, high)), 3)
    pitch = None
    if engine == "espeak-ng":
        plow, phigh = settings.espeak_pitch
        pitch = int(rng.integers(plow, phigh + 1))
    return VoiceSpec(engine=engine, voice=voice, rate=rate, pitch=pitch)


def sample_heldout_voice(settings: TTSSettings, rng: np.random.Generator) -> VoiceSpec:
    """Draw a voice of the held-out family ``settings.heldout`` (rate from ``settings.rate``,
    espeak-ng pitch from ``settings.espeak_pitch``; an espeak-ng held-out voice is an accent
    combined with a training variant).

    Raises:
        ValueError: ``settings.heldout`` is unset or has no voices.
    """
    held = settings.heldout
    if held is None or not held.voices:
        raise ValueError(f"no held-out voice family configured: {held!r}")
    voice = held.voices[int(rng.integers(len(held.voices)))]
    low, high = settings.rate
    rate = round(float(rng.uniform(low, high)), 3)
    pitch = None
    if held.engine == "espeak-ng":
        variant = settings.espeak_variants[int(rng.integers(len(settings.espeak_variants)))]
        voice = f"{voice}+{variant}"
        pitch = int(rng.integers(settings.espeak_pitch[0], settings.espeak_pitch[1] + 1))
    return VoiceSpec(engine=held.engine, voice=voice, rate=rate, pitch=pitch)


@functools.lru_cache(maxsize=1)
def _espeak_languages() -> frozenset[str]:
    out = _run_text(["espeak-ng", "--voices"])
    # Columns: Pty Language Age/Gender VoiceName File Other-languages.
    return frozenset(line.split()[1] for line in out.splitlines()[1:] if line.split())


@functools.lru_cache(maxsize=1)
def _espeak_variants() -> frozenset[str]:
    out = _run_text(["espeak-ng", "--voices=variant"])
    # The file column is "!v/NAME"; a few names contain one space ("Mr serious"), and
    # columns are separated by two or more spaces, so stop at the first double space.
    return frozenset(m.group(1) for m in re.finditer(r"!v/(\S+(?: \S+)*)", out))


@functools.lru_cache(maxsize=1)
def _flite_voices() -> frozenset[str]:
    out = _run_text(["flite", "-lv"])
    return frozenset(out.split(":", 1)[-1].split())


def _run_text(cmd: list[str]) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except FileNotFoundError as exc:
        raise ValueError(f"TTS engine {cmd[0]!r} is not installed") from exc
    return proc.stdout


def check_voice(voice: VoiceSpec) -> None:
    """Check that ``voice`` exists in its installed engine.

    espeak-ng silently falls back to its default voice for an unknown variant, so the
    accent and variant names are checked against ``espeak-ng --voices`` listings here.

    Raises:
        ValueError: the engine is missing or does not know the voice.
    """
    if voice.engine == "espeak-ng":
        accent, _, variant = voice.voice.partition("+")
        if accent not in _espeak_languages():
            raise ValueError(f"unknown espeak-ng accent {accent!r} in voice {voice.voice!r}")
        if variant and variant not in _espeak_variants():
            raise ValueError(
                f"unknown espeak-ng variant {variant!r} in voice {voice.voice!r}; "
                "see `espeak-ng --voices=variant` (file column without '!v/')"
            )
    elif voice.engine == "flite":
        if voice.voice not in _flite_voices():
            raise ValueError(f"unknown flite voice {voice.voice!r}; see `flite -lv`")
    elif voice.voice not in FESTIVAL_VOICES:
        raise ValueError(
            f"unknown festival voice {voice.voice!r}; expected one of {sorted(FESTIVAL_VOICES)}"
        )


# --------------------------------------------------------------------------- audio


def _trim_and_level(audio: np.ndarray, sample_rate: int) -> np.ndarray | None:
    """Trim edge silence and level one utterance; None when it is silent throughout.

    Args:
        audio: float samples in [-1, 1], shape ``(T,)``.
        sample_rate: Hz.

    Returns:
        float samples, shape ``(T',)`` with ``T' <= T``.
    """
    hop = max(1, sample_rate // 100)  # 10 ms frames
    n_frames = math.ceil(len(audio) / hop)
    padded = np.zeros(n_frames * hop)
    padded[: len(audio)] = audio
    frame_rms = np.sqrt(np.mean(padded.reshape(n_frames, hop) ** 2, axis=1))  # (F,)
    loudest = float(frame_rms.max()) if n_frames else 0.0
    if loudest < 1e-5:  # below -100 dBFS: the engine produced no speech
        return None
    loud = np.flatnonzero(frame_rms >= loudest * 10 ** (_TRIM_FLOOR_DB / 20))
    margin = round(_TRIM_MARGIN_S * sample_rate)
    start = max(0, int(loud[0]) * hop - margin)
    stop = min(len(audio), (int(loud[-1]) + 1) * hop + margin)
    audio = audio[start:stop]
    # Level every engine to the same RMS so that loudness does not give the engine away
    # (the augmentation stage varies gain on purpose); the cap keeps headroom and stops
    # a peaky voice from clipping.
    rms = float(np.sqrt(np.mean(audio**2)))
    gain = _TARGET_RMS / rms
    peak = float(np.abs(audio).max())
    gain = min(gain, _PEAK_CAP / peak)
    return audio * gain


def _finish(raw_path: Path, job: SynthJob, sample_rate: int) -> SynthResult:
    """Turn an engine's raw WAV into the job's final file (resample, trim, level, write)."""
    try:
        audio, rate = sf.read(raw_path, dtype="float64", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as exc:
        return _failed(job, f"{job.voice.engine} wrote an unreadable WAV: {exc}")
    mono = audio.mean(axis=1)  # (T,)
    if rate != sample_rate:
        g = math.gcd(rate, sample_rate)
        mono = resample_poly(mono, sample_rate // g, rate // g)
    levelled = _trim_and_level(mono, sample_rate)
    if levelled is None:
        return _failed(job, f"{job.voice.engine} produced silent audio for {job.text!r}")
    pcm = np.round(np.clip(levelled, -1.0, 1.0) * 32767).astype(np.int16)
    out = Path(job.out_path)
    out.parent.mkdir(parents=True, exist_ok=True)  # a bad output folder is an error, not N failed jobs
    try:
        with atomic_path(out) as tmp:
            sf.write(tmp, pcm, sample_rate, subtype="PCM_16", format="WAV")
    except OSError as exc:
        return _failed(job, f"cannot write {out}: {exc}")
    return SynthResult(job.id, out, len(pcm) / sample_rate, False, None)


def _failed(job: SynthJob, reason: str) -> SynthResult:
    return SynthResult(job.id, Path(job.out_path), 0.0, False, reason)


def _existing_duration(path: Path, sample_rate: int) -> float | None:
    """Duration (s) of an already rendered output, or None when it must be (re)made."""
    try:
        info = sf.info(path)
    except (sf.LibsndfileError, RuntimeError, OSError):
        return None
    if info.samplerate != sample_rate or info.channels != 1 or info.frames <= 0:
        return None
    return info.frames / sample_rate


# --------------------------------------------------------------------------- engines


def _tail(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else "..." + text[-limit:]


def _render_one(job: SynthJob, raw: Path) -> str | None:
    """Run espeak-ng or flite for one job into ``raw``; returns an error or None."""
    v = job.voice
    if v.engine == "espeak-ng":
        cmd = ["espeak-ng", "-v", v.voice, "-s", str(round(_ESPEAK_DEFAULT_WPM * v.rate))]
        if v.pitch is not None:
            cmd += ["-p", str(v.pitch)]
        # Text goes through stdin so that a sentence starting with "-" is not an option.
        cmd += ["-w", str(raw), "--stdin"]
        stdin, timeout = job.text, _ESPEAK_TIMEOUT_S
    else:
        cmd = ["flite", "-voice", v.voice, "--setf", f"duration_stretch={1.0 / v.rate:.6f}"]
        cmd += ["-t", job.text, "-o", str(raw)]
        stdin, timeout = None, _FLITE_TIMEOUT_S
    try:
        proc = subprocess.run(
            cmd, input=stdin, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return f"{v.engine} timed out after {timeout:.0f} s"
    except FileNotFoundError:
        return f"{v.engine} is not installed"
    if proc.returncode != 0 or not raw.exists():
        return f"{v.engine} -v {v.voice} failed (exit {proc.returncode}): {_tail(proc.stderr)}"
    return None


def _scheme_string(text: str) -> str:
    """``text`` as a double-quoted Scheme string literal (festival's SIOD reader)."""
    # Control characters would end the line festival's reader is in; a space is harmless.
    text = re.sub(r"[\x00-\x1f\x7f]", " ", text)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _festival_script(jobs: Sequence[SynthJob], raws: Sequence[Path]) -> str:
    """One Scheme script rendering every job; markers on stderr attribute failures.

    Each utterance is wrapped in ``unwind-protect`` so that an error (which would abort a
    ``festival -b`` run) is reported as ``VLFAIL i`` and the session goes on. stderr is
    unbuffered, so a festival error message lands between ``VLBEGIN i`` and ``VLFAIL i``.
    """
    lines: list[str] = []
    for i, (job, raw) in enumerate(zip(jobs, raws, strict=True)):
        lines.append(f'(format stderr "VLBEGIN {i}\\n")')
        # Select the voice before every utterance (cheap once its diphones are loaded):
        # each utterance then starts from the same state whatever the chunk held before,
        # so its audio does not depend on how jobs were split across sessions.
        lines.append(f"({FESTIVAL_VOICES[job.voice.voice]})")
        lines.append(f"(Parameter.set 'Duration_Stretch {1.0 / job.voice.rate:.6f})")
        lines.append(
            f"(unwind-protect (utt.save.wave (SynthText {_scheme_string(job.text)}) "
            f'{_scheme_string(str(raw))} \'riff) (format stderr "VLFAIL {i}\\n"))'
        )
    lines.append('(format stderr "VLDONE\\n")')
    return "\n".join(lines) + "\n"


def _festival_session(
    jobs: Sequence[SynthJob], raws: Sequence[Path], script: Path
) -> tuple[dict[int, str], int]:
    """Run one ``festival -b`` session over ``jobs``.

    Returns:
        ``(errors, n_done)``: error text by job index for the utterances festival reported
        as failed, and how many jobs the session got through (``len(jobs)`` unless it died
        part-way; the job at index ``n_done`` is then the one it died on).
    """
    script.write_text(_festival_script(jobs, raws), encoding="utf-8")
    timeout = _FESTIVAL_TIMEOUT_S + _FESTIVAL_TIMEOUT_PER_UTT_S * len(jobs)
    try:
        proc = subprocess.run(
            ["festival", "-b", str(script)],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )
        stderr = proc.stderr
    except FileNotFoundError:
        return {i: "festival is not installed" for i in range(len(jobs))}, len(jobs)
    except subprocess.TimeoutExpired as exc:
        raw = exc.stderr or ""
        stderr = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        stderr += f"\nfestival session timed out after {timeout:.0f} s"
    errors: dict[int, str] = {}
    begun = -1
    pending: list[str] = []
    done = False
    for line in stderr.splitlines():
        if m := re.fullmatch(r"VLBEGIN (\d+)", line.strip()):
            begun, pending = int(m.group(1)), []
        elif m := re.fullmatch(r"VLFAIL (\d+)", line.strip()):
            errors[int(m.group(1))] = _tail("\n".join(pending)) or "unknown festival error"
        elif line.strip() == "VLDONE":
            done = True
        else:
            pending.append(line)
    if done:
        return errors, len(jobs)
    # The session died (crash, timeout, bad voice): blame the utterance it was on.
    dead = max(begun, 0)
    errors[dead] = "festival session died: " + (_tail("\n".join(pending)) or "no output")
    return errors, dead + 1


def _run_festival(jobs: Sequence[SynthJob], tmpdir: Path, sample_rate: int) -> list[SynthResult]:
    """Render festival jobs in as few sessions as possible (one unless a session dies)."""
    raws = [tmpdir / f"festival_{i}.wav" for i in range(len(jobs))]
    results: list[SynthResult | None] = [None] * len(jobs)
    start = 0
    while start < len(jobs):
        errors, n_done = _festival_session(
            jobs[start:], raws[start:], tmpdir / f"batch_{start}.scm"
        )
        for k in range(n_done):
            i = start + k
            job = jobs[i]
            if k in errors:
                results[i] = _failed(job, f"festival ({job.voice.voice}): {errors[k]}")
            elif not raws[i].exists():
                results[i] = _failed(job, f"festival ({job.voice.voice}) wrote no audio")
            else:
                results[i] = _finish(raws[i], job, sample_rate)
        start += n_done  # a died session resumes after the utterance it died on
    return [r or _failed(job, "not rendered") for r, job in zip(results, jobs, strict=True)]


def _run_chunk(
    engine: str, indexed: Sequence[tuple[int, SynthJob]], sample_rate: int
) -> list[tuple[int, SynthResult]]:
    """Worker task: render one chunk of jobs of a single engine.

    Top-level and argument-picklable so that it runs under the ``spawn`` start method.
    """
    jobs = [job for _, job in indexed]
    with tempfile.TemporaryDirectory(prefix="voiceloop_tts_") as tmp:
        tmpdir = Path(tmp)
        if engine == "festival":
            results = _run_festival(jobs, tmpdir, sample_rate)
        else:
            results = []
            for i, job in enumerate(jobs):
                raw = tmpdir / f"{engine}_{i}.wav"
                error = _render_one(job, raw)
                results.append(_failed(job, error) if error else _finish(raw, job, sample_rate))
    return [(index, result) for (index, _), result in zip(indexed, results, strict=True)]


# --------------------------------------------------------------------------- driver


def _chunks(
    pending: Sequence[tuple[int, SynthJob]], workers: int
) -> list[tuple[str, list[tuple[int, SynthJob]]]]:
    """Split pending jobs into single-engine tasks, festival ones first.

    Each festival chunk is one festival session (~0.2 s to start, then a few ms per
    utterance), so festival chunks are as large as load balancing allows and go first:
    the longest tasks should start early.
    """
    groups: dict[str, list[tuple[int, SynthJob]]] = {}
    for item in pending:
        groups.setdefault(item[1].voice.engine, []).append(item)
    tasks: list[tuple[str, list[tuple[int, SynthJob]]]] = []
    for engine, items in sorted(groups.items(), key=lambda kv: kv[0] != "festival"):
        cap = _MAX_FESTIVAL_CHUNK if engine == "festival" else _MAX_CHUNK
        # Aim for ~2 tasks per worker per group, so that no worker idles at the end; one
        # worker needs no balancing (and should get one festival session per 128 jobs).
        share = len(items) if workers == 1 else math.ceil(len(items) / (2 * workers))
        size = max(1, min(cap, share))
        tasks += [(engine, items[i : i + size]) for i in range(0, len(items), size)]
    return tasks


def synthesize(
    jobs: Sequence[SynthJob],
    *,
    sample_rate: int = 16000,
    workers: int = 0,
    progress: bool = True,
) -> list[SynthResult]:
    """Render ``jobs`` to mono PCM16 WAV files, in parallel and resumably.

    A job whose ``out_path`` already holds a readable mono WAV at ``sample_rate`` is not
    rendered again (``skipped=True``). Outputs are written atomically, so after a killed
    run every existing ``out_path`` is complete. Worker processes are started with
    ``forkserver`` (``spawn`` where that is missing): a script calling this must guard its
    entry point with ``if __name__ == "__main__":``.

    Args:
        jobs: utterances to render; ``out_path`` values must be distinct.
        sample_rate: output rate in Hz (engine output is resampled to it).
        workers: worker processes; 0 = ``os.cpu_count()``. With one worker (or one task)
            everything runs in this process.
        progress: show a tqdm bar over utterances.

    Returns:
        One :class:`SynthResult` per job, in the order of ``jobs``. A failed utterance has
        ``error`` set and ``duration_s == 0.0``; it never raises.

    Raises:
        ValueError: bad ``sample_rate`` or ``workers``, duplicate ``out_path``, or a voice
            its engine does not have (checked before anything is rendered).
    """
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    seen: set[Path] = set()
    for job in jobs:
        path = Path(job.out_path).resolve()
        if path in seen:
            raise ValueError(f"two jobs write the same file {job.out_path}")
        seen.add(path)
    for voice in {job.voice for job in jobs}:
        check_voice(voice)

    results: list[SynthResult | None] = [None] * len(jobs)
    pending: list[tuple[int, SynthJob]] = []
    for i, job in enumerate(jobs):
        duration = _existing_duration(Path(job.out_path), sample_rate)
        if duration is not None:
            results[i] = SynthResult(job.id, Path(job.out_path), duration, True, None)
        elif not job.text.strip():
            results[i] = _failed(job, "empty text")
        else:
            pending.append((i, job))

    n_workers = workers or os.cpu_count() or 1
    tasks = _chunks(pending, n_workers)
    bar = tqdm(
        total=len(jobs),
        initial=len(jobs) - len(pending),
        unit="utt",
        desc="tts",
        disable=not progress,
    )
    with bar:
        if n_workers == 1 or len(tasks) <= 1:
            for engine, items in tasks:
                for i, result in _run_chunk(engine, items, sample_rate):
                    results[i] = result
                bar.update(len(items))
        else:
            context = pool_context(__name__)
            with ProcessPoolExecutor(min(n_workers, len(tasks)), mp_context=context) as pool:
                futures = {
                    pool.submit(_run_chunk, engine, items, sample_rate): items
                    for engine, items in tasks
                }
                for future in as_completed(futures):
                    items = futures[future]
                    try:
                        done = future.result()
                    except Exception as exc:  # noqa: BLE001 - a dead worker must not lose the rest
                        done = [(i, _failed(job, f"worker failed: {exc!r}")) for i, job in items]
                    for i, result in done:
                        results[i] = result
                    bar.update(len(items))
    # Every slot is filled above; the fallback only guards the "nothing lost" promise.
    return [r or _failed(job, "not rendered") for r, job in zip(results, jobs, strict=True)]
