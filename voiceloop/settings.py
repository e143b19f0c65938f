"""Typed settings: ``params.yaml`` parsed once into pydantic models.

``params.yaml`` has a ``base`` block with every tunable number and a ``profiles`` block
whose entries (``tiny``, ``quick``, ``full``) override parts of ``base``. The chosen
profile is deep-merged over ``base`` and validated here; nothing else in the code base
reads ``params.yaml`` directly.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "AlertSettings",
    "AugmentSettings",
    "CalibrationSettings",
    "CanaryMetricSettings",
    "CanarySettings",
    "CanaryStepSettings",
    "CategoricalDriftSettings",
    "CorpusSettings",
    "DecodeSettings",
    "DriftSettings",
    "EmbeddingDriftSettings",
    "FeatureSettings",
    "FeedbackSettings",
    "FlowSettings",
    "GateFloorSettings",
    "GateSettings",
    "HeldoutVoiceSettings",
    "IngestSettings",
    "LogSinkSettings",
    "LossSettings",
    "ModelSettings",
    "MonitoringSettings",
    "NoiseSettings",
    "NumericalDriftSettings",
    "PromotionSettings",
    "RampSettings",
    "RetrainSettings",
    "RetrainStepSettings",
    "ReverbSettings",
    "ScenarioSettings",
    "ServingSettings",
    "Settings",
    "SimulatorSettings",
    "SpecAugmentSettings",
    "SplitSettings",
    "TTSSettings",
    "TrackingSettings",
    "TrafficSettings",
    "TrainSettings",
    "ValidationSettings",
    "ValueOverrides",
    "WarpSettings",
    "WebhookSinkSettings",
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
    (``order``, absolute ``discount``, n-grams of order ≥ 3 seen fewer than ``min_count``
    times left out) is trained on the training transcripts; the LM
    weight and word score are chosen from the grids by WER (SemER for a tagged model) on up to
    ``tune_utterances`` validation utterances, per model (a weaker acoustic model wants
    more LM)."""

    enabled: bool = True
    order: int = Field(3, ge=1, le=6)
    discount: float = Field(0.7, gt=0, lt=1)
    min_count: int = Field(1, ge=1)
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
    ``model.frontend.features``) or ``global`` (fixed training-set statistics).
    ``init``: the student's first weights — ``random``, or ``teacher``: the teacher's
    front end, its first ``model.encoder_layers`` blocks and its CTC and intent heads
    (layer truncation, as DistilBERT is initialised from its teacher; the student must
    then have the teacher's width, heads, FFN, kernel and subsampling; checked at load).
    A warm start (``--init-from``, the retraining flow) takes precedence over it.
    ``benchmarks/student_gap.py`` scores the released teacher cut to its first 3 blocks,
    untrained, beside the students (its own per-utterance normalisation and centred
    convolutions: the student starts from those weights, not from that model)."""

    normalise: Literal["causal", "global"] = "causal"
    init: Literal["random", "teacher"] = "random"
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
    ``audio_format``: the container of the stored mono 16-bit audio — ``wav`` (no
    encoding) or ``flac`` (lossless, smaller, but its encoder runs in the serving process
    and costs a saturated service ~10 % of its throughput; see the README's serving
    figures).
    """

    root: str | None = None
    sample: float = Field(1.0, ge=0, le=1)
    audio_format: Literal["wav", "flac"] = "wav"
    batch_max_records: int = Field(256, ge=1)
    batch_max_seconds: float = Field(2.0, gt=0)
    queue_max: int = Field(4096, ge=1)


class ServingSettings(_Strict):
    """The HTTP service (``voiceloop serve``).

    Audio limits: ``max_audio_bytes`` is checked before the body is read (Content-Length)
    and while it streams; ``max_duration_s`` after decoding (both answer 413). An upload
    whose RMS level is below ``silence_dbfs`` is answered 200 with ``clarify: true`` and
    an empty transcript, without running the model. ``poll_seconds``: how often registry
    aliases and the canary share are re-read. ``processes``: server processes sharing
    the port (a supervisor accepts and hands each connection to the process with the
    fewest open ones; 0 = one per core): the LM beam search
    holds Python's GIL, so one process cannot keep two cores busy. ``workers``: inference threads per
    process (0 = the cores divided among the processes, at least one); each ONNX Runtime
    session uses ``model_threads`` intra-op threads. ``max_batch``: requests that
    waited together run as one model call of up to this many (1 = one at a time; an
    int8 model's answer can then differ slightly with its batch-mates, see
    :class:`serving.models.PredictorPool`).
    """

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_audio_bytes: int = Field(2_000_000, ge=1000)
    max_duration_s: float = Field(15.0, gt=0)
    silence_dbfs: float = -60.0
    poll_seconds: float = Field(5.0, gt=0)
    processes: int = Field(1, ge=0)
    workers: int = Field(0, ge=0)
    model_threads: int = Field(1, ge=1)
    max_batch: int = Field(1, ge=1)
    canary_share_tag: str = "canary_share"
    traffic: TrafficSettings = TrafficSettings()


NumericalDriftMethod = Literal["wasserstein", "psi", "jensenshannon", "hellinger", "kl_div", "ed"]
CategoricalDriftMethod = Literal["jensenshannon", "psi", "hellinger", "kl_div"]


def _positive_thresholds(value: dict[str, float]) -> dict[str, float]:
    bad = {k: v for k, v in value.items() if not v > 0}
    if bad:
        raise ValueError(f"thresholds must be positive, got {bad}")
    return value


class NumericalDriftSettings(_Strict):
    """Drift of the numerical columns (audio signal features and numerical prediction
    features, ``monitoring.schema``): one Evidently ``ValueDrift`` per column.

    ``method`` is an Evidently stat test whose score is a *distance* (higher = more
    drift): with thousands of rows per window a p-value test flags shifts too small to
    matter, while a distance measures the size of the shift. ``wasserstein`` is the first
    Wasserstein distance divided by the reference's standard deviation (0.1 = the
    distribution moved by a tenth of a standard deviation). A column drifts when its
    score reaches its threshold (``thresholds[column]``, else ``threshold``); the window
    shows *data drift* when at least ``min_drifted`` columns drift (one column alone is
    too often a measurement artefact). The service columns (``latency_ms``,
    ``monitoring.schema.SERVICE_FEATURES``) are scored against their thresholds and
    reported, but never counted: server load moves them without any data shift.
    """

    method: NumericalDriftMethod = "wasserstein"
    threshold: float = Field(0.1, gt=0)
    thresholds: dict[str, float] = {}
    min_drifted: int = Field(2, ge=1)

    _thresholds = field_validator("thresholds")(_positive_thresholds)


class CategoricalDriftSettings(_Strict):
    """Prediction drift on the distributions of the categorical answer columns
    (``intent``, ``domain``, ``clarify``, and ``slot_count``: slots filled per answer,
    derived from ``slots``): one Evidently ``ValueDrift`` per column with a
    distance ``method`` (``jensenshannon``: Jensen-Shannon distance, natural log, 0-0.83).
    Any column reaching its threshold (``thresholds[column]``, else ``threshold``) is
    *prediction drift*."""

    method: CategoricalDriftMethod = "jensenshannon"
    threshold: float = Field(0.1, gt=0)
    thresholds: dict[str, float] = {}

    _thresholds = field_validator("thresholds")(_positive_thresholds)


class EmbeddingDriftSettings(_Strict):
    """Drift of the encoder embeddings (``emb_*``), Evidently ``EmbeddingsDrift``.

    Embedding drift is the expensive signal (Evidently also draws a t-SNE map of the
    rows it is given), so it runs on a seeded sample of at most ``sample_rows`` rows of
    each side, projected on the first ``pca_components`` principal components of the
    reference (fitted on the whole reference, whitened, so each component has unit
    variance; 0 keeps the raw dimensions). ``method``: an Evidently embedding drift
    method (``distance``: the ``distance`` metric between the two mean embeddings;
    ``mmd``, ``ratio``, ``model``: see ``embedding_drift_methods``), all scored
    higher-is-drift against ``threshold``. The ``distance`` threshold is tied to the
    sample size: with no drift the distance between the two means of ``k`` whitened
    components is about ``sqrt(2 k / sample_rows)`` (0.31 for 48 components and 1000
    rows), so change ``threshold`` with ``sample_rows`` (or calibrate it). With fewer
    than ``min_rows`` comparable rows on either side (same ``embedding_model`` as the
    reference, finite values) the signal is skipped.
    """

    method: Literal["distance", "mmd", "ratio", "model"] = "distance"
    distance: Literal["euclidean", "cosine", "cityblock", "chebyshev"] = "euclidean"
    sample_rows: int = Field(1000, ge=50, le=2500)
    pca_components: int = Field(48, ge=0)
    min_rows: int = Field(200, ge=10)
    threshold: float = Field(0.5, gt=0)


class CalibrationSettings(_Strict):
    """How ``monitoring.drift.calibrate_thresholds`` sets thresholds from baseline
    windows (same-distribution windows held apart from the reference *and* from the
    windows later judged): each distance threshold becomes the ``quantile`` of its
    scores over the baseline windows times ``margin``; at least ``min_windows``
    windows are required."""

    quantile: float = Field(0.95, gt=0.5, lt=1)
    margin: float = Field(1.25, ge=1)
    min_windows: int = Field(20, ge=2)


class DriftSettings(_Strict):
    """The drift decision rule (``monitoring.drift.decide_drift``).

    A window of traffic (``window_rows`` most recent rows; thresholds are valid for the
    window size they were calibrated on, and larger windows only lower the false-alarm
    rate) is compared with the production model's reference. A window with fewer than
    ``min_samples`` rows gets no decision (not drifted, marked insufficient). Otherwise
    it is **drifted** when any of these holds:

    - data drift: at least ``numerical.min_drifted`` numerical columns drift (the
      service column ``latency_ms`` is reported, not counted);
    - prediction drift: any categorical answer column drifts;
    - embedding drift: the embedding score reaches ``embedding.threshold``;
    - performance: the label-free estimate of intent accuracy (mean calibrated
      confidence) is more than ``max_accuracy_drop`` below the reference's.
    """

    window_rows: int = Field(2000, ge=10)
    min_samples: int = Field(500, ge=10)
    numerical: NumericalDriftSettings = NumericalDriftSettings()
    categorical: CategoricalDriftSettings = CategoricalDriftSettings()
    embedding: EmbeddingDriftSettings = EmbeddingDriftSettings()
    max_accuracy_drop: float = Field(0.05, gt=0, le=1)
    calibration: CalibrationSettings = CalibrationSettings()

    @model_validator(mode="after")
    def _samples(self) -> DriftSettings:
        if self.min_samples > self.window_rows:
            raise ValueError(f"min_samples {self.min_samples} > window_rows {self.window_rows}")
        return self


class LogSinkSettings(_Strict):
    """The ``log`` alert sink: one log record per new alert at ``level``."""

    level: Literal["info", "warning", "error", "critical"] = "warning"


class WebhookSinkSettings(_Strict):
    """The ``webhook`` alert sink: HTTP POST of the alert's JSON to ``url``.

    Each attempt waits at most ``timeout_s`` seconds; a failed attempt (connection
    error, timeout, non-2xx answer) is retried ``retries`` more times, ``backoff_s``
    seconds apart (doubling). A delivery that still fails is logged and counted, never
    raised into the flow. ``headers`` are added to the request (e.g. a token)."""

    url: str | None = None
    timeout_s: float = Field(5.0, gt=0)
    retries: int = Field(2, ge=0)
    backoff_s: float = Field(0.5, ge=0)
    headers: dict[str, str] = {}

    @field_validator("url")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://", value):
            raise ValueError(f"webhook url must start with http:// or https://, got {value!r}")
        return value


class AlertSettings(_Strict):
    """Drift alerts (``monitoring.alerts``), persisted in ``<workspace>/monitoring/alerts.db``.

    Alerts are deduplicated per drift *episode*: the first drifted window opens an
    episode and raises one alert; further drifted windows join it; the episode (and its
    alert) closes after ``close_after`` consecutive clean windows. ``sinks``: where a new
    alert is delivered: ``log`` and/or ``webhook`` (needs ``webhook.url``).
    """

    close_after: int = Field(3, ge=1)
    sinks: list[Literal["log", "webhook"]] = ["log"]
    log: LogSinkSettings = LogSinkSettings()
    webhook: WebhookSinkSettings = WebhookSinkSettings()

    @model_validator(mode="after")
    def _webhook_url(self) -> AlertSettings:
        if "webhook" in self.sinks and not self.webhook.url:
            raise ValueError("alerts.sinks lists webhook but alerts.webhook.url is empty")
        return self


class IngestSettings(_Strict):
    """Ingestion of committed traffic batches into the curated dataset
    (``monitoring.ingest``; the checks are ``monitoring.traffic_suite``'s).

    A request row is quarantined unless its stored audio decodes, is finite, has a rate
    in ``[min_sample_rate, max_sample_rate]`` Hz (the store keeps the *uploaded* rate),
    lasts ``[min_duration_s, max_duration_s]`` seconds, and has at most
    ``max_silence_share`` silent 10 ms frames and ``max_clipping_share`` samples at full
    scale (``monitoring.signal_features``). Embeddings are computed ``embed_batch_size``
    utterances per forward pass. A batch failing with a transient error (``OSError``) is
    tried ``retries`` more times, ``retry_backoff_s`` seconds apart (doubling), before it
    is quarantined whole. ``dvc``: version the curated dataset with DVC after a run that
    added data. ``lock_wait_s``: how long a run waits for another ingestion of the same
    workspace to finish before it gives up.
    """

    min_duration_s: float = Field(0.3, ge=0)
    max_duration_s: float = Field(15.0, gt=0)
    min_sample_rate: int = Field(8000, ge=1)
    max_sample_rate: int = Field(48000, ge=1)
    max_silence_share: float = Field(0.8, ge=0, le=1)
    max_clipping_share: float = Field(0.01, ge=0, le=1)
    embed_batch_size: int = Field(32, ge=1)
    retries: int = Field(2, ge=0)
    retry_backoff_s: float = Field(1.0, ge=0)
    dvc: bool = True
    lock_wait_s: float = Field(300.0, ge=0)

    @model_validator(mode="after")
    def _ranges(self) -> IngestSettings:
        if self.min_duration_s > self.max_duration_s:
            raise ValueError(f"min_duration_s {self.min_duration_s} > max_duration_s "
                             f"{self.max_duration_s}")
        if self.min_sample_rate > self.max_sample_rate:
            raise ValueError(f"min_sample_rate {self.min_sample_rate} > max_sample_rate "
                             f"{self.max_sample_rate}")
        return self


class MonitoringSettings(_Strict):
    """Traffic monitoring: ingestion (``ingest``), drift detection (``drift``) and
    alerting (``alerts``). ``reference_split`` / ``reference_rows``: the production
    model's own validation data that windows are compared with (featurised once per
    model version).

    ``adapted_reference``: the reference of a version registered by a retraining (one
    adapted to drifted traffic). ``live``: the first ``reference_rows`` ingested rows it
    answered itself — the world it was adapted to and promoted in, once the canary
    analysis vouched for it; until that many rows exist its windows are not judged
    ("warming up"); it starts with its parent's calibrated thresholds, if any (see
    ``voiceloop.retrain.inherit_thresholds``). ``corpus``: the
    base corpus' ``reference_split``, like the seed model — the shift that was adapted
    to then stays "drift" and is detected again after every promotion.
    """

    ingest: IngestSettings = IngestSettings()
    drift: DriftSettings = DriftSettings()
    alerts: AlertSettings = AlertSettings()
    reference_split: str = "valid"
    reference_rows: int = Field(2000, ge=50)
    adapted_reference: Literal["live", "corpus"] = "live"


class RetrainStepSettings(_Strict):
    """One warm-started training of the retraining flow (teacher or student): a short
    fine-tune, so a lower peak LR and a short warm-up."""

    epochs: int = Field(3, ge=1)
    max_minutes: float | None = Field(5.0, gt=0)
    lr: float = Field(5e-4, gt=0)
    warmup_steps: int = Field(30, ge=0)
    threads: int = Field(1, ge=1)


class RetrainSettings(_Strict):
    """The retraining flow (``flows/retrain.py``).

    ``base_profile``: the corpus profile whose train split is replayed against forgetting
    and whose test split is the gate's fixed golden set (its template split must equal
    the production model's training split: ``quick`` uses every template of ``full``).
    Labels: ``label_fraction`` of the traffic pool, at most ``max_labels``, chosen by
    active learning; teacher pseudo-labels for samples whose calibrated teacher confidence
    is at least ``pseudo_threshold``. ``replay_utterances`` old-corpus utterances join the
    new ones (``replay_ratio`` × new at least). ``min_new_samples``: fewer new samples →
    no retraining. ``valid_utterances``: validation subset per split during training.
    ``dvc_experiment``: run the training stages as ``dvc exp run
    pipelines/retrain/dvc.yaml:retrain`` when the
    workspace lies inside the repository (DVC tracks outputs inside the repo only).
    """

    base_profile: str = "quick"
    label_fraction: float = Field(0.05, ge=0, le=1)
    max_labels: int = Field(200, ge=0)
    pseudo_threshold: float = Field(0.9, ge=0, le=1)
    replay_utterances: int = Field(1500, ge=0)
    replay_ratio: float = Field(2.0, ge=0)
    min_new_samples: int = Field(30, ge=1)
    valid_utterances: int = Field(400, ge=10)
    teacher: RetrainStepSettings = RetrainStepSettings()
    student: RetrainStepSettings = RetrainStepSettings(max_minutes=5.0, lr=1e-3)
    dvc_experiment: bool = True


GateMetric = Literal["intent_accuracy", "slot_f1", "slu_f1", "exact_match", "semer", "wer", "cer"]
"""``MetricSet`` rates the offline gate can compare (``monitoring.gate`` knows which way
each one is better)."""


def _non_negative_limits(value: dict[str, float]) -> dict[str, float]:
    bad = {k: v for k, v in value.items() if not v >= 0}
    if bad:
        raise ValueError(f"limits must be non-negative numbers, got {bad}")
    return value


class GateFloorSettings(_Strict):
    """Absolute floors on the golden set that every candidate must meet, whatever
    production scores (a bad model must not pass because production is bad too, and the
    very first model has nothing to be compared with). Fractions: 0.85 = 85 %."""

    min_intent_accuracy: float = Field(0.85, ge=0, le=1)
    max_semer: float = Field(0.55, ge=0)


class GateSettings(_Strict):
    """The offline gate (``monitoring.gate``): candidate vs production on each evaluation
    set (the fixed golden set ``golden_set`` and, when there is one, labelled traffic).

    ``max_regression_pt``: per metric, how far the candidate may be worse than production,
    in percentage points (intent accuracy 0.5 = candidate ≥ production − 0.5 pt; SemER
    1.0 = candidate ≤ production + 1.0 pt); only the metrics listed are checked.
    ``slice_max_regression_pt``: the same for every slice (family/value) with at least
    ``min_slice_n`` utterances in both reports; looser, because a slice is smaller.
    ``max_latency_increase`` / ``max_size_increase``: p50 latency and bundle size may
    grow by at most this fraction (0.2 = +20 %). ``max_negative_flip_rate``: at most this
    fraction of a set's utterances may be exactly right for production and wrong for the
    candidate. ``floor``: absolute floors on the golden set.
    """

    golden_set: str = "golden"
    max_regression_pt: dict[GateMetric, float] = {
        "intent_accuracy": 0.5, "slot_f1": 1.0, "semer": 1.0, "wer": 1.0,
    }
    slice_max_regression_pt: dict[GateMetric, float] = {"intent_accuracy": 5.0, "semer": 5.0}
    min_slice_n: int = Field(100, ge=1)
    max_latency_increase: float = Field(0.2, ge=0)
    max_size_increase: float = Field(0.2, ge=0)
    max_negative_flip_rate: float = Field(0.01, ge=0, le=1)
    floor: GateFloorSettings = GateFloorSettings()

    _limits = field_validator("max_regression_pt", "slice_max_regression_pt")(
        _non_negative_limits)


class CanaryStepSettings(_Strict):
    """How one canary step is waited for (Flagger's ``interval``, Argo's ``count``).

    The flow re-analyses the step every ``interval_s`` seconds until both routes have
    answered at least ``min_samples`` requests since the step began (requests, per
    route), and gives up after ``max_wait_s`` seconds: a step still inconclusive then is
    not promoted (the flow rolls back)."""

    interval_s: float = Field(60.0, gt=0)
    min_samples: int = Field(200, ge=1)
    max_wait_s: float = Field(1800.0, gt=0)

    @model_validator(mode="after")
    def _interval(self) -> CanaryStepSettings:
        if self.interval_s > self.max_wait_s:
            raise ValueError(f"interval_s {self.interval_s} > max_wait_s {self.max_wait_s}")
        return self


class CanaryMetricSettings(_Strict):
    """Metric templates of the canary analysis (``monitoring.canary``): each compares the
    canary route with the production route over the same step. Rates are fractions
    (0.01 = 1 pt).

    - ``max_error_rate_increase``: malformed answers (no intent and no clarify, or a
      confidence that is not a number in [0, 1]): canary − production ≤ this.
    - ``rate_alpha``: the rate checks (error, clarify, feedback), the confidence check
      and the latency check fail only when the canary's excess beyond the allowed
      difference is also significant: a one-sided z-test (two proportions; two means) or,
      for latency, a binomial test of the share of canary requests slower than the limit
      gives p < this (30 canary answers put ±9 pt of noise on a 40 % rate; of 34 canary
      answers, 5 slower than the limit fail the binomial test (p = 0.026), 4 do not
      (p = 0.088)); a latency above production's relative limit must also be significant
      by a permutation test (``permutations`` reshuffles), since that limit comes from a
      production sample.
    - ``max_latency_p95_ratio`` / ``max_latency_p95_ms``: server-side p95 latency:
      canary ≤ production × ratio and ≤ this many milliseconds (or not significantly
      above, see ``rate_alpha``).
    - ``max_clarify_rate_increase``: canary − production ≤ this.
    - ``max_intent_distance``: Jensen–Shannon distance (natural log, 0–0.83) between
      the two routes' intent distributions; fails only when it is also significant: a
      permutation test (``permutations`` reshuffles of the pooled rows) gives
      p < ``intent_alpha`` (small samples alone make the distance large).
    - ``max_feedback_rate_increase``: share of requests that drew implicit feedback:
      canary − production ≤ this.
    - ``max_confidence_drop``: mean calibrated confidence (label-free accuracy estimate):
      canary ≥ production − this.
    """

    max_error_rate_increase: float = Field(0.01, ge=0, le=1)
    rate_alpha: float = Field(0.05, gt=0, lt=1)
    max_latency_p95_ratio: float = Field(1.5, ge=1)
    max_latency_p95_ms: float = Field(1000.0, gt=0)
    max_clarify_rate_increase: float = Field(0.05, ge=0, le=1)
    max_intent_distance: float = Field(0.1, gt=0)
    intent_alpha: float = Field(0.01, gt=0, lt=1)
    permutations: int = Field(200, ge=20)
    max_feedback_rate_increase: float = Field(0.03, ge=0, le=1)
    max_confidence_drop: float = Field(0.03, ge=0, le=1)

    @model_validator(mode="after")
    def _reachable_alphas(self) -> CanaryMetricSettings:
        # A permutation p-value is never below 1 / (1 + permutations): a smaller alpha
        # would make the intent and latency checks impossible to fail.
        floor = 1.0 / (1 + self.permutations)
        for name in ("rate_alpha", "intent_alpha"):
            if getattr(self, name) <= floor:
                raise ValueError(
                    f"{name} {getattr(self, name)} can never be reached with {self.permutations} "
                    f"permutations (smallest p-value {floor:.4f}): raise permutations")
        return self


class CanarySettings(_Strict):
    """The canary rollout (Flagger's ``spec.analysis``, Argo Rollouts' AnalysisRun).

    ``steps``: canary traffic shares in percent, increasing (Flagger's stepWeights); the
    last is normally 100. ``failure_limit``: a step fails when more than this many
    metric checks fail (Argo's ``failureLimit``: 0 = any failed check fails the step).
    ``step``: how long each step waits and on how many requests; ``metrics``: the limits.
    """

    steps: list[float] = [5.0, 25.0, 50.0, 100.0]
    failure_limit: int = Field(0, ge=0)
    step: CanaryStepSettings = CanaryStepSettings()
    metrics: CanaryMetricSettings = CanaryMetricSettings()

    @field_validator("steps")
    @classmethod
    def _increasing(cls, value: list[float]) -> list[float]:
        if not value:
            raise ValueError("canary steps must not be empty")
        if any(not 0 < s <= 100 for s in value):
            raise ValueError(f"canary steps must lie in (0, 100] percent, got {value}")
        if sorted(set(value)) != value:
            raise ValueError(f"canary steps must increase strictly, got {value}")
        return value


class PromotionSettings(_Strict):
    """Promotion of a retrained candidate: the offline ``gate``, then the ``canary``."""

    gate: GateSettings = GateSettings()
    canary: CanarySettings = CanarySettings()


class FlowSettings(_Strict):
    """Prefect deployments (``voiceloop flows serve``): schedules of the flows, and the
    event drift raises (a deployment trigger of the retraining flow listens for it)."""

    ingest_every_minutes: float = Field(10.0, gt=0)
    monitor_cron: str = "0 * * * *"
    retrain_cron: str = "0 3 * * 1"
    drift_event: str = "voiceloop.drift.detected"


_SPOKEN = re.compile(r"^[a-z']+( [a-z']+)*$")
_SCENARIO_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def _merge_into(base: BaseModel, override: dict[str, Any]) -> dict[str, Any]:
    """``base`` as a dict with ``override`` applied: nested settings models merge key by
    key (``noise: {snr_db: …}`` keeps the other noise fields), everything else (lists,
    ranges, ``engine_weights``) is replaced whole."""
    merged = base.model_dump()
    for key, value in override.items():
        current = getattr(base, key, None)
        if isinstance(current, BaseModel) and isinstance(value, dict):
            merged[key] = _merge_into(current, value)
        else:
            merged[key] = value
    return merged


class ValueOverrides(_Strict):
    """Open-list values a scenario's users say instead of the training ones
    (``model/data/values/<language>.yaml``). Each given list replaces the training list;
    ``name`` and ``wildcards`` replace per key (HA entity domain / wildcard list), keys
    not given keep their training values. Values are spoken forms: lower-case words."""

    area: list[str] | None = None
    floor: list[str] | None = None
    name: dict[str, list[str]] | None = None
    wildcards: dict[str, list[str]] | None = None

    @model_validator(mode="after")
    def _spoken(self) -> ValueOverrides:
        lists: list[tuple[str, list[str]]] = []
        for field in ("area", "floor"):
            values = getattr(self, field)
            if values is not None:
                lists.append((field, values))
        for field in ("name", "wildcards"):
            for key, values in (getattr(self, field) or {}).items():
                lists.append((f"{field}.{key}", values))
        for where, values in lists:
            if not values:
                raise ValueError(f"values.{where} is empty")
            bad = [v for v in values if not _SPOKEN.match(v)]
            if bad:
                raise ValueError(f"values.{where}: {bad} are not spoken forms "
                                 "(lower-case words separated by single spaces)")
            dup = sorted({v for v in values if values.count(v) > 1})
            if dup:
                raise ValueError(f"values.{where}: duplicated {dup}")
        return self


class RampSettings(_Strict):
    """A mixture that moves linearly from scenario ``start`` to scenario ``end`` over a
    run: request ``i`` of ``n`` comes from ``end`` with probability ``i / (n - 1)``."""

    start: str = "baseline"
    end: str


class ScenarioSettings(_Strict):
    """One simulated user population: who speaks, where, and what they ask.

    A scenario is either a *population* (the fields below, each overriding the corpus'
    training distribution) or a *mixture* of populations (``mix`` or ``ramp``, with no
    overrides of its own).

    Attributes:
        description: one line for people (logged when a run starts).
        tts: partial :class:`TTSSettings` over ``corpus.tts`` (e.g. ``engine_weights``,
            ``espeak_accents``, ``festival_voices``, ``rate``); given fields replace the
            corpus' whole. The held-out voice family is never drawn unless listed here.
        augment: partial :class:`AugmentSettings` over ``corpus.augment``; nested
            ``noise`` / ``reverb`` merge key by key.
        domains: relative weights over the grammar's domains (``model.data.grammar.
            DOMAINS``); a domain not listed is never asked. None: the corpus' own mix.
        intents: relative weights of intents; intents not listed are never asked.
            None: every intent of the corpus.
        values: area / floor / device-name / wildcard lists replacing the training ones.
        require_values: only sentences whose slots speak at least one value of
            ``values`` (so that a new-values population really says new values).
        mix: a static mixture: relative weights of other (population) scenarios.
        ramp: a moving mixture from one population scenario to another.
    """

    description: str = ""
    tts: dict[str, Any] = {}
    augment: dict[str, Any] = {}
    domains: dict[str, float] | None = None
    intents: dict[str, float] | None = None
    values: ValueOverrides = ValueOverrides()
    require_values: bool = False
    mix: dict[str, float] | None = None
    ramp: RampSettings | None = None

    @field_validator("domains", "intents", "mix")
    @classmethod
    def _weights(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return value
        negative = {k: w for k, w in value.items() if w < 0}
        if negative or sum(value.values()) <= 0:
            raise ValueError(f"weights must be non-negative with a positive sum, got {value}")
        return value

    @field_validator("tts")
    @classmethod
    def _no_heldout(cls, value: dict[str, Any]) -> dict[str, Any]:
        if "heldout" in value:
            raise ValueError("tts.heldout cannot be set in a scenario: list the voices to "
                             "speak with instead (e.g. festival_voices: [ked])")
        return value

    @model_validator(mode="after")
    def _values_required(self) -> ScenarioSettings:
        if self.require_values and self.values == ValueOverrides():
            raise ValueError("require_values is set but the scenario has no values")
        return self

    @property
    def is_mixture(self) -> bool:
        return self.mix is not None or self.ramp is not None

    @model_validator(mode="after")
    def _one_kind(self) -> ScenarioSettings:
        if self.mix is not None and self.ramp is not None:
            raise ValueError("a scenario has either mix or ramp, not both")
        if self.is_mixture:
            own = [f for f in ("tts", "augment", "domains", "intents", "require_values")
                   if getattr(self, f)]
            own += ["values"] if self.values != ValueOverrides() else []
            if own:
                raise ValueError(f"a mixture scenario (mix/ramp) cannot also set {own}: "
                                 "put them in the scenarios it mixes")
        return self

    def tts_settings(self, base: TTSSettings) -> TTSSettings:
        """``base`` (the corpus' voices) with this scenario's overrides, held-out family
        removed. Raises ValueError (pydantic's) on an unknown field or bad value."""
        merged = _merge_into(base, self.tts)
        merged["heldout"] = None
        return TTSSettings.model_validate(merged)

    def augment_settings(self, base: AugmentSettings) -> AugmentSettings:
        """``base`` (the corpus' augmentation) with this scenario's overrides."""
        return AugmentSettings.model_validate(_merge_into(base, self.augment))


class FeedbackSettings(_Strict):
    """Implicit feedback simulated users give after an answer: with probability
    ``p_wrong`` when the answer's frame (intent + slots) was wrong, ``p_right`` when it
    was right. A feedback is a ``correction`` (carrying the true transcript) with
    probability ``correction_share``, else a ``repeat``."""

    p_wrong: float = Field(0.6, ge=0, le=1)
    p_right: float = Field(0.02, ge=0, le=1)
    correction_share: float = Field(0.5, ge=0, le=1)


class SimulatorSettings(_Strict):
    """The traffic simulator (``voiceloop simulate``, ``serving.simulator``).

    A run sends at most ``requests`` requests and stops after ``max_seconds`` (setup
    included) whichever comes first; in-flight requests then finish or time out
    (``timeout_s``). ``rate``: target requests/s over all ``concurrency`` clients (0 = as
    fast as they go). ``devices``: simulated users, each with a stable ``X-Device-Id``.
    ``render_workers``: processes rendering TTS + augmentation ahead of the clients
    (0 = one per core; 1 = a thread of this process); at most ``prefetch`` rendered
    utterances wait. ``babble_utterances``: sentences rendered once per run to make
    babble noise. ``annotations_root``: the annotation store; empty →
    ``<workspace>/annotations`` (never inside the traffic store). ``log_every_s``: a
    progress line at least this often.
    """

    requests: int = Field(200, ge=1)
    max_seconds: float = Field(600.0, gt=0)
    rate: float = Field(5.0, ge=0)
    concurrency: int = Field(4, ge=1)
    timeout_s: float = Field(30.0, gt=0)
    devices: int = Field(50, ge=1)
    render_workers: int = Field(1, ge=0)
    prefetch: int = Field(32, ge=1)
    babble_utterances: int = Field(16, ge=0)
    log_every_s: float = Field(10.0, gt=0)
    annotations_root: str | None = None
    feedback: FeedbackSettings = FeedbackSettings()
    scenarios: dict[str, ScenarioSettings] = {"baseline": ScenarioSettings()}

    @model_validator(mode="after")
    def _references(self) -> SimulatorSettings:
        for name, scenario in self.scenarios.items():
            if not _SCENARIO_NAME.match(name):
                raise ValueError(f"scenario name {name!r}: use lower-case letters, digits "
                                 "and _ (starting with a letter)")
            parts = dict(scenario.mix or {})
            if scenario.ramp is not None:
                parts = {scenario.ramp.start: 1.0, scenario.ramp.end: 1.0}
            for part in parts:
                if part not in self.scenarios:
                    raise ValueError(f"scenario {name!r} mixes unknown scenario {part!r}; "
                                     f"defined: {sorted(self.scenarios)}")
                if self.scenarios[part].is_mixture:
                    raise ValueError(f"scenario {name!r} mixes {part!r}, itself a mixture; "
                                     "only population scenarios can be mixed")
        return self


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
    flows: FlowSettings = FlowSettings()
    promotion: PromotionSettings = PromotionSettings()
    retrain: RetrainSettings = RetrainSettings()
    simulator: SimulatorSettings = SimulatorSettings()
    monitoring: MonitoringSettings = MonitoringSettings()

    @model_validator(mode="after")
    def _scenarios_resolve(self) -> Settings:
        """Every population scenario's TTS and augmentation overrides must make valid
        settings over this profile's corpus (fail at load, naming the scenario)."""
        for name, scenario in self.simulator.scenarios.items():
            if scenario.is_mixture:
                continue
            for part, resolve, base in (
                ("tts", scenario.tts_settings, self.corpus.tts),
                ("augment", scenario.augment_settings, self.corpus.augment),
            ):
                try:
                    resolve(base)  # type: ignore[operator]
                except ValueError as exc:
                    raise ValueError(
                        f"simulator.scenarios.{name}.{part} is invalid: {exc}") from exc
        return self

    @model_validator(mode="after")
    def _student_fits_its_teacher(self) -> Settings:
        """``student.init: teacher`` copies the teacher's first blocks: fail at load, not
        after the teacher's targets were computed, when the shapes cannot match."""
        if self.student.init != "teacher":
            return self
        s, t = self.student.model, self.model
        differ = [f"{f} {getattr(s, f)} vs {getattr(t, f)}"
                  for f in ("d_model", "heads", "ffn_mult", "conv_kernel", "subsampling",
                            "frontend_channels", "ctc_upsample", "ctc_units", "decoder_layers")
                  if getattr(s, f) != getattr(t, f)]
        if s.encoder_layers > t.encoder_layers:
            differ.append(f"encoder_layers {s.encoder_layers} > {t.encoder_layers}")
        if differ:
            raise ValueError("student.init 'teacher' needs the teacher's shapes (student vs "
                             "model): " + "; ".join(differ))
        return self

    @property
    def annotations_root(self) -> Path:
        """The annotation store (ground truth of simulated requests), apart from the
        traffic store: ``simulator.annotations_root`` or ``<workspace>/annotations``."""
        root = self.simulator.annotations_root
        return Path(root) if root else self.workspace / "annotations"

    @property
    def simulations_dir(self) -> Path:
        """Where ``voiceloop simulate`` writes its reports: ``<workspace>/simulations``."""
        return self.workspace / "simulations"

    @property
    def traffic_root(self) -> str:
        """Where the production-traffic store lives (a folder or an fsspec URL)."""
        return self.serving.traffic.root or str(self.workspace / "traffic")

    @property
    def traffic_audio_cache(self) -> Path:
        """Local copies of stored traffic audio for evaluation on labelled traffic (the
        gate, the demo's scores): ``<workspace>/cache/traffic_audio``. Safe to delete."""
        return self.workspace / "cache" / "traffic_audio"

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
    overrides: Sequence[str] = (),
) -> Settings:
    """Parse ``params.yaml`` into :class:`Settings`.

    Args:
        params_path: path to ``params.yaml``; defaults to the repository's.
        profile: profile name; defaults to ``profile`` in the file.
        workspace: workspace folder; defaults to ``$VOICELOOP_WORKSPACE``, then to
            ``workspace`` in the file. A relative path is taken from the folder of
            ``params.yaml``.
        overrides: ``dotted.key=value`` settings applied after the profile (the value is
            YAML: ``student.train.max_minutes=60``, ``features.warp.speed=[0.9, 1.1]``) —
            one-off runs such as a continued training need no copy of ``params.yaml``.

    Raises:
        ValueError: unknown profile, a malformed override, or invalid values (the message
            names the field).
    """
    params_path = params_path or repo_root() / "params.yaml"
    raw = yaml.safe_load(params_path.read_text(encoding="utf-8")) or {}
    profiles: dict[str, Any] = raw.get("profiles") or {}
    name = profile or raw.get("profile", "quick")
    if name not in profiles:
        raise ValueError(f"unknown profile {name!r}; params.yaml defines {sorted(profiles)}")
    merged = _deep_merge(raw.get("base") or {}, profiles[name] or {})
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} is not dotted.key=value")
        node: dict[str, Any] = {}
        cursor = node
        parts = key.strip().split(".")
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
        cursor[parts[-1]] = yaml.safe_load(value)
        merged = _deep_merge(merged, node)
    ws = workspace or os.environ.get("VOICELOOP_WORKSPACE") or raw.get("workspace", "workspace")
    ws_path = Path(ws)
    if not ws_path.is_absolute():
        ws_path = params_path.resolve().parent / ws_path
    return Settings(profile=name, seed=int(raw.get("seed", 0)), workspace=ws_path, **merged)
