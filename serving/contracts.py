"""The service's wire and storage contracts, shared by the HTTP service, the traffic
store, the simulator and the flows that read what they write.

- :class:`UnderstandResponse`: ``POST /v1/understand`` → the prediction contract
  (``model.inference.prediction.Prediction``: ``id`` = the request id, ``transcript``,
  ``intent``, ``slots``, ``confidence``, ``model_version``, ``clarify``) plus
  ``request_id``, ``route`` and ``latency_ms``.
- :class:`ErrorBody`: every 4xx/5xx answer is ``{"error": {"code", "message"}}``.
- :class:`FeedbackRequest`: ``POST /v1/feedback``: implicit feedback on an earlier answer.
- :class:`TrafficRecord`: one logged request in the production-traffic store (no ground
  truth: that lives in the annotation store, keyed by ``request_id``).
- :class:`Annotation`: what an annotator (the simulator, standing for human labellers)
  says a request really meant.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from model.data.manifest import ManifestRow, Slot

__all__ = [
    "ROUTES",
    "Annotation",
    "CanaryShare",
    "ErrorBody",
    "ErrorDetail",
    "FeedbackRequest",
    "Route",
    "TrafficRecord",
    "UnderstandResponse",
]

Route = Literal["production", "canary"]
ROUTES: tuple[Route, ...] = ("production", "canary")


class UnderstandResponse(BaseModel):
    """The answer to one utterance."""

    model_config = ConfigDict(extra="forbid")

    request_id: str
    id: str
    transcript: str
    intent: str
    slots: list[Slot] = Field(default_factory=list)
    confidence: float = Field(ge=0.0, le=1.0)
    model_version: str
    clarify: bool
    route: Route
    latency_ms: float = Field(ge=0.0)


class ErrorDetail(BaseModel):
    """A machine-readable ``code`` (``empty_body``, ``unsupported_format``, …) and a
    sentence for people."""

    code: str
    message: str


class ErrorBody(BaseModel):
    """Every error answer of the service."""

    error: ErrorDetail


class FeedbackRequest(BaseModel):
    """Implicit feedback on request ``request_id``: the user repeated the command
    (``repeat``) or corrected the assistant (``correction``, optional corrected text)."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=128)
    kind: Literal["repeat", "correction"]
    text: str | None = Field(None, max_length=2000)


class CanaryShare(BaseModel):
    """``PUT /admin/canary`` body: the share of traffic (percent) the canary gets."""

    share: float = Field(ge=0.0, le=100.0)


class TrafficRecord(BaseModel):
    """One logged request.

    Attributes:
        request_id: the service's id of the request (also the audio file's name).
        timestamp: when the request arrived (UTC).
        device_id: the ``X-Device-Id`` header, or None.
        route: which alias answered.
        model_version: the answering model's version string.
        registry_version: the registry version number behind the alias, or None for a
            model served from a path.
        transcript, intent, slots, confidence, clarify: the answer.
        latency_ms: server-side time to answer.
        duration_s: audio duration after decoding.
        sample_rate: the uploaded audio's sample rate (Hz).
        audio_format: ``wav``, ``flac`` or ``ogg`` as uploaded.
        audio: where the stored audio is, relative to the traffic store root: the batch's
            audio shard (an uncompressed tar of WAV or FLAC files), or, with
            ``audio_bytes == 0``, a file of its own (stores written before shards).
        audio_offset: where this request's file starts inside ``audio`` (bytes).
        audio_bytes: the length of this request's file inside ``audio`` (bytes); 0 = all of it.
        kind: ``request``; feedback rows are ``feedback`` (then ``feedback_kind`` and
            ``feedback_text`` are set and the answer fields are empty).
    """

    model_config = ConfigDict(extra="forbid")

    request_id: str
    timestamp: datetime
    device_id: str | None = None
    kind: Literal["request", "feedback"] = "request"
    route: Route | None = None
    model_version: str = ""
    registry_version: str | None = None
    transcript: str = ""
    intent: str = ""
    slots: list[Slot] = Field(default_factory=list)
    confidence: float = 0.0
    clarify: bool = False
    latency_ms: float = 0.0
    duration_s: float = 0.0
    sample_rate: int = 0
    audio_format: str = ""
    audio: str = ""
    audio_offset: int = Field(default=0, ge=0)
    audio_bytes: int = Field(default=0, ge=0)
    feedback_kind: str | None = None
    feedback_text: str | None = None


class Annotation(BaseModel):
    """Ground truth of one request, as an annotator would give it; read only by the
    labelling step of the retraining flow (and by evaluation of the loop)."""

    model_config = ConfigDict(extra="forbid")

    request_id: str
    transcript: str
    intent: str
    slots: list[Slot] = Field(default_factory=list)
    domain: str = ""
    scenario: str = ""
    engine: str = ""
    voice: str = ""
    augment: list[str] = Field(default_factory=list)
    timestamp: datetime | None = None

    def manifest_row(self, audio: str, duration_s: float) -> ManifestRow:
        """This labelled request as an evaluation row (split ``test``, template
        ``traffic``) whose audio is ``audio`` (the stored request's file)."""
        return ManifestRow(
            id=self.request_id, audio=audio, duration_s=duration_s,
            transcript=self.transcript, intent=self.intent, slots=self.slots,
            engine=self.engine or "traffic", voice=self.voice or "unknown", split="test",
            template_id="traffic", domain=self.domain or "general")
