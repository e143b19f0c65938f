"""The corpus stage: grammar → labelled sentences → TTS audio → augmentation → manifests.

``build_corpus`` is the one function the CLI, the DVC stage and the flows call. It is
resumable (finished audio is skipped), deterministic by seed (each utterance draws its
voice and augmentation from a generator keyed by its own id), and loses nothing: an
utterance that cannot be rendered is written to ``quarantine.jsonl`` with its reason,
and the report's counts balance (planned = written + quarantined).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import soundfile as sf
from pydantic import BaseModel
from tqdm import tqdm

from model.data.augment import SOURCE_SEP, Augmenter, RIRBank, augment_rng
from model.data.grammar import Grammar, GrammarReport, LabelledSentence, Template
from model.data.manifest import AugmentStep, ManifestRow, read_manifest, write_manifest
from model.data.parallel import pool_context
from model.data.seeding import stable_rng
from model.data.splits import (
    ALL_SPLITS,
    SPLITS,
    TemplateSplit,
    select_templates,
    split_templates,
)
from model.data.stats import CorpusStats, corpus_stats
from model.data.tts import SynthJob, VoiceSpec, sample_heldout_voice, sample_voice, synthesize
from model.fileio import atomic_path
from voiceloop.settings import AugmentSettings, CorpusSettings, Settings

__all__ = [
    "CorpusLayout",
    "CorpusReport",
    "CorpusValidationError",
    "CorpusValidator",
    "PlannedUtterance",
    "QuarantinedUtterance",
    "build_corpus",
    "corpus_templates",
    "load_corpus_rows",
    "per_template_counts",
    "plan_corpus",
]

log = logging.getLogger(__name__)


class CorpusValidationError(RuntimeError):
    """The built corpus failed its Great Expectations suite; see the report path."""


@dataclass(frozen=True)
class CorpusLayout:
    """Where a corpus keeps its files, under ``root`` (``<workspace>/corpus/<profile>``)."""

    root: Path

    @property
    def clean_dir(self) -> Path:
        return self.root / "clean"

    @property
    def audio_dir(self) -> Path:
        return self.root / "audio"

    @property
    def manifests_dir(self) -> Path:
        return self.root / "manifests"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    @property
    def rir_dir(self) -> Path:
        return self.root / "rir"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine.jsonl"

    def manifest(self, split: str) -> Path:
        return self.manifests_dir / f"{split}.jsonl"

    def manifests(self) -> list[Path]:
        """The manifests of every split this corpus has (held-out-voice splits if built)."""
        return [self.manifest(s) for s in ALL_SPLITS
                if s in SPLITS or self.manifest(s).exists()]


@dataclass(frozen=True)
class PlannedUtterance:
    """An utterance to render: its labels, split and voice."""

    id: str
    sentence: LabelledSentence
    split: str
    voice: VoiceSpec


class QuarantinedUtterance(BaseModel):
    """An utterance that could not be added to the corpus, and why."""

    id: str
    transcript: str
    intent: str
    template_id: str
    split: str
    engine: str
    voice: str
    reason: str


class CorpusReport(BaseModel):
    """What one corpus build did; every count balances."""

    profile: str
    seed: int
    templates: int
    train_only_intents: list[str]
    sentences_sampled: int
    sentences_labelled: int
    sentences_duplicate: int
    sentences_dropped: dict[str, int]
    planned: int
    synthesized: int
    resumed: int
    written: int
    quarantined: int
    quarantine_reasons: dict[str, int]
    validation_passed: bool | None = None
    stats: CorpusStats


@dataclass
class _Plan:
    utterances: list[PlannedUtterance]
    grammar_report: GrammarReport
    split: TemplateSplit
    grammar: Grammar = field(repr=False)


def _utterance_id(sentence: LabelledSentence) -> str:
    digest = hashlib.sha1(f"{sentence.template_id}\x00{sentence.text}".encode()).hexdigest()
    return f"u{digest[:12]}"


def per_template_counts(
    templates: Sequence[Template], settings: CorpusSettings
) -> dict[str, int]:
    """Sentences the corpus samples from each template: ``utterances_per_template``,
    raised for intents with few templates to reach ``min_utterances_per_intent``.
    (Relative to each other, these are also how often the corpus speaks each template.)"""
    per_intent = Counter(t.intent for t in templates)
    counts = {}
    for t in templates:
        boost = math.ceil(settings.min_utterances_per_intent / per_intent[t.intent])
        counts[t.id] = max(settings.utterances_per_template, boost)
    return counts


def corpus_templates(settings: Settings, grammar: Grammar) -> list[Template]:
    """The templates (every split) the corpus of ``settings`` is built from: the profile's
    ``max_templates`` / ``max_intents`` / ``intents`` selection, drawn with the corpus seed.
    Deterministic; the traffic simulator's baseline speaks these templates too."""
    cs = settings.corpus
    return select_templates(
        grammar.templates,
        stable_rng(settings.seed, "select"),
        max_templates=cs.max_templates,
        max_intents=cs.max_intents,
        intents=cs.intents,
    )


def plan_corpus(settings: Settings, grammar: Grammar | None = None,
                progress: bool = False) -> _Plan:
    """Choose templates, split them, sample labelled sentences and assign voices.

    Pure apart from reading the grammar: no audio is produced. Deterministic by
    ``settings.seed``. ``progress``: a bar while the sentences are labelled.
    """
    cs = settings.corpus
    grammar = grammar or Grammar.load(cs.language)
    templates = corpus_templates(settings, grammar)
    split = split_templates(
        templates, cs.split.valid, cs.split.test, stable_rng(settings.seed, "split")
    )
    sentences, report = grammar.generate(
        templates, per_template_counts(templates, cs), stable_rng(settings.seed, "sample"),
        progress=progress,
    )
    if cs.max_utterances is not None and len(sentences) > cs.max_utterances:
        keep = stable_rng(settings.seed, "cap").choice(
            len(sentences), size=cs.max_utterances, replace=False
        )
        sentences = [sentences[i] for i in sorted(keep)]
    planned: dict[str, PlannedUtterance] = {}
    for sentence in sentences:
        uid = _utterance_id(sentence)
        if uid in planned:
            continue  # same sentence from the same template: one recording is enough
        voice = sample_voice(cs.tts, stable_rng(settings.seed, "voice", uid))
        planned[uid] = PlannedUtterance(uid, sentence, split.split_of[sentence.template_id], voice)
    if cs.tts.heldout is not None:
        planned.update(_plan_heldout(settings, list(planned.values())))
    return _Plan(list(planned.values()), report, split, grammar)


def _plan_heldout(
    settings: Settings, utterances: list[PlannedUtterance]
) -> dict[str, PlannedUtterance]:
    """The held-out-voice twins: a random subset of the valid / test sentences spoken by
    the held-out voice family, ids ``h…`` (the twin of ``u…``)."""
    held = settings.corpus.tts.heldout
    assert held is not None
    twins: dict[str, PlannedUtterance] = {}
    for split, count in (("valid", held.valid_utterances), ("test", held.test_utterances)):
        pool = [u for u in utterances if u.split == split]
        order = stable_rng(settings.seed, "heldout", split).permutation(len(pool))
        for i in sorted(order[:count]):
            utt = pool[int(i)]
            uid = "h" + utt.id[1:]
            voice = sample_heldout_voice(settings.corpus.tts, stable_rng(settings.seed, "voice", uid))
            twins[uid] = PlannedUtterance(uid, utt.sentence, f"{split}_heldout", voice)
    return twins


# -- augmentation workers ---------------------------------------------------------------

_AUGMENTER: Augmenter | None = None
_AUG_SEED = 0


def _init_augmenter(
    settings: AugmentSettings, sample_rate: int, rir_dir: Path, babble: list[Path], seed: int
) -> None:
    global _AUGMENTER, _AUG_SEED
    bank = RIRBank.build(settings.reverb, seed, sample_rate, rir_dir) if settings.reverb.p else None
    _AUGMENTER = Augmenter(settings, sample_rate, bank, babble)
    _AUG_SEED = seed


def _augment_one(job: tuple[str, Path, Path]) -> tuple[str, Path, list[AugmentStep], float]:
    """Augment one clean file; returns (id, final audio path, steps, duration s)."""
    uid, clean, out = job
    assert _AUGMENTER is not None
    audio, sr = sf.read(clean, dtype="float32")
    augmented, steps = _AUGMENTER(audio, augment_rng(_AUG_SEED, uid))
    if not steps:
        return uid, clean, [], len(audio) / sr
    if not out.exists():
        with atomic_path(out) as tmp:
            sf.write(tmp, augmented, sr, subtype="PCM_16")
    return uid, out, steps, len(augmented) / sr


def _portable(step: AugmentStep, manifests_dir: Path) -> dict:
    """A step as recorded in the manifest: babble source paths relative to the manifest's
    folder, like ``audio``, so a corpus can be moved or rebuilt elsewhere byte-identically."""
    record = step.model_dump()
    sources = record["params"].get("sources")
    if isinstance(sources, str):
        record["params"]["sources"] = SOURCE_SEP.join(
            os.path.relpath(src, manifests_dir) for src in sources.split(SOURCE_SEP)
        )
    return record


def _augment_all(
    jobs: list[tuple[str, Path, Path]],
    settings: Settings,
    layout: CorpusLayout,
    babble: list[Path],
    workers: int,
    progress: bool,
) -> dict[str, tuple[Path, list[AugmentStep], float]]:
    cs = settings.corpus
    init_args = (cs.augment, cs.tts.sample_rate, layout.rir_dir, babble, settings.seed)
    # Build the RIR bank once here so workers only load it from the cache.
    if cs.augment.reverb.p:
        RIRBank.build(cs.augment.reverb, settings.seed, cs.tts.sample_rate, layout.rir_dir,
                      progress=progress)
    results: dict[str, tuple[Path, list[AugmentStep], float]] = {}
    bar = tqdm(total=len(jobs), desc="augment", unit="utt", disable=not progress)
    if workers <= 1 or len(jobs) < 64:
        _init_augmenter(*init_args)
        for job in jobs:
            uid, path, steps, dur = _augment_one(job)
            results[uid] = (path, steps, dur)
            bar.update()
    else:
        with ProcessPoolExecutor(
            workers, mp_context=pool_context(__name__), initializer=_init_augmenter,
            initargs=init_args,
        ) as pool:
            for uid, path, steps, dur in pool.map(_augment_one, jobs, chunksize=32):
                results[uid] = (path, steps, dur)
                bar.update()
    bar.close()
    return results


# -- the stage --------------------------------------------------------------------------


CorpusValidator = Callable[[CorpusLayout, Grammar], bool]
"""Validates a built corpus's manifests (writing its report into ``reports/``) and says
whether they passed; the stage layer passes the Great Expectations suite."""


def build_corpus(
    settings: Settings, progress: bool = True, validate: CorpusValidator | None = None
) -> CorpusReport:
    """Build (or resume) the corpus of ``settings.profile`` under ``settings.corpus_dir``.

    Writes ``manifests/{train,valid,test}.jsonl`` (plus the held-out-voice splits when
    configured), ``quarantine.jsonl`` and ``reports/`` (statistics, per-intent balance,
    validation). Raises :class:`CorpusValidationError` when ``validate`` fails.
    """
    cs = settings.corpus
    layout = CorpusLayout(settings.corpus_dir)
    for folder in (layout.clean_dir, layout.audio_dir, layout.manifests_dir, layout.reports_dir):
        folder.mkdir(parents=True, exist_ok=True)
    workers = cs.workers or os.cpu_count() or 1

    plan = plan_corpus(settings, progress=progress)
    log.info("planned %d utterances from %d templates", len(plan.utterances),
             plan.grammar_report.templates)
    jobs = [
        SynthJob(u.id, u.sentence.text, u.voice, layout.clean_dir / f"{u.id}.wav")
        for u in plan.utterances
    ]
    synth = synthesize(jobs, sample_rate=cs.tts.sample_rate, workers=workers, progress=progress)

    quarantined: list[QuarantinedUtterance] = []
    rendered: list[PlannedUtterance] = []
    for utt, res in zip(plan.utterances, synth, strict=True):
        reason = res.error
        if reason is None and not (
            cs.validation.min_duration_s <= res.duration_s <= cs.validation.max_duration_s
        ):
            reason = f"duration {res.duration_s:.2f}s outside " \
                     f"[{cs.validation.min_duration_s}, {cs.validation.max_duration_s}]"
        if reason is None:
            rendered.append(utt)
        else:
            quarantined.append(_quarantine(utt, reason))

    # Babble is made of other training utterances, never of held-out ones.
    train_clean = sorted(layout.clean_dir / f"{u.id}.wav" for u in rendered if u.split == "train")
    babble_rng = stable_rng(settings.seed, "babble")
    babble = [train_clean[i] for i in sorted(babble_rng.permutation(len(train_clean))[:64])]
    aug_jobs = [
        (u.id, layout.clean_dir / f"{u.id}.wav", layout.audio_dir / f"{u.id}.wav")
        for u in rendered
    ]
    augmented = _augment_all(aug_jobs, settings, layout, babble, workers, progress)

    rows_by_split: dict[str, list[ManifestRow]] = {
        s: [] for s in ALL_SPLITS if s in SPLITS or cs.tts.heldout}
    for utt in rendered:
        path, steps, duration = augmented[utt.id]
        rows_by_split[utt.split].append(_manifest_row(utt, path, steps, duration, layout))
    for split, rows in rows_by_split.items():
        write_manifest(layout.manifest(split), sorted(rows, key=lambda r: r.id))
    _write_jsonl(layout.quarantine, [q.model_dump() for q in quarantined])

    all_rows = [r for rows in rows_by_split.values() for r in rows]
    stats = corpus_stats(all_rows)
    report = CorpusReport(
        profile=settings.profile,
        seed=settings.seed,
        templates=plan.grammar_report.templates,
        train_only_intents=list(plan.split.train_only_intents),
        sentences_sampled=plan.grammar_report.sampled,
        sentences_labelled=plan.grammar_report.labelled,
        sentences_duplicate=plan.grammar_report.duplicates,
        sentences_dropped=dict(plan.grammar_report.dropped),
        planned=len(plan.utterances),
        synthesized=sum(1 for r in synth if r.error is None and not r.skipped),
        resumed=sum(1 for r in synth if r.skipped),
        written=len(all_rows),
        quarantined=len(quarantined),
        quarantine_reasons=dict(Counter(q.reason.split(":")[0] for q in quarantined)),
        stats=stats,
    )
    if validate is not None:
        report.validation_passed = validate(layout, plan.grammar)
    _write_reports(layout, report)
    if report.validation_passed is False:
        raise CorpusValidationError(
            f"corpus failed validation: see {layout.reports_dir / 'validation.md'}"
        )
    return report


def load_corpus_rows(layout: CorpusLayout) -> list[ManifestRow]:
    """All manifest rows of a built corpus, every split."""
    return [row for path in layout.manifests() if path.exists() for row in read_manifest(path)]


def _quarantine(utt: PlannedUtterance, reason: str) -> QuarantinedUtterance:
    return QuarantinedUtterance(
        id=utt.id,
        transcript=utt.sentence.text,
        intent=utt.sentence.intent,
        template_id=utt.sentence.template_id,
        split=utt.split,
        engine=utt.voice.engine,
        voice=utt.voice.voice,
        reason=reason,
    )


def _manifest_row(
    utt: PlannedUtterance,
    audio: Path,
    steps: list[AugmentStep],
    duration: float,
    layout: CorpusLayout,
) -> ManifestRow:
    return ManifestRow(
        id=utt.id,
        audio=os.path.relpath(audio, layout.manifests_dir),
        duration_s=round(duration, 4),
        transcript=utt.sentence.text,
        intent=utt.sentence.intent,
        slots=list(utt.sentence.slots),
        engine=utt.voice.engine,
        voice=utt.voice.voice,
        augment=[_portable(step, layout.manifests_dir) for step in steps],
        split=utt.split,
        template_id=utt.sentence.template_id,
        domain=utt.sentence.domain,
        rate=round(utt.voice.rate, 3),
        pitch=utt.voice.pitch,
    )


def _write_jsonl(path: Path, records: Sequence[dict]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record) + "\n")


def _write_reports(layout: CorpusLayout, report: CorpusReport) -> None:
    reports = layout.reports_dir
    (reports / "corpus_report.json").write_text(report.model_dump_json(indent=2), encoding="utf-8")
    (reports / "stats.json").write_text(report.stats.model_dump_json(indent=2), encoding="utf-8")
    validation = {True: "passed", False: "FAILED", None: "not run"}[report.validation_passed]
    lines = [
        report.stats.to_markdown(),
        "## Build",
        "",
        (
            f"- templates {report.templates}; sentences sampled {report.sentences_sampled}, "
            f"labelled {report.sentences_labelled}, duplicates {report.sentences_duplicate}, "
            f"dropped {report.sentences_dropped or 0}"
        ),
        (
            f"- planned {report.planned} = written {report.written} + quarantined "
            f"{report.quarantined} {report.quarantine_reasons or ''}"
        ),
        f"- synthesized {report.synthesized}, resumed from earlier runs {report.resumed}",
        (
            "- intents kept in train only (fewer than three templates): "
            f"{', '.join(report.train_only_intents) or 'none'}"
        ),
        f"- validation: {validation}",
    ]
    (reports / "stats.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _metrics = {
        "utterances": report.written,
        "quarantined": report.quarantined,
        "hours": round(report.stats.hours, 4),
        "intents": report.stats.intents,
        "imbalance_ratio": round(report.stats.imbalance_ratio, 3),
        **{f"utterances_{s}": n for s, n in report.stats.utterances_by_split.items()},
    }
    (layout.root / "metrics.json").write_text(json.dumps(_metrics, indent=2), encoding="utf-8")

