"""ONNX Runtime inference over a deploy bundle, with the interface of ``SLUPredictor``.

::

    waveform ─► log-mel (T, F) ─► pad to (B, T, F) ─► encoder.onnx ─► encoder (B, T', D)
                                                         ├─► ctc_logits (B, k·T', C) ─► greedy CTC
                                                         ├─► intent_logits (B, I) ─► softmax max
                                                         └─► decoder.onnx, re-run per token
                                                             (B, U) → (B, P) ─► greedy parse

Everything around the network (audio checks, features, batching, the prediction
contract, error predictions) is :class:`model.inference.batch.BatchPredictor`'s, shared with
the torch predictor; so are the greedy CTC and parse loops (:mod:`model.decoding.greedy`).

:func:`load_predictor` opens whatever a model folder holds: a torch package, a deploy
bundle, or an MLflow pyfunc model (``MLmodel``) carrying a bundle among its artifacts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from model.decoding.greedy import greedy_parse_steps
from model.inference.batch import BatchOutput, BatchPredictor, SLUPredictor
from model.nn.export import (
    BundleConfig,
    DeployBundle,
    is_bundle,
    load_bundle_config,
    make_session,
    open_bundle,
)
from model.nn.package import has_lm

__all__ = ["OnnxSLUPredictor", "load_predictor", "pyfunc_bundle_dir"]

_PYFUNC_BUNDLE_KEY = "bundle"


class OnnxSLUPredictor(BatchPredictor):
    """Runs a deploy bundle (fp32 or int8) with ONNX Runtime on the CPU.

    Args:
        bundle_dir: folder written by :func:`model.nn.export.export_onnx` or
            :func:`model.nn.export.quantize_bundle`.
        threads: intra-op threads per session (inter-op: 1).
        batch_size: utterances per forward pass.
        max_parse_len: longest parse to decode (capped by the model's ``max_parse_len``).
        use_lm: transcribe with the bundle's ``lm/`` beam search when it has one.

    Raises:
        ValueError: ``bundle_dir`` is not a deploy bundle.
    """

    def __init__(
        self, bundle_dir: Path | str, threads: int = 1, batch_size: int = 16,
        max_parse_len: int = 40, use_lm: bool = True,
    ) -> None:
        self.bundle: DeployBundle = open_bundle(Path(bundle_dir))
        self.config: BundleConfig = load_bundle_config(self.bundle.folder)
        cfg = self.config
        super().__init__(
            cfg.features, cfg.parse_vocab, cfg.ctc_vocab, cfg.clarify_threshold,
            cfg.model.encoder.subsampling, batch_size, max_parse_len,
            self.bundle.folder if use_lm and has_lm(self.bundle.folder) else None,
            cfg.intent_temperature,
        )
        self.threads = threads
        self.encoder = make_session(self.bundle.encoder, threads)
        self.decoder = (make_session(self.bundle.decoder, threads)
                        if self.bundle.decoder is not None else None)

    @property
    def version(self) -> str:
        return self.config.version

    @property
    def embedding_dim(self) -> int:
        return int(self.config.model.encoder.d_model)

    def _encode_batch(self, feats: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        # Asking for the two encoder outputs alone: ONNX Runtime then skips the heads.
        encoder, enc_lengths = self.encoder.run(
            ["encoder", "encoder_lengths"],
            {"feats": feats.numpy().astype(np.float32, copy=False),
             "lengths": lengths.numpy().astype(np.int64, copy=False)},
        )
        return torch.from_numpy(encoder), torch.from_numpy(enc_lengths)

    def _decode_batch(self, feats: Tensor, lengths: Tensor) -> BatchOutput:
        encoder, enc_lengths, ctc_logits, intent_logits = self.encoder.run(
            ["encoder", "encoder_lengths", "ctc_logits", "intent_logits"],
            {"feats": feats.numpy().astype(np.float32, copy=False),
             "lengths": lengths.numpy().astype(np.int64, copy=False)},
        )
        k = self.config.model.ctc_upsample
        transcripts = self._transcribe(
            torch.from_numpy(ctc_logits), torch.from_numpy(enc_lengths) * k)
        parses = None
        if self.decoder is not None:
            decoder = self.decoder
            limit = min(self.max_parse_len, self.config.model.max_parse_len)

            def step(tokens: Tensor) -> Tensor:
                (logits,) = decoder.run(["logits"], {
                    "tokens": tokens.numpy(), "encoder": encoder, "encoder_lengths": enc_lengths})
                return torch.from_numpy(logits)

            parses, _ = greedy_parse_steps(step, feats.size(0), limit,
                                           self._allowed_tokens(transcripts))
        return BatchOutput(
            transcripts=transcripts,
            intent_logits=torch.from_numpy(intent_logits).float(),
            parses=parses,
        )


def pyfunc_bundle_dir(model_dir: Path) -> Path:
    """The deploy bundle inside an MLflow pyfunc model folder (its ``bundle`` artifact).

    Raises:
        ValueError: no ``MLmodel`` file, no ``python_function`` flavour, or no bundle artifact.
    """
    import yaml

    mlmodel = model_dir / "MLmodel"
    if not mlmodel.is_file():
        raise ValueError(f"{model_dir} is not an MLflow model folder: MLmodel missing")
    spec: dict[str, Any] = yaml.safe_load(mlmodel.read_text(encoding="utf-8")) or {}
    flavor = (spec.get("flavors") or {}).get("python_function") or {}
    artifact = (flavor.get("artifacts") or {}).get(_PYFUNC_BUNDLE_KEY) or {}
    path = artifact.get("path") if isinstance(artifact, dict) else None
    if not path:
        raise ValueError(
            f"{mlmodel}: no python_function artifact {_PYFUNC_BUNDLE_KEY!r} "
            "(expected a model logged by serving.pyfunc.log_pyfunc)"
        )
    bundle = model_dir / path
    if not is_bundle(bundle):
        raise ValueError(f"{mlmodel}: artifact {_PYFUNC_BUNDLE_KEY!r} at {bundle} is not a deploy bundle")
    return bundle


def load_predictor(
    folder: Path, batch_size: int = 16, max_parse_len: int = 40, threads: int = 1,
    use_lm: bool = True,
) -> BatchPredictor:
    """The predictor for a local model folder.

    - ``MLmodel`` (an MLflow pyfunc model from :func:`serving.pyfunc.log_pyfunc`) → the
      bundle among its artifacts, with :class:`OnnxSLUPredictor`;
    - ``encoder.onnx`` + ``config.json`` (a deploy bundle) → :class:`OnnxSLUPredictor`;
    - ``weights.pt`` + ``config.json`` (a torch package) → :class:`~model.inference.batch.SLUPredictor`.

    ``use_lm``: transcripts from the model's ``lm/`` beam search when it has one.

    Raises:
        FileNotFoundError: ``folder`` does not exist.
        ValueError: ``folder`` is none of the above.
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    if (folder / "MLmodel").is_file():
        return OnnxSLUPredictor(pyfunc_bundle_dir(folder), threads, batch_size, max_parse_len,
                                use_lm)
    if is_bundle(folder):
        return OnnxSLUPredictor(folder, threads, batch_size, max_parse_len, use_lm)
    if (folder / "weights.pt").is_file() and (folder / "config.json").is_file():
        return SLUPredictor.load(folder, batch_size=batch_size, max_parse_len=max_parse_len,
                                 use_lm=use_lm)
    raise ValueError(
        f"{folder} is not a model: expected a torch package (weights.pt + config.json), a deploy "
        "bundle (encoder.onnx + decoder.onnx + config.json) or an MLflow pyfunc model (MLmodel)"
    )
