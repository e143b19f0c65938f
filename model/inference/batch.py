"""Batch inference: audio → transcript, intent, slots, confidence (the prediction contract).

:class:`BatchPredictor` holds everything that does not depend on how the network runs:
audio loading and checks, features, length-sorted batching, turning decoder outputs into
:class:`Decoded` and :class:`~model.inference.prediction.Prediction`. :class:`SLUPredictor` runs a
torch :class:`~model.nn.package.ModelPackage`; ``model.inference.onnx.OnnxSLUPredictor``
runs an exported ONNX bundle through the same interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from model.decoding.beam import BeamTranscriber
from model.decoding.greedy import ctc_greedy, greedy_parse, value_mask
from model.frontend.audio import AudioError, load_audio, prepare_waveform
from model.frontend.features import FeatureConfig, FeatureExtractor
from model.inference.prediction import Prediction
from model.nn.network import chunk_attention_mask, min_input_frames
from model.nn.package import ModelPackage, load_package
from model.nn.tokens import CTCVocab, ParseVocab, TaggedCharVocab, split_tagged

__all__ = [
    "BatchOutput",
    "BatchPredictor",
    "Decoded",
    "SLUPredictor",
    "decoded_to_prediction",
    "length_sorted_batches",
    "predict_dataset",
]


@dataclass(frozen=True)
class Decoded:
    """Decoder output for one utterance, before it becomes a :class:`Prediction`."""

    transcript: str
    intent: str
    confidence: float
    parse_intent: str
    slots: list


@dataclass(frozen=True)
class BatchOutput:
    """What a network gives for one padded batch of B utterances.

    Attributes:
        transcripts: B transcripts (:meth:`BatchPredictor._transcribe`); tagged
            transcripts for a tagged CTC head.
        intent_logits: ``(B, I)`` intent logits (before temperature scaling).
        parses: B parse token-id lists (no ``<bos>``/``<eos>``), or None for a model
            without a parse decoder (its slots come from the tagged transcript).
    """

    transcripts: list[str]
    intent_logits: Tensor
    parses: list[list[int]] | None


def decoded_to_prediction(
    uid: str, decoded: Decoded, version: str, clarify_threshold: float
) -> Prediction:
    """One :class:`Decoded` → the prediction contract (clarify below the threshold)."""
    return Prediction(
        id=uid,
        transcript=" ".join(decoded.transcript.split()),
        intent=decoded.intent,
        slots=decoded.slots,
        confidence=min(1.0, max(0.0, decoded.confidence)),
        model_version=version,
        clarify=decoded.confidence < clarify_threshold,
    )


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices of ``lengths`` sorted by length, in chunks of at most ``batch_size``."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


class BatchPredictor(ABC):
    """Runs a network on features, waveforms or audio files (subclasses run the network).

    Utterances are batched by length (``batch_size`` at most) to limit padding; results
    come back in input order. Subclasses implement :attr:`version` and
    :meth:`_decode_batch`, and for :meth:`embed_waveforms` :attr:`embedding_dim` and
    :meth:`_encode_batch`.

    Args:
        features: feature settings of the model.
        parse_vocab, ctc_vocab: the model's vocabularies.
        clarify_threshold: confidences below it set ``clarify``.
        subsampling: the encoder's front-end factor (sets the shortest usable audio).
        batch_size: utterances per forward pass.
        max_parse_len: longest parse to decode.
        lm_dir: a model folder or bundle with ``lm/``: transcripts then come from the
            lexicon + n-gram beam search (``model.decoding.beam``) instead of greedy CTC.
        intent_temperature: confidences are ``softmax(logits / intent_temperature)``.
    """

    def __init__(
        self,
        features: FeatureConfig,
        parse_vocab: ParseVocab,
        ctc_vocab: CTCVocab,
        clarify_threshold: float,
        subsampling: int,
        batch_size: int = 16,
        max_parse_len: int = 40,
        lm_dir: Path | None = None,
        intent_temperature: float = 1.0,
    ) -> None:
        if intent_temperature <= 0:
            raise ValueError(f"intent_temperature must be positive, got {intent_temperature}")
        self.intent_temperature = intent_temperature
        self.feature_config = features
        self.transcriber = BeamTranscriber(lm_dir, ctc_vocab) if lm_dir is not None else None
        self.extractor = FeatureExtractor(features)
        self.parse_vocab = parse_vocab
        self.ctc_vocab = ctc_vocab
        self.clarify_threshold = clarify_threshold
        self.batch_size = batch_size
        self.max_parse_len = max_parse_len
        # T = 1 + N // hop frames; one frame of margin over the front end's minimum.
        self.min_samples = min_input_frames(subsampling) * self.extractor.hop + self.extractor.hop

    @property
    @abstractmethod
    def version(self) -> str:
        """The model version written into every prediction."""

    @abstractmethod
    def _decode_batch(self, feats: Tensor, lengths: Tensor) -> BatchOutput:
        """Padded features ``(B, T, F)`` float32 and lengths ``(B,)`` int64 → outputs."""

    @property
    def embedding_dim(self) -> int:
        """D, the width of the encoder output (and of :meth:`embed_waveforms` rows)."""
        raise NotImplementedError(f"{type(self).__name__} does not give embeddings")

    def _encode_batch(self, feats: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Padded features ``(B, T, F)`` float32 and lengths ``(B,)`` int64 → encoder
        output ``(B, T', D)`` and its valid lengths ``(B,)``."""
        raise NotImplementedError(f"{type(self).__name__} does not give embeddings")

    def _transcribe(self, ctc_logits: Tensor, ctc_lengths: Tensor) -> list[str]:
        """``(B, T', C)`` CTC logits and ``(B,)`` lengths → B transcripts: the LM beam
        search when the predictor has one, else greedy CTC."""
        if self.transcriber is not None:
            return self.transcriber.decode(ctc_logits, ctc_lengths)
        return [self.ctc_vocab.decode(ids).strip() for ids in ctc_greedy(ctc_logits, ctc_lengths)]

    def _allowed_tokens(self, transcripts: Sequence[str]) -> Tensor | None:
        """The parse-token mask that makes slot values copies of transcript words
        (``copy_values`` of the LM settings), or ``None`` for an unconstrained parse."""
        if self.transcriber is None or not self.transcriber.config.copy_values:
            return None
        return value_mask(self.parse_vocab, transcripts)

    @torch.no_grad()
    def decode_features(self, feats: Sequence[Tensor]) -> list[Decoded]:
        """Decode a list of ``(T_i, F)`` feature arrays."""
        results: dict[int, Decoded] = {}
        intents = self.parse_vocab.intents
        tagged = isinstance(self.ctc_vocab, TaggedCharVocab)
        for idx in length_sorted_batches([f.shape[0] for f in feats], self.batch_size):
            batch = [feats[i].float() for i in idx]
            lengths = torch.tensor([f.shape[0] for f in batch])
            padded = torch.nn.utils.rnn.pad_sequence(batch, batch_first=True)
            out = self._decode_batch(padded, lengths)
            probs = torch.softmax(out.intent_logits.float() / self.intent_temperature, dim=-1)
            conf, best = probs.max(dim=-1)
            for j, i in enumerate(idx):
                transcript, slots = out.transcripts[j], []
                parse_intent = intents[int(best[j])]
                if tagged:
                    transcript, slots = split_tagged(transcript, self.parse_vocab.slot_types)
                if out.parses is not None:
                    parse_intent, slots = self.parse_vocab.decode(out.parses[j])
                results[i] = Decoded(
                    transcript=transcript,
                    intent=intents[int(best[j])],
                    confidence=float(conf[j]),
                    parse_intent=parse_intent,
                    slots=slots,
                )
        return [results[i] for i in range(len(feats))]

    @torch.no_grad()
    def embed_waveforms(
        self, waveforms: Sequence[np.ndarray], sample_rates: Sequence[int]
    ) -> np.ndarray:
        """Utterance embeddings: the encoder output mean-pooled over its valid frames.

        Waveforms are prepared like :meth:`predict_waveforms` (down-mixed, resampled to
        the model's rate) and encoded in length-sorted batches of ``batch_size``; padded
        frames never enter the mean, so an utterance's embedding does not depend on the
        batch it lands in (up to float rounding).

        Args:
            waveforms: N waveforms, each ``(samples,)`` or ``(samples, channels)``.
            sample_rates: their N rates in Hz.

        Returns:
            ``(N, D)`` float32, in input order; a row of NaN for audio that cannot be used
            (empty, non-finite, shorter than the encoder's shortest input).

        Raises:
            ValueError: ``waveforms`` and ``sample_rates`` differ in length.
        """
        if len(waveforms) != len(sample_rates):
            raise ValueError(f"{len(waveforms)} waveforms but {len(sample_rates)} sample rates")
        out = np.full((len(waveforms), self.embedding_dim), np.nan, dtype=np.float32)
        target = self.feature_config.sample_rate
        feats: dict[int, Tensor] = {}
        for i, (audio, rate) in enumerate(zip(waveforms, sample_rates, strict=True)):
            try:
                feats[i] = self._features(prepare_waveform(audio, int(rate), target))
            except AudioError:
                continue  # stays NaN: the caller decides what an unusable row means
        keys = sorted(feats)
        for batch in length_sorted_batches([feats[k].shape[0] for k in keys], self.batch_size):
            idx = [keys[j] for j in batch]
            lengths = torch.tensor([feats[i].shape[0] for i in idx])
            padded = torch.nn.utils.rnn.pad_sequence([feats[i].float() for i in idx],
                                                     batch_first=True)
            enc, enc_lengths = self._encode_batch(padded, lengths)  # (B, T', D), (B,)
            enc = enc.float()
            valid = torch.arange(enc.size(1))[None, :] < enc_lengths[:, None]  # (B, T')
            summed = (enc * valid[..., None]).sum(dim=1)  # (B, D)
            pooled = summed / enc_lengths.clamp(min=1)[:, None].to(summed.dtype)
            out[idx] = pooled.numpy()
        return out

    def to_prediction(self, uid: str, decoded: Decoded) -> Prediction:
        return decoded_to_prediction(uid, decoded, self.version, self.clarify_threshold)

    def predict_features(self, ids: Sequence[str], feats: Sequence[Tensor]) -> list[Prediction]:
        """Predictions for already-computed features ``(T_i, F)`` (e.g. a cached split)."""
        decoded = self.decode_features(feats)
        return [self.to_prediction(uid, d) for uid, d in zip(ids, decoded, strict=True)]

    def predict_waveforms(
        self, ids: Sequence[str], waveforms: Sequence[np.ndarray], sample_rates: Sequence[int]
    ) -> list[Prediction]:
        """Predict for in-memory audio; each waveform ``(N,)`` or ``(N, channels)``.

        A waveform that cannot be used yields a prediction with ``error`` set.
        """
        target = self.feature_config.sample_rate
        loaders = [
            partial(prepare_waveform, audio, rate, target)
            for audio, rate in zip(waveforms, sample_rates, strict=True)
        ]
        return self.predict_loaders(ids, loaders)

    def predict_files(
        self, ids: Sequence[str], paths: Sequence[Path], progress: bool = False
    ) -> list[Prediction]:
        """Predict for audio files; unreadable files give predictions with ``error``."""
        target = self.feature_config.sample_rate
        return self.predict_loaders(ids, [partial(load_audio, p, target) for p in paths], progress)

    def predict_loaders(
        self, ids: Sequence[str], loaders: Sequence[Callable[[], np.ndarray]], progress: bool = False
    ) -> list[Prediction]:
        """Predict for audio behind loaders: zero-argument callables returning a float32 mono
        waveform at the model's sample rate, or raising :class:`AudioError` (that item then
        becomes a prediction with ``error``). The rest is decoded in length-sorted batches;
        results come back in input order."""
        feats: dict[int, Tensor] = {}
        errors: dict[int, str] = {}
        for i, load in enumerate(tqdm(loaders, desc="load audio", unit="utt", disable=not progress)):
            try:
                feats[i] = self._features(load())
            except AudioError as exc:
                errors[i] = str(exc)
        keys = sorted(feats)
        decoded = dict(zip(keys, self.decode_features([feats[k] for k in keys]), strict=True))
        return [
            Prediction(id=uid, model_version=self.version, error=errors[i]) if i in errors
            else self.to_prediction(uid, decoded[i])
            for i, uid in enumerate(ids)
        ]

    def _features(self, waveform: np.ndarray) -> Tensor:
        if waveform.size < self.min_samples:
            raise AudioError(f"audio too short: {waveform.size} samples < {self.min_samples}")
        return self.extractor(waveform)


class SLUPredictor(BatchPredictor):
    """Runs a torch :class:`ModelPackage` (see :class:`BatchPredictor`)."""

    def __init__(
        self, package: ModelPackage, batch_size: int = 16, max_parse_len: int = 40,
        chunk: int | None = None, use_lm: bool = True,
    ) -> None:
        super().__init__(
            package.features, package.parse_vocab, package.ctc_vocab, package.clarify_threshold,
            package.model.cfg.encoder.subsampling, batch_size, max_parse_len,
            package.lm_dir.parent if use_lm and package.lm_dir is not None else None,
            package.intent_temperature,
        )
        self.package = package
        self.model = package.model.eval()
        # Chunked attention (encoder frames per chunk): what streaming with that chunk
        # size computes (model.inference.streaming proves the equality), at batch speed.
        self.chunk = chunk

    @classmethod
    def load(cls, folder: Path, **kwargs: Any) -> SLUPredictor:
        return cls(load_package(folder), **kwargs)

    @property
    def version(self) -> str:
        return self.package.version

    @property
    def embedding_dim(self) -> int:
        return int(self.model.cfg.encoder.d_model)

    def _encode(self, feats: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(B, T, F)``, ``(B,)`` → encodings ``(B, T', D)``, lengths ``(B,)``, pad mask."""
        mask = None
        if self.chunk:
            frames = int(self.model.encoder.subsampling.output_lengths(lengths).max())
            mask = chunk_attention_mask(frames, self.chunk)
        return self.model.encode(feats, lengths, mask)

    @torch.no_grad()
    def _encode_batch(self, feats: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        enc, enc_lengths, _ = self._encode(feats, lengths)
        return enc, enc_lengths

    @torch.no_grad()
    def _decode_batch(self, feats: Tensor, lengths: Tensor) -> BatchOutput:
        enc, enc_lengths, pad = self._encode(feats, lengths)
        transcripts = self._transcribe(*self.model.ctc(enc, enc_lengths))
        parses = None
        if self.model.parse_decoder is not None:
            parses, _ = greedy_parse(self.model, enc, pad, self.max_parse_len,
                                     self._allowed_tokens(transcripts))
        return BatchOutput(
            transcripts=transcripts,
            intent_logits=self.model.intent_head(enc, pad).float(),
            parses=parses,
        )


def predict_dataset(
    package: ModelPackage, ids: Sequence[str], feats: Sequence[Tensor], batch_size: int,
    max_parse_len: int, use_lm: bool = True,
) -> list[Prediction]:
    """Predictions for utterances ``ids`` from their cached features ``[(T_i, F)]``
    (transcripts from the package's LM beam search when it has one and ``use_lm``)."""
    predictor = SLUPredictor(package, batch_size=batch_size, max_parse_len=max_parse_len,
                             use_lm=use_lm)
    return predictor.predict_features(list(ids), list(feats))
