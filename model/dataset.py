"""Training data: cached features, encoded targets, length-bucketed batches.

Features are computed once per corpus split and cached as fp16 under
``<workspace>/features/<profile>/`` (keyed by the manifest's content and the feature
settings), because recomputing log-mels every epoch would cost as much as training.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from model.audio import load_audio
from model.data.manifest import ManifestRow
from model.features import FeatureConfig, FeatureExtractor, normalise_features
from model.tokens import CTCVocab, ParseVocab

__all__ = ["Batch", "SLUDataset", "collate", "load_features", "make_batches", "pad_parses"]

log = logging.getLogger(__name__)


def _cache_key(rows: Sequence[ManifestRow], cfg: FeatureConfig) -> str:
    digest = hashlib.sha1(repr(asdict(cfg)).encode())
    for row in rows:
        digest.update(f"{row.id}\x00{row.audio}\x00{row.duration_s}\n".encode())
    return digest.hexdigest()[:16]


def load_features(
    rows: Sequence[ManifestRow],
    manifest_dir: Path,
    cfg: FeatureConfig,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> list[Tensor]:
    """Log-mel features ``(T_i, F)`` (fp16) for each row, from cache when possible."""
    cache: Path | None = None
    if cache_dir is not None:
        cache = cache_dir / f"features-{_cache_key(rows, cfg)}.pt"
        if cache.exists():
            return torch.load(cache)
    extractor = FeatureExtractor(cfg)
    feats = [
        extractor(load_audio(row.audio_path(manifest_dir), cfg.sample_rate)).to(torch.float16)
        for row in tqdm(rows, desc="features", unit="utt", disable=not progress)
    ]
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        torch.save(feats, tmp)
        tmp.replace(cache)
    return feats


@dataclass
class Batch:
    """A padded mini-batch.

    Attributes:
        ids: utterance ids, length B.
        feats: ``(B, T, F)`` float32 features, zero-padded.
        lengths: ``(B,)`` valid frames.
        ctc_targets: ``(sum L_b,)`` concatenated CTC unit ids (characters or words).
        ctc_lengths: ``(B,)`` transcript lengths in CTC units.
        intents: ``(B,)`` intent indices.
        parse_in: ``(B, U)`` decoder inputs (``<bos>`` + parse), ``<pad>``-padded.
        parse_out: ``(B, U)`` decoder targets (parse + ``<eos>``), ``<pad>``-padded.
        parse_pad_mask: ``(B, U)`` True on padding.
    """

    ids: list[str]
    feats: Tensor
    lengths: Tensor
    ctc_targets: Tensor
    ctc_lengths: Tensor
    intents: Tensor
    parse_in: Tensor
    parse_out: Tensor
    parse_pad_mask: Tensor

    @property
    def size(self) -> int:
        return len(self.ids)


class SLUDataset:
    """Rows of one split with their features and encoded targets (all in memory)."""

    def __init__(
        self,
        rows: Sequence[ManifestRow],
        feats: Sequence[Tensor],
        ctc_vocab: CTCVocab,
        parse: ParseVocab,
    ) -> None:
        if len(rows) != len(feats):
            raise ValueError(f"{len(rows)} rows but {len(feats)} feature arrays")
        intent_index = {name: i for i, name in enumerate(parse.intents)}
        unknown = sorted({r.intent for r in rows} - set(intent_index))
        if unknown:
            raise ValueError(f"intents not in the vocabulary: {unknown}")
        self.rows = list(rows)
        self.feats = list(feats)
        self.ctc_targets = [ctc_vocab.encode(r.transcript) for r in rows]
        self.intents = [intent_index[r.intent] for r in rows]
        self.parses = [parse.encode(r.intent, r.slots) for r in rows]
        self.lengths = np.array([f.shape[0] for f in feats], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def difficulty(self) -> np.ndarray:
        """Curriculum order key: duration, with augmented audio after clean audio."""
        augmented = np.array([bool(r.augment) for r in self.rows], dtype=np.float64)
        return self.lengths / self.lengths.max() + augmented


def make_batches(
    lengths: np.ndarray,
    max_frames: int,
    rng: np.random.Generator | None = None,
    order: np.ndarray | None = None,
) -> list[list[int]]:
    """Group utterance indices into batches of at most ``max_frames`` padded frames.

    Utterances are sorted by length so that a batch pads little. With ``rng`` the
    batches are shuffled (and ties broken randomly); with ``order`` (a key per
    utterance) batches are built and returned in that order instead (curriculum).
    """
    n = len(lengths)
    if order is not None:
        idx = np.argsort(order, kind="stable")
    else:
        jitter = rng.random(n) if rng is not None else np.zeros(n)
        idx = np.lexsort((jitter, lengths))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in idx.tolist():
        longest_if_added = max(longest, int(lengths[i]))
        if current and longest_if_added * (len(current) + 1) > max_frames:
            batches.append(current)
            current, longest_if_added = [], int(lengths[i])
        current.append(i)
        longest = longest_if_added
    if current:
        batches.append(current)
    if order is None and rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def pad_parses(parses: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """Full parse sequences ``[<bos>, …, <eos>]`` → decoder inputs (all but the last
    token) and targets (all but the first), ``(B, U)`` each, ``<pad>``-padded."""
    width = max(len(p) for p in parses) - 1
    parse_in = torch.full((len(parses), width), ParseVocab.PAD, dtype=torch.long)
    parse_out = torch.full((len(parses), width), ParseVocab.PAD, dtype=torch.long)
    for b, p in enumerate(parses):
        parse_in[b, : len(p) - 1] = torch.tensor(p[:-1])
        parse_out[b, : len(p) - 1] = torch.tensor(p[1:])
    return parse_in, parse_out


def collate(
    data: SLUDataset, indices: Sequence[int], features: FeatureConfig | None = None
) -> Batch:
    """Pad the utterances ``indices`` of ``data`` into a :class:`Batch`.

    With ``features``, each utterance's stored (raw) features are normalised with it
    before padding — how distillation feeds one cache of raw log-mels to a teacher and a
    student that normalise differently.
    """
    feats = [
        data.feats[i].float() if features is None else normalise_features(data.feats[i], features)
        for i in indices
    ]
    lengths = torch.tensor([f.shape[0] for f in feats], dtype=torch.long)
    padded = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True)
    chars = [torch.tensor(data.ctc_targets[i], dtype=torch.long) for i in indices]
    parse_in, parse_out = pad_parses([data.parses[i] for i in indices])
    return Batch(
        ids=[data.rows[i].id for i in indices],
        feats=padded,
        lengths=lengths,
        ctc_targets=torch.cat(chars) if chars else torch.zeros(0, dtype=torch.long),
        ctc_lengths=torch.tensor([len(c) for c in chars], dtype=torch.long),
        intents=torch.tensor([data.intents[i] for i in indices], dtype=torch.long),
        parse_in=parse_in,
        parse_out=parse_out,
        parse_pad_mask=parse_in == ParseVocab.PAD,
    )
