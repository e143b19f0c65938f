"""Manifest contract: one utterance per JSON Lines row.

The manifest is the boundary between the corpus stage and everything downstream
(training, evaluation, validation, drift monitoring). Its fields follow
``ARCHITECTURE.md``: ``id``, ``audio``, ``duration_s``, ``transcript``, ``intent``,
``slots`` plus provenance (``engine``, ``voice``, ``augment``, ``split``,
``template_id``) and the ``domain`` tag used for domain-shift scenarios.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from model.fileio import atomic_path

__all__ = [
    "AugmentStep",
    "ManifestRow",
    "Slot",
    "iter_manifest",
    "iter_raw_manifest",
    "read_manifest",
    "write_manifest",
]


class Slot(BaseModel):
    """One slot of a parse: hassil slot name and the value as spoken (lower-case words)."""

    model_config = ConfigDict(frozen=True)

    type: str
    value: str


class AugmentStep(BaseModel):
    """One transform applied to an utterance's audio, with the parameters it was drawn with.

    ``kind`` is one of ``noise``, ``reverb``, ``gain``, ``clip``, ``telephone``; ``params``
    holds the sampled values (e.g. ``{"noise": "pink", "snr_db": 12.5}``) so that the
    transform can be audited and replayed.
    """

    model_config = ConfigDict(frozen=True)

    kind: str
    params: dict[str, float | int | str] = Field(default_factory=dict)


class ManifestRow(BaseModel):
    """One utterance of the corpus.

    Attributes:
        id: stable utterance id, unique across all splits.
        audio: path to a 16 kHz mono WAV file (relative paths are relative to the
            manifest's folder).
        duration_s: audio duration in seconds.
        transcript: normalised words (lower case, numbers spelled out, no digits).
        intent: Home Assistant intent name, e.g. ``HassTurnOn``.
        slots: ordered slots with spoken values.
        engine: TTS engine (``espeak-ng``, ``flite``, ``festival``) or ``traffic``.
        voice: engine voice, e.g. ``en-gb-scotland+f3`` or ``kal16``.
        augment: transforms applied after synthesis, in order; empty for clean audio.
        split: ``train``, ``valid`` or ``test``.
        template_id: id of the grammar template the sentence came from.
        domain: coarse domain tag (``lights``, ``climate``, ``media``, ...).
        rate: speaking-rate factor the voice was rendered at (1.0 = engine default).
        pitch: engine pitch setting, when the engine has one.
    """

    model_config = ConfigDict(extra="forbid")

    id: str
    audio: str
    duration_s: float
    transcript: str
    intent: str
    slots: list[Slot] = Field(default_factory=list)
    engine: str
    voice: str
    augment: list[AugmentStep] = Field(default_factory=list)
    split: str
    template_id: str
    domain: str
    rate: float = 1.0
    pitch: int | None = None

    def audio_path(self, manifest_dir: Path) -> Path:
        """Absolute audio path, resolving a relative ``audio`` against ``manifest_dir``."""
        path = Path(self.audio)
        return path if path.is_absolute() else manifest_dir / path


def write_manifest(path: Path, rows: Iterable[ManifestRow]) -> int:
    """Write ``rows`` as JSON Lines atomically (temp file + rename); returns the row count."""
    count = 0
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(row.model_dump_json() + "\n")
            count += 1
    return count


def iter_raw_manifest(path: Path) -> Iterator[dict[str, Any]]:
    """Yield each line of a JSON Lines manifest as a plain dict, without validation.

    Used by data validation, which must see malformed rows instead of failing on them.
    """
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from exc


def iter_manifest(path: Path) -> Iterator[ManifestRow]:
    """Yield validated rows of a JSON Lines manifest."""
    for raw in iter_raw_manifest(path):
        yield ManifestRow.model_validate(raw)


def read_manifest(path: Path) -> list[ManifestRow]:
    """Read a whole JSON Lines manifest into validated rows."""
    return list(iter_manifest(path))
