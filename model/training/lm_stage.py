"""Give a trained model its transcript language model: build, tune on validation, attach.

``attach_lm`` trains the word n-gram on the training split's transcripts (and those of
the corpus' ``lm_text`` manifest when it has one: see :data:`LM_TEXT_MANIFEST`, and the
sentences of a parent model's LM: :data:`LM_INHERITED_TEXT`) — tagged
ones for a tagged CTC head, plus one short sentence per value of the grammar's value lists
and per number of the numeric slot types, so every area, device name and number is in
the lexicon — writes the ``lm/`` folder into the model folder (and any deploy bundles
made from it), then picks the LM weight and word score on validation data for *this*
model's CTC posteriors: by SemER for a tagged model (its slots come from the beam), by
WER otherwise. Both training stages call it; ``voiceloop lm`` runs it on an existing
model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import jiwer
import torch
from torch import Tensor
from tqdm import tqdm

from model.data.grammar import Grammar
from model.data.manifest import ManifestRow, read_manifest
from model.data.textnorm import spell_number
from model.decoding.beam import (
    BeamConfig,
    BeamTranscriber,
    build_lm_folder,
    read_lm_sentences,
    tune_beam,
    write_config,
)
from model.decoding.greedy import ctc_greedy
from model.evaluation.report import evaluate
from model.frontend.cache import load_split, random_subset
from model.inference.batch import SLUPredictor, length_sorted_batches
from model.inference.prediction import Prediction
from model.nn.package import LM_DIRNAME, ModelPackage, copy_lm_folder, load_package
from model.nn.tokens import (
    CLOSE_TAG,
    CharVocab,
    CTCVocab,
    TaggedCharVocab,
    number_words,
    open_tag,
    split_tagged,
)
from voiceloop.settings import Settings

__all__ = ["LM_INHERITED_TEXT", "LM_TEXT_MANIFEST", "LMResult", "attach_lm", "ctc_emissions",
           "lm_sentences", "with_inherited"]

LM_TEXT_MANIFEST = "lm_text"
"""A corpus' optional manifest (``manifests/lm_text.jsonl``) of rows whose transcripts
join the LM's text and are not trained on. A retraining trains on new data plus a replay
*sample* of the old corpus but must keep the LM of the whole old corpus: an LM of the
sample alone lacked 49 of the production LM's 527 lexicon words, and the retrained
student's slot F1 on the golden set fell 1.1 points instead of 0.2."""

LM_INHERITED_TEXT = "lm_sentences.txt.gz"
"""A corpus' optional file (``manifests/lm_sentences.txt.gz``) of LM sentences taken
verbatim (already tagged): a retraining puts its parent model's LM text there
(:data:`model.nn.package.LM_SENTENCES`). The seed production model's LM came from the
`full` corpus; rebuilt from the demo's small base corpus instead, the candidate's 5-gram
cost 6.5 points of golden slot F1 and the gate rejected it (2026-12-02) — with the
production LM the same retrained weights lost nothing."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LMResult:
    """The attached LM: its folder, the chosen config, and validation WER greedy vs beam
    (fractions) on ``utterances`` validation utterances; ``grid`` maps
    ``"lm_weight/word_score"`` to the tuning criterion (``criterion``: ``semer`` or
    ``wer``); ``semer`` maps ``copy_values`` on/off to validation SemER (models with a
    parse decoder; the setting with the lower one is kept)."""

    folder: Path
    config: BeamConfig
    utterances: int
    greedy_wer: float
    beam_wer: float
    grid: dict[str, float]
    semer: dict[str, float]
    criterion: str
    beam_semer: float | None = None


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


def lm_sentences(rows: Sequence[ManifestRow], ctc_vocab: CTCVocab,
                 values: dict[str, Any] | None = None) -> list[str]:
    """The LM's training text: each row's CTC target (tagged transcript for a tagged
    vocabulary) plus, per slot type, one sentence per value of the grammar's value lists
    (``values``: ``Grammar.values``) and per number 0–100 for slot types whose training
    values are all number words — so values and numbers never seen in a training sentence
    are still lexicon words with a sensible LM probability."""
    sentences = [ctc_vocab.target_text(r.transcript, r.slots) for r in rows]
    tagged = isinstance(ctc_vocab, TaggedCharVocab)

    def sentence(slot_type: str, value: str) -> str:
        return f"{open_tag(slot_type)} {value} {CLOSE_TAG}" if tagged else value

    if values:
        by_type = {"area": values.get("area", []), "floor": values.get("floor", []),
                   "name": [n for names in values.get("name", {}).values() for n in names]}
        for slot_type, items in by_type.items():
            sentences += [sentence(slot_type, " ".join(str(v).split())) for v in items if str(v).strip()]
    numbers = set(number_words())
    seen: dict[str, set[str]] = {}
    for r in rows:
        for slot in r.slots:
            seen.setdefault(slot.type, set()).update(slot.value.split())
    for slot_type, words in sorted(seen.items()):
        if words and words <= numbers:
            sentences += [sentence(slot_type, spell_number(n)) for n in range(101)]
    return sentences


def with_inherited(inherited: list[str], own: list[str]) -> list[str]:
    """A retrained model's LM text: its parent's whole text, plus those of its own
    sentences (new rows, the replay sample, value and number sentences) that the parent's
    does not already hold. Adding the replay sample or the value sentences again every
    generation would keep raising their counts (with ``min_count`` 2, a second copy
    lifts their rare n-grams over the cut-off); skipping what is known loses no word."""
    known = set(inherited)
    added = [s for s in own if s not in known]
    log.info("the LM keeps its parent's %d sentences and adds %d of its own %d", len(inherited),
             len(added), len(own))
    return inherited + added


def attach_lm(
    settings: Settings, model_dir: Path, progress: bool = True, bundles: Sequence[Path] = (),
) -> LMResult:
    """Build the LM (:func:`lm_sentences`) into ``model_dir/lm``, tune its weights on
    validation data for this model, and copy the folder into each of ``bundles``.

    Raises:
        FileNotFoundError: the corpus manifests or the model folder are missing.
        TypeError: the model's CTC head is not over (tagged) characters.
    """
    lm = settings.decode.lm
    package = load_package(model_dir)
    vocab = package.ctc_vocab
    if not isinstance(vocab, CharVocab | TaggedCharVocab):  # a word-unit CTC head emits words
        raise TypeError(f"{model_dir}: the LM beam search needs a character CTC head")
    tagged = isinstance(vocab, TaggedCharVocab)
    manifests = settings.corpus_dir / "manifests"
    grammar_values = Grammar.load(settings.corpus.language).values
    rows = read_manifest(manifests / "train.jsonl")
    if (manifests / f"{LM_TEXT_MANIFEST}.jsonl").exists():
        rows += read_manifest(manifests / f"{LM_TEXT_MANIFEST}.jsonl")
    text = lm_sentences(rows, vocab, grammar_values)
    if (manifests / LM_INHERITED_TEXT).is_file():
        text = with_inherited(read_lm_sentences(manifests / LM_INHERITED_TEXT), text)
    folder = build_lm_folder(
        text, model_dir / LM_DIRNAME,
        BeamConfig(beam_size=lm.beam_size, beam_threshold=lm.beam_threshold,
                   beam_size_token=lm.beam_size_token, order=lm.order,
                   copy_values=package.model.parse_decoder is not None), lm.discount,
        lm.min_count)
    rows, feats = load_split(settings, "valid", progress, package.features)
    rows, feats = random_subset(rows, feats, lm.tune_utterances, settings.seed)
    emissions = ctc_emissions(package, feats, settings.decode.batch_size)
    refs = [r.transcript for r in rows]
    greedy = [split_tagged(vocab.decode(ctc_greedy(e[None], torch.tensor([n]))[0]))[0]
              for e, n in emissions]
    package.lm_dir = None
    intents = [p.intent for p in SLUPredictor(package, settings.decode.batch_size,
                                              settings.decode.max_parse_len,
                                              use_lm=False).predict_features(
                                                  [r.id for r in rows], feats)]

    def semer(hyps: list[str]) -> float:
        preds = []
        for r, hyp, intent in zip(rows, hyps, intents, strict=True):
            transcript, slots = split_tagged(hyp, package.parse_vocab.slot_types)
            preds.append(Prediction(id=r.id, transcript=transcript, intent=intent, slots=slots))
        return evaluate(rows, preds).overall.semer

    def wer(hyps: list[str]) -> float:
        return float(jiwer.wer(refs, [split_tagged(h)[0] or "<empty>" for h in hyps]))

    transcriber = BeamTranscriber(model_dir, vocab)
    grid_size = len(lm.lm_weights) * len(lm.word_scores)
    criterion = "semer" if tagged else "wer"
    log.info("tuning the LM weights by validation %s on %d utterances (%d settings)",
             criterion.upper(), len(rows), grid_size)
    with tqdm(total=grid_size, desc="lm tuning", disable=not progress) as bar:
        config, grid = tune_beam(transcriber, emissions, semer if tagged else wer,
                                 lm.lm_weights, lm.word_scores, on_trial=lambda: bar.update())
    write_config(model_dir, config)
    best = transcriber.with_config(config)
    hyps = [best.decode(e[None, :n], torch.tensor([n]))[0] for e, n in emissions]
    copy_semer: dict[str, float] = {}
    package.lm_dir = folder
    if package.model.parse_decoder is not None:
        for copy in (True, False):
            write_config(model_dir, replace(config, copy_values=copy))
            predictor = SLUPredictor(package, settings.decode.batch_size,
                                     settings.decode.max_parse_len)
            preds = predictor.predict_features([r.id for r in rows], feats)
            copy_semer[str(copy).lower()] = evaluate(rows, preds).overall.semer
        config = replace(config, copy_values=copy_semer["true"] <= copy_semer["false"])
        write_config(model_dir, config)
    result = LMResult(folder, config, len(rows),
                      float(jiwer.wer(refs, [g or "<empty>" for g in greedy])), wer(hyps),
                      grid, copy_semer, criterion, semer(hyps) if tagged else None)
    (folder / "tuning.json").write_text(json.dumps(
        {**asdict(result), "folder": str(folder), "config": asdict(config)}, indent=2),
        encoding="utf-8")
    for bundle in bundles:
        copy_lm_folder(folder, bundle)
    log.info("LM attached to %s: lm_weight %.2f word_score %.2f; validation WER %.1f%% greedy "
             "→ %.1f%% beam%s", model_dir, config.lm_weight, config.word_score,
             100 * result.greedy_wer, 100 * result.beam_wer,
             f", SemER {100 * result.beam_semer:.1f}%" if result.beam_semer is not None else "")
    return result
