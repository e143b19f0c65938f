"""Batch inference: audio → transcript, intent, slots, confidence (the prediction contract)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from model.audio import AudioError, load_audio, prepare_waveform
from model.decoding import ctc_greedy, greedy_parse
from model.features import FeatureExtractor
from model.package import ModelPackage, load_package
from model.prediction import Prediction

__all__ = ["Decoded", "SLUPredictor"]


@dataclass(frozen=True)
class Decoded:
    """Decoder output for one utterance, before it becomes a :class:`Prediction`."""

    transcript: str
    intent: str
    confidence: float
    parse_intent: str
    slots: list


class SLUPredictor:
    """Runs a :class:`ModelPackage` on features, waveforms or audio files.

    Utterances are batched by length (``batch_size`` at most) to limit padding; results
    come back in input order.
    """

    def __init__(self, package: ModelPackage, batch_size: int = 16, max_parse_len: int = 40) -> None:
        self.package = package
        self.model = package.model.eval()
        self.extractor = FeatureExtractor(package.features)
        self.ctc_vocab = package.ctc_vocab
        self.batch_size = batch_size
        self.max_parse_len = max_parse_len

    @classmethod
    def load(cls, folder: Path, **kwargs: int) -> SLUPredictor:
        return cls(load_package(folder), **kwargs)

    @property
    def version(self) -> str:
        return self.package.version

    @torch.no_grad()
    def decode_features(self, feats: Sequence[Tensor]) -> list[Decoded]:
        """Decode a list of ``(T_i, F)`` feature arrays."""
        order = sorted(range(len(feats)), key=lambda i: feats[i].shape[0])
        results: dict[int, Decoded] = {}
        intents = self.package.parse_vocab.intents
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            batch = [feats[i].float() for i in idx]
            lengths = torch.tensor([f.shape[0] for f in batch])
            padded = torch.nn.utils.rnn.pad_sequence(batch, batch_first=True)
            enc, enc_lengths, pad = self.model.encode(padded, lengths)
            ctc = ctc_greedy(*self.model.ctc(enc, enc_lengths))
            probs = torch.softmax(self.model.intent_head(enc, pad).float(), dim=-1)
            conf, best = probs.max(dim=-1)
            parses, _ = greedy_parse(self.model, enc, pad, self.max_parse_len)
            for j, i in enumerate(idx):
                parse_intent, slots = self.package.parse_vocab.decode(parses[j])
                results[i] = Decoded(
                    transcript=self.ctc_vocab.decode(ctc[j]).strip(),
                    intent=intents[int(best[j])],
                    confidence=float(conf[j]),
                    parse_intent=parse_intent,
                    slots=slots,
                )
        return [results[i] for i in range(len(feats))]

    def to_prediction(self, uid: str, decoded: Decoded) -> Prediction:
        return Prediction(
            id=uid,
            transcript=" ".join(decoded.transcript.split()),
            intent=decoded.intent,
            slots=decoded.slots,
            confidence=min(1.0, max(0.0, decoded.confidence)),
            model_version=self.version,
            clarify=decoded.confidence < self.package.clarify_threshold,
        )

    def predict_waveforms(
        self, ids: Sequence[str], waveforms: Sequence[np.ndarray], sample_rates: Sequence[int]
    ) -> list[Prediction]:
        """Predict for in-memory audio; each waveform ``(N,)`` or ``(N, channels)``.

        A waveform that cannot be used yields a prediction with ``error`` set.
        """
        target = self.package.features.sample_rate
        loaders = [
            partial(prepare_waveform, audio, rate, target)
            for audio, rate in zip(waveforms, sample_rates, strict=True)
        ]
        return self._predict(ids, loaders, progress=False)

    def predict_files(
        self, ids: Sequence[str], paths: Sequence[Path], progress: bool = False
    ) -> list[Prediction]:
        """Predict for audio files; unreadable files give predictions with ``error``."""
        target = self.package.features.sample_rate
        return self._predict(ids, [partial(load_audio, p, target) for p in paths], progress)

    def _predict(
        self, ids: Sequence[str], loaders: Sequence[Callable[[], np.ndarray]], progress: bool
    ) -> list[Prediction]:
        """Load each waveform (a loader raising :class:`AudioError` marks that item as an
        error), decode the rest in length-sorted batches, and return in input order."""
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
        # The front end needs at least 7 frames (two 3-wide stride-2 convolutions).
        min_samples = 8 * self.extractor.hop
        if waveform.size < min_samples:
            raise AudioError(f"audio too short: {waveform.size} samples < {min_samples}")
        return self.extractor(waveform)
