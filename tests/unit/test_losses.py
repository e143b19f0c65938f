"""Each loss term and the task weightings, on cases small enough to check by hand."""

import math

import pytest
import torch

from model.nn.tokens import ParseVocab
from model.training.losses import (
    ScheduledWeighting,
    UncertaintyWeighting,
    ctc_loss,
    intent_loss,
    make_weighting,
    parse_loss,
)


def test_ctc_loss_near_zero_for_confident_correct_path() -> None:
    # Target "ab" (ids 1, 2) over 4 frames with the path a, blank, b, blank.
    logits = torch.full((1, 4, 3), -20.0)
    for t, k in enumerate([1, 0, 2, 0]):
        logits[0, t, k] = 20.0
    loss = ctc_loss(logits, torch.tensor([4]), torch.tensor([1, 2]), torch.tensor([2]))
    assert float(loss) < 1e-3


def test_ctc_loss_uniform_matches_path_count() -> None:
    # Uniform over C=2 symbols (blank, a), T=2 frames, target "a": valid paths are
    # (a,a), (a,blank), (blank,a): p = 3 * (1/2)^2 = 3/4; loss = -log(3/4) / target length 1.
    logits = torch.zeros(1, 2, 2)
    loss = ctc_loss(logits, torch.tensor([2]), torch.tensor([1]), torch.tensor([1]))
    assert float(loss) == pytest.approx(-math.log(0.75), rel=1e-5)


def test_ctc_loss_impossible_alignment_is_zero_not_inf() -> None:
    loss = ctc_loss(torch.zeros(1, 1, 3), torch.tensor([1]), torch.tensor([1, 2]),
                    torch.tensor([2]))
    assert torch.isfinite(loss) and float(loss) == 0.0


def test_intent_loss_is_cross_entropy() -> None:
    # logits [0, ln 3]: softmax = [1/4, 3/4]; target 1 -> -ln(3/4)
    logits = torch.tensor([[0.0, math.log(3.0)]])
    assert float(intent_loss(logits, torch.tensor([1]))) == pytest.approx(-math.log(0.75))


def test_parse_loss_ignores_padding_and_smooths() -> None:
    vocab = 4
    logits = torch.zeros(1, 3, vocab)
    targets = torch.tensor([[2, 1, ParseVocab.PAD]])
    # Uniform logits: CE = ln 4 for each real token, whatever the smoothing.
    assert float(parse_loss(logits, targets, 0.1)) == pytest.approx(math.log(4), rel=1e-6)
    # Changing the padded position's logits must not change the loss.
    logits2 = logits.clone()
    logits2[0, 2] = torch.tensor([9.0, -3.0, 1.0, 2.0])
    assert float(parse_loss(logits2, targets, 0.1)) == pytest.approx(math.log(4), rel=1e-6)


def test_uncertainty_weighting_formula_and_init() -> None:
    w = UncertaintyWeighting({"ctc": 1.0, "intent": 0.5, "parse": 0.25})
    losses = {"ctc": torch.tensor(2.0), "intent": torch.tensor(4.0), "parse": torch.tensor(8.0)}
    out = w(losses)
    assert out.weights == pytest.approx({"ctc": 1.0, "intent": 0.5, "parse": 0.25})
    # total = sum w_i * L_i + s_i with s_i = -ln w_i
    expected = 2.0 + 2.0 + 2.0 + (0.0 + math.log(2) + math.log(4))
    assert float(out.total.detach()) == pytest.approx(expected, rel=1e-5)
    out.total.backward()
    assert all(p.grad is not None for p in w.parameters())


def test_schedule_moves_from_start_to_end() -> None:
    w = ScheduledWeighting({"ctc": 1.0, "intent": 0.0, "parse": 0.2},
                           {"ctc": 0.5, "intent": 1.0, "parse": 1.0}, epochs=4)
    assert w.weights_at(0) == pytest.approx({"ctc": 1.0, "intent": 0.0, "parse": 0.2})
    assert w.weights_at(2) == pytest.approx({"ctc": 0.75, "intent": 0.5, "parse": 0.6})
    assert w.weights_at(10) == pytest.approx({"ctc": 0.5, "intent": 1.0, "parse": 1.0})
    out = w({"ctc": torch.tensor(1.0), "intent": torch.tensor(1.0), "parse": torch.tensor(1.0)}, 2)
    assert float(out.total) == pytest.approx(0.75 + 0.5 + 0.6)


def test_make_weighting_rejects_unknown() -> None:
    with pytest.raises(ValueError, match="unknown"):
        make_weighting("magic", {}, {}, 1)
