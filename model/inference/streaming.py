"""Streaming inference: partial transcripts while audio arrives, the full result at the end.

The student encoder is trained with **chunked attention** (``chunk_attention_mask``): an
encoder frame sees every frame of its own chunk and of earlier chunks (optionally only
``left_chunks`` of them), never a later chunk, and its convolutions are causal. Such a
network can run chunk by chunk with cached state and give exactly what the masked
full-sequence pass gives (tested), so the accuracy we measure offline with the mask is the
accuracy users get live.

Right context (look-ahead) is therefore the rest of the current chunk — at most one chunk,
e.g. 160 ms for 2 encoder frames of 80 ms — plus the front end's receptive field (15
feature frames = 150 ms for subsampling 8, 70 ms for 4) and half an STFT window (16 ms).

Pipeline per stream, all incremental::

    audio (N,) ─► StreamingFeatures ─► log-mel frames (t, F) ─► StreamingEncoder
        ─► encoder frames (c, D) per chunk ─► CTC greedy ─► partial transcript
    end of speech ─► intent head + parse decoder over all encoder frames ─► Decoded

Per-utterance feature normalisation needs the whole utterance, so a streaming model uses
``normalise="global"`` (fixed statistics from training data) or ``normalise="causal"`` (a
running per-utterance mean, kept across calls).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from model.decoding.beam import BeamTranscriber
from model.decoding.greedy import greedy_parse, value_mask
from model.frontend.features import FeatureExtractor, causal_normalise
from model.inference.batch import Decoded
from model.nn.network import JointModel, chunk_attention_mask, sinusoids
from model.nn.package import ModelPackage
from model.nn.tokens import split_tagged

__all__ = [
    "PartialResult",
    "StreamingEncoder",
    "StreamingFeatures",
    "StreamingRecognizer",
    "StreamingSession",
    "chunk_attention_mask",
]


class StreamingFeatures:
    """Incremental log-mel features equal to :class:`FeatureExtractor` on the whole audio.

    Frame i of a centred STFT covers samples ``[i·hop − n_fft/2, i·hop + n_fft/2)``; it is
    emitted once those samples have all arrived (reflection padding only touches the
    edges, so earlier frames are final). ``finish`` emits the last frames, whose windows
    reach past the end of the audio.

    ``normalise='causal'`` keeps the running per-bin sum of the raw frames emitted so far
    (and their count), so each new frame is normalised exactly as
    ``normalise_features`` does on the whole utterance.
    """

    def __init__(self, extractor: FeatureExtractor) -> None:
        if extractor.cfg.normalise == "utterance":
            raise ValueError(
                "streaming needs causal features: normalise='global', 'causal' or 'none', "
                "got 'utterance'")
        self.extractor = extractor
        self._chunks: list[np.ndarray] = []
        self.samples = 0
        self.emitted = 0
        # Causal normalisation state: per-bin sum of the `emitted` raw frames (float64).
        self._raw_sum = torch.zeros(extractor.cfg.n_mels, dtype=torch.float64)

    def _audio(self) -> np.ndarray:
        if len(self._chunks) > 1:
            self._chunks = [np.concatenate(self._chunks)]
        return self._chunks[0] if self._chunks else np.zeros(0, dtype=np.float32)

    def accept(self, samples: np.ndarray) -> Tensor:
        """Add ``(n,)`` float32 samples; returns the newly final frames ``(t, F)``."""
        self._chunks.append(np.asarray(samples, dtype=np.float32).reshape(-1))
        self.samples += int(np.asarray(samples).size)
        half = self.extractor.n_fft // 2
        if self.samples <= half:  # reflection padding needs more than half a window
            return torch.zeros(0, self.extractor.cfg.n_mels)
        ready = (self.samples - half) // self.extractor.hop + 1
        return self._emit(ready)

    def finish(self) -> Tensor:
        """The remaining frames ``(t, F)``; total frames = ``1 + samples // hop``."""
        return self._emit(1 + self.samples // self.extractor.hop)

    def _emit(self, upto: int) -> Tensor:
        if upto <= self.emitted:
            return torch.zeros(0, self.extractor.cfg.n_mels)
        # Only the tail is analysed, not the whole utterance again: starting `margin`
        # frames early keeps the slice's own edge reflection away from the frames
        # emitted (frame-wise normalisation makes the rest exact).
        hop = self.extractor.hop
        margin = -(-(self.extractor.n_fft // 2) // hop)
        first = max(0, self.emitted - margin)
        tail = self._audio()[first * hop :]
        cfg = self.extractor.cfg
        if cfg.normalise == "causal":
            # The extractor would restart the running mean at the slice; continue it.
            raw = self.extractor.raw(tail)[self.emitted - first : upto - first]
            feats = causal_normalise(raw, cfg, self._raw_sum, self.emitted)
            self._raw_sum += raw.double().sum(0)
        else:
            feats = self.extractor(tail)[self.emitted - first : upto - first]
        self.emitted = upto
        return feats


class StreamingEncoder:
    """Runs a causal, chunk-trained encoder chunk by chunk with cached state.

    Args:
        model: a :class:`JointModel` whose encoder has ``causal_conv=True``.
        chunk: encoder frames per chunk (each ``subsampling × hop`` long, e.g. 80 ms).
        left_chunks: chunks of left context kept in the attention cache (None = all).

    ``accept(feats (t, F))`` returns the encoder frames ``(c, D)`` completed by this input
    (whole chunks only); ``finish()`` encodes the last, possibly partial chunk.
    """

    def __init__(self, model: JointModel, chunk: int, left_chunks: int | None = None) -> None:
        cfg = model.cfg.encoder
        if not cfg.causal_conv:
            raise ValueError("streaming needs an encoder trained with causal_conv=True")
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1 encoder frame, got {chunk}")
        self.encoder = model.encoder
        self.chunk, self.left_chunks = chunk, left_chunks
        strides = self.encoder.subsampling.strides
        self.factor = int(np.prod(strides))
        # Receptive field of the unpadded 3-wide conv stack, in feature frames.
        self.receptive = 1 + 2 * sum(int(np.prod(strides[:i])) for i in range(len(strides)))
        self._feats = torch.zeros(0, cfg.n_mels)
        self._subsampled = 0  # encoder-rate frames produced by the front end
        self._pending: list[Tensor] = []
        self._attn: list[tuple[Tensor, Tensor] | None] = [None] * len(self.encoder.blocks)
        self._conv: list[Tensor | None] = [None] * len(self.encoder.blocks)

    @property
    def frames_done(self) -> int:
        return self._subsampled - sum(p.size(0) for p in self._pending)

    @torch.no_grad()
    def accept(self, feats: Tensor) -> Tensor:
        self._feats = torch.cat([self._feats, feats.float()])
        self._front_end()
        out = []
        while sum(p.size(0) for p in self._pending) >= self.chunk:
            pending = torch.cat(self._pending)
            self._pending = [pending[self.chunk :]]
            out.append(self._encode(pending[: self.chunk]))
        return torch.cat(out) if out else torch.zeros(0, self.encoder.cfg.d_model)

    @torch.no_grad()
    def finish(self) -> Tensor:
        self._front_end()
        pending = torch.cat(self._pending) if self._pending else torch.zeros(0)
        self._pending = []
        if pending.numel() == 0:
            return torch.zeros(0, self.encoder.cfg.d_model)
        return self._encode(pending)

    def _front_end(self) -> None:
        total = self._feats.size(0)
        available = (total - self.receptive) // self.factor + 1 if total >= self.receptive else 0
        if available <= self._subsampled:
            return
        start = self.factor * self._subsampled
        stop = self.factor * (available - 1) + self.receptive
        window = self._feats[start:stop][None]
        x, _ = self.encoder.subsampling(window, torch.tensor([window.size(1)]))
        if self.encoder.cfg.pos_enc:
            x = x + sinusoids(x.size(1), x.size(2), self._subsampled).to(x.dtype)
        self._pending.append(x[0])
        self._subsampled = available

    def _encode(self, frames: Tensor) -> Tensor:
        x = frames[None]  # (1, C, D)
        keep = None if self.left_chunks is None else self.left_chunks * self.chunk
        for i, block in enumerate(self.encoder.blocks):
            x, kv, self._conv[i] = block.forward_chunk(x, self._attn[i], self._conv[i])
            # Left context for the next chunk: the last `left_chunks` whole chunks.
            self._attn[i] = kv if keep is None else (kv[0][:, -keep:], kv[1][:, -keep:])
        return x[0]


@dataclass(frozen=True)
class PartialResult:
    """What a stream knows so far: the CTC transcript and how much audio it covers."""

    transcript: str
    audio_s: float
    encoder_frames: int


class StreamingSession:
    """One utterance being recognised; create with :meth:`StreamingRecognizer.session`."""

    def __init__(self, recognizer: StreamingRecognizer) -> None:
        self.r = recognizer
        self.features = StreamingFeatures(recognizer.extractor)
        self.encoder = StreamingEncoder(recognizer.model, recognizer.chunk, recognizer.left_chunks)
        self._encoded: list[Tensor] = []
        self._logits: list[Tensor] = []  # (c·k, C) CTC logits per chunk, for the final beam
        self._ids: list[int] = []
        self._previous: int | None = None

    @torch.no_grad()
    def accept_audio(self, samples: np.ndarray) -> PartialResult:
        """Feed ``(n,)`` float32 samples at the model's rate; returns the partial result."""
        self._consume(self.encoder.accept(self.features.accept(samples)))
        return self.partial()

    def partial(self) -> PartialResult:
        """The greedy transcript so far (slot tags removed)."""
        rate = self.r.package.features.sample_rate
        return PartialResult(
            transcript=split_tagged(self.r.package.ctc_vocab.decode(self._ids))[0],
            audio_s=self.features.samples / rate,
            encoder_frames=sum(e.size(0) for e in self._encoded),
        )

    @torch.no_grad()
    def finish(self) -> Decoded:
        """End of speech: flush, then intent, confidence and parse over all frames."""
        self._consume(self.encoder.accept(self.features.finish()))
        self._consume(self.encoder.finish())
        if not self._encoded or sum(e.size(0) for e in self._encoded) == 0:
            raise ValueError("utterance too short for the encoder front end")
        model = self.r.model
        enc = torch.cat(self._encoded)[None]  # (1, T', D)
        pad = torch.zeros(1, enc.size(1), dtype=torch.bool)
        logits = model.intent_head(enc, pad).float() / self.r.package.intent_temperature
        conf, best = torch.softmax(logits, dim=-1)[0].max(dim=-1)
        vocab = self.r.package.parse_vocab
        transcript, allowed = self.r.package.ctc_vocab.decode(self._ids), None
        if self.r.transcriber is not None:
            # End of speech: the lexicon + LM beam replaces the greedy partial.
            ctc = torch.cat(self._logits)[None]
            transcript = self.r.transcriber.decode(ctc, torch.tensor([ctc.size(1)]))[0]
        transcript, slots = split_tagged(transcript, vocab.slot_types)
        parse_intent = vocab.intents[int(best)]
        if model.parse_decoder is not None:
            if self.r.transcriber is not None and self.r.transcriber.config.copy_values:
                allowed = value_mask(vocab, [transcript])
            parses, _ = greedy_parse(model, enc, pad, self.r.max_parse_len, allowed)
            parse_intent, slots = vocab.decode(parses[0])
        return Decoded(
            transcript=transcript,
            intent=self.r.package.parse_vocab.intents[int(best)],
            confidence=float(conf),
            parse_intent=parse_intent,
            slots=slots,
        )

    def _consume(self, frames: Tensor) -> None:
        if frames.size(0) == 0:
            return
        self._encoded.append(frames)
        model = self.r.model
        logits, _ = model.ctc(frames[None], torch.tensor([frames.size(0)]))
        self._logits.append(logits[0])
        # Greedy CTC across chunk boundaries: repeats merge with the previous chunk's end.
        for token in logits[0].argmax(-1).tolist():
            if token != self._previous and token != 0:
                self._ids.append(token)
            self._previous = token


class StreamingRecognizer:
    """Streaming front door for a model package trained for it.

    Args:
        package: a causal-conv, global-CMVN model (the student).
        chunk: encoder frames per chunk.
        left_chunks: attention left context in chunks (None = whole utterance).
        max_parse_len: parse tokens to decode at most.
        use_lm: the final transcript from the package's LM beam search, when it has one
            (partials stay greedy).
    """

    def __init__(
        self, package: ModelPackage, chunk: int, left_chunks: int | None = None,
        max_parse_len: int = 40, use_lm: bool = True,
    ) -> None:
        self.package = package
        self.transcriber = (
            BeamTranscriber(package.lm_dir.parent, package.ctc_vocab)
            if use_lm and package.lm_dir is not None else None)
        self.model = package.model.eval()
        self.extractor = FeatureExtractor(package.features)
        StreamingFeatures(self.extractor)  # validates the feature normalisation early
        if not self.model.cfg.encoder.causal_conv:
            raise ValueError("streaming needs an encoder trained with causal_conv=True")
        self.chunk, self.left_chunks, self.max_parse_len = chunk, left_chunks, max_parse_len

    @property
    def chunk_ms(self) -> float:
        cfg = self.package.features
        return self.chunk * self.model.cfg.encoder.subsampling * cfg.hop_ms

    def session(self) -> StreamingSession:
        return StreamingSession(self)
