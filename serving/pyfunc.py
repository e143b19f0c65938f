"""The deploy bundle as an MLflow pyfunc model: log, register, load by alias, predict.

::

    DataFrame  id | audio (WAV path) | audio_base64 (base64 of WAV bytes)
        ─► VoiceloopPyfunc.predict ─► OnnxSLUPredictor (the bundle among the artifacts)
        ─► [ {id, transcript, intent, slots: [{type, value}], confidence, model_version,
              clarify} | {id, model_version, error, …} ]     one dict per row, in order

The logged model carries the bundle as its ``bundle`` artifact and this repository's
``model`` and ``serving`` packages as code, so ``mlflow.pyfunc.load_model`` works where
the repository is not installed (the Python dependencies still have to be). Nothing is
read or configured at import time.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import soundfile as sf
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.tracking import MlflowClient
from mlflow.types.schema import Array, ColSpec, Object, Property, Schema

from model.frontend.audio import AudioError, load_audio, prepare_waveform
from model.nn.export import open_bundle

__all__ = [
    "INPUT_COLUMNS",
    "VoiceloopPyfunc",
    "log_pyfunc",
    "pyfunc_signature",
    "register_pyfunc",
    "wav_base64",
]

INPUT_COLUMNS = ("id", "audio", "audio_base64")
_REQUIREMENTS = ("mlflow", "onnxruntime", "numpy", "pandas", "torch", "torchaudio", "soundfile",
                 "pydantic", "tqdm", "pyyaml", "flashlight-text")


def wav_base64(waveform: np.ndarray, sample_rate: int) -> str:
    """Encode a float waveform ``(N,)`` as base64 of a 16-bit PCM WAV file."""
    buffer = io.BytesIO()
    sf.write(buffer, np.asarray(waveform, dtype=np.float32), sample_rate, format="WAV",
             subtype="PCM_16")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _load_base64(text: str, target_rate: int) -> np.ndarray:
    """base64 of audio-file bytes → float32 mono at ``target_rate``.

    Raises:
        AudioError: not base64, or the bytes are not audio soundfile can read.
    """
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise AudioError(f"audio_base64 is not valid base64: {exc}") from exc
    try:
        audio, rate = sf.read(io.BytesIO(raw), dtype="float32", always_2d=False)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise AudioError(f"audio_base64 does not decode as audio: {exc}") from exc
    return prepare_waveform(audio, rate, target_rate)


def _fail(message: str) -> np.ndarray:
    raise AudioError(message)


def _cell(row: pd.Series, column: str) -> str | None:
    """A cell as text, or None when the column is absent or the value missing."""
    value = row.get(column)
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return None
    return str(value)


class VoiceloopPyfunc(mlflow.pyfunc.PythonModel):
    """Pyfunc front of a deploy bundle (artifact ``bundle``), run by ONNX Runtime.

    Args:
        threads: ONNX Runtime intra-op threads.
        batch_size: utterances per forward pass.
        max_parse_len: longest parse to decode.
    """

    def __init__(self, threads: int = 1, batch_size: int = 16, max_parse_len: int = 40) -> None:
        self.threads = threads
        self.batch_size = batch_size
        self.max_parse_len = max_parse_len
        self._predictor: Any = None

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from model.inference.onnx import OnnxSLUPredictor

        self._predictor = OnnxSLUPredictor(
            Path(context.artifacts["bundle"]), threads=self.threads,
            batch_size=self.batch_size, max_parse_len=self.max_parse_len,
        )

    def predict(
        self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> list[dict[str, Any]]:
        """One prediction-contract dict per row of ``model_input`` (not modified).

        Each row needs ``id`` and one of ``audio`` (a WAV/FLAC path readable here) or
        ``audio_base64`` (base64 of the file's bytes; preferred when both are set). A row
        whose audio is missing or unusable gets a dict with ``error`` instead.

        Raises:
            RuntimeError: called before :meth:`load_context`.
            ValueError: ``model_input`` has no ``id`` column.
        """
        if self._predictor is None:
            raise RuntimeError("VoiceloopPyfunc.predict called before load_context")
        frame = pd.DataFrame(model_input)
        if "id" not in frame.columns:
            raise ValueError(f"model input needs an 'id' column; got {list(frame.columns)}")
        rate = self._predictor.feature_config.sample_rate
        ids: list[str] = []
        loaders: list[Callable[[], np.ndarray]] = []
        for position, (_, row) in enumerate(frame.iterrows()):
            uid = _cell(row, "id")
            ids.append(uid or f"row-{position}")
            encoded, path = _cell(row, "audio_base64"), _cell(row, "audio")
            if uid is None:
                loaders.append(partial(_fail, f"row {position} lacks id"))
            elif encoded is not None:
                loaders.append(partial(_load_base64, encoded, rate))
            elif path is not None:
                loaders.append(partial(load_audio, Path(path), rate))
            else:
                loaders.append(partial(_fail, f"row {position} has neither audio nor audio_base64"))
        predictions = self._predictor.predict_loaders(ids, loaders)
        return [p.model_dump(mode="json", exclude_none=True) for p in predictions]


def pyfunc_signature() -> ModelSignature:
    """Input: ``id`` and optional ``audio`` / ``audio_base64`` strings. Output: the
    prediction contract (``error`` optional)."""
    slot = Object([Property("type", "string"), Property("value", "string")])
    inputs = Schema([
        ColSpec("string", "id"),
        ColSpec("string", "audio", required=False),
        ColSpec("string", "audio_base64", required=False),
    ])
    outputs = Schema([
        ColSpec("string", "id"),
        ColSpec("string", "transcript"),
        ColSpec("string", "intent"),
        ColSpec(Array(slot), "slots"),
        ColSpec("double", "confidence"),
        ColSpec("string", "model_version"),
        ColSpec("boolean", "clarify"),
        ColSpec("string", "error", required=False),
    ])
    return ModelSignature(inputs=inputs, outputs=outputs)


def _input_example(sample_rate: int) -> pd.DataFrame:
    """One self-contained row: a 0.5-s tone written as a WAV file, base64-encoded."""
    t = np.arange(sample_rate // 2) / sample_rate
    tone = (0.3 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "example.wav"
        sf.write(path, tone, sample_rate, subtype="PCM_16")
        encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    return pd.DataFrame({"id": ["example-1"], "audio_base64": [encoded]})


def _requirements() -> list[str]:
    pins = []
    for name in _REQUIREMENTS:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pins.append(name)
    return pins


def _tracking_uri(uri: str):  # type: ignore[no-untyped-def]
    """MLflow's process-wide URIs set to ``uri`` for the block, then restored exactly.

    Some MLflow 3 code paths (the fluent ``log_model``, and the registry resolving a
    ``models:/<model id>`` source) read the global URIs rather than the client's.
    """
    from voiceloop.tracking import mlflow_scope

    return mlflow_scope(uri)


@contextmanager
def _fluent_run(client: MlflowClient, run_id: str) -> Iterator[None]:
    """Make ``run_id`` MLflow's active run on this thread, with ``client``'s tracking URI,
    and put everything back afterwards (URI, and the run's status if it was RUNNING)."""
    status = client.get_run(run_id).info.status
    with _tracking_uri(client.tracking_uri):
        try:
            with mlflow.start_run(run_id=run_id):
                yield
        finally:
            if status == "RUNNING":
                client.update_run(run_id, status="RUNNING")


def log_pyfunc(
    client: MlflowClient,
    run_id: str,
    bundle_dir: Path,
    name: str = "pyfunc",
    threads: int = 1,
    batch_size: int = 16,
    max_parse_len: int = 40,
) -> ModelInfo:
    """Log ``bundle_dir`` as an MLflow pyfunc model of run ``run_id``.

    Args:
        client: client of the tracking server (``RunLogger.client`` works).
        run_id: the run the model belongs to (its status is left as it was).
        bundle_dir: a deploy bundle (fp32 or int8).
        name: the model's name within the run (MLflow 3's ``name``, formerly
            ``artifact_path``).
        threads, batch_size, max_parse_len: serving settings stored with the model.

    Returns:
        MLflow's :class:`ModelInfo` (``model_uri`` is ``models:/<model id>``); register it
        with :func:`register_pyfunc`.

    Raises:
        ValueError: ``bundle_dir`` is not a deploy bundle.
    """
    import model as model_package
    import serving as serving_package

    bundle = open_bundle(bundle_dir)
    from model.nn.export import load_bundle_config

    rate = load_bundle_config(bundle.folder).features.sample_rate
    code_paths = [str(Path(p.__file__).parent) for p in (model_package, serving_package)]
    with _fluent_run(client, run_id):
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=VoiceloopPyfunc(threads, batch_size, max_parse_len),
            artifacts={"bundle": str(bundle.folder)},
            code_paths=code_paths,
            signature=pyfunc_signature(),
            input_example=_input_example(rate),
            pip_requirements=_requirements(),
        )


def register_pyfunc(
    client: MlflowClient, info: ModelInfo, name: str, alias: str | None = None
) -> str:
    """Register a model logged by :func:`log_pyfunc` as a new version of ``name``
    (created if absent), optionally pointing ``alias`` at it; returns the version."""
    try:
        client.get_registered_model(name)
    except Exception:  # noqa: BLE001 - MLflow raises a generic RestException
        client.create_registered_model(name)
    with _tracking_uri(client.tracking_uri):
        created = client.create_model_version(
            name, source=info.model_uri, run_id=info.run_id, model_id=info.model_id)
    if alias:
        client.set_registered_model_alias(name, alias, created.version)
    return str(created.version)
