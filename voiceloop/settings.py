"""Typed settings: ``params.yaml`` parsed once into pydantic models.

``params.yaml`` has a ``base`` block with every tunable number and a ``profiles`` block
whose entries (``tiny``, ``quick``, ``full``) override parts of ``base``. The chosen
profile is deep-merged over ``base`` and validated here; nothing else in the code base
reads ``params.yaml`` directly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "AugmentSettings",
    "CorpusSettings",
    "NoiseSettings",
    "ReverbSettings",
    "Settings",
    "SplitSettings",
    "TTSSettings",
    "ValidationSettings",
    "load_settings",
    "repo_root",
]

Engine = Literal["espeak-ng", "flite", "festival"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_range(value: tuple[float, float]) -> tuple[float, float]:
    low, high = value
    if low > high:
        raise ValueError(f"range low {low} > high {high}")
    return value


class TTSSettings(_Strict):
    """Which voices render the corpus, and how much prosody varies.

    ``engine_weights`` are relative sampling weights of the engines. espeak-ng voices are
    ``accent+variant`` pairs drawn from ``espeak_accents`` × ``espeak_variants``.
    ``rate`` is a speaking-rate factor (1.0 = the engine's default speed);
    ``espeak_pitch`` is espeak-ng's 0–99 pitch setting.
    """

    engine_weights: dict[Engine, float] = {"espeak-ng": 0.5, "flite": 0.25, "festival": 0.25}
    espeak_accents: list[str]
    espeak_variants: list[str]
    flite_voices: list[Literal["kal16", "awb", "rms"]] = ["kal16", "awb", "rms"]
    festival_voices: list[Literal["kal", "ked"]] = ["kal", "ked"]
    rate: tuple[float, float] = (0.85, 1.2)
    espeak_pitch: tuple[int, int] = (30, 70)
    sample_rate: int = 16000

    _rate = field_validator("rate")(_check_range)

    @field_validator("engine_weights")
    @classmethod
    def _positive(cls, value: dict[str, float]) -> dict[str, float]:
        if not value or any(w < 0 for w in value.values()) or sum(value.values()) <= 0:
            raise ValueError("engine_weights must be non-negative with a positive sum")
        return value


class NoiseSettings(_Strict):
    """Additive noise: kind drawn from ``kinds``, SNR (dB) uniform in ``snr_db``."""

    p: float = Field(0.5, ge=0, le=1)
    kinds: list[Literal["white", "pink", "babble"]] = ["white", "pink", "babble"]
    snr_db: tuple[float, float] = (5.0, 30.0)
    babble_talkers: tuple[int, int] = (2, 5)

    _snr = field_validator("snr_db")(_check_range)


class ReverbSettings(_Strict):
    """Reverberation by a synthetic room impulse response (pyroomacoustics image method).

    A bank of ``bank_size`` rooms is simulated once per seed and reused, because one room
    costs about a second to simulate. ``rt60_s`` is the target reverberation time range.
    """

    p: float = Field(0.3, ge=0, le=1)
    rt60_s: tuple[float, float] = (0.2, 0.8)
    bank_size: int = Field(16, ge=1)

    _rt60 = field_validator("rt60_s")(_check_range)


class AugmentSettings(_Strict):
    """Augmentation after synthesis. ``p`` is the chance that an utterance is augmented at
    all; each transform then fires with its own probability (at least one fires)."""

    p: float = Field(0.6, ge=0, le=1)
    noise: NoiseSettings = NoiseSettings()
    reverb: ReverbSettings = ReverbSettings()
    gain_p: float = Field(0.5, ge=0, le=1)
    gain_db: tuple[float, float] = (-12.0, 6.0)
    clip_p: float = Field(0.1, ge=0, le=1)
    clip_level: tuple[float, float] = (0.3, 0.8)
    telephone_p: float = Field(0.15, ge=0, le=1)

    _gain = field_validator("gain_db")(_check_range)
    _clip = field_validator("clip_level")(_check_range)


class SplitSettings(_Strict):
    """Template-level split: fractions of each intent's templates held out."""

    valid: float = Field(0.1, ge=0, lt=1)
    test: float = Field(0.15, ge=0, lt=1)

    @model_validator(mode="after")
    def _sum(self) -> SplitSettings:
        if self.valid + self.test >= 1:
            raise ValueError("valid + test must leave templates for training")
        return self


class ValidationSettings(_Strict):
    """Bounds the Great Expectations suite enforces on a manifest."""

    min_duration_s: float = 0.3
    max_duration_s: float = 20.0
    duration_tolerance_s: float = 0.05
    sample_rate: int = 16000


class CorpusSettings(_Strict):
    """Size and make-up of the synthetic spoken-command corpus.

    ``utterances_per_template`` sentences are sampled from each grammar template, raised
    for intents with few templates so that each intent gets at least
    ``min_utterances_per_intent`` (as far as its templates have distinct sentences).
    ``max_templates`` keeps a per-intent-stratified subset of templates and
    ``max_intents`` a random subset of intents, which is how the tiny profile stays tiny;
    ``intents`` restricts the corpus to named intents (domain-shift scenarios).
    ``workers`` = 0 uses every core.
    """

    language: str = "en"
    utterances_per_template: int = Field(4, ge=1)
    min_utterances_per_intent: int = Field(0, ge=0)
    max_templates: int | None = Field(None, ge=3)
    max_intents: int | None = Field(None, ge=1)
    intents: list[str] | None = None
    max_utterances: int | None = Field(None, ge=1)
    workers: int = Field(0, ge=0)
    split: SplitSettings = SplitSettings()
    tts: TTSSettings
    augment: AugmentSettings = AugmentSettings()
    validation: ValidationSettings = ValidationSettings()


class Settings(_Strict):
    """Everything one run needs: profile name, seed, workspace and stage settings."""

    profile: str
    seed: int
    workspace: Path
    corpus: CorpusSettings

    @property
    def corpus_dir(self) -> Path:
        """Where the corpus of this profile lives: ``<workspace>/corpus/<profile>``."""
        return self.workspace / "corpus" / self.profile


def repo_root() -> Path:
    """The repository root (the folder holding ``params.yaml``)."""
    return Path(__file__).resolve().parent.parent


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_settings(
    params_path: Path | None = None,
    profile: str | None = None,
    workspace: Path | None = None,
) -> Settings:
    """Parse ``params.yaml`` into :class:`Settings`.

    Args:
        params_path: path to ``params.yaml``; defaults to the repository's.
        profile: profile name; defaults to ``profile`` in the file.
        workspace: workspace folder; defaults to ``$VOICELOOP_WORKSPACE``, then to
            ``workspace`` in the file. A relative path is taken from the folder of
            ``params.yaml``.

    Raises:
        ValueError: unknown profile or invalid values (the message names the field).
    """
    params_path = params_path or repo_root() / "params.yaml"
    raw = yaml.safe_load(params_path.read_text(encoding="utf-8")) or {}
    profiles: dict[str, Any] = raw.get("profiles") or {}
    name = profile or raw.get("profile", "quick")
    if name not in profiles:
        raise ValueError(f"unknown profile {name!r}; params.yaml defines {sorted(profiles)}")
    merged = _deep_merge(raw.get("base") or {}, profiles[name] or {})
    ws = workspace or os.environ.get("VOICELOOP_WORKSPACE") or raw.get("workspace", "workspace")
    ws_path = Path(ws)
    if not ws_path.is_absolute():
        ws_path = params_path.resolve().parent / ws_path
    return Settings(profile=name, seed=int(raw.get("seed", 0)), workspace=ws_path, **merged)
