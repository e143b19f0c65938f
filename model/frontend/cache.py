"""Features of corpus splits, computed once and cached.

Features are computed once per corpus split and cached as fp16 under
``<workspace>/features/<profile>/`` (keyed by the manifest's content and the feature
settings), because recomputing log-mels every epoch would cost as much as training.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from model.data.corpus import CorpusLayout
from model.data.manifest import ManifestRow, read_manifest
from model.fileio import atomic_path
from model.frontend.audio import load_audio
from model.frontend.features import FeatureConfig, FeatureExtractor, normalise_features
from voiceloop.settings import Settings

__all__ = ["feature_config", "load_features", "load_split", "random_subset"]

log = logging.getLogger(__name__)


def _cache_key(rows: Sequence[ManifestRow], cfg: FeatureConfig) -> str:
    digest = hashlib.sha1(repr(asdict(cfg)).encode())
    for row in rows:
        digest.update(f"{row.id}\x00{row.audio}\x00{row.duration_s}\n".encode())
    return digest.hexdigest()[:16]


def load_features(
    rows: Sequence[ManifestRow],
    manifest_dir: Path,
    cfg: FeatureConfig,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> list[Tensor]:
    """Log-mel features ``(T_i, F)`` (fp16) for each row, from cache when possible."""
    cache: Path | None = None
    if cache_dir is not None:
        cache = cache_dir / f"features-{_cache_key(rows, cfg)}.pt"
        if cache.exists():
            return torch.load(cache)
    extractor = FeatureExtractor(cfg)
    feats = [
        extractor(load_audio(row.audio_path(manifest_dir), cfg.sample_rate)).to(torch.float16)
        for row in tqdm(rows, desc="features", unit="utt", disable=not progress)
    ]
    if cache is not None:
        # Two runs filling the same cache each write their own temporary file.
        with atomic_path(cache) as tmp:
            torch.save(feats, tmp)
    return feats


def feature_config(settings: Settings) -> FeatureConfig:
    f = settings.features
    return FeatureConfig(
        sample_rate=settings.corpus.tts.sample_rate, n_mels=f.n_mels, win_ms=f.win_ms,
        hop_ms=f.hop_ms, normalise=f.normalise,
    )


def random_subset(
    rows: list[ManifestRow], feats: list, limit: int | None, seed: int
) -> tuple[list[ManifestRow], list]:
    """At most ``limit`` rows (with their features), drawn at random with ``seed`` and kept
    in their original order; everything when ``limit`` is None or not smaller."""
    if not limit or len(rows) <= limit:
        return rows, feats
    keep = sorted(np.random.default_rng(seed).choice(len(rows), limit, replace=False))
    return [rows[i] for i in keep], [feats[i] for i in keep]


def load_split(
    settings: Settings, split: str, progress: bool, features: FeatureConfig | None = None,
    raw: bool = False,
) -> tuple[list[ManifestRow], list[Tensor]]:
    """Rows of ``split`` and their features ``[(T_i, F)]`` (fp16).

    One cache of raw log-mels per split serves every normalisation: ``features``
    (default: the teacher's configuration from ``settings``) is applied on the way out,
    unless ``raw`` (training data, which is perturbed before it is normalised).

    Raises:
        FileNotFoundError: the split's manifest does not exist.
    """
    layout = CorpusLayout(settings.corpus_dir)
    path = layout.manifest(split)
    if not path.exists():
        raise FileNotFoundError(
            f"no {split} manifest at {path}: build the corpus first "
            f"(voiceloop corpus -p {settings.profile})"
        )
    rows = read_manifest(path)
    cfg = features or feature_config(settings)
    cached_cfg = FeatureConfig(sample_rate=cfg.sample_rate, n_mels=cfg.n_mels, win_ms=cfg.win_ms,
                               hop_ms=cfg.hop_ms, normalise="none")
    feats = load_features(
        rows, layout.manifests_dir, cached_cfg,
        settings.workspace / "features" / settings.profile, progress,
    )
    if not raw and cfg.normalise != "none":
        feats = [normalise_features(f, cfg).to(torch.float16) for f in feats]
    return rows, feats
