"""Lexicon-constrained CTC beam search with a word n-gram LM (shallow fusion).

A character CTC head spells; most of its word errors in this closed domain are
misspellings ("ligh on") and implausible word sequences. The beam search (flashlight's
lexicon decoder through torchaudio) only emits words of the lexicon and scores each
hypothesis as ``acoustic log-prob + lm_weight · LM log-prob + word_score · words``.

An LM folder (``lm/`` inside a model folder or deploy bundle) holds:

- ``lexicon.txt``: ``word<TAB>w o r d |`` per word (a slot tag such as ``<area>`` is one
  CTC unit: ``<area><TAB><area> |``);
- ``lm.arpa``: the word n-gram of :mod:`model.decoding.ngram`, trained on training transcripts;
- ``decoder.json``: :class:`BeamConfig` (beam size, weights chosen on validation data).

Only the final transcript uses it; streaming partials stay greedy (cheap, and they are
replaced at end of speech).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from model.decoding.ngram import train_ngram
from model.nn.package import LM_DIRNAME, LM_FILES, LM_SENTENCES, copy_lm_folder, has_lm
from model.nn.tokens import CharVocab, CTCVocab, TaggedCharVocab, is_tag

__all__ = [
    "LM_DIRNAME",
    "BeamConfig",
    "BeamTranscriber",
    "build_lm_folder",
    "copy_lm_folder",
    "has_lm",
    "read_lm_sentences",
]

log = logging.getLogger(__name__)

_LEXICON, _ARPA, _CONFIG = LM_FILES
_SIL = "|"


@dataclass(frozen=True)
class BeamConfig:
    """Beam-search settings. ``lm_weight`` scales the LM's natural-log score,
    ``word_score`` is added per emitted word (> 0 counters the LM's bias to short
    outputs); ``beam_size`` hypotheses survive each frame, and only those within
    ``beam_threshold`` (log-score) of the best, extended by the ``beam_size_token`` most
    likely characters (``benchmarks/beam_pruning.py``, 1,000 test utterances: decoding
    6.3 → 2.0 ms per utterance for the teacher, WER 24.8 → 24.9 %). ``copy_values``: the parse decoder may only use
    value words of this transcript (``model.decoding.greedy.value_mask``)."""

    beam_size: int = 50
    beam_threshold: float = 12.0
    beam_size_token: int | None = 8
    lm_weight: float = 1.0
    word_score: float = 0.0
    order: int = 3
    copy_values: bool = True


def build_lm_folder(
    sentences: Iterable[str], folder: Path, config: BeamConfig, discount: float = 0.7,
    min_count: int = 1,
) -> Path:
    """Train the n-gram on ``sentences`` and write lexicon, ARPA and config to ``folder``.

    Raises:
        ValueError: no words in ``sentences``.
    """
    sentences = [" ".join(s.split()) for s in sentences]
    words = sorted({w for s in sentences for w in s.split()})
    if not words:
        raise ValueError("no words to build a language model from")
    folder.mkdir(parents=True, exist_ok=True)
    # A file here may be a link to another model's (the release's teacher shares the
    # student's): write a file of this folder's own, never through the link.
    for name in (_ARPA, _LEXICON, _CONFIG, LM_SENTENCES):
        if (folder / name).is_symlink():
            (folder / name).unlink()
    train_ngram(sentences, config.order, discount, min_count).write_arpa(folder / _ARPA)
    (folder / _LEXICON).write_text(
        "".join(f"{w}\t{w if is_tag(w) else ' '.join(w)} {_SIL}\n" for w in words),
        encoding="utf-8")
    (folder / _CONFIG).write_text(json.dumps(asdict(config), indent=2), encoding="utf-8")
    # mtime 0: the same text gives the same bytes (DVC hashes, the release's shared files)
    with open(folder / LM_SENTENCES, "wb") as raw, gzip.GzipFile(
            fileobj=raw, mode="wb", mtime=0) as gz:
        gz.write("".join(f"{s}\n" for s in sentences).encode("utf-8"))
    log.info("language model: %d words, %d sentences → %s", len(words), len(sentences), folder)
    return folder


def read_lm_sentences(path: Path) -> list[str]:
    """The sentences of an LM's ``sentences.txt.gz`` (:data:`LM_SENTENCES`)."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def read_config(folder: Path) -> BeamConfig:
    """The :class:`BeamConfig` of a model folder's ``lm/``."""
    raw = json.loads((Path(folder) / LM_DIRNAME / _CONFIG).read_text(encoding="utf-8"))
    return BeamConfig(**raw)


def write_config(folder: Path, config: BeamConfig) -> None:
    """Replace the :class:`BeamConfig` of a model folder's ``lm/`` (e.g. after tuning)."""
    (Path(folder) / LM_DIRNAME / _CONFIG).write_text(
        json.dumps(asdict(config), indent=2), encoding="utf-8")


@contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Silence file descriptors 1 and 2 (KenLM prints an ARPA-loading progress bar from
    C++, which would interleave with JSON Lines or tables on stdout and with tqdm bars;
    a failure still surfaces as a Python exception)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            yield
    finally:
        for fd, copy in zip((1, 2), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)


class BeamTranscriber:
    """Decodes CTC log-probabilities into words with the lexicon and LM of a model folder.

    Args:
        model_dir: folder holding ``lm/`` (model package or deploy bundle).
        ctc_vocab: the model's CTC units; characters or tagged characters (a word-unit CTC
            needs no lexicon search). With tags, transcripts come back tagged.
        config: overrides ``lm/decoder.json`` (used when tuning the weights).

    Raises:
        TypeError: ``ctc_vocab`` is not a character vocabulary.
        ValueError: no ``lm/`` folder.
    """

    def __init__(self, model_dir: Path, ctc_vocab: CTCVocab, config: BeamConfig | None = None):
        if not isinstance(ctc_vocab, CharVocab | TaggedCharVocab):
            raise TypeError("lexicon beam search needs a character CTC vocabulary")
        if not has_lm(model_dir):
            raise ValueError(f"{model_dir} has no language model folder ({LM_DIRNAME}/)")
        from torchaudio.models.decoder import ctc_decoder  # needs flashlight-text

        self.folder = Path(model_dir) / LM_DIRNAME
        self.ctc_vocab = ctc_vocab
        self.config = config or read_config(model_dir)
        self.tokens = [_SIL if s == " " else s for s in ctc_vocab.symbols]
        self._sil = self.tokens.index(_SIL)
        c = self.config
        with _quiet_stdout():
            self._decoder = ctc_decoder(
                lexicon=str(self.folder / _LEXICON), tokens=self.tokens,
                lm=str(self.folder / _ARPA) if c.lm_weight > 0 else None,
                beam_size=c.beam_size, beam_threshold=c.beam_threshold,
                beam_size_token=c.beam_size_token,
                lm_weight=c.lm_weight, word_score=c.word_score,
                blank_token=CharVocab.symbols[CharVocab.blank], sil_token=_SIL,
                unk_word="<unk>", nbest=1,
            )

    def with_config(self, config: BeamConfig) -> BeamTranscriber:
        """A transcriber on the same LM folder with other settings."""
        return BeamTranscriber(self.folder.parent, self.ctc_vocab, config)

    def decode(self, log_probs: Tensor, lengths: Tensor) -> list[str]:
        """Transcribe a batch.

        Args:
            log_probs: ``(B, T', C)`` CTC log-probabilities (or logits: they are
                log-softmaxed again, which leaves log-probabilities unchanged).
            lengths: ``(B,)`` valid CTC slots per utterance.

        Returns:
            B transcripts (lexicon words separated by single spaces).
        """
        log_probs = torch.log_softmax(log_probs.detach().float().cpu(), dim=-1)
        # Training transcripts carry no trailing space, but the lexicon decoder only
        # commits a word at a word boundary: close every utterance with one certain
        # boundary frame, or its last word would be dropped.
        b, _, c = log_probs.shape
        boundary = torch.full((b, 1, c), -30.0)
        boundary[..., self._sil] = 0.0
        out: list[str] = []
        for i in range(b):
            n = int(lengths[i])
            emissions = torch.cat([log_probs[i: i + 1, :n], boundary[i: i + 1]], dim=1)
            hyps = self._decoder(emissions.contiguous())[0]
            out.append(" ".join(w for w in hyps[0].words if w != "<unk>") if hyps else "")
        return out


def tune_beam(
    transcriber: BeamTranscriber,
    emissions: Sequence[tuple[Tensor, int]],
    score: Callable[[list[str]], float],
    lm_weights: Sequence[float] = (0.5, 1.0, 1.5, 2.0),
    word_scores: Sequence[float] = (-1.0, 0.0, 1.0, 2.0),
    on_trial: Callable[[], object] | None = None,
) -> tuple[BeamConfig, dict[str, float]]:
    """Choose ``lm_weight`` and ``word_score`` by ``score`` (lower is better: WER, or
    SemER for a tagged model) of the decoded held-in data (validation split).

    Args:
        transcriber: a transcriber whose beam size is kept.
        emissions: per utterance ``(T', C)`` log-probs and its valid length.
        score: decoded transcripts (input order) → error rate.
        on_trial: called after each setting (progress bars).

    Returns:
        The best config and the score per tried ``"lm_weight/word_score"``.
    """
    scores: dict[str, float] = {}
    best: tuple[float, BeamConfig] | None = None
    for lm_weight in lm_weights:
        for word_score in word_scores:
            config = replace(transcriber.config, lm_weight=lm_weight, word_score=word_score)
            trial = transcriber.with_config(config)
            hyps = [trial.decode(e[None, :n], torch.tensor([n]))[0] for e, n in emissions]
            value = float(score(hyps))
            scores[f"{lm_weight}/{word_score}"] = value
            if on_trial:
                on_trial()
            if best is None or value < best[0]:
                best = (value, config)
    assert best is not None
    return best[1], scores
