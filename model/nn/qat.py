"""Quantisation-aware training that mirrors ONNX Runtime's dynamic int8 deployment path.

The student is deployed by exporting it to ONNX and running
``onnxruntime.quantization.quantize_dynamic(per_channel=True, reduce_range=True,
weight_type=QInt8)`` (:func:`model.nn.export.quantize_bundle`). Every
``MatMul`` with a constant weight then becomes ``DynamicQuantizeLinear`` on its input
activation + ``MatMulInteger`` against an int8 weight (the bias ``Add`` stays float). This
module fake-quantises exactly those two tensors during training, with ONNX Runtime's own
conventions (checked against ``onnxruntime/quantization/quant_utils.py`` of the installed
onnxruntime 1.32: ``compute_scale_zp``, ``quantize_nparray``, ``ONNX_INT_TYPE_*_RANGE``;
``MatMulInteger.quantize`` in ``operators/matmul.py``; and the ONNX ``DynamicQuantizeLinear``
spec / ORT's CPU ``GetQuantizationParameter``):

* **Weights** — int8, symmetric, one scale per output channel (ORT quantises the MatMul's
  ``B = Wᵀ`` of shape ``(in, out)`` along its last axis, i.e. per row of the torch weight
  ``(out, in)``), zero point 0, on ORT's *reduced* 7-bit grid (:data:`WEIGHT_REDUCE_RANGE`):
  range ``[-64, 64]`` (``ONNX_INT_TYPE_REDUCED_RANGE``) and
  ``scale = float32(float64(max|w_row|) / 64)`` (``compute_scale_zp``: ``2·absmax / (64 -
  (-64))``, divided in float64, stored float32); an all-zero row gets scale 1. Values are
  rounded half to even. ``reduce_range=False`` gives the full symmetric int8 grid instead:
  ``[-127, 127]`` (``ONNX_INT_TYPE_SYMMETRIC_RANGE``), ``scale = max|w_row| / 127``.
* **Activations** — the input of every quantised matmul, uint8, asymmetric, per tensor,
  range taken from the current input and widened to include 0 (``DynamicQuantizeLinear``):
  ``scale = (max(x, 0) - min(x, 0)) / 255`` (float32; 1 when the range is empty),
  ``zero_point = round_half_even(clamp(-min(x, 0) / scale, 0, 255))``. The range spans
  the whole tensor, so a training batch shares one range; ``per_sample_activations=True``
  gives each batch item its own (what a deployment serving one utterance at a time sees).
  ``reduce_range`` does not touch activations: ORT quantises them with
  ``quantize_activation(reduce_range=False)`` into a ``DynamicQuantizeLinear`` node, whose
  output is always the full uint8 ``[0, 255]``.

What is quantised (shapes for the JointModel, ``D = d_model``): every ``nn.Linear`` — the
conv front end's projection ``(D, 32·F')``, each Conformer block's feed-forward
``(mult·D, D)``/``(D, mult·D)``, ``SelfAttention.in_proj`` ``(3D, D)`` and ``out_proj``
``(D, D)``, the conv module's pointwise layers ``(2D, D)``/``(D, D)``, the CTC, intent and
parse heads, the Linear layers inside ``nn.TransformerDecoderLayer`` — and every
``nn.MultiheadAttention`` (the decoder's self- and cross-attention): ``in_proj_weight``
``(3D, D)`` per channel over its ``3D`` rows (rows survive the split ONNX export makes for
cross-attention, so per-channel scales are unchanged by it; ORT's ``quant_pre_process``
must fold that ``Split`` into constants for those matmuls to get int8 weights), and the
query / key / value inputs (one activation quantiser per *distinct* tensor, as one exported
MatMul per distinct input). ``nn.MultiheadAttention`` never calls its ``out_proj`` module (it reads
``out_proj.weight`` and calls ``F.linear``), so for a quantised attention module the
attention output is produced with an identity stand-in for ``out_proj`` and then passed
through the real ``out_proj`` module, whose hooks fake-quantise it (exact: multiplying by
an identity matrix changes no value; the fast path and slow path both work).

A 2-D ``nn.Linear`` input (the intent classifier on pooled vectors, the attention output
projection) exports as ``Gemm``; ORT's dynamic quantiser first rewrites such a ``Gemm`` into
``MatMul`` + ``Add`` (``ONNXModel.replace_gemm_with_matmul``), so it is quantised the same
way. Convolutions (``ConvInteger``: per-tensor weights) and embeddings (``Gather``) are
*not* fake-quantised here: quantise only ``MatMul``/``Gemm`` at deployment (``op_types``),
or those layers see rounding in deployment that training never saw. ``skip`` leaves chosen
layers float; exclude the same nodes from ``quantize_dynamic``.

Mechanism: weights through ``torch.nn.utils.parametrize`` (:class:`WeightFakeQuant`),
activations through forward pre-hooks (:class:`DynamicActivationFakeQuant`), both built on
``torch.fake_quantize_per_{channel,tensor}_affine`` (straight-through gradients). Why not
the alternatives: ``torch.ao.quantization``'s eager ``prepare_qat``/``convert`` is deprecated
in torch 2.11 and targets its own fbgemm/qnnpack kernels and observers (affine int8
weights, static activation ranges), not ORT's dynamic scheme; torchao's ``QATConfig`` is
newer but its converted models run slowly in eager mode on this CPU (project notes). Here
training sees the very rounding the deployed graph applies, and :meth:`QATHandle.strip`
with ``bake=True`` leaves every weight *on* its int8 grid, so ``quantize_dynamic``
reproduces the trained weights exactly (tested bit for bit on an exported graph, whose
int8 output then matches the QAT forward pass to float rounding — on any x86 CPU, thanks
to :data:`WEIGHT_REDUCE_RANGE`).

bf16 autocast: the fake-quant ops run in float32 (inputs are cast up and the result cast
back to the input dtype). Checkpoints: a prepared model's ``state_dict`` names weights
``…parametrizations.weight.original``; :func:`plain_state_dict` gives the plain names (latent
float weights, or their int8-grid values) for an unprepared model.

Usage::

    qat = prepare_qat(student)          # after loading the float weights
    ...train as usual (the optimizer keeps the same Parameter objects)...
    qat.strip(bake=True)                # weights now on the 7-bit grid; export → quantize_bundle
"""

from __future__ import annotations

import re
import types
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

__all__ = [
    "WEIGHT_QMAX",
    "WEIGHT_REDUCE_RANGE",
    "DynamicActivationFakeQuant",
    "QATHandle",
    "WeightFakeQuant",
    "int8_weight_grid_error",
    "load_plain_state_dict",
    "ort_weight_scale",
    "plain_state_dict",
    "prepare_qat",
    "quantized_weight_names",
]

_F32_TINY = torch.finfo(torch.float32).tiny
# Names of the child modules prepare_qat attaches (removed again by strip()).
_ACT_LINEAR = "activation_fake_quant"
_ACT_MHA = ("query_fake_quant", "key_fake_quant", "value_fake_quant")


#: Weights on ORT's reduced 7-bit grid (``quantize_dynamic(reduce_range=True)``): the one
#: setting shared by QAT, baking and :func:`model.nn.export.quantize_bundle`. Why: ORT's
#: u8 (activation) × s8 (weight) ``MatMulInteger`` kernel on x86 CPUs *without* VNNI (AVX2,
#: AVX512 without VNNI) multiplies with ``vpmaddubsw``, which adds each pair of products in
#: int16 and saturates: full-range weights reach 255·127·2 = 64770 > 32767, so the
#: deployed graph stops computing what QAT trained (measured here, AMD EPYC with AVX2:
#: ORT's output was as far from the QAT model as from the float model). With 7-bit weights
#: (|q| <= 64) a pair stays within 255·64·2 = 32640 <= 32767, exact on every CPU. This is
#: ORT's documented remedy (onnxruntime.ai/docs/performance/model-optimizations/
#: quantization.html, "When to use reduce-range and per-channel quantization?": reduce-range
#: quantises weights to 7 bits for U8S8 on AVX2/AVX512 non-VNNI machines to mitigate
#: saturation). The cost is one bit of weight precision, which QAT trains for.
WEIGHT_REDUCE_RANGE = True


def _weight_qmax(reduce_range: bool) -> int:
    # ORT: symmetric int8 → [-127, 127]; reduce_range int8 → [-64, 64]
    # (ONNX_INT_TYPE_SYMMETRIC_RANGE / ONNX_INT_TYPE_REDUCED_RANGE in quant_utils.py).
    return 64 if reduce_range else 127


#: Largest |q| of a deployed int8 weight (64 with :data:`WEIGHT_REDUCE_RANGE`).
WEIGHT_QMAX = _weight_qmax(WEIGHT_REDUCE_RANGE)


def ort_weight_scale(
    weight: Tensor, per_channel: bool = True, reduce_range: bool = WEIGHT_REDUCE_RANGE
) -> Tensor:
    """The float32 scale(s) ORT's ``quantize_dynamic`` gives a 2-D weight ``(out, in)``.

    Returns ``(out,)`` per channel, else a 0-d tensor. ``float32(float64(absmax) / qmax)``,
    1 where that is below float32's smallest normal number (ORT's ``compute_scale_zp``).
    """
    w = weight.detach().float()
    absmax = w.abs().amax(dim=tuple(range(1, w.dim()))) if per_channel else w.abs().amax()
    scale64 = absmax.double() / _weight_qmax(reduce_range)
    return torch.where(scale64 < _F32_TINY, torch.ones_like(scale64), scale64).float()


class WeightFakeQuant(nn.Module):
    """Parametrization: symmetric int8 fake quantisation of a weight ``(out, in)``.

    For ``torch.nn.utils.parametrize.register_parametrization``. Per output channel (one
    scale per row, ORT's ``per_channel=True``) or per tensor. Gradients pass straight
    through to the latent float weight.

    Buffers (not saved in the state dict): ``calls`` (how often it quantised),
    ``scale`` — the last scales ``(out,)`` (or ``(1,)`` per tensor).

    Args:
        channels: output channels (rows) of the weight.
        per_channel: one scale per row (else one per tensor).
        reduce_range: ORT's 7-bit weights (range ``[-64, 64]``, the default, see
            :data:`WEIGHT_REDUCE_RANGE`); False: full int8 ``[-127, 127]``.
    """

    def __init__(self, channels: int, per_channel: bool = True,
                 reduce_range: bool = WEIGHT_REDUCE_RANGE) -> None:
        super().__init__()
        self.enabled = True
        self.per_channel = per_channel
        self.reduce_range = reduce_range
        self.qmax = _weight_qmax(reduce_range)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("scale", torch.zeros(channels if per_channel else 1), persistent=False)

    def quantize(self, weight: Tensor) -> Tensor:
        """Fake-quantised ``weight`` (same dtype), regardless of ``enabled``; records nothing."""
        return self._quantize(weight)[0]

    def _quantize(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        w = weight.float()
        scale = ort_weight_scale(w, self.per_channel, self.reduce_range)
        if self.per_channel:
            zero = torch.zeros(scale.shape, dtype=torch.int32, device=w.device)
            q = torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -self.qmax, self.qmax)
        else:
            zero = torch.zeros((), dtype=torch.int32, device=w.device)
            q = torch.fake_quantize_per_tensor_affine(w, scale, zero, -self.qmax, self.qmax)
        return q.to(weight.dtype), scale

    def forward(self, weight: Tensor) -> Tensor:
        if not self.enabled:
            return weight
        q, scale = self._quantize(weight)
        with torch.no_grad():
            self.calls += 1
            self.scale.copy_(scale.reshape(self.scale.shape))
        return q

    def extra_repr(self) -> str:
        return (f"channels={self.scale.numel()}, per_channel={self.per_channel}, "
                f"qrange=[-{self.qmax}, {self.qmax}], enabled={self.enabled}")


class DynamicActivationFakeQuant(nn.Module):
    """uint8 fake quantisation of an activation with its own run-time range.

    Mirrors ``DynamicQuantizeLinear``: range ``[min(x, 0), max(x, 0)]`` of the current
    input, ``scale = range / 255`` (1 for an all-zero input), zero point rounded half to
    even, values rounded half to even and saturated to ``[0, 255]``. Per tensor, or with
    ``per_sample=True`` one range per index of dim 0 (what a deployment sees when it runs
    one utterance at a time). Straight-through gradient; the range itself gets none.

    Buffers (not saved): ``calls``, and the last ``scale`` / ``zero_point`` (0-d per
    tensor, ``(B,)`` per sample).
    """

    def __init__(self, per_sample: bool = False) -> None:
        super().__init__()
        self.enabled = True
        self.per_sample = per_sample
        self.register_buffer("calls", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("scale", torch.zeros(()), persistent=False)
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled or not x.is_floating_point() or x.numel() == 0:
            return x
        xf = x.float()
        per_sample = self.per_sample and x.dim() >= 2
        with torch.no_grad():
            flat = xf.detach().reshape(x.size(0), -1) if per_sample else xf.detach().reshape(1, -1)
            lo, hi = torch.aminmax(flat, dim=1)
            lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
            scale = torch.where(hi == lo, torch.ones_like(hi), (hi - lo) / 255.0)
            zero = torch.round((-lo / scale).clamp(0.0, 255.0)).to(torch.int32)
        if per_sample:
            y = torch.fake_quantize_per_channel_affine(xf, scale, zero, 0, 0, 255)
        else:
            scale, zero = scale[0], zero[0]
            y = torch.fake_quantize_per_tensor_affine(xf, scale, zero, 0, 255)
        with torch.no_grad():
            self.calls += 1
            self.scale = scale.clone()
            self.zero_point = zero.clone()
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"uint8, per_sample={self.per_sample}, enabled={self.enabled}"


# --------------------------------------------------------------------------- MHA support


class _IdentityProjection:
    """Stands in for ``MultiheadAttention.out_proj`` (identity weight, zero bias)."""

    def __init__(self, dim: int, like: Tensor) -> None:
        self.weight = torch.eye(dim, dtype=like.dtype, device=like.device)
        self.bias = torch.zeros(dim, dtype=like.dtype, device=like.device)


def _latent(module: nn.Module, name: str) -> Tensor:
    """The stored tensor behind ``module.<name>`` without running a parametrization."""
    if parametrize.is_parametrized(module, name):
        return module.parametrizations[name].original
    return getattr(module, name)


def _mha_qat_forward(
    self: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor,
    *args: Any, **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """``MultiheadAttention.forward`` with fake-quantised inputs and a hooked ``out_proj``."""
    fq_q, fq_k, fq_v = (getattr(self, n) for n in _ACT_MHA)
    if not fq_q.enabled:
        return nn.MultiheadAttention.forward(self, query, key, value, *args, **kwargs)
    # One quantiser per distinct tensor, and identities kept, so self-attention stays one
    # packed projection (and may take the fast path) exactly as in the float module.
    q = fq_q(query)
    k = q if key is query else fq_k(key)
    v = q if value is query else k if value is key else fq_v(value)
    real = self._modules["out_proj"]
    assert real is not None
    stand_in = _IdentityProjection(self.embed_dim, _latent(real, "weight"))
    with parametrize.cached():  # in_proj_weight is read several times per call
        self._modules["out_proj"] = stand_in  # type: ignore[assignment]
        try:
            attn, weights = nn.MultiheadAttention.forward(self, q, k, v, *args, **kwargs)
        finally:
            self._modules["out_proj"] = real
    return real(attn), weights


def _mha_weight_names(mha: nn.MultiheadAttention) -> list[str]:
    if mha._qkv_same_embed_dim:
        return ["in_proj_weight"]
    return ["q_proj_weight", "k_proj_weight", "v_proj_weight"]


def _linear_pre_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    # Looks its quantiser up on the module (not in a closure) so deep copies stay correct.
    fq = module._modules.get(_ACT_LINEAR)
    if fq is None or not args:
        return None
    return (fq(args[0]), *args[1:])


# --------------------------------------------------------------------------- handle


@dataclass
class QATHandle:
    """What :func:`prepare_qat` did, and the switches to drive or undo it.

    Attributes:
        model: the prepared model.
        modules: qualified names of the quantised modules (``nn.Linear`` and
            ``nn.MultiheadAttention``), in ``named_modules`` order.
        weight_quantizers: ``"<module>.<weight name>"`` → its :class:`WeightFakeQuant`.
        activation_quantizers: ``"<module>.<input>"`` (``input`` for a Linear; ``query``,
            ``key``, ``value`` for attention) → its :class:`DynamicActivationFakeQuant`.
    """

    model: nn.Module
    modules: list[str] = field(default_factory=list)
    weight_quantizers: dict[str, WeightFakeQuant] = field(default_factory=dict)
    activation_quantizers: dict[str, DynamicActivationFakeQuant] = field(default_factory=dict)
    _hooks: list[RemovableHandle] = field(default_factory=list, repr=False)
    _patched_mha: list[nn.MultiheadAttention] = field(default_factory=list, repr=False)
    _stripped: bool = field(default=False, repr=False)

    def observers(self) -> Iterator[tuple[str, nn.Module]]:
        """``(name, quantiser)`` for every weight then every activation quantiser."""
        yield from self.weight_quantizers.items()
        yield from self.activation_quantizers.items()

    def enable(self, on: bool = True) -> None:
        """Switch all fake quantisation on or off (off: the model computes in float, exactly)."""
        for _, fq in self.observers():
            fq.enabled = on

    @property
    def enabled(self) -> bool:
        return any(fq.enabled for _, fq in self.observers())

    def reset_stats(self) -> None:
        """Zero the call counters."""
        for _, fq in self.observers():
            fq.calls.zero_()

    def stats(self) -> dict[str, Any]:
        """Summary: counts of quantisers and fake-quant calls, weight-scale range."""
        w_scales = [fq.scale for fq in self.weight_quantizers.values() if int(fq.calls) > 0]
        return {
            "enabled": self.enabled,
            "modules": len(self.modules),
            "weight_quantizers": len(self.weight_quantizers),
            "activation_quantizers": len(self.activation_quantizers),
            "weight_calls": sum(int(fq.calls) for fq in self.weight_quantizers.values()),
            "activation_calls": sum(int(fq.calls) for fq in self.activation_quantizers.values()),
            "weight_quantizers_used": len(w_scales),
            "activation_quantizers_used": sum(
                int(fq.calls) > 0 for fq in self.activation_quantizers.values()),
            "min_weight_scale": min((float(s.min()) for s in w_scales), default=float("nan")),
            "max_weight_scale": max((float(s.max()) for s in w_scales), default=float("nan")),
        }

    def strip(self, bake: bool = True) -> nn.Module:
        """Remove every parametrization, hook and quantiser; return the plain model.

        Args:
            bake: leave each weight at its fake-quantised value (on the int8 grid, so ORT's
                ``quantize_dynamic`` with the same scheme reproduces it exactly); else
                restore the latent float weights. Parameter objects are kept either way.
        """
        if self._stripped:
            return self.model
        for hook in self._hooks:
            hook.remove()
        for mha in self._patched_mha:
            del mha.forward  # the instance attribute; the class's forward shows again
        modules = dict(self.model.named_modules())
        for key, fq in self.weight_quantizers.items():
            owner, _, tensor_name = key.rpartition(".")
            fq.enabled = True  # baking must quantise even if QAT was switched off
            parametrize.remove_parametrizations(
                modules[owner], tensor_name, leave_parametrized=bake)
        for name in self.modules:
            module = modules[name]
            for child in (_ACT_LINEAR, *_ACT_MHA):
                if child in module._modules:
                    delattr(module, child)
        self._stripped = True
        return self.model


# --------------------------------------------------------------------------- prepare


def prepare_qat(
    model: nn.Module,
    skip: Callable[[str, nn.Module], bool] | None = None,
    *,
    per_channel: bool = True,
    reduce_range: bool = WEIGHT_REDUCE_RANGE,
    per_sample_activations: bool = False,
) -> QATHandle:
    """Insert ORT-style fake quantisation into every ``nn.Linear`` and ``nn.MultiheadAttention``.

    In place; call it after loading float weights and before building the optimizer (or
    keep the optimizer: the Parameter objects do not change). Observer counters start at 0.

    Args:
        model: the float model.
        skip: ``skip(name, module)`` True leaves that module float. Skipping an attention
            module also leaves its ``out_proj`` float (the two are one unit).
        per_channel: weights per output channel, as ``quantize_dynamic(per_channel=True)``.
        reduce_range: 7-bit weights, as ``quantize_dynamic(reduce_range=True)`` (default
            :data:`WEIGHT_REDUCE_RANGE`, what :func:`model.nn.export.quantize_bundle` uses).
        per_sample_activations: one activation range per batch item (deployment on one
            utterance at a time) instead of one per batch tensor.

    Raises:
        ValueError: the model is already prepared.
    """
    handle = QATHandle(model)
    named = list(model.named_modules())
    skipped_out_proj: set[int] = set()
    for name, module in named:
        if isinstance(module, nn.MultiheadAttention) and skip is not None and skip(name, module):
            skipped_out_proj.add(id(module.out_proj))

    def add_weight(name: str, module: nn.Module, tensor_name: str) -> None:
        if parametrize.is_parametrized(module, tensor_name) and any(
            isinstance(p, WeightFakeQuant) for p in module.parametrizations[tensor_name]
        ):
            raise ValueError(f"{name}.{tensor_name} is already prepared for QAT")
        weight = getattr(module, tensor_name)
        if weight is None or weight.dim() != 2:
            raise ValueError(f"{name}.{tensor_name}: expected a 2-D weight")
        fq = WeightFakeQuant(weight.size(0), per_channel, reduce_range).to(weight.device)
        parametrize.register_parametrization(module, tensor_name, fq)
        handle.weight_quantizers[f"{name}.{tensor_name}" if name else tensor_name] = fq

    def add_act(name: str, module: nn.Module, child: str, label: str) -> DynamicActivationFakeQuant:
        fq = DynamicActivationFakeQuant(per_sample_activations)
        module.add_module(child, fq)
        handle.activation_quantizers[f"{name}.{label}" if name else label] = fq
        return fq

    for name, module in named:
        if isinstance(module, nn.MultiheadAttention):
            if id(module.out_proj) in skipped_out_proj:
                continue
            for tensor_name in _mha_weight_names(module):
                add_weight(name, module, tensor_name)
            for child, label in zip(_ACT_MHA, ("query", "key", "value"), strict=True):
                add_act(name, module, child, label)
            # A bound method (not a closure), so deep copies call their own module.
            patched = types.MethodType(_mha_qat_forward, module)
            module.forward = patched  # type: ignore[method-assign]
            handle._patched_mha.append(module)
            handle.modules.append(name)
        elif isinstance(module, nn.Linear):
            if id(module) in skipped_out_proj or (skip is not None and skip(name, module)):
                continue
            add_weight(name, module, "weight")
            add_act(name, module, _ACT_LINEAR, "input")
            handle._hooks.append(module.register_forward_pre_hook(_linear_pre_hook))
            handle.modules.append(name)
    handle.reset_stats()  # registration evaluates each parametrization once
    return handle


# --------------------------------------------------------------------------- helpers


def quantized_weight_names(model: nn.Module) -> list[str]:
    """``"<module>.<weight>"`` of every weight :func:`prepare_qat` would quantise."""
    names = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.MultiheadAttention):
            names += [prefix + t for t in _mha_weight_names(module)]
        elif isinstance(module, nn.Linear):
            names.append(prefix + "weight")
    return names


def int8_weight_grid_error(
    model: nn.Module,
    names: Iterable[str] | None = None,
    per_channel: bool = True,
    reduce_range: bool = WEIGHT_REDUCE_RANGE,
) -> float:
    """Largest distance of a weight to ORT's int8 grid, in quantisation steps (LSB).

    Each weight (the value the module uses, i.e. fake-quantised while prepared) is divided
    by the scale ORT would give it and compared with the nearest integer: 0 means ORT's
    ``quantize_dynamic`` reproduces it exactly; arbitrary float weights give up to 0.5.

    Args:
        model: prepared or plain model.
        names: ``"<module>.<weight>"`` to check (default :func:`quantized_weight_names`).
        per_channel, reduce_range: the scheme, as in :func:`prepare_qat`.
    """
    modules = dict(model.named_modules())
    worst = 0.0
    with torch.no_grad():
        for key in quantized_weight_names(model) if names is None else names:
            owner, _, tensor_name = key.rpartition(".")
            w = getattr(modules[owner], tensor_name).float()
            scale = ort_weight_scale(w, per_channel, reduce_range)
            ratio = w / (scale[:, None] if per_channel else scale)
            worst = max(worst, float((ratio - torch.round(ratio)).abs().max()))
    return worst


_ORIGINAL = re.compile(r"^(.*?)parametrizations\.([^.]+)\.original$")


def plain_state_dict(model: nn.Module, quantized: bool = False) -> dict[str, Tensor]:
    """The state dict with parametrized weights under their plain names.

    ``…parametrizations.weight.original`` becomes ``…weight``, so the result loads into an
    unprepared model of the same architecture.

    Args:
        quantized: the weights' fake-quantised values (what ``strip(bake=True)`` would leave,
            even if QAT is switched off) instead of the latent float weights.
    """
    modules = dict(model.named_modules())
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        match = _ORIGINAL.match(key)
        if match is None:
            out[key] = value
            continue
        prefix, tensor_name = match.groups()
        if quantized:
            owner = modules[prefix[:-1]] if prefix else model
            with torch.no_grad():
                for p in owner.parametrizations[tensor_name]:
                    value = p.quantize(value) if isinstance(p, WeightFakeQuant) else p(value)
            value = value.detach()
        out[prefix + tensor_name] = value
    return out


def load_plain_state_dict(
    model: nn.Module, state_dict: dict[str, Tensor], strict: bool = True
) -> Any:
    """Load a plain (unprepared) state dict into a model, prepared or not.

    Keys of parametrized tensors are renamed to ``…parametrizations.<name>.original``;
    returns ``load_state_dict``'s result.
    """
    renamed = dict(state_dict)
    for name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        prefix = f"{name}." if name else ""
        for tensor_name in module.parametrizations:
            if prefix + tensor_name in renamed:
                renamed[f"{prefix}parametrizations.{tensor_name}.original"] = renamed.pop(
                    prefix + tensor_name)
    return model.load_state_dict(renamed, strict=strict)
