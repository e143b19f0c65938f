"""Quantisation-aware training: coverage, observers, exactness when off, straight-through
gradients, baking onto the int8 grid, state dicts, bf16 autocast, and agreement with
ONNX Runtime's own quantiser (its Python weight quantiser, its DynamicQuantizeLinear
kernel, and quantize_dynamic on an exported graph)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from model.nn.network import EncoderConfig, JointModel, JointOutput, ModelConfig
from model.nn.qat import (
    WEIGHT_QMAX,
    WEIGHT_REDUCE_RANGE,
    DynamicActivationFakeQuant,
    WeightFakeQuant,
    int8_weight_grid_error,
    load_plain_state_dict,
    ort_weight_scale,
    plain_state_dict,
    prepare_qat,
    quantized_weight_names,
)

torch.set_num_threads(1)

HEADS = ("ctc_logits", "intent_logits", "parse_logits")


def _model() -> JointModel:
    torch.manual_seed(0)
    cfg = ModelConfig(
        EncoderConfig(d_model=32, layers=2, heads=2, ffn_mult=2, conv_kernel=5),
        n_chars=29, n_intents=5, n_parse_tokens=40, decoder_layers=1, decoder_ffn=64,
        max_parse_len=12,
    )
    return JointModel(cfg)


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(3, 100, 80, generator=g)
    lengths = torch.tensor([100, 80, 60])
    tokens = torch.randint(0, 40, (3, 6), generator=g)
    return feats, lengths, tokens


def _run(model: nn.Module, seed: int = 0) -> JointOutput:
    torch.manual_seed(seed)  # same dropout masks for every model in train mode
    return model(*_batch())


def _loss(out: JointOutput) -> torch.Tensor:
    return sum(getattr(out, k).float().square().mean() for k in HEADS)  # type: ignore[return-value]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _calls(handle) -> dict[str, int]:  # type: ignore[no-untyped-def]
    return {name: int(fq.calls) for name, fq in handle.observers()}


# --------------------------------------------------------------------------- coverage


def test_every_linear_and_attention_is_covered() -> None:
    model = _model()
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    mhas = {n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    expected_weights = quantized_weight_names(model)
    qat = prepare_qat(model)
    assert set(qat.modules) == linears | mhas
    assert len(qat.modules) == 28  # 1 front end + 2×8 per block + 4 heads + 7 decoder
    for name in (
        "encoder.subsampling.proj", "encoder.blocks.0.attn.in_proj",
        "encoder.blocks.0.attn.out_proj", "encoder.blocks.1.conv.pointwise_in",
        "encoder.blocks.1.ff2.net.4", "ctc_head", "intent_head.score",
        "intent_head.classifier.3", "parse_decoder.decoder.layers.0.self_attn",
        "parse_decoder.decoder.layers.0.multihead_attn",
        "parse_decoder.decoder.layers.0.multihead_attn.out_proj",
        "parse_decoder.decoder.layers.0.linear1", "parse_decoder.out",
    ):
        assert name in qat.modules
    assert list(qat.weight_quantizers) == expected_weights
    mha_w = "parse_decoder.decoder.layers.0.self_attn.in_proj_weight"
    assert qat.weight_quantizers[mha_w].scale.shape == (3 * 32,)  # per channel over 3·D rows
    assert len(qat.activation_quantizers) == len(linears) + 3 * len(mhas)
    assert set(qat.stats()) >= {"weight_calls", "activation_calls", "enabled"}
    assert all(int(c) == 0 for c in _calls(qat).values())
    with pytest.raises(ValueError, match="already prepared"):
        prepare_qat(model)


def test_skip_leaves_layers_float() -> None:
    model = _model()
    qat = prepare_qat(model, skip=lambda name, m: name.startswith("parse_decoder.decoder")
                      and isinstance(m, nn.MultiheadAttention))
    # A skipped attention module takes its out_proj with it.
    assert not any(n.startswith("parse_decoder.decoder.layers.0.self_attn") for n in qat.modules)
    assert not parametrize.is_parametrized(
        model.parse_decoder.decoder.layers[0].self_attn.out_proj)
    assert "parse_decoder.decoder.layers.0.linear1" in qat.modules
    _run(model.eval())


# --------------------------------------------------------------------------- observers, exactness


def test_observers_run_in_training_and_scales_are_positive() -> None:
    model = _model().train()
    qat = prepare_qat(model)
    _loss(_run(model)).backward()
    calls = _calls(qat)
    unused = {n for n in calls if n.endswith((".self_attn.key", ".self_attn.value",
                                              ".multihead_attn.value"))}
    # Self-attention quantises one tensor (q is k is v); cross-attention two (k is v).
    assert unused == {n for n, c in calls.items() if c == 0}
    assert len(unused) == 3
    assert all(c == 1 for n, c in calls.items() if n not in unused)  # once per forward
    for name, fq in qat.observers():
        if name not in unused:
            assert bool((fq.scale > 0).all()), name
    stats = qat.stats()
    assert stats["weight_calls"] == 28
    assert stats["activation_calls"] == len(qat.activation_quantizers) - 3
    assert stats["min_weight_scale"] > 0


@pytest.mark.parametrize("train", [False, True])
def test_disabled_is_the_float_model_exactly(train: bool) -> None:
    ref = _model().train(train)
    model = copy.deepcopy(ref)
    qat = prepare_qat(model)
    qat.enable(False)
    with torch.no_grad():
        a, b = _run(model), _run(ref)
    for k in HEADS:
        assert torch.equal(getattr(a, k), getattr(b, k)), k
    assert all(c == 0 for c in _calls(qat).values())
    assert qat.stats()["enabled"] is False


@pytest.mark.parametrize("train", [False, True])
def test_enabled_is_close_to_float_but_not_equal(train: bool) -> None:
    ref = _model().train(train)
    model = copy.deepcopy(ref)
    qat = prepare_qat(model)
    with torch.no_grad():
        a, b = _run(model), _run(ref)
    # Random weights and 7-bit weight grids: a few percent of error, more in train mode,
    # where dropout thins the small-init parse decoder's signal (measured 0.17).
    limit = 0.25 if train else 0.1
    for k in HEADS:
        err = _rel(getattr(a, k), getattr(b, k))
        assert 1e-5 < err < limit, (k, err)
    assert qat.stats()["activation_calls"] > 0


def test_inference_mode_works() -> None:
    model = _model().eval()
    qat = prepare_qat(model)
    with torch.inference_mode():
        out = _run(model)
    assert torch.isfinite(out.ctc_logits).all()
    assert qat.stats()["weight_calls"] == 28


# --------------------------------------------------------------------------- gradients


def test_gradients_reach_the_latent_float_weights() -> None:
    model = _model().train()
    qat = prepare_qat(model)
    _loss(_run(model)).backward()
    modules = dict(model.named_modules())
    for key in qat.weight_quantizers:
        owner, _, tensor_name = key.rpartition(".")
        latent = modules[owner].parametrizations[tensor_name].original
        assert isinstance(latent, nn.Parameter)
        assert latent.grad is not None and latent.grad.abs().sum() > 0, key
        assert torch.isfinite(latent.grad).all(), key


def test_fake_quant_gradients_are_straight_through() -> None:
    torch.manual_seed(0)
    w = torch.randn(6, 10, requires_grad=True)
    g = torch.randn(6, 10)
    (WeightFakeQuant(6)(w) * g).sum().backward()
    assert torch.equal(w.grad, g)
    x = torch.randn(4, 7, requires_grad=True)
    (DynamicActivationFakeQuant()(x) * g[:4, :7]).sum().backward()
    # Identity inside the range; the extreme value may saturate after zero-point rounding.
    assert (x.grad == g[:4, :7]).float().mean() > 0.9


# --------------------------------------------------------------------------- attention


def test_multihead_attention_fast_and_slow_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    ref = nn.TransformerDecoderLayer(32, 4, 64, 0.0, batch_first=True, norm_first=True)
    layer = copy.deepcopy(ref)
    qat = prepare_qat(layer)
    assert {"self_attn", "multihead_attn", "self_attn.out_proj"} <= set(qat.modules)
    assert layer.self_attn._qkv_same_embed_dim
    fast = []
    native = torch._native_multi_head_attention

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        fast.append(1)
        return native(*args, **kwargs)

    monkeypatch.setattr(torch, "_native_multi_head_attention", spy)
    x, mem = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    for train in (False, True):
        layer.train(train), ref.train(train)
        fast.clear()
        qat.reset_stats()
        with torch.no_grad():
            y, y_ref = layer(x, mem), ref(x, mem)
        assert bool(fast) != train  # eval + no grad: self-attention takes the fast path
        assert 1e-5 < _rel(y, y_ref) < 0.05
        calls = _calls(qat)
        # The attention output feeding out_proj is quantised although MHA never calls out_proj.
        assert calls["self_attn.out_proj.input"] == 1
        assert calls["multihead_attn.out_proj.input"] == 1
        assert calls["self_attn.in_proj_weight"] == 1  # cached within one call
        assert calls["multihead_attn.key"] == 1 and calls["multihead_attn.value"] == 0
    # need_weights and separate query/key/value tensors
    mha = layer.multihead_attn.eval()
    out, weights = mha(x, mem, mem.clone(), need_weights=True)
    assert out.shape == (2, 5, 32) and weights is not None and weights.shape == (2, 5, 7)
    assert int(qat.activation_quantizers["multihead_attn.value"].calls) == 1
    qat.strip(bake=False)
    assert "forward" not in vars(layer.self_attn)
    with torch.no_grad():
        assert torch.equal(layer(x, mem), ref(x, mem))


# --------------------------------------------------------------------------- strip, state dicts


def test_strip_bakes_weights_onto_the_int8_grid() -> None:
    model = _model().train()
    qat = prepare_qat(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    _loss(_run(model)).backward()
    opt.step()
    assert int8_weight_grid_error(model, list(qat.weight_quantizers)) < 1e-4  # fake-quantised view
    baked = plain_state_dict(model, quantized=True)
    latent = plain_state_dict(model)
    assert not any("parametrizations" in k for k in baked)
    qat.enable(False)  # baking quantises regardless
    params = {id(p) for p in model.parameters()}
    stripped = qat.strip(bake=True)
    assert stripped is model and {id(p) for p in model.parameters()} == params  # optimizer-safe
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert not any(isinstance(m, (WeightFakeQuant, DynamicActivationFakeQuant))
                   for m in model.modules())
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert int8_weight_grid_error(model) < 1e-4
    plain = _model()
    assert int8_weight_grid_error(plain) > 0.4  # float weights are anywhere between grid points
    sd = model.state_dict()
    assert set(sd) == set(plain.state_dict())
    for k in baked:
        assert torch.equal(sd[k], baked[k]), k
    assert any(not torch.equal(latent[k], baked[k]) for k in baked)
    plain.load_state_dict(sd)
    model.eval(), plain.eval()
    with torch.no_grad():
        a, b = _run(model), _run(plain)
    for k in HEADS:
        assert torch.equal(getattr(a, k), getattr(b, k))
    assert qat.strip() is model  # idempotent


def test_strip_without_bake_restores_float_weights() -> None:
    ref = _model().eval()
    model = copy.deepcopy(ref)
    qat = prepare_qat(model)
    _run(model)
    qat.strip(bake=False)
    with torch.no_grad():
        a, b = _run(model), _run(ref)
    for k in HEADS:
        assert torch.equal(getattr(a, k), getattr(b, k))


def test_plain_state_dict_round_trips() -> None:
    ref = _model().eval()
    model = copy.deepcopy(ref)
    qat = prepare_qat(model)
    sd = model.state_dict()
    assert "ctc_head.parametrizations.weight.original" in sd
    assert "parse_decoder.decoder.layers.0.self_attn.parametrizations.in_proj_weight.original" in sd
    assert not any(k.endswith((".calls", ".scale", ".zero_point")) for k in sd)  # stats not saved
    plain = plain_state_dict(model)
    assert set(plain) == set(ref.state_dict())
    fresh = _model()
    fresh.load_state_dict(plain)  # strict
    for k, v in ref.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    # A plain checkpoint loads into a prepared model too.
    other = _model()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01)
    other_qat = prepare_qat(other)
    load_plain_state_dict(other, ref.state_dict())
    other_qat.enable(False), qat.enable(False)
    with torch.no_grad():
        a, b = _run(other.eval()), _run(ref)
    for k in HEADS:
        assert torch.equal(getattr(a, k), getattr(b, k))


# --------------------------------------------------------------------------- bf16


def test_bf16_autocast_training_step() -> None:
    ref = _model().train()
    model = copy.deepcopy(ref)
    qat = prepare_qat(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _run(model)
        assert out.ctc_logits.dtype == torch.bfloat16
        loss = _loss(out)
    loss.backward()
    assert torch.isfinite(loss)
    for p in model.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()
    assert qat.stats()["activation_calls"] == len(qat.activation_quantizers) - 3
    model.eval(), ref.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = _run(model), _run(ref)
        for k in HEADS:
            assert 1e-4 < _rel(getattr(a, k), getattr(b, k)) < 0.05, k
        qat.enable(False)
        a = _run(model)
    for k in HEADS:
        assert torch.equal(getattr(a, k), getattr(b, k))


def test_deep_copy_of_a_prepared_model_uses_its_own_quantizers() -> None:
    model = _model().eval()
    qat = prepare_qat(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        a, b = _run(model), _run(twin)
    assert torch.equal(a.parse_logits, b.parse_logits)
    assert qat.stats()["weight_calls"] == 28  # not 56: the copy counts on its own
    twin_linear = twin.parse_decoder.decoder.layers[0].self_attn.out_proj
    assert int(twin_linear.activation_fake_quant.calls) == 1


# --------------------------------------------------------------------------- ORT conventions


def test_weight_scheme_matches_onnxruntime_quantizer() -> None:
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import quantize_data

    torch.manual_seed(0)
    w = torch.randn(48, 40) * torch.logspace(-3, 0, 48)[:, None]
    w[5] = 0.0  # an all-zero channel: ORT uses scale 1
    for reduce_range, qmax in ((False, 127), (True, 64)):
        fq = WeightFakeQuant(48, reduce_range=reduce_range)
        y = fq(w)
        for i in range(48):
            zp, scale, q = quantize_data(w[i].numpy(), TensorProto.INT8, True, reduce_range)
            assert int(zp) == 0 and np.float32(scale) == fq.scale[i].item()
            assert int(np.abs(q).max()) == (0 if i == 5 else qmax)
            np.testing.assert_array_equal(q.astype(np.float32) * np.float32(scale), y[i].numpy())
        # per tensor
        zp, scale, q = quantize_data(w.numpy(), TensorProto.INT8, True, reduce_range)
        assert np.float32(scale) == ort_weight_scale(w, False, reduce_range).item()
        y = WeightFakeQuant(48, per_channel=False, reduce_range=reduce_range)(w)
        np.testing.assert_array_equal(q.astype(np.float32) * np.float32(scale), y.numpy())
    # The default, shared with model.nn.export.quantize_bundle: ORT's 7-bit reduce_range grid.
    assert WEIGHT_REDUCE_RANGE is True and WEIGHT_QMAX == 64
    assert WeightFakeQuant(48).qmax == 64 and torch.equal(
        ort_weight_scale(w), ort_weight_scale(w, reduce_range=True))


def test_activation_scheme_matches_dynamic_quantize_linear() -> None:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "s", "z"])], "dql",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info(n, t, None) for n, t in
         (("y", TensorProto.UINT8), ("s", TensorProto.FLOAT), ("z", TensorProto.UINT8))],
    )
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(onnx_model.SerializeToString(), opts,
                                   providers=["CPUExecutionProvider"])
    torch.manual_seed(0)
    cases = [torch.randn(3, 9, 16) * 3 + 1, torch.rand(50) + 0.5, -torch.rand(4, 8),
             torch.zeros(5), torch.randn(7, 33)]
    fq = DynamicActivationFakeQuant()
    for x in cases:
        y, s, z = session.run(None, {"x": x.numpy()})
        out = fq(x)
        assert np.float32(s) == fq.scale.item() and int(z) == int(fq.zero_point)
        dequant = (y.astype(np.float32) - np.float32(z)) * np.float32(s)
        np.testing.assert_array_equal(dequant, out.numpy())
    # per sample: each batch item as its own tensor
    x = torch.randn(3, 5, 8) * torch.tensor([0.1, 1.0, 10.0])[:, None, None]
    per_sample = DynamicActivationFakeQuant(per_sample=True)(x)
    for i in range(3):
        assert torch.equal(per_sample[i], DynamicActivationFakeQuant()(x[i]))


class _TinyStack(nn.Module):
    """A Linear front end, one Transformer decoder layer (self + cross attention), a 2-D head."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 32)
        self.layer = nn.TransformerDecoderLayer(32, 4, 64, 0.0, batch_first=True, norm_first=True)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:
        y = self.layer(torch.relu(self.proj(x)), mem)
        return self.head(y.mean(1))


def test_onnxruntime_quantize_dynamic_reproduces_baked_weights(tmp_path: Path) -> None:
    """The deployment quantiser (quantize_bundle's quantize_dynamic call) keeps the baked
    weights bit for bit, and the int8 graph computes what the QAT model computes. The latter
    fails with 8-bit weights on x86 CPUs without VNNI (int16 saturation in vpmaddubsw): the
    7-bit weight grid (WEIGHT_REDUCE_RANGE) makes it hold on every CPU."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from model.nn.export import DEFAULT_INT8_OP_TYPES, _quantize_graph

    torch.manual_seed(0)
    float_model = _TinyStack().eval()
    qat_model = copy.deepcopy(float_model)
    prepare_qat(qat_model)
    x, mem = torch.randn(2, 6, 16), torch.randn(2, 9, 32)
    with torch.no_grad():
        y_float, y_qat = float_model(x, mem), qat_model(x, mem)
    baked = _TinyStack().eval()
    baked.load_state_dict(plain_state_dict(qat_model, quantized=True))

    src, dst = tmp_path / "f.onnx", tmp_path / "q.onnx"
    torch.onnx.export(baked, (x, mem), str(src), dynamo=True, external_data=False,
                      input_names=["x", "mem"], output_names=["y"])
    # quant_pre_process + quantize_dynamic exactly as quantize_bundle runs them.
    _quantize_graph(src, dst, DEFAULT_INT8_OP_TYPES, per_channel=True)

    graph = onnx.load(str(dst)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    matmuls = [n for n in graph.node if n.op_type == "MatMulInteger"]
    # proj, self-attn in_proj + out_proj, cross-attn q + kv + out_proj, linear1, linear2, head
    assert len(matmuls) == 9
    assert not [n for n in graph.node if n.op_type in ("MatMul", "Gemm")
                and any(i in inits for i in n.input)]
    rows = {r.tobytes() for p in baked.state_dict().values() if p.dim() == 2
            for r in p.numpy().astype(np.float32)}
    for node in matmuls:
        name = node.input[1]
        assert name.endswith("_quantized")
        q = inits[name]
        scale = inits[name[: -len("_quantized")] + "_scale"]
        assert q.dtype == np.int8 and scale.shape == (q.shape[1],)  # per output channel
        # 7-bit grid: every channel reaches ±64 and none goes beyond (an 8-bit regression
        # would show 127 here, and saturate on AVX2 without VNNI).
        assert (np.abs(q.astype(np.int32)).max(axis=0) == WEIGHT_QMAX).all(), name
        dequant = (q.astype(np.float32) * scale.astype(np.float32)).T  # (out, in)
        for row in dequant:
            assert row.tobytes() in rows  # bit-exact: ORT keeps the baked weights
    # And the deployed int8 graph computes what the QAT model computed.
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(dst), opts, providers=["CPUExecutionProvider"])
    y_ort = torch.from_numpy(session.run(None, {"x": x.numpy(), "mem": mem.numpy()})[0])
    assert _rel(y_ort, y_qat) < 0.02 * _rel(y_ort, y_float), (_rel(y_ort, y_qat),
                                                             _rel(y_ort, y_float))
