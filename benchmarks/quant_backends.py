"""Latency and size of the student under each CPU inference backend, one thread.

Backends, for the encoder + CTC + intent heads on one 3-s utterance (300 feature frames):

  (a) torch fp32 eager
  (b) torch.ao.quantization.quantize_dynamic on nn.Linear (int8 weights, eager)
  (c) torchao Int8DynamicActivationInt8WeightConfig via quantize_ (reported if it fails)
  (d) ONNX Runtime fp32 (the deploy bundle's encoder.onnx)
  (e) ONNX Runtime int8 dynamic, MatMul/Gemm only (the default of model.nn.export)
  (e') ONNX Runtime int8 dynamic, MatMul/Gemm + Conv (ConvInteger), to choose the default

plus the full greedy decode (encoder + ``--decode-steps`` parse-decoder steps with a growing
prefix, as the predictors run it) for torch fp32 and the ORT bundles, the on-disk size of
each, and the agreement of each backend's outputs with torch fp32 (CTC frame argmax,
intent logits).

The model is student-sized (d_model 96, 4 layers, ×8 subsampling, CTC ×4, 1-layer
decoder with FFN 384, 42 intents, ~2000 parse tokens, 30 CTC units), randomly
initialised unless ``--package`` names a trained model folder. Random weights give
representative speed; the agreement figures are only meaningful for a trained model.

    uv run python benchmarks/quant_backends.py [--package PATH] [--runs 100]

Prints a table and writes ``benchmarks/results/quant_backends.json``.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import platform
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from model.frontend.features import FeatureConfig
from model.nn.export import export_onnx, make_session, quantize_bundle
from model.nn.network import EncoderConfig, JointModel, ModelConfig
from model.nn.package import ModelPackage, load_package
from model.nn.tokens import ParseVocab

_OUT = Path(__file__).parent / "results" / "quant_backends.json"


def _student_package(seed: int = 0) -> ModelPackage:
    """A random-init student with the deployed shapes (see module docstring)."""
    vocab = ParseVocab(
        intents=tuple(f"Intent{i:02d}" for i in range(42)),
        slot_types=tuple(f"slot{i:02d}" for i in range(30)),
        words=tuple(f"w{i:04d}" for i in range(1924)),
    )  # 4 specials + 42 + 30 + 1924 = 2000 parse tokens
    cfg = ModelConfig(
        EncoderConfig(d_model=96, layers=4, heads=4, ffn_mult=4, conv_kernel=9, subsampling=8,
                      causal_conv=True, dropout=0.1),
        n_chars=30, n_intents=len(vocab.intents), n_parse_tokens=len(vocab),
        decoder_layers=1, decoder_heads=4, decoder_ffn=384, max_parse_len=48, ctc_upsample=4,
    )
    torch.manual_seed(seed)
    return ModelPackage(JointModel(cfg).eval(), FeatureConfig(), vocab, 0.5,
                        {"version": "bench-random"})


def _percentiles(times_s: list[float]) -> dict[str, float]:
    ms = np.asarray(times_s) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p95_ms": round(float(np.percentile(ms, 95)), 3),
            "mean_ms": round(float(ms.mean()), 3)}


def _time(fn: Callable[[], object], runs: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return _percentiles(times)


def _torch_heads(model: nn.Module, feats: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    with torch.inference_mode():
        enc, enc_lengths, pad = model.encode(feats, lengths)
        ctc, _ = model.ctc(enc, enc_lengths)
        return ctc, model.intent_head(enc, pad)


def _torch_decode(model: JointModel, feats: Tensor, lengths: Tensor, steps: int) -> Tensor:
    """Encoder, heads, then ``steps`` greedy decoder steps (no early stop at <eos>)."""
    with torch.inference_mode():
        enc, enc_lengths, pad = model.encode(feats, lengths)
        model.ctc(enc, enc_lengths)
        model.intent_head(enc, pad)
        tokens = torch.full((feats.size(0), 1), ParseVocab.BOS, dtype=torch.long)
        for _ in range(steps):
            best = model.parse_decoder(tokens, enc, pad)[:, -1].argmax(-1)
            tokens = torch.cat([tokens, best[:, None]], dim=1)
        return tokens


def _ort_decode(encoder: Any, decoder: Any, feats: np.ndarray, lengths: np.ndarray,
                steps: int) -> np.ndarray:
    enc, enc_lengths, _, _ = encoder.run(None, {"feats": feats, "lengths": lengths})
    tokens = np.full((feats.shape[0], 1), ParseVocab.BOS, dtype=np.int64)
    for _ in range(steps):
        (logits,) = decoder.run(["logits"], {"tokens": tokens, "encoder": enc,
                                              "encoder_lengths": enc_lengths})
        tokens = np.concatenate([tokens, logits.argmax(-1)[:, None]], axis=1)
    return tokens


def _state_bytes(model: nn.Module) -> int | None:
    buffer = io.BytesIO()
    try:
        torch.save(model.state_dict(), buffer)
    except Exception:  # noqa: BLE001 - tensor subclasses may not serialise; report, don't fail
        return None
    return buffer.tell()


def _agreement(ctc: np.ndarray, intent: np.ndarray, ref: tuple[np.ndarray, np.ndarray]
               ) -> dict[str, float]:
    return {"ctc_argmax_agreement": round(float((ctc.argmax(-1) == ref[0].argmax(-1)).mean()), 4),
            "intent_logits_max_abs_diff": round(float(np.abs(intent - ref[1]).max()), 4)}


def run(package: ModelPackage, runs: int, warmup: int, frames: int, steps: int,
        work: Path) -> dict[str, Any]:
    torch.set_num_threads(1)
    model = package.model.eval()
    generator = torch.Generator().manual_seed(1)
    feats = torch.randn(1, frames, model.cfg.encoder.n_mels, generator=generator)
    lengths = torch.tensor([frames])
    feats_np, lengths_np = feats.numpy(), lengths.numpy()
    ref_ctc, ref_intent = (t.numpy() for t in _torch_heads(model, feats, lengths))
    reference = (ref_ctc, ref_intent)
    rows: dict[str, dict[str, Any]] = {}

    # (a) torch fp32 eager
    rows["torch_fp32"] = {**_time(lambda: _torch_heads(model, feats, lengths), runs, warmup),
                          "size_bytes": _state_bytes(model)}

    # (b) torch.ao dynamic quantisation of nn.Linear
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ao = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear},
                                                        dtype=torch.qint8)
        ctc, intent = (t.numpy() for t in _torch_heads(ao, feats, lengths))
        rows["torch_ao_dynamic_int8"] = {
            **_time(lambda: _torch_heads(ao, feats, lengths), runs, warmup),
            "size_bytes": _state_bytes(ao), **_agreement(ctc, intent, reference)}
    except Exception as exc:  # noqa: BLE001 - report any backend failure
        rows["torch_ao_dynamic_int8"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}

    # (c) torchao int8 dynamic activations + int8 weights
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        tao = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_(tao, Int8DynamicActivationInt8WeightConfig())
            ctc, intent = (t.float().numpy() for t in _torch_heads(tao, feats, lengths))
            timing = _time(lambda: _torch_heads(tao, feats, lengths), runs, warmup)
        rows["torchao_int8_dyn"] = {**timing, "size_bytes": _state_bytes(tao),
                                    **_agreement(ctc, intent, reference)}
    except Exception as exc:  # noqa: BLE001
        rows["torchao_int8_dyn"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}

    # (d), (e), (e') ONNX Runtime
    start = time.perf_counter()
    fp32 = export_onnx(package, work / "fp32")
    export_s = time.perf_counter() - start
    start = time.perf_counter()
    int8 = quantize_bundle(fp32.folder, work / "int8")
    quant_s = time.perf_counter() - start
    int8_conv = quantize_bundle(fp32.folder, work / "int8_conv",
                                op_types=("MatMul", "Gemm", "Conv"))
    sessions = {}
    for key, bundle in (("ort_fp32", fp32), ("ort_int8", int8), ("ort_int8_with_conv", int8_conv)):
        encoder, decoder = make_session(bundle.encoder), make_session(bundle.decoder)
        sessions[key] = (encoder, decoder)
        _, _, ctc, intent = encoder.run(None, {"feats": feats_np, "lengths": lengths_np})
        timing = _time(lambda e=encoder: e.run(None, {"feats": feats_np, "lengths": lengths_np}),
                       runs, warmup)
        rows[key] = {**timing, "size_bytes": bundle.size_bytes(),
                     **_agreement(ctc, intent, reference)}

    # Full greedy decode: encoder + heads + `steps` decoder steps.
    decode: dict[str, dict[str, float]] = {
        "torch_fp32": _time(lambda: _torch_decode(model, feats, lengths, steps), runs // 2,
                            warmup)}
    for key, (encoder, decoder) in sessions.items():
        decode[key] = _time(
            lambda e=encoder, d=decoder: _ort_decode(e, d, feats_np, lengths_np, steps),
            runs // 2, warmup)
    return {
        "benchmark": "quant_backends",
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "versions": _versions(),
        "setup": {"threads": 1, "frames": frames, "audio_s": frames / 100, "runs": runs,
                  "decode_steps": steps, "parameters": model.num_parameters(),
                  "model": package.version, "export_s": round(export_s, 1),
                  "quantize_s": round(quant_s, 2)},
        "encoder_heads": rows,
        "greedy_decode": decode,
    }


def _versions() -> dict[str, str]:
    import onnxruntime

    out = {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__}
    try:
        import torchao

        out["torchao"] = torchao.__version__
    except ImportError:
        pass
    return out


def _table(result: dict[str, Any]) -> str:
    header = (f"{'backend':<24} {'p50 ms':>8} {'p95 ms':>8} {'size MB':>8} {'CTC agree':>9} "
              f"{'intent Δ':>9}")
    lines = [header]
    for key, row in result["encoder_heads"].items():
        if "error" in row:
            lines.append(f"{key:<24} failed: {row['error'][:80]}")
            continue
        size = f"{row['size_bytes'] / 1e6:.2f}" if row.get("size_bytes") else "n/a"
        agree = row.get("ctc_argmax_agreement", 1.0)
        delta = row.get("intent_logits_max_abs_diff", 0.0)
        lines.append(f"{key:<24} {row['p50_ms']:>8.2f} {row['p95_ms']:>8.2f} {size:>8} "
                     f"{agree:>9.3f} {delta:>9.4f}")
    steps = result["setup"]["decode_steps"]
    lines.append(f"\nfull greedy decode (encoder + heads + {steps} decoder steps)")
    for key, row in result["greedy_decode"].items():
        lines.append(f"{key:<24} {row['p50_ms']:>8.2f} {row['p95_ms']:>8.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", type=Path, help="trained model folder (default: random student)")
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--frames", type=int, default=300, help="feature frames (100 per second)")
    parser.add_argument("--decode-steps", type=int, default=12)
    parser.add_argument("--out", type=Path, default=_OUT)
    args = parser.parse_args()
    package = load_package(args.package) if args.package else _student_package()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(package, args.runs, args.warmup, args.frames, args.decode_steps, Path(tmp))
    result["setup"]["wall_s"] = round(time.perf_counter() - start, 1)
    print(_table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\n→ {args.out} ({result['setup']['wall_s']} s)")


if __name__ == "__main__":
    main()
