"""Export a model package to a self-contained ONNX *deploy bundle*, and int8-quantise it.

::

    bundle/
      encoder.onnx   feats (B, T, F) float32, lengths (B,) int64
                       → encoder (B, T', D), encoder_lengths (B,) int64,
                         ctc_logits (B, k·T', C), intent_logits (B, I)
      decoder.onnx   (models with a parse decoder only) tokens (B, U) int64,
                     encoder (B, T', D), encoder_lengths (B,) int64
                       → logits (B, P) of the last position only
      config.json    what ``save_package`` writes (model and feature config incl. global
                     statistics, vocabularies, clarify threshold, intent temperature,
                     metadata) plus an
                     ``"onnx"`` section naming the graphs and whether they are int8

B, T, T' and U are dynamic. Greedy parse decoding re-runs ``decoder.onnx`` with a growing
prefix (no key/value cache: parses are ~10 tokens, the decoder is one or two layers).

The encoder graph comes from the tracing exporter (``torch.onnx.export(...,
dynamo=False)``): for the released student it writes the same numbers as the
torch.export-based exporter (``dynamo=True``) in 1.5 s instead of 27.5 s (one core; 0.6
s against 13 s for a tiny test encoder), and the int8 graph runs as fast (3.4 vs 3.6 ms
per 3-s utterance) at 5 % more bytes (graph-structure nodes) — every export (the
training stages, the retraining flow, a dozen test fixtures) paid those seconds. Tracing
freezes Python-level values at the example's shapes, so :func:`export_onnx` verifies the
bundle against eager torch at the example's shape *and* at other lengths and batch
sizes. The parse decoder's graph still comes from torch.export: traced,
``nn.MultiheadAttention``'s cross-attention kept the example's encoder length and batch
in its reshapes (the second-length check caught it).
The encoder graph skips the eager encoder's data-dependent "utterance too short" check
(it cannot be traced); callers check lengths first
(:func:`model.nn.network.min_input_frames`). Padding invariance survives export: padded
frames are masked exactly as in eager mode (tested).

:func:`quantize_bundle` applies ONNX Runtime dynamic quantisation: int8 weights (per output
channel, on ORT's 7-bit ``reduce_range`` grid — :data:`model.nn.qat.WEIGHT_REDUCE_RANGE`
explains why: without it, x86 CPUs lacking VNNI saturate the u8×s8 products), uint8
activations quantised on the fly. Each activation tensor gets one scale,
computed over the whole padded batch, so in an int8 bundle an utterance's numbers depend
slightly on its batch-mates (exact padding invariance holds for fp32 only; batch size 1
gives the utterance-alone result).
"""

from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from model.frontend.features import FeatureConfig
from model.nn.network import (
    EncoderConfig,
    JointModel,
    ModelConfig,
    lengths_to_padding_mask,
    min_input_frames,
    sinusoids,
)
from model.nn.package import LM_DIRNAME, ModelPackage, copy_lm_folder, has_lm, save_package
from model.nn.qat import WEIGHT_REDUCE_RANGE
from model.nn.tokens import CTCVocab, ParseVocab, ctc_vocab_from_json

__all__ = [
    "BUNDLE_FORMAT",
    "DEFAULT_INT8_OP_TYPES",
    "BundleConfig",
    "DeployBundle",
    "ExportMismatchError",
    "check_bundle",
    "export_onnx",
    "is_bundle",
    "load_bundle_config",
    "make_session",
    "open_bundle",
    "quantize_bundle",
]

BUNDLE_FORMAT = "voiceloop-onnx-v1"
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
CONFIG_FILE = "config.json"
OPSET = 20

ENCODER_INPUTS = ("feats", "lengths")
ENCODER_OUTPUTS = ("encoder", "encoder_lengths", "ctc_logits", "intent_logits")
DECODER_INPUTS = ("tokens", "encoder", "encoder_lengths")
DECODER_OUTPUTS = ("logits",)

# Which ops to quantise, chosen by measurement (benchmarks/quant_backends.py: student shape,
# d_model 96, 4 layers, ×8 subsampling, 3-s utterance, 1 thread, Xeon with AVX512-VNNI/AMX,
# onnxruntime 1.32, a training job sharing the 2 cores; p50, 200 runs):
#                          encoder+heads   + 12 decoder steps   bundle
#   fp32                   1.48 ms         3.84 ms              6.0 MB
#   int8 MatMul+Gemm       1.24 ms         2.98 ms              2.3 MB
#   int8 + Conv            3.44 ms         5.17 ms              2.3 MB
# Quantising convolutions makes the encoder ~2.8× slower: ConvInteger has no fast depthwise
# kernel and adds a DynamicQuantizeLinear + dequantise around every small conv, and it saves
# only ~60 kB (the front end and depthwise convs are tiny). So convolutions stay fp32;
# every matmul-shaped layer (attention, feed-forward, pointwise, heads) is int8 — which is
# also exactly what model.nn.qat fake-quantises during training.
DEFAULT_INT8_OP_TYPES: tuple[str, ...] = ("MatMul", "Gemm")


class ExportMismatchError(RuntimeError):
    """The exported graphs disagree with the eager model beyond tolerance."""


@dataclass(frozen=True)
class DeployBundle:
    """An exported bundle folder.

    Attributes:
        folder: the bundle folder.
        encoder, decoder, config: paths of ``encoder.onnx``, ``decoder.onnx`` (None for a
            model without a parse decoder), ``config.json``.
        quantized: the graphs carry int8 weights.
    """

    folder: Path
    encoder: Path
    decoder: Path | None
    config: Path
    quantized: bool

    def size_bytes(self) -> int:
        """On-disk size of the two graphs (including any external weight files)."""
        return sum(p.stat().st_size for p in self.folder.iterdir() if p.is_file()
                   and p.name != CONFIG_FILE)


@dataclass(frozen=True)
class BundleConfig:
    """``config.json`` of a bundle, parsed.

    Attributes:
        model: the network's configuration (sizes, vocab sizes, ``max_parse_len``).
        features: feature settings (incl. global mean/std when used).
        parse_vocab, ctc_vocab: vocabularies.
        clarify_threshold: confidences below it set ``clarify``.
        intent_temperature: confidences are ``softmax(intent_logits / intent_temperature)``.
        metadata: free-form (``version``, ``role``, …).
        onnx: the ``"onnx"`` section (file names, ``int8``, op types, opset).
    """

    model: ModelConfig
    features: FeatureConfig
    parse_vocab: ParseVocab
    ctc_vocab: CTCVocab
    clarify_threshold: float
    metadata: dict[str, Any] = field(default_factory=dict)
    onnx: dict[str, Any] = field(default_factory=dict)
    intent_temperature: float = 1.0

    @property
    def version(self) -> str:
        return str(self.metadata.get("version", "unversioned"))


def is_bundle(folder: Path) -> bool:
    """Whether ``folder`` looks like a deploy bundle (has ``encoder.onnx`` and ``config.json``)."""
    return (folder / ENCODER_FILE).is_file() and (folder / CONFIG_FILE).is_file()


def _read_config(folder: Path) -> dict[str, Any]:
    if not is_bundle(folder):
        raise ValueError(
            f"{folder} is not a deploy bundle: expected {ENCODER_FILE}, {DECODER_FILE} and "
            f"{CONFIG_FILE} (written by model.nn.export.export_onnx)"
        )
    config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    onnx_section = config.get("onnx")
    if not isinstance(onnx_section, dict) or onnx_section.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"{folder / CONFIG_FILE}: no {BUNDLE_FORMAT!r} onnx section")
    return config


def load_bundle_config(folder: Path) -> BundleConfig:
    """Parse ``folder/config.json``.

    Raises:
        ValueError: the folder is not a deploy bundle of this format.
    """
    config = _read_config(folder)
    model_cfg = dict(config["model"])
    model_cfg["encoder"] = EncoderConfig(**model_cfg["encoder"])
    return BundleConfig(
        model=ModelConfig(**model_cfg),
        features=FeatureConfig(**config["features"]),
        parse_vocab=ParseVocab.from_json(config["parse_vocab"]),
        ctc_vocab=ctc_vocab_from_json(config.get("ctc_vocab")),
        clarify_threshold=float(config.get("clarify_threshold", 0.0)),
        metadata=dict(config.get("metadata", {})),
        onnx=dict(config["onnx"]),
        intent_temperature=float(config.get("intent_temperature", 1.0)),
    )


def open_bundle(folder: Path) -> DeployBundle:
    """The :class:`DeployBundle` of an existing folder (validated like :func:`load_bundle_config`)."""
    section = _read_config(folder)["onnx"]
    return DeployBundle(
        folder=folder,
        encoder=folder / section.get("encoder", ENCODER_FILE),
        decoder=folder / section["decoder"] if section.get("decoder") else None,
        config=folder / CONFIG_FILE,
        quantized=bool(section.get("int8", False)),
    )


# --------------------------------------------------------------------------- export


class _EncoderGraph(nn.Module):
    """Encoder + CTC + intent heads as one traceable module.

    Mirrors :meth:`model.nn.network.ConformerEncoder.forward` minus its data-dependent
    length check (``bool(tensor)`` cannot be exported); equality with the eager model is
    checked by :func:`check_bundle`.
    """

    def __init__(self, model: JointModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, feats: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        encoder = self.model.encoder
        x, enc_lengths = encoder.subsampling(feats, lengths)  # (B, T', D), (B,)
        if encoder.cfg.pos_enc:
            x = x + sinusoids(x.size(1), x.size(2)).to(x.dtype)
        pad = lengths_to_padding_mask(enc_lengths, x.size(1))  # (B, T')
        x = x.masked_fill(pad[..., None], 0.0)
        for block in encoder.blocks:
            x = block(x, pad)
        enc = x.masked_fill(pad[..., None], 0.0)
        ctc_logits, _ = self.model.ctc(enc, enc_lengths)  # (B, k·T', C)
        return enc, enc_lengths, ctc_logits, self.model.intent_head(enc, pad)


class _DecoderGraph(nn.Module):
    """One parse-decoder step: the logits ``(B, P)`` of the last of ``U`` positions."""

    def __init__(self, model: JointModel) -> None:
        super().__init__()
        self.decoder = model.parse_decoder

    def forward(self, tokens: Tensor, encoder: Tensor, encoder_lengths: Tensor) -> Tensor:
        pad = lengths_to_padding_mask(encoder_lengths, encoder.size(1))
        return self.decoder(tokens, encoder, pad)[:, -1]


def _example_inputs(cfg: ModelConfig) -> tuple[Tensor, Tensor]:
    """A padded batch of two: ``(2, T, F)`` features and lengths ``[T, ~0.6 T]``."""
    frames = max(120, 4 * min_input_frames(cfg.encoder.subsampling))
    generator = torch.Generator().manual_seed(0)
    feats = torch.randn(2, frames, cfg.encoder.n_mels, generator=generator)
    lengths = torch.tensor([frames, frames * 3 // 5])
    feats[1, int(lengths[1]):] = 0.0
    return feats, lengths


def _trace(module: nn.Module, args: tuple[Tensor, ...], path: Path,
           input_names: Sequence[str], output_names: Sequence[str],
           dynamic_axes: dict[str, dict[int, str]]) -> None:
    """``module`` on ``args`` as one ONNX file, by the tracing exporter; ``dynamic_axes``
    names the axes (per input and output) that may differ from the example's."""
    with warnings.catch_warnings():
        # The tracing exporter is deprecated in favour of dynamo=True (20x slower here,
        # see the module docstring); torch 2.11 is pinned, and its tracer warnings are
        # about Python values frozen at the example's shapes, which verify=True checks.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", UserWarning)
        torch.onnx.export(
            module.eval(), args, str(path), dynamo=False, opset_version=OPSET,
            input_names=list(input_names), output_names=list(output_names),
            dynamic_axes=dynamic_axes, do_constant_folding=True, verbose=False,
        )
    _strip_node_metadata(path)


def _torch_export(module: nn.Module, args: tuple[Tensor, ...], path: Path,
                  input_names: Sequence[str], output_names: Sequence[str],
                  dynamic_shapes: dict[str, dict[int, Any]]) -> None:
    """``module`` on ``args`` as one ONNX file, through torch.export (``dynamo=True``:
    slower, but no shape is frozen); weights inside the file (one graph, one file)."""
    torch.onnx.export(
        module.eval(), args, str(path), dynamo=True, opset_version=OPSET,
        input_names=list(input_names), output_names=list(output_names),
        dynamic_shapes=dynamic_shapes, external_data=False, optimize=True, verbose=False,
    )
    _strip_node_metadata(path)


def _strip_node_metadata(path: Path) -> None:
    """Drop the exporter's per-node debugging metadata (source stack traces, FX names):
    ~9 % of a student graph's bytes, never read at inference."""
    import onnx

    graph = onnx.load(str(path))
    for node in graph.graph.node:
        del node.metadata_props[:]
    onnx.save(graph, str(path))


def _package_config(package: ModelPackage) -> dict[str, Any]:
    """Exactly the ``config.json`` that :func:`model.nn.package.save_package` writes."""
    with tempfile.TemporaryDirectory() as tmp:
        save_package(package, Path(tmp))
        return json.loads((Path(tmp) / CONFIG_FILE).read_text(encoding="utf-8"))


def _write_config(folder: Path, config: dict[str, Any]) -> Path:
    path = folder / CONFIG_FILE
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path


def export_onnx(package: ModelPackage, out_dir: Path, verify: bool = True,
                atol: float = 1e-4) -> DeployBundle:
    """Write ``package`` as an fp32 deploy bundle into ``out_dir`` (created).

    Args:
        package: the model package (the model is put in eval mode).
        out_dir: bundle folder.
        verify: run ONNX Runtime on a padded example batch and compare with eager torch.
        atol: largest absolute difference tolerated by ``verify``.

    Raises:
        ExportMismatchError: ``verify`` found outputs differing by more than ``atol``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    model = package.model.eval()
    cfg = model.cfg
    feats, lengths = _example_inputs(cfg)
    with torch.no_grad():
        _trace(_EncoderGraph(model), (feats, lengths), out_dir / ENCODER_FILE,
               ENCODER_INPUTS, ENCODER_OUTPUTS,
               {"feats": {0: "batch", 1: "frames"}, "lengths": {0: "batch"},
                "encoder": {0: "batch", 1: "encoder_frames"}, "encoder_lengths": {0: "batch"},
                "ctc_logits": {0: "batch", 1: "ctc_frames"}, "intent_logits": {0: "batch"}})
        if model.parse_decoder is not None:
            enc, enc_lengths, _ = model.encode(feats, lengths)
            example_tokens = torch.tensor([[ParseVocab.BOS, 4, 5], [ParseVocab.BOS, 6, 7]])
            batch = torch.export.Dim("batch", min=1, max=4096)
            enc_frames = torch.export.Dim("encoder_frames", min=1)
            tokens = torch.export.Dim("tokens", min=1, max=cfg.max_parse_len + 1)
            _torch_export(_DecoderGraph(model), (example_tokens, enc, enc_lengths),
                          out_dir / DECODER_FILE, DECODER_INPUTS, DECODER_OUTPUTS,
                          {"tokens": {0: batch, 1: tokens}, "encoder": {0: batch, 1: enc_frames},
                           "encoder_lengths": {0: batch}})
    config = _package_config(package)
    config["onnx"] = {
        "format": BUNDLE_FORMAT, "encoder": ENCODER_FILE,
        "decoder": DECODER_FILE if model.parse_decoder is not None else None,
        "int8": False, "opset": OPSET, "exporter": f"torch {torch.__version__}: encoder traced, decoder torch.export",
        "encoder_inputs": list(ENCODER_INPUTS), "encoder_outputs": list(ENCODER_OUTPUTS),
        "decoder_inputs": list(DECODER_INPUTS), "decoder_outputs": list(DECODER_OUTPUTS),
    }
    _write_config(out_dir, config)
    if package.lm_dir is not None:
        copy_lm_folder(package.lm_dir, out_dir)
    bundle = open_bundle(out_dir)
    if verify:
        check_bundle(bundle, model, atol=atol)
        # Other lengths and batch sizes than the traced example's (the service runs
        # batches of 1 to serving.max_batch): a shape frozen into the graph by tracing
        # shows up here as a mismatch or an ORT error.
        frames = int(feats.size(1)) * 3 // 2 + 7
        check_bundle(bundle, model, atol=atol, frames=frames, batch=3)
        check_bundle(bundle, model, atol=atol, frames=frames // 2 + 3, batch=1)
    return bundle


def make_session(path: Path, threads: int = 1) -> Any:
    """An ONNX Runtime CPU session: ``threads`` intra-op threads, one inter-op thread,
    every graph optimisation (fusions included)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_bundle(bundle: DeployBundle, model: JointModel, atol: float = 1e-4,
                 frames: int | None = None, batch: int = 2) -> dict[str, float]:
    """Compare ONNX Runtime with eager torch on a padded batch of utterances: the export
    example (two), or ``batch`` random ones of ``frames`` frames and shorter (lengths
    spread down to about half).

    Returns the largest absolute difference per output (``encoder`` compared on valid
    frames, ``ctc_logits`` on valid CTC frames, ``decoder`` on a 3-token prefix).

    Raises:
        ExportMismatchError: a difference above ``atol``.
    """
    feats, lengths = _example_inputs(model.cfg)
    if frames is not None:
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        shortest = max(min_input_frames(model.cfg.encoder.subsampling), frames // 2)
        lengths = torch.linspace(frames, shortest, batch).round().long()
        feats = torch.randn(batch, frames, model.cfg.encoder.n_mels)
        for i, n in enumerate(lengths.tolist()):
            feats[i, n:] = 0.0
    encoder = make_session(bundle.encoder)
    enc_o, len_o, ctc_o, intent_o = encoder.run(
        list(ENCODER_OUTPUTS), {"feats": feats.numpy(), "lengths": lengths.numpy()})
    tokens = torch.tensor([[ParseVocab.BOS, 4 + i % 2 * 2, 5 + i % 2 * 2]
                           for i in range(feats.size(0))])
    with torch.no_grad():
        enc, enc_lengths, pad = model.encode(feats, lengths)
        ctc, ctc_lengths = model.ctc(enc, enc_lengths)
        intent = model.intent_head(enc, pad)
    if not np.array_equal(len_o, enc_lengths.numpy()):
        raise ExportMismatchError(f"encoder lengths {len_o} != {enc_lengths.tolist()}")
    valid = ~pad.numpy()
    ctc_valid = ~lengths_to_padding_mask(ctc_lengths, ctc.size(1)).numpy()
    diffs = {
        "encoder": float(np.abs(enc_o - enc.numpy())[valid].max()),
        "ctc_logits": float(np.abs(ctc_o - ctc.numpy())[ctc_valid].max()),
        "intent_logits": float(np.abs(intent_o - intent.numpy()).max()),
    }
    if bundle.decoder is not None and model.parse_decoder is not None:
        (logits_o,) = make_session(bundle.decoder).run(list(DECODER_OUTPUTS), {
            "tokens": tokens.numpy(), "encoder": enc_o, "encoder_lengths": len_o})
        with torch.no_grad():
            logits = model.parse_decoder(tokens, enc, pad)[:, -1]
        diffs["decoder"] = float(np.abs(logits_o - logits.numpy()).max())
    worst = max(diffs, key=diffs.__getitem__)
    if diffs[worst] > atol:
        raise ExportMismatchError(f"ONNX {worst} differs from torch by {diffs[worst]:.2e} > {atol}")
    return diffs


# --------------------------------------------------------------------------- quantisation


def _quantize_graph(src: Path, dst: Path, op_types: Sequence[str], per_channel: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        # Pre-processing (shape inference + ORT's basic graph optimisation) folds the
        # Split of nn.MultiheadAttention's packed cross-attention weight into constants,
        # so those matmuls get int8 weights too.
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        quantize_dynamic(
            str(prepared), str(dst),
            op_types_to_quantize=list(op_types),
            per_channel=per_channel,
            # 7-bit weights, the grid model.nn.qat trains and bakes on: keeps the u8s8
            # kernel exact on AVX2 (vpmaddubsw saturates int16 with 8-bit weights).
            reduce_range=WEIGHT_REDUCE_RANGE,
            weight_type=QuantType.QInt8,  # activations: dynamic uint8 (u8s8)
            extra_options={"MatMulConstBOnly": True},  # weights only, not activation × activation
        )


def quantize_bundle(src: Path, dst: Path, per_channel: bool = True,
                    op_types: Sequence[str] = DEFAULT_INT8_OP_TYPES) -> DeployBundle:
    """Dynamic int8 quantisation of both graphs of bundle ``src`` into ``dst`` (created).

    Weights go on the same 7-bit grid (|q| <= 64) that :mod:`model.nn.qat` trains and bakes
    on (:data:`model.nn.qat.WEIGHT_REDUCE_RANGE`), so a baked QAT model is reproduced bit
    for bit and its int8 graph computes what QAT trained on any x86 CPU, VNNI or not.

    Args:
        src: an fp32 bundle folder.
        dst: output bundle folder (must differ from ``src``).
        per_channel: one weight scale per output channel (more accurate, same speed).
        op_types: ONNX op types whose constant weights become int8 (see
            :data:`DEFAULT_INT8_OP_TYPES` for why convolutions are left out).

    Raises:
        ValueError: ``src`` is not a bundle, is already int8, or equals ``dst``.
    """
    source = open_bundle(src)
    if source.quantized:
        raise ValueError(f"{src} is already quantised")
    if src.resolve() == dst.resolve():
        raise ValueError("quantize_bundle needs a destination other than its source")
    dst.mkdir(parents=True, exist_ok=True)
    _quantize_graph(source.encoder, dst / ENCODER_FILE, op_types, per_channel)
    if source.decoder is not None:
        _quantize_graph(source.decoder, dst / DECODER_FILE, op_types, per_channel)
    config = _read_config(src)
    config["onnx"].update({
        "encoder": ENCODER_FILE, "decoder": DECODER_FILE if source.decoder is not None else None,
        "int8": True,
        "quantization": {"method": "onnxruntime.quantize_dynamic", "weights": "int8",
                         "reduce_range": WEIGHT_REDUCE_RANGE,
                         "activations": "uint8 dynamic", "per_channel": per_channel,
                         "op_types": list(op_types)},
    })
    _write_config(dst, config)
    if has_lm(src):
        copy_lm_folder(src / LM_DIRNAME, dst)
    return open_bundle(dst)
