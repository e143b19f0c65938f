"""Vocabularies, CTC greedy decoding, batching and the clarify threshold."""

import numpy as np
import pytest
import torch

from model.data.manifest import Slot
from model.decoding.greedy import (
    choose_clarify_threshold,
    ctc_greedy,
    greedy_parse_steps,
    value_mask,
)
from model.nn.tokens import CharVocab, ParseVocab, WordVocab, ctc_vocab_from_json, format_parse
from model.training.dataset import make_batches


def test_char_vocab_round_trip() -> None:
    chars = CharVocab()
    ids = chars.encode("what's the time")
    assert chars.blank not in ids
    assert chars.decode(ids) == "what's the time"


def test_word_vocab_round_trip_unknown_and_json() -> None:
    words = WordVocab(("kitchen", "light", "on", "the", "turn"))
    ids = words.encode("turn on the kitchen light")
    assert words.blank not in ids and len(ids) == 5
    assert words.decode(ids) == "turn on the kitchen light"
    assert words.encode("turn on the garage")[-1] == WordVocab.UNK
    assert words.decode([WordVocab.UNK, 0, ids[0]]) == "<unk> turn"
    assert ctc_vocab_from_json(words.to_json()) == words
    assert isinstance(ctc_vocab_from_json(None), CharVocab)
    with pytest.raises(ValueError):
        ctc_vocab_from_json({"units": "phones"})


def test_parse_vocab_round_trip_and_unknown_words() -> None:
    vocab = ParseVocab.build(["HassLightSet", "HassTurnOn"], ["area", "brightness"],
                             ["set the kitchen light"])
    slots = [Slot(type="area", value="kitchen"), Slot(type="brightness", value="fifty")]
    ids = vocab.encode("HassLightSet", slots)
    assert ids[0] == ParseVocab.BOS and ids[-1] == ParseVocab.EOS
    assert vocab.decode(ids[1:]) == ("HassLightSet", slots)
    unknown = vocab.encode("HassLightSet", [Slot(type="area", value="zanzibar")])
    assert ParseVocab.UNK in unknown
    assert format_parse("HassLightSet", slots) == "HassLightSet | area = kitchen | brightness = fifty"
    assert ParseVocab.from_json(vocab.to_json()) == vocab


def test_parse_decode_is_lenient() -> None:
    vocab = ParseVocab.build(["HassTurnOn"], ["area", "name"], ["kitchen lamp"])
    tok = {t: i for i, t in enumerate(vocab.tokens)}
    # stray word before any slot, an empty slot, a late intent token: all ignored
    ids = [tok["[HassTurnOn]"], tok["lamp"], tok["[name]"], tok["[area]"], tok["kitchen"],
           tok["[HassTurnOn]"], ParseVocab.EOS, tok["[name]"], tok["lamp"]]
    assert vocab.decode(ids) == ("HassTurnOn", [Slot(type="area", value="kitchen")])


def test_ctc_greedy_merges_repeats_and_drops_blanks() -> None:
    # frames: a a blank a b b blank -> "aab"
    path = [1, 1, 0, 1, 2, 2, 0]
    logits = torch.nn.functional.one_hot(torch.tensor([path]), 3).float()
    assert ctc_greedy(logits, torch.tensor([7])) == [[1, 1, 2]]
    assert ctc_greedy(logits, torch.tensor([3])) == [[1]]


def test_clarify_threshold() -> None:
    conf = [0.95, 0.9, 0.8, 0.6, 0.4]
    correct = [True, True, True, False, True]
    # accepted accuracy by threshold: 0.8 -> 3/3; 0.6 -> 3/4; 0.4 -> 4/5
    assert choose_clarify_threshold(conf, correct, 0.95) == pytest.approx(0.8)
    assert choose_clarify_threshold(conf, correct, 0.8) == 0.0
    assert choose_clarify_threshold(conf, [False] * 5, 0.5) == 1.0
    with pytest.raises(ValueError):
        choose_clarify_threshold([0.5], [], 0.9)


def test_make_batches_bounds_padding_and_covers_everything() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(50, 400, size=200)
    batches = make_batches(lengths, 2000, rng=np.random.default_rng(1))
    assert sorted(i for b in batches for i in b) == list(range(200))
    for b in batches:
        assert max(lengths[b]) * len(b) <= 2000 or len(b) == 1
    order = make_batches(lengths, 2000, order=lengths.astype(float))
    firsts = [max(lengths[b]) for b in order]
    assert firsts == sorted(firsts)  # curriculum: shortest batches first


def test_value_mask_allows_structure_and_transcript_words_only() -> None:
    vocab = ParseVocab.build(["HassTurnOn"], ["area", "name"], ["kitchen light", "garage door"])
    mask = value_mask(vocab, ["turn on the kitchen light", ""])
    index = {t: i for i, t in enumerate(vocab.tokens)}
    for token in ("<eos>", "[HassTurnOn]", "[area]", "[name]", "kitchen", "light"):
        assert mask[0, index[token]]
    assert not mask[0, index["garage"]] and not mask[1, index["kitchen"]]
    assert mask[1, index["[area]"]]


def test_greedy_parse_never_emits_a_masked_token() -> None:
    # The decoder prefers token 5, then <eos>; masking 5 forces the runner-up 6.
    def step(tokens: torch.Tensor) -> torch.Tensor:
        logits = torch.full((tokens.size(0), 8), -5.0)
        if tokens.size(1) == 1:
            logits[:, 5], logits[:, 6] = 3.0, 2.0
        else:
            logits[:, ParseVocab.EOS] = 3.0
        return logits

    free, _ = greedy_parse_steps(step, 2, 4)
    allowed = torch.ones(2, 8, dtype=torch.bool)
    allowed[1, 5] = False
    masked, _ = greedy_parse_steps(step, 2, 4, allowed)
    assert free == [[5], [5]] and masked == [[5], [6]]
