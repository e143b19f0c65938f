"""Unit tests of model/data/tts.py: engines, festival batching, resume, determinism, voices.

Each test renders a handful of short sentences (a few ms each with espeak-ng / flite, one
~0.2 s festival session per batch); only ``test_worker_pool`` pays for worker start-up.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from model.data import tts
from model.data.tts import SynthJob, VoiceSpec, check_voice, sample_voice, synthesize
from voiceloop.settings import TTSSettings, load_settings

SENTENCE = "turn on the kitchen lights"  # ~1.3-1.8 s in every engine at rate 1.0

VOICES = {
    "espeak-ng": VoiceSpec("espeak-ng", "en-gb-scotland+f3", rate=1.0, pitch=40),
    "flite": VoiceSpec("flite", "kal16", rate=1.0),
    "festival": VoiceSpec("festival", "kal", rate=1.0),
}


def _needs(engine: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(shutil.which(engine) is None, reason=f"{engine} not installed")


needs_all = pytest.mark.skipif(
    any(shutil.which(e) is None for e in tts.ENGINES), reason="a TTS engine is not installed"
)


def _job(tmp_path: Path, name: str, voice: VoiceSpec, text: str = SENTENCE) -> SynthJob:
    return SynthJob(id=name, text=text, voice=voice, out_path=tmp_path / f"{name}.wav")


def _render(jobs: list[SynthJob]) -> list[tts.SynthResult]:
    # One worker: everything runs in this process (no pool start-up, monkeypatch works).
    return synthesize(jobs, workers=1, progress=False)


def _assert_speech(result: tts.SynthResult, min_s: float = 0.6, max_s: float = 4.0) -> None:
    assert result.error is None, result.error
    info = sf.info(result.out_path)
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    audio, _ = sf.read(result.out_path, dtype="float64")  # (T,)
    assert result.duration_s == pytest.approx(len(audio) / 16000)
    assert min_s <= result.duration_s <= max_s
    assert np.sqrt(np.mean(audio**2)) > 0.02  # levelled to ~0.1 RMS, so clearly not silent
    assert np.abs(audio).max() <= 0.9 + 1e-4  # peak cap


@pytest.mark.parametrize("engine", tts.ENGINES)
def test_each_engine_renders_speech(tmp_path: Path, engine: str) -> None:
    if shutil.which(engine) is None:
        pytest.skip(f"{engine} not installed")
    (result,) = _render([_job(tmp_path, engine, VOICES[engine])])
    _assert_speech(result)
    assert not result.skipped


@_needs("espeak-ng")
def test_rate_changes_duration(tmp_path: Path) -> None:
    slow, fast = _render(
        [
            _job(tmp_path, "slow", VoiceSpec("espeak-ng", "en-us", rate=0.8)),
            _job(tmp_path, "fast", VoiceSpec("espeak-ng", "en-us", rate=1.25)),
        ]
    )
    # Silence margins (2 x 0.12 s) do not scale with rate, so compare loosely.
    assert fast.duration_s < 0.85 * slow.duration_s


@_needs("festival")
def test_festival_batch_is_one_session(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    real_run = subprocess.run

    def counting_run(cmd, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(list(cmd))
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(tts.subprocess, "run", counting_run)
    texts = [
        "don't turn off the lights",
        'say "good night" to the kitchen',
        "a back\\slash; (parens) and it's o'clock",
    ]
    voices = [VoiceSpec("festival", "kal"), VoiceSpec("festival", "ked", rate=1.2)] * 2
    jobs = [_job(tmp_path, f"f{i}", voices[i], text) for i, text in enumerate(texts)]
    results = _render(jobs)
    assert [c[0] for c in calls] == ["festival"]
    for result in results:
        _assert_speech(result, min_s=0.8, max_s=6.0)  # punctuation adds pauses


@_needs("festival")
@pytest.mark.parametrize("fault", ["error", "crash"])
def test_festival_failure_is_isolated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    real_script = tts._festival_script

    def faulty_script(jobs, raws):  # type: ignore[no-untyped-def]
        script = real_script(jobs, raws)
        if len(jobs) < 3:  # the retry session after a crash: leave it alone
            return script
        if fault == "error":  # utterance 1 fails inside the session, which goes on
            return script.replace(str(raws[1]), "/nonexistent-dir/x.wav")
        # The session dies on utterance 1: festival exits without reaching VLDONE.
        return script.replace(
            '(format stderr "VLBEGIN 1\\n")', '(format stderr "VLBEGIN 1\\n")(quit)'
        )

    monkeypatch.setattr(tts, "_festival_script", faulty_script)
    jobs = [_job(tmp_path, f"f{i}", VOICES["festival"]) for i in range(3)]
    ok0, bad, ok2 = _render(jobs)
    _assert_speech(ok0)
    _assert_speech(ok2)
    assert bad.error is not None and "festival" in bad.error
    assert bad.duration_s == 0.0 and not bad.out_path.exists()


@needs_all
def test_resume_skips_finished_and_remakes_missing(tmp_path: Path) -> None:
    jobs = [_job(tmp_path, name, voice) for name, voice in VOICES.items()]
    first = _render(jobs)
    assert all(r.error is None and not r.skipped for r in first)
    before = {j.id: (j.out_path.read_bytes(), j.out_path.stat().st_mtime_ns) for j in jobs}

    second = _render(jobs)
    assert all(r.skipped and r.error is None for r in second)
    assert [r.duration_s for r in second] == [r.duration_s for r in first]
    assert {j.id: (j.out_path.read_bytes(), j.out_path.stat().st_mtime_ns) for j in jobs} == before

    jobs[1].out_path.unlink()
    jobs[2].out_path.write_bytes(b"RIFF half a file")  # not decodable: must be re-made
    third = _render(jobs)
    assert [r.skipped for r in third] == [True, False, False]
    assert all(j.out_path.read_bytes() == before[j.id][0] for j in jobs)
    assert not list(tmp_path.glob(".*.tmp"))  # no temp files left behind


@needs_all
def test_same_job_gives_identical_audio(tmp_path: Path) -> None:
    for name, voice in VOICES.items():
        a, b = _render([_job(tmp_path / "a", name, voice), _job(tmp_path / "b", name, voice)])
        assert a.out_path.read_bytes() == b.out_path.read_bytes()


@_needs("festival")
def test_festival_audio_does_not_depend_on_batch(tmp_path: Path) -> None:
    target = VoiceSpec("festival", "kal", rate=1.1)
    (alone,) = _render([_job(tmp_path / "alone", "t", target)])
    others = [VoiceSpec("festival", "ked", rate=0.9), VoiceSpec("festival", "kal", rate=1.3)]
    batch = [_job(tmp_path / "batch", f"o{i}", v, "close the garage") for i, v in enumerate(others)]
    results = _render([*batch, _job(tmp_path / "batch", "t", target)])
    assert results[-1].out_path.read_bytes() == alone.out_path.read_bytes()


@needs_all
def test_worker_pool_keeps_job_order(tmp_path: Path) -> None:
    voices = list(VOICES.values())
    jobs = [_job(tmp_path, f"u{i}", voices[i % 3], f"{SENTENCE} number {i}") for i in range(9)]
    results = synthesize(jobs, workers=2, progress=False)
    assert [r.id for r in results] == [j.id for j in jobs]
    assert all(r.error is None and r.duration_s > 1.0 for r in results)
    # The pool renders the same bytes as the in-process path.
    (again,) = _render([_job(tmp_path / "again", "u4", voices[1], f"{SENTENCE} number 4")])
    assert again.out_path.read_bytes() == jobs[4].out_path.read_bytes()


@_needs("espeak-ng")
def test_empty_text_is_an_error_result(tmp_path: Path) -> None:
    ok, empty = _render(
        [_job(tmp_path, "ok", VOICES["espeak-ng"]), _job(tmp_path, "e", VOICES["espeak-ng"], "  ")]
    )
    assert ok.error is None
    assert empty.error == "empty text" and empty.duration_s == 0.0


@needs_all
@pytest.mark.parametrize(
    "voice",
    [
        VoiceSpec("espeak-ng", "en-us+no_such_variant"),
        VoiceSpec("espeak-ng", "xx-nowhere+f3"),
        VoiceSpec("flite", "nobody"),
        VoiceSpec("festival", "nobody"),
    ],
)
def test_unknown_voice_raises(tmp_path: Path, voice: VoiceSpec) -> None:
    with pytest.raises(ValueError, match="unknown"):
        synthesize([_job(tmp_path, "x", voice)], workers=1, progress=False)
    assert not (tmp_path / "x.wav").exists()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"engine": "say", "voice": "alex"},
        {"engine": "flite", "voice": ""},
        {"engine": "flite", "voice": "kal16", "pitch": 50},
        {"engine": "espeak-ng", "voice": "en-us", "pitch": 120},
        {"engine": "espeak-ng", "voice": "en-us", "rate": 0.1},
    ],
)
def test_bad_voice_spec_raises(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        VoiceSpec(**kwargs)


def test_duplicate_out_path_raises(tmp_path: Path) -> None:
    job = _job(tmp_path, "x", VOICES["flite"])
    with pytest.raises(ValueError, match="same file"):
        synthesize([job, job], workers=1, progress=False)


def _settings(**weights: float) -> TTSSettings:
    return TTSSettings(
        engine_weights=weights or {"espeak-ng": 0.5, "flite": 0.25, "festival": 0.25},
        espeak_accents=["en-us", "en-gb-scotland"],
        espeak_variants=["f3", "m2", "klatt"],
        rate=(0.85, 1.2),
        espeak_pitch=(30, 70),
    )


def test_sample_voice_is_deterministic_by_seed() -> None:
    settings = _settings()

    def draw(seed: int) -> list[VoiceSpec]:
        rng = np.random.default_rng(seed)
        return [sample_voice(settings, rng) for _ in range(50)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_sample_voice_respects_settings() -> None:
    settings = _settings(**{"espeak-ng": 0.0, "flite": 1.0, "festival": 3.0})
    rng = np.random.default_rng(0)
    voices = [sample_voice(settings, rng) for _ in range(400)]
    engines = [v.engine for v in voices]
    assert "espeak-ng" not in engines
    assert 0.15 < engines.count("flite") / len(engines) < 0.35  # weight 1 of 4
    assert all(0.85 <= v.rate <= 1.2 and v.pitch is None for v in voices)
    assert {v.voice for v in voices if v.engine == "flite"} == {"kal16", "awb", "rms"}

    espeak_only = _settings(**{"espeak-ng": 1.0})
    voices = [sample_voice(espeak_only, rng) for _ in range(200)]
    assert all(v.engine == "espeak-ng" and 30 <= (v.pitch or -1) <= 70 for v in voices)
    assert {v.voice.split("+")[0] for v in voices} == {"en-us", "en-gb-scotland"}
    assert {v.voice.split("+")[1] for v in voices} == {"f3", "m2", "klatt"}


@_needs("espeak-ng")
def test_params_yaml_voices_exist() -> None:
    # espeak-ng falls back silently to its default voice for unknown names; catch typos.
    settings = load_settings(profile="tiny").corpus.tts
    for accent in settings.espeak_accents:
        for variant in settings.espeak_variants:
            check_voice(VoiceSpec("espeak-ng", f"{accent}+{variant}"))
    if shutil.which("flite"):
        for voice in settings.flite_voices:
            check_voice(VoiceSpec("flite", voice))
