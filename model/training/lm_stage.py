"""Give a trained model its transcript language model: build, tune on validation, attach.

``attach_lm`` trains the word n-gram on the training split's transcripts, writes the
``lm/`` folder into the model folder (and any deploy bundles made from it), then picks
the LM weight and word score by validation WER for *this* model's CTC posteriors. Both
training stages call it; ``voiceloop lm`` runs it on an existing model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import jiwer
import torch
from torch import Tensor
from tqdm import tqdm

from model.data.manifest import read_manifest
from model.decoding.beam import (
    BeamConfig,
    BeamTranscriber,
    build_lm_folder,
    tune_beam,
    write_config,
)
from model.decoding.greedy import ctc_greedy
from model.evaluation.report import evaluate
from model.frontend.cache import load_split, random_subset
from model.inference.batch import SLUPredictor, length_sorted_batches
from model.nn.package import LM_DIRNAME, ModelPackage, copy_lm_folder, load_package
from model.nn.tokens import CharVocab
from voiceloop.settings import Settings

__all__ = ["LMResult", "attach_lm", "ctc_emissions"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LMResult:
    """The attached LM: its folder, the chosen config, and validation WER greedy vs beam
    (fractions) on ``utterances`` validation utterances; ``grid`` maps
    ``"lm_weight/word_score"`` to validation WER; ``semer`` maps ``copy_values`` on/off
    to validation SemER (the setting with the lower one is kept)."""

    folder: Path
    config: BeamConfig
    utterances: int
    greedy_wer: float
    beam_wer: float
    grid: dict[str, float]
    semer: dict[str, float]


@torch.no_grad()
def ctc_emissions(
    package: ModelPackage, feats: Sequence[Tensor], batch_size: int = 16
) -> list[tuple[Tensor, int]]:
    """CTC log-probabilities per utterance: ``(T'_i, C)`` and the valid length T'_i."""
    model = package.model.eval()
    out: dict[int, tuple[Tensor, int]] = {}
    for idx in length_sorted_batches([f.shape[0] for f in feats], batch_size):
        batch = [feats[i].float() for i in idx]
        lengths = torch.tensor([f.shape[0] for f in batch])
        padded = torch.nn.utils.rnn.pad_sequence(batch, batch_first=True)
        enc, enc_lengths, _ = model.encode(padded, lengths)
        logits, ctc_lengths = model.ctc(enc, enc_lengths)
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        for j, i in enumerate(idx):
            n = int(ctc_lengths[j])
            out[i] = (log_probs[j, :n].clone(), n)
    return [out[i] for i in range(len(feats))]


def attach_lm(
    settings: Settings, model_dir: Path, progress: bool = True, bundles: Sequence[Path] = (),
) -> LMResult:
    """Build the LM from the training transcripts into ``model_dir/lm``, tune its weights
    on validation data for this model (beam weights by WER, then ``copy_values`` by
    SemER), and copy the folder into each of ``bundles``.

    Raises:
        FileNotFoundError: the corpus manifests or the model folder are missing.
        TypeError: the model's CTC head is not over characters.
    """
    lm = settings.decode.lm
    package = load_package(model_dir)
    if not isinstance(package.ctc_vocab, CharVocab):  # a word-unit CTC head emits words
        raise TypeError(f"{model_dir}: the LM beam search needs a character CTC head")
    manifests = settings.corpus_dir / "manifests"
    train_text = [r.transcript for r in read_manifest(manifests / "train.jsonl")]
    folder = build_lm_folder(
        train_text, model_dir / LM_DIRNAME,
        BeamConfig(beam_size=lm.beam_size, beam_threshold=lm.beam_threshold,
                   beam_size_token=lm.beam_size_token, order=lm.order), lm.discount)
    rows, feats = load_split(settings, "valid", progress, package.features)
    rows, feats = random_subset(rows, feats, lm.tune_utterances, settings.seed)
    emissions = ctc_emissions(package, feats, settings.decode.batch_size)
    refs = [r.transcript for r in rows]
    greedy = [package.ctc_vocab.decode(ctc_greedy(e[None], torch.tensor([n]))[0]).strip()
              for e, n in emissions]
    transcriber = BeamTranscriber(model_dir, package.ctc_vocab)
    grid_size = len(lm.lm_weights) * len(lm.word_scores)
    log.info("tuning the LM weights on %d validation utterances (%d settings)",
             len(rows), grid_size)
    with tqdm(total=grid_size, desc="lm tuning", disable=not progress) as bar:
        config, grid = tune_beam(transcriber, emissions, refs, lm.lm_weights, lm.word_scores,
                                 on_trial=lambda: bar.update())
    semer: dict[str, float] = {}
    package.lm_dir = folder
    for copy in (True, False):
        write_config(model_dir, replace(config, copy_values=copy))
        predictor = SLUPredictor(package, settings.decode.batch_size,
                                 settings.decode.max_parse_len)
        preds = predictor.predict_features([r.id for r in rows], feats)
        semer[str(copy).lower()] = evaluate(rows, preds).overall.semer
    config = replace(config, copy_values=semer["true"] <= semer["false"])
    write_config(model_dir, config)
    result = LMResult(folder, config, len(rows), float(jiwer.wer(refs, greedy)),
                      grid[f"{config.lm_weight}/{config.word_score}"], grid, semer)
    (folder / "tuning.json").write_text(json.dumps(
        {**asdict(result), "folder": str(folder), "config": asdict(config)}, indent=2),
        encoding="utf-8")
    for bundle in bundles:
        copy_lm_folder(folder, bundle)
    log.info("LM attached to %s: lm_weight %.2f word_score %.2f copy_values %s; validation "
             "WER %.1f%% greedy → %.1f%% beam; SemER %s", model_dir, config.lm_weight,
             config.word_score, config.copy_values, 100 * result.greedy_wer,
             100 * result.beam_wer, semer)
    return result
