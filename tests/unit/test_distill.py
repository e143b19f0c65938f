"""Pure pieces of the distillation loop."""

import numpy as np
import pytest
import torch

from model.nn.network import EncoderConfig, JointModel, ModelConfig
from model.nn.tokens import ParseVocab
from model.training.student import _chunk_mask, _parse_tensors, ctc_frame_ms

torch.set_num_threads(1)


def _model(subsampling: int, upsample: int, causal: bool = True) -> JointModel:
    return JointModel(ModelConfig(
        EncoderConfig(d_model=32, layers=1, heads=2, ffn_mult=2, conv_kernel=5,
                      subsampling=subsampling, causal_conv=causal),
        n_chars=29, n_intents=3, n_parse_tokens=20, decoder_layers=1, decoder_ffn=32,
        ctc_upsample=upsample,
    ))


def test_teacher_and_student_ctc_slots_align() -> None:
    # teacher 4 x 10 ms / 2 = 20 ms; student 8 x 10 ms / 4 = 20 ms
    assert ctc_frame_ms(_model(4, 2), 10.0) == ctc_frame_ms(_model(8, 4), 10.0) == 20.0
    assert ctc_frame_ms(_model(8, 2), 10.0) == 40.0


def test_parse_tensors_from_teacher_decodes() -> None:
    parse_in, parse_out, pad = _parse_tensors([[5, 6, 7], [8]])
    b, e, p = ParseVocab.BOS, ParseVocab.EOS, ParseVocab.PAD
    assert parse_in.tolist() == [[b, 5, 6, 7], [b, 8, p, p]]
    assert parse_out.tolist() == [[5, 6, 7, e], [8, e, p, p]]
    assert pad.tolist() == [[False] * 4, [False, False, True, True]]


def test_dynamic_chunk_mask_sampling() -> None:
    model = _model(8, 4)
    lengths = torch.tensor([400, 300])  # 400 frames -> 49 encoder frames at subsampling 8
    rng = np.random.default_rng(0)
    masks = [_chunk_mask(model, lengths, rng, [2, 4], 0.5, None) for _ in range(200)]
    full = sum(m is None for m in masks)
    assert 60 < full < 140  # about half the batches use full context
    chunked = [m for m in masks if m is not None]
    assert all(m.shape == (49, 49) for m in chunked)
    # frame 0 sees exactly its own chunk: 2 or 4 frames
    assert {int((~m[0]).sum()) for m in chunked} == {2, 4}
    assert _chunk_mask(model, lengths, rng, [], 0.0, None) is None
    # a full-context encoder never trains on chunks, whatever full_context_p says
    full_context = _model(8, 4, causal=False)
    assert all(_chunk_mask(full_context, lengths, rng, [2, 4], 0.0, None) is None
               for _ in range(20))


def test_unlabelled_audio_uses_the_teachers_own_parse_as_target() -> None:
    from model.decoding.greedy import greedy_parse
    from model.training.student import _teacher_outputs

    torch.manual_seed(0)
    teacher = _model(4, 2).eval()
    feats, lengths = torch.randn(3, 150, 80), torch.tensor([150, 120, 90])
    out, parse_in, parse_out, pad = _teacher_outputs(teacher, feats, lengths, None, None, 10,
                                                     bf16=False)
    enc, _, enc_pad = teacher.encode(feats, lengths)
    expected, _ = greedy_parse(teacher, enc, enc_pad, 10)
    for b, seq in enumerate(expected):
        n = len(seq)
        assert parse_in[b, 1 : n + 1].tolist() == seq and parse_out[b, :n].tolist() == seq
        assert parse_out[b, n] == ParseVocab.EOS and not pad[b, : n + 1].any()
    assert out.parse_logits is not None and out.parse_logits.shape[:2] == parse_in.shape
    assert not out.parse_logits.requires_grad  # targets only: no gradient into the teacher


def test_cached_teacher_targets_pad_into_batches() -> None:
    from model.training.student import TeacherTargets

    targets = TeacherTargets(
        ctc=[torch.ones(5, 3).half(), torch.ones(3, 3).half()],
        intent=torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
        parse_in=[torch.tensor([1, 7, 8]), torch.tensor([1, 9])],
        parse_out=[torch.tensor([7, 8, 2]), torch.tensor([9, 2])],
        parse=[torch.zeros(3, 11).half(), torch.zeros(2, 11).half()],
        encoder=None,
    )
    t = targets.batch([1, 0])
    assert t["ctc"].shape == (2, 5, 3) and t["ctc_lengths"].tolist() == [3, 5]
    assert t["ctc"][0, 3:].abs().sum() == 0  # padding is zero, and masked by the lengths
    assert t["intent"].tolist() == [[3.0, 4.0], [1.0, 2.0]]
    assert t["parse_in"].tolist() == [[1, 9, ParseVocab.PAD], [1, 7, 8]]
    assert t["parse_out"].tolist() == [[9, 2, ParseVocab.PAD], [7, 8, 2]]
    assert t["parse"].shape == (2, 3, 11) and t["encoder"] is None and t["encoder_lengths"] is None


def test_teacher_targets_without_a_parse_decoder_have_no_parse_terms() -> None:
    from model.training.student import TeacherTargets

    targets = TeacherTargets(ctc=[torch.ones(4, 3).half()], intent=torch.zeros(1, 2),
                             parse_in=None, parse_out=None, parse=None, encoder=None)
    t = targets.batch([0])
    assert t["parse"] is None and t["parse_in"] is None and t["ctc"].shape == (1, 4, 3)


def test_warm_start_copies_weights_and_refuses_other_shapes() -> None:
    from model.frontend.features import FeatureConfig
    from model.nn.package import ModelPackage
    from model.nn.tokens import CharVocab
    from model.training.student import warm_start

    vocab = ParseVocab(("A", "B", "C"), ("area",), tuple(f"w{i}" for i in range(9)))
    source = ModelPackage(_model(8, 4), FeatureConfig(), vocab)
    student = _model(8, 4)
    assert not torch.equal(student.ctc_head.weight, source.model.ctc_head.weight)
    warm_start(student, source, vocab, CharVocab())
    for (name, a), (_, b) in zip(student.state_dict().items(),
                                 source.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="architecture"):
        warm_start(_model(4, 2), source, vocab, CharVocab())
    # Causal and centred convolutions share their weights: a streaming student may be
    # continued as a full-context one (benchmarks/recipe_trial.py --student --init-from).
    centred = _model(8, 4, causal=False)
    warm_start(centred, source, vocab, CharVocab())
    assert torch.equal(centred.ctc_head.weight, source.model.ctc_head.weight)
    other = ParseVocab(("A", "B", "D"), ("area",), vocab.words)
    with pytest.raises(ValueError, match="vocabularies"):
        warm_start(_model(8, 4), source, other, CharVocab())


def _deep(layers: int, d_model: int = 32, causal: bool = False,
          inter: int = 0) -> JointModel:
    return JointModel(ModelConfig(
        EncoderConfig(d_model=d_model, layers=layers, heads=2, ffn_mult=2, conv_kernel=5,
                      subsampling=8, causal_conv=causal, inter_ctc_layer=inter),
        n_chars=29, n_intents=3, n_parse_tokens=20, decoder_layers=0, ctc_upsample=4,
    ))


def test_a_student_initialised_from_the_teacher_is_its_first_blocks() -> None:
    from model.training.student import init_from_teacher

    torch.manual_seed(0)
    teacher = _deep(3, inter=2).eval()
    student = _deep(2).eval()
    init_from_teacher(student, teacher)
    feats, lengths = torch.randn(2, 160, 80), torch.tensor([160, 120])
    with torch.no_grad():
        _, _, inter = teacher.encoder.forward_with_intermediate(feats, lengths)
        enc, _ = student.encoder(feats, lengths)
    # the same computation: the teacher's output after its second block
    assert inter is not None and torch.allclose(enc, inter, atol=1e-6)
    assert torch.equal(student.ctc_head.weight, teacher.ctc_head.weight)
    # A causal student copies the same weights (only the padding differs).
    causal = _deep(2, causal=True)
    init_from_teacher(causal, teacher)
    assert torch.equal(causal.encoder.blocks[1].conv.depthwise.weight,
                       teacher.encoder.blocks[1].conv.depthwise.weight)
    with pytest.raises(ValueError, match="d_model: student 16 vs teacher 32"):
        init_from_teacher(_deep(2, d_model=16), teacher)
    with pytest.raises(ValueError, match="4 blocks, the teacher only 3"):
        init_from_teacher(_deep(4), teacher)


def test_a_student_that_cannot_take_its_teachers_blocks_fails_at_load() -> None:
    from voiceloop.settings import load_settings

    with pytest.raises(ValueError, match="d_model 96 vs 144; encoder_layers 7 > 6"):
        load_settings(profile="full", overrides=["student.model.d_model=96",
                                                 "student.model.encoder_layers=7"])
    assert load_settings(profile="full").student.init == "teacher"
