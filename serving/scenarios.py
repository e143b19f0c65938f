"""Traffic-simulator scenarios: who speaks to the assistant, in which rooms, asking what.

A scenario (``simulator.scenarios`` in ``params.yaml``, typed by
:class:`voiceloop.settings.ScenarioSettings`) is either a *population* — the corpus'
training distribution with some parts overridden (voices, augmentation, domain or intent
weights, value lists) — or a *mixture* of populations: a static ``mix`` or a ``ramp``
that moves from one population to another over a run (request ``i`` of ``n`` comes from
the ramp's end with probability ``i / (n - 1)``).

Nothing here is a copy of the corpus code; it is reused:

- sentences: the corpus' own template selection (:func:`model.data.corpus.corpus_templates`)
  and sampling weights (:func:`model.data.corpus.per_template_counts`), drawn and labelled
  by :meth:`model.data.grammar.Grammar.generate` (hassil recognition, spoken-form
  normalisation), with a :class:`~model.data.grammar.Grammar` rebuilt over the
  scenario's value lists when it has any;
- voices: :func:`model.data.tts.sample_voice` over the scenario's
  :class:`~voiceloop.settings.TTSSettings` (the corpus' minus the held-out family, plus
  overrides), rendered by :func:`model.data.tts.synthesize`;
- rooms and noise: :class:`model.data.augment.Augmenter` with the utterance's
  :func:`~model.data.augment.augment_rng` and a cached :class:`~model.data.augment.RIRBank`.

Determinism: utterance ``i`` of a run depends only on ``(seed, scenario name, i)`` (and on
the run's length for a ramp), never on worker count or timing.

:func:`render_utterances` renders a run's utterances in a worker pool ahead of the
consumer, yields them in index order, and removes its temporary files when it finishes
or is closed.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import soundfile as sf

from model.data.augment import Augmenter, RIRBank, augment_rng
from model.data.corpus import corpus_templates, per_template_counts
from model.data.grammar import DOMAINS, Grammar, LabelledSentence, Template
from model.data.manifest import Slot
from model.data.parallel import pool_context
from model.data.seeding import stable_rng
from model.data.tts import SynthJob, VoiceSpec, sample_voice, synthesize
from serving.contracts import Annotation
from voiceloop.settings import (
    AugmentSettings,
    ScenarioSettings,
    Settings,
    TTSSettings,
    ValueOverrides,
)

__all__ = [
    "PlannedRequest",
    "Population",
    "PopulationSampler",
    "RenderFailure",
    "Scenario",
    "ScenarioSampler",
    "SimUtterance",
    "load_scenario",
    "load_scenarios",
    "render_successes",
    "render_utterances",
]

log = logging.getLogger(__name__)

_MAX_DRAWS = 40  # template draws per request before it counts as a planning failure
_CHUNK = 8  # utterances per render task (one festival session per chunk)


# -- configuration ----------------------------------------------------------------------


@dataclass(frozen=True)
class Population:
    """One user population, resolved against the profile's corpus settings.

    Attributes:
        name: the scenario name it came from (``baseline``, ``accent_shift``, …).
        description: one line for people.
        tts: the full voice settings drawn from (corpus voices, held-out family removed,
            scenario overrides applied).
        augment: the full augmentation settings.
        domains: relative domain weights, or None for the corpus' own mix.
        intents: relative intent weights, or None for every intent of the corpus.
        values: value lists replacing the training ones (see
            :class:`~voiceloop.settings.ValueOverrides`).
        require_values: only sentences with a slot value from ``values``.
    """

    name: str
    description: str
    tts: TTSSettings
    augment: AugmentSettings
    domains: dict[str, float] | None = None
    intents: dict[str, float] | None = None
    values: ValueOverrides = field(default_factory=ValueOverrides)
    require_values: bool = False

    def override_values(self) -> set[str]:
        """Every value of the population's own value lists (empty when it has none)."""
        v = self.values
        lists = [v.area or [], v.floor or [], *(v.name or {}).values(),
                 *(v.wildcards or {}).values()]
        return {value for values in lists for value in values}


@dataclass(frozen=True)
class Scenario:
    """A named scenario: one population, or a mixture of populations.

    Attributes:
        name: the scenario's name in ``params.yaml``.
        description: one line for people.
        kind: ``population`` (one), ``mix`` (static weights) or ``ramp`` (from
            ``populations[0]`` to ``populations[1]``).
        populations: the populations mixed (one for ``population``).
        weights: relative weights of ``populations`` for ``mix`` (ignored otherwise).
    """

    name: str
    description: str
    kind: Literal["population", "mix", "ramp"]
    populations: tuple[Population, ...]
    weights: tuple[float, ...] = ()

    def shares(self, index: int, total: int) -> dict[str, float]:
        """The mixture of request ``index`` of a run of ``total`` (population → share).

        For a ramp the end's share is ``index / (total - 1)`` (0 for a one-request run):
        it grows linearly from 0 at the first request to 1 at the last.

        Raises:
            ValueError: ``index`` outside ``[0, total)``.
        """
        if not 0 <= index < total:
            raise ValueError(f"request index {index} outside [0, {total})")
        if self.kind == "population":
            return {self.populations[0].name: 1.0}
        if self.kind == "ramp":
            end = index / (total - 1) if total > 1 else 0.0
            start_pop, end_pop = self.populations
            if start_pop.name == end_pop.name:
                return {start_pop.name: 1.0}
            return {start_pop.name: 1.0 - end, end_pop.name: end}
        total_w = sum(self.weights)
        return {p.name: w / total_w for p, w in zip(self.populations, self.weights, strict=True)}

    def population_for(self, index: int, total: int, seed: int) -> Population:
        """The population that speaks request ``index`` (a draw from :meth:`shares` with a
        generator keyed by ``(seed, scenario, index)``)."""
        if self.kind == "population":
            return self.populations[0]
        shares = self.shares(index, total)
        u = stable_rng(seed, "sim-mix", self.name, index).random()
        acc = 0.0
        for population in self.populations:
            acc += shares.get(population.name, 0.0)
            if u < acc:
                return population
        return self.populations[-1]


def _population(name: str, config: ScenarioSettings, settings: Settings) -> Population:
    bad = sorted(set(config.domains or {}) - set(DOMAINS))
    if bad:
        raise ValueError(f"scenario {name!r}: unknown domains {bad}; the grammar's domains "
                         f"are {list(DOMAINS)}")
    return Population(
        name=name,
        description=config.description,
        tts=config.tts_settings(settings.corpus.tts),
        augment=config.augment_settings(settings.corpus.augment),
        domains=dict(config.domains) if config.domains is not None else None,
        intents=dict(config.intents) if config.intents is not None else None,
        values=config.values,
        require_values=config.require_values,
    )


def load_scenario(settings: Settings, name: str, *, ramp_to: str | None = None) -> Scenario:
    """Resolve scenario ``name`` of ``settings.simulator.scenarios``.

    Args:
        settings: the profile's settings (the corpus settings scenarios override).
        name: scenario name.
        ramp_to: for a ramp scenario, replace its end population with this scenario.

    Raises:
        ValueError: unknown name (the message lists the defined ones), an unknown domain,
            or ``ramp_to`` on a scenario that is not a ramp / naming an unknown or
            mixture scenario.
    """
    scenarios = settings.simulator.scenarios
    if name not in scenarios:
        raise ValueError(f"unknown scenario {name!r}; params.yaml defines {sorted(scenarios)}")
    config = scenarios[name]
    if ramp_to is not None:
        if config.ramp is None:
            raise ValueError(f"ramp_to={ramp_to!r} given but scenario {name!r} is not a ramp")
        if ramp_to not in scenarios or scenarios[ramp_to].is_mixture:
            raise ValueError(f"ramp_to={ramp_to!r} is not a population scenario; choose one "
                             f"of {sorted(k for k, v in scenarios.items() if not v.is_mixture)}")
    if config.ramp is not None:
        end = ramp_to or config.ramp.end
        populations = (_population(config.ramp.start, scenarios[config.ramp.start], settings),
                       _population(end, scenarios[end], settings))
        return Scenario(name, config.description, "ramp", populations)
    if config.mix is not None:
        parts = [(k, w) for k, w in config.mix.items() if w > 0]
        return Scenario(
            name, config.description, "mix",
            tuple(_population(k, scenarios[k], settings) for k, _ in parts),
            tuple(w for _, w in parts),
        )
    return Scenario(name, config.description, "population",
                    (_population(name, config, settings),))


def load_scenarios(settings: Settings) -> dict[str, Scenario]:
    """Every scenario of ``settings``, resolved (raises on the first invalid one)."""
    return {name: load_scenario(settings, name) for name in settings.simulator.scenarios}


# -- planning: sentences and voices -------------------------------------------------------


@dataclass(frozen=True)
class PlannedRequest:
    """What request ``index`` will say and with which voice (no audio yet)."""

    index: int
    id: str
    population: str
    sentence: LabelledSentence
    voice: VoiceSpec


@dataclass(frozen=True)
class RenderFailure:
    """Request ``index`` could not be planned or rendered (it is not sent)."""

    index: int
    id: str
    population: str
    reason: str


def _merged_values(training: dict[str, Any], overrides: ValueOverrides, where: str
                   ) -> dict[str, Any]:
    values = dict(training)
    for key in ("area", "floor"):
        if getattr(overrides, key) is not None:
            values[key] = list(getattr(overrides, key))
    for key in ("name", "wildcards"):
        given = getattr(overrides, key)
        if given is None:
            continue
        unknown = sorted(set(given) - set(training[key]))
        if unknown:
            raise ValueError(f"scenario {where!r}: values.{key} has unknown keys {unknown}; "
                             f"known: {sorted(training[key])}")
        values[key] = {**training[key], **{k: list(v) for k, v in given.items()}}
    return values


class PopulationSampler:
    """Templates and their draw probabilities for one population (built by
    :class:`ScenarioSampler`).

    Attributes:
        grammar: the grammar sentences are drawn and labelled with (the corpus grammar,
            or one rebuilt over the population's value lists).
        templates: the candidate templates; ``probs`` their draw probabilities.
        missing_domains: weighted domains the profile's corpus has no template of (their
            weight went to the other domains; logged).
    """

    def __init__(self, population: Population, base: Grammar, pool: Sequence[Template],
                 pool_weights: dict[str, int]) -> None:
        self.population = population
        if population.values == ValueOverrides():
            self.grammar = base
        else:
            values = _merged_values(base.values, population.values, population.name)
            self.grammar = Grammar(base.intents, values)
        # Templates are the same objects whatever the values: re-index the rebuilt grammar.
        by_id = {t.id: t for t in self.grammar.templates}
        templates = [by_id[t.id] for t in pool]
        weights = np.array([float(pool_weights[t.id]) for t in templates])
        if population.intents is not None:
            unknown = sorted(set(population.intents) - set(base.intent_names))
            if unknown:
                raise ValueError(f"scenario {population.name!r}: unknown intents {unknown}")
            weights *= np.array([population.intents.get(t.intent, 0.0) for t in templates])
        self.missing_domains: list[str] = []
        if population.domains is not None:
            # P(template) = P(domain) * P(template | domain): the domain weights are the
            # domains' shares of requests, whatever their template counts.
            domain_of = np.array([t.domain for t in templates])
            mass = {d: float(weights[domain_of == d].sum()) for d in population.domains}
            self.missing_domains = sorted(
                d for d, w in population.domains.items() if w > 0 and mass[d] == 0)
            if self.missing_domains:
                log.warning("scenario %r: the profile's corpus has no template of domains "
                            "%s; their weight goes to the other domains", population.name,
                            self.missing_domains)
            scale = np.array([population.domains.get(d, 0.0) / mass[d]
                              if mass.get(d) else 0.0 for d in domain_of])
            weights = weights * scale
        if weights.sum() <= 0:
            raise ValueError(f"scenario {population.name!r}: none of the profile's corpus "
                             "templates matches its domains/intents")
        self.templates = templates
        self.probs = weights / weights.sum()
        self._required = population.override_values() if population.require_values else set()

    def domain_shares(self) -> dict[str, float]:
        """Expected share of each domain among this population's requests."""
        shares: dict[str, float] = {}
        for template, p in zip(self.templates, self.probs, strict=True):
            shares[template.domain] = shares.get(template.domain, 0.0) + float(p)
        return {d: s for d, s in shares.items() if s > 0}

    def draw_template(self, rng: np.random.Generator) -> Template:
        return self.templates[int(rng.choice(len(self.templates), p=self.probs))]

    def sentence(self, rng: np.random.Generator) -> LabelledSentence | None:
        """A labelled sentence (hassil labels, spoken form), redrawn when hassil cannot
        label it or (``require_values``) it says none of the population's own values;
        None after ``_MAX_DRAWS`` draws."""
        required = self._required
        for _ in range(_MAX_DRAWS):
            template = self.draw_template(rng)
            sentences, _ = self.grammar.generate([template], 1, rng)
            if not sentences:
                continue
            sentence = sentences[0]
            if required and not any(slot.value in required for slot in sentence.slots):
                continue
            return sentence
        return None


class ScenarioSampler:
    """Plans the requests of one simulated run: population, sentence and voice of each.

    The template pool is the profile's corpus selection (every split:
    :func:`model.data.corpus.corpus_templates`), each template weighted as often as the
    corpus speaks it (:func:`model.data.corpus.per_template_counts`), then reweighted by
    the population's intent and domain weights.

    Args:
        settings: the profile's settings.
        scenario: the scenario to plan.
        seed: the run's seed.
        total: requests in the run (a ramp's share depends on it).
        grammar: the corpus language's grammar (loaded when None, ~1 s).

    Raises:
        ValueError: an unknown intent or value-list key, or no template left
            after the domain/intent weights.
    """

    def __init__(self, settings: Settings, scenario: Scenario, seed: int, total: int,
                 grammar: Grammar | None = None) -> None:
        if total < 1:
            raise ValueError(f"total must be >= 1, got {total}")
        self.scenario = scenario
        self.seed = seed
        self.total = total
        self.sample_rate = settings.corpus.tts.sample_rate
        base = grammar or Grammar.load(settings.corpus.language)
        pool = corpus_templates(settings, base)
        weights = per_template_counts(pool, settings.corpus)
        self._samplers = {p.name: PopulationSampler(p, base, pool, weights)
                          for p in scenario.populations}
        # Babble talkers: the corpus' own voices (the baseline population), first sampler.
        self._babble_tts = ScenarioSettings().tts_settings(settings.corpus.tts)

    def sampler(self, population: str) -> PopulationSampler:
        return self._samplers[population]

    def population(self, index: int) -> Population:
        """The population that speaks request ``index``."""
        return self.scenario.population_for(index, self.total, self.seed)

    def request_id(self, index: int) -> str:
        return f"sim-{self.scenario.name}-{index:06d}"

    def draw_template(self, index: int) -> Template:
        """The first template drawn for request ``index`` (cheap: no labelling); the
        planned sentence comes from it unless hassil could not label it."""
        sampler = self._samplers[self.population(index).name]
        return sampler.draw_template(self._sentence_rng(index))

    def _sentence_rng(self, index: int) -> np.random.Generator:
        return stable_rng(self.seed, "sim-sentence", self.scenario.name, index)

    def plan(self, index: int) -> PlannedRequest | RenderFailure:
        """Population, labelled sentence and voice of request ``index``."""
        population = self.population(index)
        uid = self.request_id(index)
        sentence = self._samplers[population.name].sentence(self._sentence_rng(index))
        if sentence is None:
            return RenderFailure(index, uid, population.name,
                                 f"no labelled sentence in {_MAX_DRAWS} draws")
        voice = sample_voice(population.tts,
                             stable_rng(self.seed, "sim-voice", self.scenario.name, index))
        return PlannedRequest(index, uid, population.name, sentence, voice)

    def plan_babble(self, count: int) -> list[PlannedRequest]:
        """``count`` background-talker sentences in the corpus' voices (for babble noise)."""
        sampler = next(iter(self._samplers.values()))
        planned = []
        for k in range(count):
            rng = stable_rng(self.seed, "sim-babble", k)
            sentence = sampler.sentence(rng)
            if sentence is not None:
                voice = sample_voice(self._babble_tts, rng)
                planned.append(PlannedRequest(-1, f"babble-{k:03d}", "babble", sentence, voice))
        return planned


# -- rendering ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimUtterance:
    """One rendered request with its ground truth.

    Attributes:
        index: position in the run.
        id: ``sim-<scenario>-<index>`` (the simulator's id; the service assigns its own
            ``request_id``).
        scenario: the population that spoke it.
        audio: float32 mono samples ``(T,)`` in ``[-1, 1]`` at ``sample_rate``.
        sample_rate: Hz.
        transcript, intent, slots, domain, template_id: the labels, as the corpus makes
            them (hassil recognition, spoken form).
        engine, voice, rate: the TTS voice.
        augment: augmentation kinds applied, in order (``reverb``, ``noise``, …).
        snr_db: SNR of the added noise, or None.
    """

    index: int
    id: str
    scenario: str
    audio: np.ndarray = field(repr=False)
    sample_rate: int
    transcript: str
    intent: str
    slots: tuple[Slot, ...]
    domain: str
    template_id: str
    engine: str
    voice: str
    rate: float
    augment: tuple[str, ...]
    snr_db: float | None = None

    @property
    def duration_s(self) -> float:
        return len(self.audio) / self.sample_rate

    def wav_bytes(self) -> bytes:
        """The audio as a 16-bit PCM WAV file (what a device uploads)."""
        buffer = io.BytesIO()
        sf.write(buffer, self.audio, self.sample_rate, format="WAV", subtype="PCM_16")
        return buffer.getvalue()

    def annotation(self, request_id: str, timestamp: datetime | None = None) -> Annotation:
        """The ground truth of this utterance for the service's request ``request_id``."""
        return Annotation(
            request_id=request_id,
            transcript=self.transcript,
            intent=self.intent,
            slots=list(self.slots),
            domain=self.domain,
            scenario=self.scenario,
            engine=self.engine,
            voice=self.voice,
            augment=list(self.augment),
            timestamp=timestamp,
        )


class _Renderer:
    """TTS + augmentation of planned requests; one per worker process (or in process)."""

    def __init__(self, augments: dict[str, AugmentSettings], sample_rate: int,
                 rir_dir: Path, babble: list[Path], seed: int) -> None:
        self.sample_rate = sample_rate
        self.seed = seed
        self.augmenters: dict[str, Augmenter] = {}
        for name, settings in augments.items():
            bank = None
            if settings.p > 0 and settings.reverb.p > 0:
                bank = RIRBank.build(settings.reverb, seed, sample_rate, rir_dir)
            self.augmenters[name] = Augmenter(settings, sample_rate, bank, babble)

    def render(self, planned: Sequence[PlannedRequest]) -> list[SimUtterance | RenderFailure]:
        out: list[SimUtterance | RenderFailure] = []
        with tempfile.TemporaryDirectory(prefix="voiceloop_sim_") as tmp:
            jobs = [SynthJob(p.id, p.sentence.text, p.voice, Path(tmp) / f"{p.id}.wav")
                    for p in planned]
            results = synthesize(jobs, sample_rate=self.sample_rate, workers=1, progress=False)
            for p, result in zip(planned, results, strict=True):
                if result.error is not None:
                    out.append(RenderFailure(p.index, p.id, p.population, result.error))
                    continue
                clean, _ = sf.read(result.out_path, dtype="float32")
                audio, steps = self.augmenters[p.population](clean, augment_rng(self.seed, p.id))
                snr = next((float(s.params["snr_db"]) for s in steps if s.kind == "noise"), None)
                out.append(SimUtterance(
                    index=p.index, id=p.id, scenario=p.population, audio=audio,
                    sample_rate=self.sample_rate, transcript=p.sentence.text,
                    intent=p.sentence.intent, slots=p.sentence.slots,
                    domain=p.sentence.domain, template_id=p.sentence.template_id,
                    engine=p.voice.engine, voice=p.voice.voice, rate=p.voice.rate,
                    augment=tuple(s.kind for s in steps), snr_db=snr,
                ))
        return out


_WORKER: _Renderer | None = None


def _init_worker(*args: Any) -> None:
    global _WORKER
    _WORKER = _Renderer(*args)


def _render_in_worker(planned: list[PlannedRequest]) -> list[SimUtterance | RenderFailure]:
    assert _WORKER is not None
    return _WORKER.render(planned)


def _needs_babble(populations: Sequence[Population]) -> bool:
    return any(p.augment.p > 0 and p.augment.noise.p > 0 and "babble" in p.augment.noise.kinds
               for p in populations)


def render_utterances(
    settings: Settings,
    scenario: Scenario,
    *,
    count: int,
    seed: int,
    cache_dir: Path,
    workers: int = 1,
    prefetch: int = 32,
    babble_utterances: int = 16,
    grammar: Grammar | None = None,
    sampler: ScenarioSampler | None = None,
) -> Iterator[SimUtterance | RenderFailure]:
    """Render requests ``0 … count-1`` of a run, ahead of the consumer, in index order.

    Sentences and voices are planned in the calling thread; TTS and augmentation run in
    ``workers`` processes (1 = in the calling thread), in chunks of 8, at most about
    ``max(prefetch, 8 * workers)`` utterances ahead of what has been consumed. Temporary WAVs (TTS output, babble
    talkers) live in temporary folders removed when the generator finishes or is closed
    (``contextlib.closing``); RIR banks are cached under ``cache_dir/rir``.

    Args:
        settings: the profile's settings.
        scenario: what to render (:func:`load_scenario`).
        count: requests in the run.
        seed: the run's seed (non-negative).
        cache_dir: folder for the RIR cache (kept between runs).
        workers: render processes; 0 = one per core.
        prefetch: rendered utterances computed ahead at most (about).
        babble_utterances: background-talker sentences rendered for babble noise.
        grammar: the grammar, if already loaded.
        sampler: a planner, if already built (must match ``scenario``/``seed``/``count``).

    Yields:
        One :class:`SimUtterance` or :class:`RenderFailure` per index, in order.

    Raises:
        ValueError: ``count`` < 1, a negative seed or workers, or an invalid scenario.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    workers = workers or os.cpu_count() or 1
    sampler = sampler or ScenarioSampler(settings, scenario, seed, count, grammar)
    sample_rate = settings.corpus.tts.sample_rate
    rir_dir = Path(cache_dir) / "rir"
    augments = {p.name: p.augment for p in scenario.populations}
    for name, augment in augments.items():  # simulate rooms once here; workers load them
        if augment.p > 0 and augment.reverb.p > 0:
            log.info("%s: %d rooms, RT60 %s s (simulated once, cached in %s)", name,
                     augment.reverb.bank_size, augment.reverb.rt60_s, rir_dir)
            RIRBank.build(augment.reverb, seed, sample_rate, rir_dir)
    babble_dir = Path(tempfile.mkdtemp(prefix="voiceloop_babble_"))
    pool: ProcessPoolExecutor | None = None
    try:
        babble: list[Path] = []
        if babble_utterances and _needs_babble(scenario.populations):
            planned = sampler.plan_babble(babble_utterances)
            jobs = [SynthJob(p.id, p.sentence.text, p.voice, babble_dir / f"{p.id}.wav")
                    for p in planned]
            results = synthesize(jobs, sample_rate=sample_rate, workers=1, progress=False)
            babble = sorted(r.out_path for r in results if r.error is None)
        init = (augments, sample_rate, rir_dir, babble, seed)
        local: _Renderer | None = None
        if workers == 1:
            local = _Renderer(*init)
        else:
            pool = ProcessPoolExecutor(workers, mp_context=pool_context(__name__),
                                       initializer=_init_worker, initargs=init)
        window = max(workers, math.ceil(prefetch / _CHUNK))  # chunks in flight
        pending: deque[_Merged | list[SimUtterance | RenderFailure]] = deque()
        next_index = 0

        def submit() -> None:
            nonlocal next_index
            stop = min(count, next_index + _CHUNK)
            planned_chunk: list[PlannedRequest] = []
            failures: dict[int, RenderFailure] = {}
            for index in range(next_index, stop):
                plan = sampler.plan(index)
                if isinstance(plan, RenderFailure):
                    failures[index] = plan
                else:
                    planned_chunk.append(plan)
            next_index = stop
            if pool is not None and planned_chunk:
                pending.append(_Merged(pool.submit(_render_in_worker, planned_chunk),
                                       planned_chunk, failures))
            else:
                rendered = local.render(planned_chunk) if (local and planned_chunk) else []
                pending.append(_merge(rendered, failures))

        while next_index < count or pending:
            # In process, render one chunk at a time (the consumer is the bound).
            limit = window if pool is not None else 1
            while next_index < count and len(pending) < limit:
                submit()
            head = pending.popleft()
            yield from head.result() if isinstance(head, _Merged) else head
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(babble_dir, ignore_errors=True)


def render_successes(
    settings: Settings, scenario: str, *, count: int, seed: int, cache_dir: Path,
    workers: int = 1, log_every: int = 0,
) -> tuple[list[SimUtterance], int]:
    """A whole run of ``scenario`` (:func:`render_utterances`, babble from
    ``simulator.babble_utterances``) for callers that need it all at once — benchmarks and
    tests: the utterances that rendered, in index order, and how many failed. With
    ``log_every``, an info line every that many rendered utterances."""
    items: list[SimUtterance] = []
    failures = 0
    with contextlib.closing(render_utterances(
            settings, load_scenario(settings, scenario), count=count, seed=seed,
            cache_dir=cache_dir, workers=workers,
            babble_utterances=settings.simulator.babble_utterances)) as stream:
        for item in stream:
            if isinstance(item, RenderFailure):
                failures += 1
                continue
            items.append(item)
            if log_every and len(items) % log_every == 0:
                log.info("  rendered %d/%d %s", len(items), count, scenario)
    return items, failures


@dataclass
class _Merged:
    """A render task's future plus the requests that failed planning, merged in order."""

    future: Future
    planned: list[PlannedRequest]
    failures: dict[int, RenderFailure]

    def result(self) -> list[SimUtterance | RenderFailure]:
        try:
            rendered = self.future.result()
        except Exception as exc:  # noqa: BLE001 - a dead worker must not stop the run
            log.warning("render task failed: %r", exc)
            rendered = [RenderFailure(p.index, p.id, p.population, f"render worker failed: "
                                      f"{exc!r}") for p in self.planned]
        return _merge(rendered, self.failures)


def _merge(rendered: list[SimUtterance | RenderFailure],
           failures: dict[int, RenderFailure]) -> list[SimUtterance | RenderFailure]:
    return sorted([*rendered, *failures.values()], key=lambda item: item.index)
