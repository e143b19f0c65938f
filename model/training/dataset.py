"""Training data: encoded targets over cached features, length-bucketed batches.

The features themselves come from ``model.frontend.cache``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from model.data.manifest import ManifestRow
from model.frontend.features import FeatureConfig, normalise_features
from model.nn.tokens import CTCVocab, ParseVocab

__all__ = ["Batch", "SLUDataset", "collate", "make_batches", "pad_parses"]

log = logging.getLogger(__name__)


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
        self.ctc_targets = [ctc_vocab.encode(ctc_vocab.target_text(r.transcript, r.slots))
                            for r in rows]
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
    data: SLUDataset, indices: Sequence[int], features: FeatureConfig | None = None,
    warp: Callable[..., Tensor] | None = None, generator: torch.Generator | None = None,
    time_stretch: bool = True,
) -> Batch:
    """Pad the utterances ``indices`` of ``data`` into a :class:`Batch`.

    With ``features``, each utterance's stored (raw) features are normalised with it
    before padding — how one cache of raw log-mels feeds a teacher and a student that
    normalise differently. With ``warp`` (``model.frontend.warp.FeatureWarp``) each raw
    utterance is first perturbed (speed / VTLP / tilt, drawn from ``generator``);
    ``time_stretch=False`` keeps its frame count (distillation's frame-aligned targets).
    """
    feats = []
    for i in indices:
        f = data.feats[i]
        if warp is not None:
            f = warp(f, generator, time_stretch=time_stretch)
        feats.append(f.float() if features is None else normalise_features(f, features))
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
