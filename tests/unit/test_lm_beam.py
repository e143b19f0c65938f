"""Word n-gram estimation (hand-computed), ARPA output, and the lexicon + LM beam search."""

import math
from pathlib import Path

import jiwer
import pytest
import torch

from model.decoding.beam import BeamConfig, BeamTranscriber, build_lm_folder, tune_beam
from model.decoding.greedy import ctc_greedy
from model.decoding.ngram import train_ngram
from model.nn.package import has_lm
from model.nn.tokens import CharVocab, WordVocab

VOCAB = CharVocab()


def test_ngram_probabilities_match_hand_computation() -> None:
    # Unigram counts: a 2, b 1, c 1, </s> 2 (N = 6, 4 types); D = 0.5 frees
    # 0.5 * 4 / 6 = 1/3, spread over 5 words (+ <unk>) = 1/15 each.
    lm = train_ngram(["a b", "a c"], order=2, discount=0.5)
    p_a = 1.5 / 6 + 1 / 15
    p_b = 0.5 / 6 + 1 / 15
    assert 10 ** lm.log10_prob("a", ()) == pytest.approx(p_a)
    assert 10 ** lm.log10_prob("zebra", ()) == pytest.approx(1 / 15)  # <unk>
    # History "a": b 1, c 1 (c_h = 2), gamma = 0.5 * 2 / 2 = 0.5.
    assert 10 ** lm.log10_prob("b", ("a",)) == pytest.approx(0.5 / 2 + 0.5 * p_b)
    assert 10 ** lm.log10_prob("a", ("a",)) == pytest.approx(0.5 * p_a)  # backed off
    # History "c": only </s> (c_h = 1), gamma = 0.5; an unseen history backs off freely.
    assert 10 ** lm.log10_prob("a", ("c",)) == pytest.approx(0.5 * p_a)
    assert lm.log10_prob("a", ("zebra",)) == pytest.approx(lm.log10_prob("a", ()))


def test_every_history_is_a_distribution() -> None:
    lm = train_ngram(["turn on the light", "turn off the light", "what time is it"], order=3)
    words = [w for w in lm.vocabulary if w != "<s>"]
    for history in [("<s>",), ("<s>", "turn"), ("turn", "on"), ("the",), ("nope", "never"), ()]:
        assert math.fsum(10 ** lm.log10_prob(w, history) for w in words) == pytest.approx(1.0)


def test_count_cutoff_drops_rare_long_ngrams_and_keeps_distributions() -> None:
    sentences = ["turn on the kitchen light", "turn on the kitchen light", "turn on the hall light",
                 "turn off the hall fan", "what time is it"]
    full = train_ngram(sentences, order=4)
    cut = train_ngram(sentences, order=4, min_count=2)
    assert cut.probs[:2] == full.probs[:2]  # uni- and bigrams are never cut
    assert ("on", "the", "hall") in full.probs[2] and ("on", "the", "hall") not in cut.probs[2]
    assert ("on", "the", "kitchen") in cut.probs[2]
    assert sum(map(len, cut.probs)) < sum(map(len, full.probs))
    # an ARPA reader needs every kept n-gram's history as an entry of its own
    for n in range(1, 4):
        assert all(gram[:-1] in cut.probs[n - 1] for gram in cut.probs[n])
        assert set(cut.backoffs[n - 1]) == set(cut.probs[n - 1])
    words = [w for w in cut.vocabulary if w != "<s>"]
    for history in [("<s>", "turn", "on"), ("turn", "on", "the"), ("on", "the"), ("the", "hall"),
                    ("off", "the", "hall"), ()]:
        assert math.fsum(10 ** cut.log10_prob(w, history) for w in words) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="min_count"):
        train_ngram(sentences, min_count=0)


def test_ngram_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        train_ngram(["a"], order=0)
    with pytest.raises(ValueError):
        train_ngram(["a"], discount=1.0)
    with pytest.raises(ValueError):
        train_ngram([])


def test_arpa_file_lists_every_ngram(tmp_path: Path) -> None:
    lm = train_ngram(["a b", "a c"], order=2)
    text = lm.write_arpa(tmp_path / "lm.arpa").read_text()
    assert "ngram 1=6" in text and f"ngram 2={len(lm.probs[1])}" in text
    assert "-99.000000\t<s>" in text and text.rstrip().endswith("\\end\\")


def _emissions(frames: list[dict[str, float]]) -> torch.Tensor:
    """``(1, T, C)`` log-probs; each frame gives probabilities to some symbols, the rest of
    its mass to blank."""
    out = torch.full((1, len(frames), len(VOCAB)), 1e-4)
    for t, probs in enumerate(frames):
        for symbol, p in probs.items():
            out[0, t, VOCAB.symbols.index(symbol)] = p
        out[0, t, VOCAB.blank] = max(1e-4, 1.0 - sum(probs.values()))
    return torch.log(out / out.sum(-1, keepdim=True))


def _spell(text: str, weak: dict[int, float] | None = None) -> list[dict[str, float]]:
    """A confident frame per character, a blank frame between; ``weak`` lowers some."""
    frames: list[dict[str, float]] = []
    for i, ch in enumerate(text):
        frames += [{ch: (weak or {}).get(i, 0.95)}, {}]
    return frames


def _lm_folder(tmp_path: Path, sentences: list[str], **config: float) -> Path:
    build_lm_folder(sentences, tmp_path / "lm", BeamConfig(**config))  # type: ignore[arg-type]
    return tmp_path


def test_lexicon_fixes_a_misspelling_greedy_makes(tmp_path: Path) -> None:
    folder = _lm_folder(tmp_path, ["turn on the light", "turn off the light"])
    assert has_lm(folder)
    # 'h' (index 3) is less likely than blank: greedy says "ligt on".
    emissions = _emissions(_spell("light on", weak={3: 0.4}))
    lengths = torch.tensor([emissions.size(1)])
    assert VOCAB.decode(ctc_greedy(emissions, lengths)[0]) == "ligt on"
    decoded = BeamTranscriber(folder, VOCAB).decode(emissions, torch.tensor([emissions.size(1)]))
    assert decoded == ["light on"]


def test_last_word_survives_without_trailing_space(tmp_path: Path) -> None:
    # Regression: the lexicon decoder only commits a word at a boundary, and transcripts
    # end without one; the transcriber must add it or drop the final word.
    folder = _lm_folder(tmp_path, ["turn on the light"])
    emissions = _emissions(_spell("turn on"))
    assert BeamTranscriber(folder, VOCAB).decode(emissions, torch.tensor([emissions.size(1)])) == [
        "turn on"]


def test_language_model_breaks_an_acoustic_tie(tmp_path: Path) -> None:
    # The audio slightly prefers "of" to "on"; the LM only ever saw "turn on".
    folder = _lm_folder(tmp_path, ["turn on the light"] * 5 + ["lots of light"],
                        lm_weight=1.0)
    frames = _spell("turn o") + [{"n": 0.43, "f": 0.47}, {}] + _spell(" the light")
    emissions = _emissions(frames)
    lengths = torch.tensor([emissions.size(1)])
    assert BeamTranscriber(folder, VOCAB).decode(emissions, lengths) == ["turn on the light"]


def test_padding_beyond_length_is_ignored(tmp_path: Path) -> None:
    folder = _lm_folder(tmp_path, ["turn on", "turn off"])
    short = _emissions(_spell("turn on"))
    padded = torch.cat([short, _emissions(_spell("off"))], dim=1)
    batch = torch.cat([padded, padded])
    out = BeamTranscriber(folder, VOCAB).decode(batch, torch.tensor([short.size(1), padded.size(1)]))
    assert out[0] == "turn on"


def test_tuning_picks_the_best_setting(tmp_path: Path) -> None:
    folder = _lm_folder(tmp_path, ["turn on the light"] * 5 + ["lots of light"])
    frames = _spell("turn o") + [{"n": 0.43, "f": 0.47}, {}] + _spell(" the light")
    e = _emissions(frames)[0]
    config, grid = tune_beam(BeamTranscriber(folder, VOCAB), [(e, e.size(0))],
                             lambda hyps: float(jiwer.wer(["turn on the light"], hyps)),
                             lm_weights=(0.0, 1.0), word_scores=(0.0,))
    assert set(grid) == {"0.0/0.0", "1.0/0.0"}
    assert grid["1.0/0.0"] == 0.0 and config.lm_weight == 1.0


def test_transcriber_needs_characters_and_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        BeamTranscriber(tmp_path, VOCAB)
    folder = _lm_folder(tmp_path, ["turn on"])
    with pytest.raises(TypeError):
        BeamTranscriber(folder, WordVocab(("on", "turn")))


def test_lm_folder_keeps_its_text_byte_for_byte(tmp_path: Path) -> None:
    from model.decoding.beam import read_lm_sentences
    from model.nn.package import LM_SENTENCES

    sentences = ["turn on the <area> kitchen </> light", "what time is it"]
    a = _lm_folder(tmp_path / "a", sentences) / "lm" / LM_SENTENCES
    assert read_lm_sentences(a) == sentences
    assert a.read_bytes()[4:8] == b"\0\0\0\0"  # gzip mtime 0: same text, same bytes


def test_rebuilding_an_lm_of_links_leaves_their_targets_alone(tmp_path: Path) -> None:
    student = _lm_folder(tmp_path / "student", ["turn on the light"]) / "lm"
    teacher = tmp_path / "teacher" / "lm"
    teacher.mkdir(parents=True)
    for name in ("lexicon.txt", "lm.arpa"):
        (teacher / name).symlink_to(student / name)
    before = (student / "lm.arpa").read_bytes()
    build_lm_folder(["what time is it"], teacher, BeamConfig())
    assert (student / "lm.arpa").read_bytes() == before
    assert not (teacher / "lm.arpa").is_symlink() and "time" in (teacher / "lexicon.txt").read_text()


def test_inherited_text_adds_only_what_the_parent_lacks() -> None:
    from model.training.lm_stage import with_inherited

    parent = ["turn on the light", "<area> kitchen </>", "turn on the light"]
    own = ["turn on the light", "<area> attic </>", "<area> kitchen </>", "lock the door",
           "lock the door"]
    text = with_inherited(parent, own)
    # the parent's text whole (its counts too), then the new sentences, none twice over
    assert text == [*parent, "<area> attic </>", "lock the door", "lock the door"]
