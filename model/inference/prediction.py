"""Prediction contract: what the model says about one utterance.

JSON Lines, one prediction per line, fields fixed by ``ARCHITECTURE.md``: ``id``,
``transcript``, ``intent``, ``slots`` ([{``type``, ``value``}]), ``confidence`` (0–1,
of the intent) and ``model_version``; plus ``clarify`` (confidence under the threshold
chosen on validation data: ask the user again) and ``error`` for input that could not
be processed (then the other fields are empty).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from model.data.manifest import Slot

__all__ = ["Prediction", "read_predictions", "write_predictions"]


class Prediction(BaseModel):
    """One model output. ``confidence`` is the intent posterior in [0, 1]."""

    model_config = ConfigDict(extra="forbid")

    id: str
    transcript: str = ""
    intent: str = ""
    slots: list[Slot] = Field(default_factory=list)
    confidence: float = Field(0.0, ge=0.0, le=1.0)
    model_version: str = ""
    clarify: bool = False
    error: str | None = None

    def to_json_line(self) -> str:
        """Serialise; ``error`` only appears when set, so clean lines match the contract."""
        return self.model_dump_json(exclude_none=True)


def write_predictions(path: Path, predictions: Iterable[Prediction]) -> int:
    """Write predictions as JSON Lines; returns how many were written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as fh:
        for prediction in predictions:
            fh.write(prediction.to_json_line() + "\n")
            count += 1
    return count


def read_predictions(path: Path) -> list[Prediction]:
    """Read a JSON Lines prediction file."""
    with path.open(encoding="utf-8") as fh:
        return [Prediction.model_validate_json(line) for line in fh if line.strip()]
