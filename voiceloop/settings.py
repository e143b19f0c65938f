"""Typed settings: ``params.yaml`` parsed once into pydantic models.

``params.yaml`` has a ``base`` block with every tunable number and a ``profiles`` block
whose entries (``tiny``, ``quick``, ``full``) override parts of ``base``. The chosen
profile is deep-merged over ``base`` and validated here; nothing else in the code base
reads ``params.yaml`` directly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "AugmentSettings",
    "CorpusSettings",
    "DecodeSettings",
    "FeatureSettings",
    "HeldoutVoiceSettings",
    "LossSettings",
    "ModelSettings",
    "NoiseSettings",
    "ReverbSettings",
    "ServingSettings",
    "Settings",
    "SpecAugmentSettings",
    "SplitSettings",
    "TTSSettings",
    "TrackingSettings",
    "TrafficSettings",
    "TrainSettings",
    "ValidationSettings",
    "WarpSettings",
    "load_settings",
    "repo_root",
]

Engine = Literal["espeak-ng", "flite", "festival"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_range(value: tuple[float, float]) -> tuple[float, float]:
    low, high = value
    if low > high:
        raise ValueError(f"range low {low} > high {high}")
    return value


class HeldoutVoiceSettings(_Strict):
    """The voice family no training utterance uses (leave-one-voice-family-out).

    ``valid_utterances`` / ``test_utterances`` sentences of the valid / test templates are
    rendered again with these voices (same sentences, same augmentation settings) into the
    splits ``valid_heldout`` / ``test_heldout``. The gap between a split and its held-out
    twin measures how well the model generalises to a voice it never heard.
    """

    engine: Engine = "festival"
    voices: list[str] = ["ked"]
    valid_utterances: int = Field(1500, ge=0)
    test_utterances: int = Field(2000, ge=0)


class TTSSettings(_Strict):
    """Which voices render the corpus, and how much prosody varies.

    ``engine_weights`` are relative sampling weights of the engines. espeak-ng voices are
    ``accent+variant`` pairs drawn from ``espeak_accents`` × ``espeak_variants``.
    ``rate`` is a speaking-rate factor (1.0 = the engine's default speed);
    ``espeak_pitch`` is espeak-ng's 0–99 pitch setting.
    """

    engine_weights: dict[Engine, float] = {"espeak-ng": 0.5, "flite": 0.25, "festival": 0.25}
    espeak_accents: list[str]
    espeak_variants: list[str]
    flite_voices: list[Literal["kal16", "awb", "rms"]] = ["kal16", "awb", "rms"]
    festival_voices: list[Literal["kal", "ked"]] = ["kal", "ked"]
    rate: tuple[float, float] = (0.85, 1.2)
    espeak_pitch: tuple[int, int] = (30, 70)
    sample_rate: int = 16000
    heldout: HeldoutVoiceSettings | None = None

    _rate = field_validator("rate")(_check_range)

    @model_validator(mode="after")
    def _heldout_unused(self) -> TTSSettings:
        """A held-out voice must not also be a training voice (it would not be held out)."""
        if self.heldout is None:
            return self
        training = {"flite": self.flite_voices, "festival": self.festival_voices,
                    "espeak-ng": self.espeak_accents}[self.heldout.engine]
        shared = sorted(set(training) & set(self.heldout.voices))
        if shared and self.engine_weights.get(self.heldout.engine, 0) > 0:
            raise ValueError(f"held-out voices {shared} are also training voices of "
                             f"{self.heldout.engine}")
        return self

    @field_validator("engine_weights")
    @classmethod
    def _positive(cls, value: dict[str, float]) -> dict[str, float]:
        if not value or any(w < 0 for w in value.values()) or sum(value.values()) <= 0:
            raise ValueError("engine_weights must be non-negative with a positive sum")
        return value


class NoiseSettings(_Strict):
    """Additive noise: kind drawn from ``kinds``, SNR (dB) uniform in ``snr_db``."""

    p: float = Field(0.5, ge=0, le=1)
    kinds: list[Literal["white", "pink", "babble"]] = ["white", "pink", "babble"]
    snr_db: tuple[float, float] = (5.0, 30.0)
    babble_talkers: tuple[int, int] = (2, 5)

    _snr = field_validator("snr_db")(_check_range)


class ReverbSettings(_Strict):
    """Reverberation by a synthetic room impulse response (pyroomacoustics image method).

    A bank of ``bank_size`` rooms is simulated once per seed and reused, because one room
    costs about a second to simulate. ``rt60_s`` is the target reverberation time range.
    """

    p: float = Field(0.3, ge=0, le=1)
    rt60_s: tuple[float, float] = (0.2, 0.8)
    bank_size: int = Field(16, ge=1)

    _rt60 = field_validator("rt60_s")(_check_range)


class AugmentSettings(_Strict):
    """Augmentation after synthesis. ``p`` is the chance that an utterance is augmented at
    all; each transform then fires with its own probability (at least one fires)."""

    p: float = Field(0.6, ge=0, le=1)
    noise: NoiseSettings = NoiseSettings()
    reverb: ReverbSettings = ReverbSettings()
    gain_p: float = Field(0.5, ge=0, le=1)
    gain_db: tuple[float, float] = (-12.0, 6.0)
    clip_p: float = Field(0.1, ge=0, le=1)
    clip_level: tuple[float, float] = (0.3, 0.8)
    telephone_p: float = Field(0.15, ge=0, le=1)

    _gain = field_validator("gain_db")(_check_range)
    _clip = field_validator("clip_level")(_check_range)


class SplitSettings(_Strict):
    """Template-level split: fractions of each intent's templates held out."""

    valid: float = Field(0.1, ge=0, lt=1)
    test: float = Field(0.15, ge=0, lt=1)

    @model_validator(mode="after")
    def _sum(self) -> SplitSettings:
        if self.valid + self.test >= 1:
            raise ValueError("valid + test must leave templates for training")
        return self


class ValidationSettings(_Strict):
    """Bounds the Great Expectations suite enforces on a manifest."""

    min_duration_s: float = 0.3
    max_duration_s: float = 20.0
    duration_tolerance_s: float = 0.05
    sample_rate: int = 16000


class CorpusSettings(_Strict):
    """Size and make-up of the synthetic spoken-command corpus.

    ``utterances_per_template`` sentences are sampled from each grammar template, raised
    for intents with few templates so that each intent gets at least
    ``min_utterances_per_intent`` (as far as its templates have distinct sentences).
    ``max_templates`` keeps a per-intent-stratified subset of templates and
    ``max_intents`` a random subset of intents, which is how the tiny profile stays tiny;
    ``intents`` restricts the corpus to named intents (domain-shift scenarios).
    ``workers`` = 0 uses every core.
    """

    language: str = "en"
    utterances_per_template: int = Field(4, ge=1)
    min_utterances_per_intent: int = Field(0, ge=0)
    max_templates: int | None = Field(None, ge=3)
    max_intents: int | None = Field(None, ge=1)
    intents: list[str] | None = None
    max_utterances: int | None = Field(None, ge=1)
    workers: int = Field(0, ge=0)
    split: SplitSettings = SplitSettings()
    tts: TTSSettings
    augment: AugmentSettings = AugmentSettings()
    validation: ValidationSettings = ValidationSettings()


class SpecAugmentSettings(_Strict):
    """Time/frequency masking in training (see ``model.frontend.features.SpecAugment``).
    ``ramp_epochs``: mask widths grow linearly from zero to full strength over this many
    epochs (lighter masking while the model first learns to align)."""

    freq_masks: int = Field(2, ge=0)
    freq_width: int = Field(15, ge=0)
    time_masks: int = Field(2, ge=0)
    time_width_frac: float = Field(0.05, ge=0, le=0.5)
    time_width_max: int = Field(20, ge=0)
    ramp_epochs: float = Field(0.0, ge=0)


class WarpSettings(_Strict):
    """On-the-fly voice perturbation of cached log-mels in training
    (``model.frontend.warp.FeatureWarp``): speed (time stretch and frequency warp by the
    same factor, Kaldi's 0.9-1.1 speed perturbation), vocal-tract-length perturbation
    (frequency warp alone) and a random spectral tilt/EQ of up to ``tilt_db``; each is
    applied to an utterance with probability ``p``. Null ranges switch a transform off."""

    speed: tuple[float, float] | None = (0.9, 1.1)
    vtlp: tuple[float, float] | None = (0.9, 1.1)
    tilt_db: float = Field(6.0, ge=0)
    p: float = Field(0.5, ge=0, le=1)


class FeatureSettings(_Strict):
    """Log-mel features: ``n_mels`` bins, ``win_ms``/``hop_ms`` in milliseconds.
    ``normalise`` is the teacher's (per utterance); the student's is
    ``student.normalise``."""

    n_mels: int = Field(80, ge=8)
    win_ms: float = 25.0
    hop_ms: float = 10.0
    normalise: Literal["utterance", "none"] = "utterance"
    specaugment: SpecAugmentSettings = SpecAugmentSettings()
    warp: WarpSettings = WarpSettings()


class ModelSettings(_Strict):
    """Network shape (teacher). ``subsampling`` is the encoder's time reduction;
    ``ctc_units`` the CTC vocabulary (``tagged``: characters plus slot tags, so slots are
    read off the transcript; ``char``: characters; ``word``: whole words of the closed
    command vocabulary); ``ctc_upsample`` the CTC label slots per encoder frame;
    ``decoder_layers`` 0 = no parse decoder (slots from the tagged transcript);
    ``inter_ctc_layer`` adds an intermediate CTC loss on that block's output (0 = none);
    ``frontend_channels`` sizes the convolutional front end."""

    d_model: int = Field(144, ge=16)
    encoder_layers: int = Field(6, ge=1)
    heads: int = Field(4, ge=1)
    ffn_mult: int = Field(4, ge=1)
    conv_kernel: int = Field(15, ge=3)
    subsampling: Literal[4, 6, 8] = 4
    dropout: float = Field(0.1, ge=0, lt=1)
    decoder_layers: int = Field(2, ge=0)
    decoder_heads: int = Field(4, ge=1)
    decoder_ffn: int = Field(576, ge=16)
    max_parse_len: int = Field(48, ge=8)
    ctc_units: Literal["char", "tagged", "word"] = "char"
    ctc_upsample: int = Field(2, ge=1, le=4)
    causal_conv: bool = False   # the streaming student: convolutions see only the past
    frontend_channels: int = Field(32, ge=4)
    inter_ctc_layer: int = Field(0, ge=0)


class LossSettings(_Strict):
    """Multitask loss.

    ``weighting``: ``uncertainty`` learns one log-variance per task (Kendall et al.
    2018) starting from ``weights``; ``schedule`` moves linearly from ``weights`` to
    ``final_weights`` over ``schedule_epochs`` (acoustics early, semantics later);
    ``fixed`` keeps ``weights``. ``label_smoothing`` applies to the parse decoder.
    ``inter_ctc`` weighs the intermediate CTC loss (models with ``inter_ctc_layer``).
    """

    weighting: Literal["uncertainty", "schedule", "fixed"] = "fixed"
    weights: dict[Literal["ctc", "intent", "parse", "inter_ctc"], float] = {
        "ctc": 1.0, "intent": 0.3, "parse": 1.0, "inter_ctc": 0.3
    }
    final_weights: dict[Literal["ctc", "intent", "parse", "inter_ctc"], float] = {
        "ctc": 0.5, "intent": 1.0, "parse": 1.0, "inter_ctc": 0.3
    }
    schedule_epochs: int = Field(5, ge=1)
    label_smoothing: float = Field(0.1, ge=0, lt=1)


class TrainSettings(_Strict):
    """Optimisation. ``batch_max_frames`` bounds padded frames (10 ms each) per batch;
    ``curriculum_epochs`` run short, clean utterances first (sorted, not shuffled);
    early stopping only starts counting after ``min_epochs`` (early SemER is noisy: an
    untrained decoder that says nothing scores better than one that babbles);
    ``max_minutes`` stops training (after the running epoch) when the budget is spent."""

    epochs: int = Field(30, ge=1)
    batch_max_frames: int = Field(6000, ge=100)
    lr: float = Field(3e-3, gt=0)
    warmup_steps: int = Field(400, ge=0)
    min_lr_ratio: float = Field(0.05, ge=0, le=1)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(5.0, gt=0)
    curriculum_epochs: int = Field(1, ge=0)
    early_stopping_patience: int = Field(5, ge=1)
    min_epochs: int = Field(8, ge=0)
    max_minutes: float | None = Field(None, gt=0)
    threads: int = Field(2, ge=1)
    # bfloat16 autocast: fast only where the CPU has native bf16 (AVX512-BF16 / AMX);
    # emulated elsewhere and then slower than fp32. "auto" asks oneDNN.
    bf16: bool | Literal["auto"] = "auto"
    log_every_steps: int = Field(20, ge=1)
    eval_max_utterances: int | None = Field(None, ge=1)
    max_train_utterances: int | None = Field(None, ge=1)  # random subset, for recipe trials
    loss: LossSettings = LossSettings()


class LMSettings(_Strict):
    """The transcript's lexicon + word n-gram beam search (``model.decoding.beam``). The n-gram
    (``order``, absolute ``discount``) is trained on the training transcripts; the LM
    weight and word score are chosen from the grids by WER on up to
    ``tune_utterances`` validation utterances, per model (a weaker acoustic model wants
    more LM)."""

    enabled: bool = True
    order: int = Field(3, ge=1, le=6)
    discount: float = Field(0.7, gt=0, lt=1)
    beam_size: int = Field(50, ge=1)
    beam_threshold: float = Field(12.0, gt=0)
    beam_size_token: int | None = Field(8, ge=1)
    lm_weights: list[float] = [0.5, 1.0, 1.5, 2.0]
    word_scores: list[float] = [-1.0, 0.0, 1.0, 2.0]
    tune_utterances: int = Field(1000, ge=1)


class DecodeSettings(_Strict):
    """Inference. The clarify threshold is the lowest intent confidence at which the
    accepted validation utterances still reach ``clarify_target_accuracy``."""

    max_parse_len: int = Field(40, ge=4)
    clarify_target_accuracy: float = Field(0.98, gt=0, le=1)
    batch_size: int = Field(16, ge=1)
    # Temperature-scale the intent confidences on the held-out-voice validation split
    # (the in-voice one when the corpus has none): pseudo-labels, clarify and label-free
    # performance estimates trust these numbers on voices the model never heard.
    calibrate: bool = True
    lm: LMSettings = LMSettings()


class DistillSettings(_Strict):
    """Knowledge distillation. The student's loss is
    ``Σ weights[t]·L_t(ground truth) + Σ kd_weights[t]·T²·KL(teacher^T ‖ student^T)``
    over t ∈ {ctc, intent, parse}, plus ``kd_weights.hidden`` × encoder-state MSE.
    ``labelled: false`` drops the ground-truth terms and decodes the teacher's own parse
    as the decoder's target sequence (what the retraining flow does on production audio).
    """

    temperature: float = Field(2.0, gt=0)
    weights: dict[Literal["ctc", "intent", "parse", "inter_ctc"], float] = {
        "ctc": 0.5, "intent": 0.5, "parse": 0.5, "inter_ctc": 0.0
    }
    kd_weights: dict[Literal["ctc", "intent", "parse", "hidden"], float] = {
        "ctc": 1.0, "intent": 1.0, "parse": 1.0, "hidden": 0.0
    }
    labelled: bool = True


class QATSettings(_Strict):
    """Quantisation-aware training: fake int8 quantisation (the ONNX Runtime dynamic
    scheme) is switched on after ``start_fraction`` of the planned epochs; the best
    epoch is chosen among the QAT epochs, so the chosen weights are the ones that were
    trained with rounding."""

    enabled: bool = True
    start_fraction: float = Field(0.6, ge=0, lt=1)


class StreamingSettings(_Strict):
    """Dynamic-chunk training (one model for every latency): each batch uses full
    context with probability ``full_context_p``, else a chunk of ``chunks`` (encoder
    frames, drawn uniformly) with ``left_chunks`` of left context (null = all).
    ``eval_chunks``: chunk sizes the benchmark reports accuracy for (0 = full context)."""

    chunks: list[int] = [1, 2, 4, 8]
    full_context_p: float = Field(0.5, ge=0, le=1)
    left_chunks: int | None = Field(None, ge=1)
    eval_chunks: list[int] = [1, 2, 4, 0]


class StudentSettings(_Strict):
    """The deployed model: a smaller, causal encoder distilled from the teacher.
    ``normalise``: its feature normalisation, which must be causal to stream: ``causal``
    (running per-utterance mean blended with the global mean, see
    ``model.frontend.features``) or ``global`` (fixed training-set statistics)."""

    normalise: Literal["causal", "global"] = "causal"
    model: ModelSettings = ModelSettings()
    train: TrainSettings = TrainSettings()
    distill: DistillSettings = DistillSettings()
    qat: QATSettings = QATSettings()
    streaming: StreamingSettings = StreamingSettings()


class TrackingSettings(_Strict):
    """MLflow. ``tracking_uri`` empty → SQLite in ``<workspace>/mlflow/mlflow.db`` with
    artifacts in ``<workspace>/mlflow/artifacts``."""

    tracking_uri: str | None = None
    experiment: str = "voiceloop"
    registered_model: str = "voiceloop-slu"


class TrafficSettings(_Strict):
    """The production-traffic store (``serving.traffic``).

    ``root``: a folder or an fsspec URL (``s3://…``); empty → ``<workspace>/traffic``.
    ``sample``: fraction of requests logged (0–1). The background writer commits a batch
    every ``batch_max_records`` records or ``batch_max_seconds`` seconds, whichever comes
    first; a request arriving while ``queue_max`` records wait is counted as dropped.
    """

    root: str | None = None
    sample: float = Field(1.0, ge=0, le=1)
    batch_max_records: int = Field(256, ge=1)
    batch_max_seconds: float = Field(2.0, gt=0)
    queue_max: int = Field(4096, ge=1)


class ServingSettings(_Strict):
    """The HTTP service (``voiceloop serve``).

    Audio limits: ``max_audio_bytes`` is checked before the body is read (Content-Length)
    and while it streams; ``max_duration_s`` after decoding (both answer 413). An upload
    whose RMS level is below ``silence_dbfs`` is answered 200 with ``clarify: true`` and
    an empty transcript, without running the model. ``poll_seconds``: how often registry
    aliases and the canary share are re-read. ``workers``: inference threads (0 = one
    per core); each ONNX Runtime session uses ``model_threads`` intra-op threads.
    """

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_audio_bytes: int = Field(2_000_000, ge=1000)
    max_duration_s: float = Field(15.0, gt=0)
    silence_dbfs: float = -60.0
    poll_seconds: float = Field(5.0, gt=0)
    workers: int = Field(0, ge=0)
    model_threads: int = Field(1, ge=1)
    canary_share_tag: str = "canary_share"
    traffic: TrafficSettings = TrafficSettings()


class Settings(_Strict):
    """Everything one run needs: profile name, seed, workspace and stage settings."""

    profile: str
    seed: int
    workspace: Path
    corpus: CorpusSettings
    features: FeatureSettings = FeatureSettings()
    model: ModelSettings = ModelSettings()
    train: TrainSettings = TrainSettings()
    decode: DecodeSettings = DecodeSettings()
    student: StudentSettings = StudentSettings()
    tracking: TrackingSettings = TrackingSettings()
    serving: ServingSettings = ServingSettings()

    @property
    def traffic_root(self) -> str:
        """Where the production-traffic store lives (a folder or an fsspec URL)."""
        return self.serving.traffic.root or str(self.workspace / "traffic")

    @property
    def corpus_dir(self) -> Path:
        """Where the corpus of this profile lives: ``<workspace>/corpus/<profile>``."""
        return self.workspace / "corpus" / self.profile

    @property
    def models_dir(self) -> Path:
        """Where this profile's trained models live: ``<workspace>/models/<profile>``."""
        return self.workspace / "models" / self.profile

    @property
    def tracking_uri(self) -> str:
        return self.tracking.tracking_uri or f"sqlite:///{self.workspace / 'mlflow' / 'mlflow.db'}"

    @property
    def artifact_root(self) -> Path:
        return self.workspace / "mlflow" / "artifacts"


def repo_root() -> Path:
    """The repository root (the folder holding ``params.yaml``)."""
    return Path(__file__).resolve().parent.parent


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_settings(
    params_path: Path | None = None,
    profile: str | None = None,
    workspace: Path | None = None,
) -> Settings:
    """Parse ``params.yaml`` into :class:`Settings`.

    Args:
        params_path: path to ``params.yaml``; defaults to the repository's.
        profile: profile name; defaults to ``profile`` in the file.
        workspace: workspace folder; defaults to ``$VOICELOOP_WORKSPACE``, then to
            ``workspace`` in the file. A relative path is taken from the folder of
            ``params.yaml``.

    Raises:
        ValueError: unknown profile or invalid values (the message names the field).
    """
    params_path = params_path or repo_root() / "params.yaml"
    raw = yaml.safe_load(params_path.read_text(encoding="utf-8")) or {}
    profiles: dict[str, Any] = raw.get("profiles") or {}
    name = profile or raw.get("profile", "quick")
    if name not in profiles:
        raise ValueError(f"unknown profile {name!r}; params.yaml defines {sorted(profiles)}")
    merged = _deep_merge(raw.get("base") or {}, profiles[name] or {})
    ws = workspace or os.environ.get("VOICELOOP_WORKSPACE") or raw.get("workspace", "workspace")
    ws_path = Path(ws)
    if not ws_path.is_absolute():
        ws_path = params_path.resolve().parent / ws_path
    return Settings(profile=name, seed=int(raw.get("seed", 0)), workspace=ws_path, **merged)
