"""Network shapes, padding invariance and configuration errors."""

import pytest
import torch

from model.nn.network import (
    ConformerEncoder,
    ConvSubsampling,
    EncoderConfig,
    JointModel,
    ModelConfig,
    lengths_to_padding_mask,
)

torch.set_num_threads(1)


def _model(**enc: int) -> JointModel:
    torch.manual_seed(0)
    cfg = ModelConfig(
        EncoderConfig(d_model=32, layers=2, heads=2, ffn_mult=2, conv_kernel=5, **enc),
        n_chars=29, n_intents=5, n_parse_tokens=40, decoder_layers=1, decoder_ffn=64,
        max_parse_len=12,
    )
    return JointModel(cfg).eval()


@pytest.mark.parametrize(("factor", "frames", "expected"), [
    # factor 4: 100 -> (100-3)//2+1 = 49 -> (49-3)//2+1 = 24
    (4, 100, 24),
    # factor 6: 100 -> 49 -> (49-3)//3+1 = 16
    (6, 100, 16),
    # factor 8: 100 -> 49 -> 24 -> (24-3)//2+1 = 11
    (8, 100, 11),
])
def test_subsampling_lengths(factor: int, frames: int, expected: int) -> None:
    sub = ConvSubsampling(80, 32, factor)
    y, lengths = sub(torch.randn(1, frames, 80), torch.tensor([frames]))
    assert y.shape == (1, expected, 32)
    assert lengths.tolist() == [expected]


def test_joint_model_output_shapes() -> None:
    model = _model()
    feats = torch.randn(3, 120, 80)
    lengths = torch.tensor([120, 90, 60])
    tokens = torch.randint(0, 40, (3, 7))
    out = model(feats, lengths, tokens)
    # 120 frames -> 59 -> 29 encoder frames
    assert out.encoder.shape == (3, 29, 32)
    assert out.encoder_lengths.tolist() == [29, 21, 14]
    # CTC emits ctc_upsample (2) label slots per encoder frame
    assert out.ctc_logits.shape == (3, 58, 29)
    assert out.ctc_lengths.tolist() == [58, 42, 28]
    assert out.intent_logits.shape == (3, 5)
    assert out.parse_logits is not None and out.parse_logits.shape == (3, 7, 40)
    assert model(feats, lengths).parse_logits is None


def test_batched_equals_one_by_one() -> None:
    """Padding must not change any output (torchaudio's conformer test idea)."""
    model = _model()
    lengths = torch.tensor([150, 97, 64, 33])
    feats = torch.randn(4, 150, 80)
    tokens = torch.randint(3, 40, (4, 6))
    with torch.no_grad():
        batched = model(feats, lengths, tokens)
        for i in range(4):
            single = model(feats[i : i + 1, : lengths[i]], lengths[i : i + 1], tokens[i : i + 1])
            n = int(single.encoder_lengths[0])
            assert n == int(batched.encoder_lengths[i])
            k = int(single.ctc_lengths[0])
            torch.testing.assert_close(single.ctc_logits[0], batched.ctc_logits[i, :k],
                                       atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(single.intent_logits[0], batched.intent_logits[i],
                                       atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(single.parse_logits[0], batched.parse_logits[i],
                                       atol=1e-5, rtol=1e-4)
            assert batched.encoder[i, n:].abs().max() == 0 if n < batched.encoder.size(1) else True


def test_causal_conv_does_not_look_ahead() -> None:
    torch.manual_seed(1)
    enc = ConformerEncoder(EncoderConfig(d_model=32, layers=1, heads=2, conv_kernel=5,
                                         causal_conv=True, dropout=0.0)).eval()
    feats = torch.randn(1, 100, 80)
    lengths = torch.tensor([100])
    # Only the conv path may leak the future; block attention to the past to isolate it.
    t = enc.subsampling.output_lengths(lengths).item()
    past_only = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
    with torch.no_grad():
        a, _ = enc(feats, lengths, past_only)
        changed = feats.clone()
        changed[:, 80:] += 5.0
        b, _ = enc(changed, lengths, past_only)
    # Input frames >= 80 reach encoder frames >= (80-3)//2//2 - 1 = 18 at the earliest.
    torch.testing.assert_close(a[:, :17], b[:, :17])
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_padding_mask() -> None:
    mask = lengths_to_padding_mask(torch.tensor([3, 1]), 4)
    assert mask.tolist() == [[False, False, False, True], [False, True, True, True]]


@pytest.mark.parametrize("bad", [{"d_model": 30, "heads": 4}, {"conv_kernel": 4},
                                 {"subsampling": 5}])
def test_invalid_config_raises(bad: dict) -> None:
    with pytest.raises(ValueError):
        EncoderConfig(**bad)


def test_wrong_feature_shape_raises() -> None:
    with pytest.raises(ValueError, match=r"\(B, T, 80\)"):
        _model()(torch.randn(2, 50, 40), torch.tensor([50, 50]))


def test_self_attention_matches_torch_multihead_attention_and_loads_its_weights() -> None:
    """Older checkpoints used nn.MultiheadAttention; ours must load them and agree."""
    from torch import nn

    from model.nn.network import SelfAttention

    torch.manual_seed(0)
    ref = nn.MultiheadAttention(48, 4, batch_first=True).eval()
    ours = SelfAttention(48, 4, 0.0).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 7, 48)
    pad = torch.tensor([[False] * 7, [False] * 5 + [True] * 2])
    expected = ref(x, x, x, key_padding_mask=pad, need_weights=False)[0]
    torch.testing.assert_close(ours(x, pad), expected, atol=1e-5, rtol=1e-5)


def test_self_attention_cache_gives_same_keys_as_full_sequence() -> None:
    from model.nn.network import SelfAttention

    torch.manual_seed(0)
    attn = SelfAttention(32, 4, 0.0).eval()
    x = torch.randn(1, 9, 32)
    causal = torch.triu(torch.ones(9, 9, dtype=torch.bool), 1)
    full = attn(x, None, causal)
    first, cache = attn.forward_with_cache(x[:, :5], None, causal[:5, :5])
    second, _ = attn.forward_with_cache(x[:, 5:], None, causal[5:, :], cache)
    torch.testing.assert_close(torch.cat([first, second], 1), full, atol=1e-5, rtol=1e-5)
