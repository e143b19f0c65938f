"""The self-contained model folder: weights plus everything needed to use them.

::

    model/
      weights.pt      state_dict of the JointModel
      config.json     model + feature config, vocabularies, clarify threshold, metadata
      lm/             optional: lexicon + word n-gram for the transcript beam search

A folder is what training writes, DVC tracks, MLflow stores as an artifact and
``voiceloop predict --model`` loads.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from model.fileio import atomic_path
from model.frontend.features import FeatureConfig
from model.nn.network import EncoderConfig, JointModel, ModelConfig
from model.nn.tokens import CharVocab, CTCVocab, ParseVocab, ctc_vocab_from_json

__all__ = ["ModelPackage", "load_package", "save_package"]

log = logging.getLogger(__name__)

_WEIGHTS = "weights.pt"
_CONFIG = "config.json"


LM_DIRNAME = "lm"
LM_FILES = ("lexicon.txt", "lm.arpa", "decoder.json")
"""What an LM folder holds (see ``model.decoding.beam``)."""
LM_SENTENCES = "sentences.txt.gz"
"""The n-gram's training text (one sentence a line, gzip), kept beside it so that a
retrained model's LM can start from its parent's text (optional: older folders lack it)."""


def has_lm(folder: Path) -> bool:
    """True when ``folder`` (a model folder or bundle) carries an ``lm/`` folder. An
    ``lm/`` folder with a file missing — or a link to one that is gone (the release's
    teacher links to the student's LM) — is warned about: the model decodes greedy."""
    lm = Path(folder) / LM_DIRNAME
    missing = [name for name in LM_FILES if not (lm / name).is_file()]
    if missing and lm.is_dir():
        log.warning("%s lacks %s (missing or a broken link): decoding without the LM", lm,
                    ", ".join(missing))
    return not missing


def copy_lm_folder(lm_dir: Path, target_dir: Path) -> None:
    """Copy the LM folder ``lm_dir`` to ``target_dir/lm`` (a model folder or bundle),
    replacing one that is there; nothing to do when it already is that folder."""
    dst = Path(target_dir) / LM_DIRNAME
    if dst.resolve() == Path(lm_dir).resolve():
        return
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(lm_dir, dst)


@dataclass
class ModelPackage:
    """A model with its configuration, vocabularies and decision threshold."""

    model: JointModel
    features: FeatureConfig
    parse_vocab: ParseVocab
    clarify_threshold: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)
    ctc_vocab: CTCVocab = field(default_factory=CharVocab)
    # The transcript LM folder (``model.decoding.beam``) that travels with the model, if any.
    lm_dir: Path | None = None
    # Intent confidence = softmax(logits / intent_temperature): temperature scaling fitted
    # on held-out-voice validation data (1.0 = uncalibrated).
    intent_temperature: float = 1.0

    @property
    def version(self) -> str:
        return str(self.metadata.get("version", "unversioned"))


def save_package(package: ModelPackage, folder: Path) -> Path:
    """Write ``weights.pt`` and ``config.json`` into ``folder`` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = package.model.cfg
    config = {
        "format": "voiceloop-joint-v1",
        "model": {**asdict(cfg), "encoder": asdict(cfg.encoder)},
        "features": asdict(package.features),
        "parse_vocab": package.parse_vocab.to_json(),
        "ctc_vocab": package.ctc_vocab.to_json(),
        "clarify_threshold": package.clarify_threshold,
        "intent_temperature": package.intent_temperature,
        "metadata": package.metadata,
    }
    with atomic_path(folder / _WEIGHTS) as tmp:
        torch.save(package.model.state_dict(), tmp)
    (folder / _CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
    if package.lm_dir is not None:
        copy_lm_folder(package.lm_dir, folder)
    return folder


def load_package(folder: Path) -> ModelPackage:
    """Load a model folder written by :func:`save_package` (eval mode, CPU).

    Raises:
        FileNotFoundError: the folder lacks ``config.json`` or ``weights.pt``.
        ValueError: the config is of another format.
    """
    config_path, weights_path = folder / _CONFIG, folder / _WEIGHTS
    for path in (config_path, weights_path):
        if not path.exists():
            raise FileNotFoundError(f"not a voiceloop model folder: {path} missing")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("format") != "voiceloop-joint-v1":
        raise ValueError(f"{config_path}: unknown model format {config.get('format')!r}")
    model_cfg = dict(config["model"])
    model_cfg["encoder"] = EncoderConfig(**model_cfg["encoder"])
    model = JointModel(ModelConfig(**model_cfg))
    model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    model.eval()
    return ModelPackage(
        model=model,
        features=FeatureConfig(**config["features"]),
        parse_vocab=ParseVocab.from_json(config["parse_vocab"]),
        clarify_threshold=float(config.get("clarify_threshold", 0.0)),
        metadata=dict(config.get("metadata", {})),
        ctc_vocab=ctc_vocab_from_json(config.get("ctc_vocab")),
        lm_dir=folder / LM_DIRNAME if has_lm(folder) else None,
        intent_temperature=float(config.get("intent_temperature", 1.0)),
    )

