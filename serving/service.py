"""Assembling a service: its model source, traffic writer and app, from settings.

Used by ``voiceloop serve``, the integration tests and ``benchmarks/serving_load.py``, so
all three run the same thing.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from fastapi import FastAPI

from serving.app import ServiceState, create_app
from serving.models import FixedModel, ModelSource, RegistryModels, default_factory
from serving.traffic import TrafficWriter
from voiceloop.registry import Registry
from voiceloop.settings import Settings

__all__ = ["build_app", "build_state"]


def build_state(settings: Settings, model_dir: Path | None = None, log_traffic: bool = True,
                workers: int | None = None) -> ServiceState:
    """The service's state: ``model_dir`` served alone (no canary), else the registry's
    ``production`` and ``canary`` aliases; the traffic store at ``settings.traffic_root``
    unless ``log_traffic`` is off.

    Sets this process's torch intra-op threads to ``serving.model_threads`` (a process-wide
    setting: the service should own its process)."""
    s = settings.serving
    n = workers or s.workers or os.cpu_count() or 1
    # Torch computes the features (and tensors around the beam search) in the inference
    # threads. Its intra-op pool defaults to one thread per core for *each* calling
    # thread (an OpenMP team per thread, spinning while it waits), so `n` inference
    # threads would run n × cores busy threads on `cores` cores: cap it like ONNX Runtime.
    torch.set_num_threads(s.model_threads)
    factory = default_factory(s.model_threads)
    models: ModelSource = (
        FixedModel(model_dir, n, factory) if model_dir is not None
        else RegistryModels(Registry(settings), n, s.poll_seconds, factory))
    traffic = TrafficWriter(settings.traffic_root, s.traffic) if log_traffic else None
    return ServiceState(settings=s, models=models, traffic=traffic, workers=n)


def build_app(settings: Settings, model_dir: Path | None = None, log_traffic: bool = True,
              workers: int | None = None) -> FastAPI:
    """:func:`build_state` wrapped in the FastAPI app."""
    return create_app(build_state(settings, model_dir, log_traffic, workers))
