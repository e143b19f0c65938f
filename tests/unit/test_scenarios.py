"""Scenario configs of the traffic simulator (serving/scenarios.py): parsing, voices,
value lists, domain weights, the ramp, and errors. No audio is rendered here."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from scipy.stats import chi2

from model.data.grammar import Grammar
from model.data.seeding import stable_rng
from model.data.textnorm import is_spoken_form
from model.data.tts import sample_voice
from serving.scenarios import ScenarioSampler, load_scenario, load_scenarios
from voiceloop.settings import Settings, load_settings, repo_root

REQUIRED = {"baseline", "accent_shift", "noise_shift", "domain_shift", "new_values", "ramp"}
HELD_OUT_ACCENTS = {"en-029", "en-gb-x-gbcwmd"}  # params.yaml: left out of training


@pytest.fixture(scope="module")
def grammar() -> Grammar:
    return Grammar.load("en")


@pytest.fixture(scope="module")
def quick() -> Settings:
    return load_settings(profile="quick")


def _voices(tts: Any, n: int = 600) -> list[tuple[str, str]]:
    """(engine, accent-or-voice) of ``n`` voices drawn from ``tts``."""
    out = []
    for i in range(n):
        voice = sample_voice(tts, stable_rng(0, "test-voice", i))
        out.append((voice.engine, voice.voice.split("+")[0]))
    return out


def _all_strings(node: Any) -> set[str]:
    if isinstance(node, str):
        return {node}
    if isinstance(node, list):
        return set().union(*map(_all_strings, node)) if node else set()
    if isinstance(node, dict):
        return set().union(*map(_all_strings, node.values())) if node else set()
    return set()


def _params_with(tmp_path: Path, edit: dict[str, Any]) -> Path:
    """A copy of params.yaml with ``base.simulator.scenarios`` entries replaced."""
    raw = yaml.safe_load((repo_root() / "params.yaml").read_text(encoding="utf-8"))
    raw["base"]["simulator"]["scenarios"].update(edit)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


# -- parsing --------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", ["tiny", "quick", "full"])
def test_scenarios_parse_from_params(profile: str) -> None:
    settings = load_settings(profile=profile)
    scenarios = load_scenarios(settings)
    assert REQUIRED <= set(scenarios)
    assert scenarios["baseline"].kind == "population"
    ramp = scenarios["ramp"]
    assert ramp.kind == "ramp"
    assert [p.name for p in ramp.populations] == ["baseline", "accent_shift"]
    # populations keep the profile's corpus settings where they do not override them
    base = scenarios["baseline"].populations[0]
    assert base.tts.engine_weights == settings.corpus.tts.engine_weights
    assert base.augment == settings.corpus.augment
    assert base.tts.heldout is None
    noise = scenarios["noise_shift"].populations[0].augment
    assert noise.noise.snr_db == (0.0, 10.0)
    assert noise.noise.kinds == settings.corpus.augment.noise.kinds  # merged, not replaced
    assert noise.telephone_p > settings.corpus.augment.telephone_p
    assert noise.reverb.p > settings.corpus.augment.reverb.p


# -- voices -----------------------------------------------------------------------------------


def test_accent_shift_never_speaks_with_a_training_voice(quick: Settings) -> None:
    training = quick.corpus.tts
    tts = load_scenario(quick, "accent_shift").populations[0].tts
    voices = _voices(tts)
    engines = Counter(engine for engine, _ in voices)
    assert set(engines) == {"espeak-ng", "festival"}
    assert 0.2 < engines["festival"] / len(voices) < 0.4  # ~30 %
    for engine, voice in voices:
        if engine == "espeak-ng":
            assert voice in HELD_OUT_ACCENTS and voice not in training.espeak_accents
        else:
            assert voice == "ked" and voice not in training.festival_voices
    assert {v for e, v in voices if e == "espeak-ng"} == HELD_OUT_ACCENTS


def test_baseline_never_speaks_with_a_held_out_voice(quick: Settings) -> None:
    training = quick.corpus.tts
    assert training.heldout is not None
    tts = load_scenario(quick, "baseline").populations[0].tts
    allowed = {"espeak-ng": set(training.espeak_accents), "flite": set(training.flite_voices),
               "festival": set(training.festival_voices)}
    voices = _voices(tts)
    assert {e for e, _ in voices} == set(allowed)
    for engine, voice in voices:
        assert voice in allowed[engine]
        assert voice not in HELD_OUT_ACCENTS
        assert not (engine == training.heldout.engine and voice in training.heldout.voices)


# -- values -----------------------------------------------------------------------------------


def test_new_values_are_disjoint_from_the_training_values(quick: Settings) -> None:
    training = yaml.safe_load(
        (repo_root() / "model/data/values/en.yaml").read_text(encoding="utf-8"))
    population = load_scenario(quick, "new_values").populations[0]
    areas = population.values.area or []
    names = [n for names in (population.values.name or {}).values() for n in names]
    assert len(areas) >= 25 and len(names) >= 35
    new = population.override_values()
    assert new == set(areas) | set(names)
    assert not new & _all_strings(training), new & _all_strings(training)
    assert all(is_spoken_form(v) for v in new)
    assert population.require_values


def test_new_values_sentences_say_new_values(quick: Settings, grammar: Grammar) -> None:
    scenario = load_scenario(quick, "new_values")
    sampler = ScenarioSampler(quick, scenario, seed=0, total=10, grammar=grammar)
    new = scenario.populations[0].override_values()
    for index in range(6):
        plan = sampler.plan(index)
        assert not hasattr(plan, "reason"), plan
        assert any(slot.value in new for slot in plan.sentence.slots), plan.sentence
        assert is_spoken_form(plan.sentence.text)


# -- domains ----------------------------------------------------------------------------------


def test_domain_shift_follows_its_domain_weights(quick: Settings, grammar: Grammar) -> None:
    n = 3000
    scenario = load_scenario(quick, "domain_shift")
    weights = scenario.populations[0].domains
    assert weights is not None
    sampler = ScenarioSampler(quick, scenario, seed=0, total=n, grammar=grammar)
    assert sampler.sampler("domain_shift").missing_domains == []  # quick has them all
    observed = Counter(sampler.draw_template(i).domain for i in range(n))
    assert set(observed) <= {d for d, w in weights.items() if w > 0}
    domains = sorted(d for d, w in weights.items() if w > 0)
    total_w = sum(weights[d] for d in domains)
    expected = np.array([n * weights[d] / total_w for d in domains])
    counts = np.array([observed[d] for d in domains])
    statistic = float(((counts - expected) ** 2 / expected).sum())
    assert statistic < chi2.ppf(0.999, len(domains) - 1), dict(observed)
    # the goals moved: timers and shopping lists up, lights and climate down
    base = ScenarioSampler(quick, load_scenario(quick, "baseline"), 0, n, grammar)
    base_shares = base.sampler("baseline").domain_shares()
    shift_shares = sampler.sampler("domain_shift").domain_shares()
    for domain in ("shopping_list", "timers"):
        assert shift_shares[domain] > base_shares[domain]
    for domain in ("lights", "climate"):
        assert shift_shares[domain] < base_shares[domain]


# -- ramp -------------------------------------------------------------------------------------


def test_ramp_share_grows_with_the_request_index(quick: Settings) -> None:
    ramp = load_scenario(quick, "ramp")
    n = 2000
    shares = [ramp.shares(i, n)["accent_shift"] for i in range(n)]
    assert shares[0] == 0.0 and shares[-1] == 1.0
    assert all(b >= a for a, b in itertools.pairwise(shares))
    for i in (0, 500, 1999):
        assert sum(ramp.shares(i, n).values()) == pytest.approx(1.0)
    drawn = [ramp.population_for(i, n, seed=1).name == "accent_shift" for i in range(n)]
    quarters = [np.mean(drawn[k * n // 4:(k + 1) * n // 4]) for k in range(4)]
    assert all(b > a for a, b in itertools.pairwise(quarters)), quarters
    assert quarters[0] < 0.2 and quarters[-1] > 0.8  # expected 0.125 and 0.875
    # the end is configurable
    to_noise = load_scenario(quick, "ramp", ramp_to="noise_shift")
    assert [p.name for p in to_noise.populations] == ["baseline", "noise_shift"]
    # deterministic by seed
    assert [ramp.population_for(i, n, 1).name for i in range(50)] == \
        [ramp.population_for(i, n, 1).name for i in range(50)]


# -- errors -----------------------------------------------------------------------------------


def test_unknown_scenario_names_raise(quick: Settings) -> None:
    with pytest.raises(ValueError, match="no_such_scenario"):
        load_scenario(quick, "no_such_scenario")
    with pytest.raises(ValueError, match="ramp_to='ramp'"):
        load_scenario(quick, "ramp", ramp_to="ramp")
    with pytest.raises(ValueError, match="not a ramp"):
        load_scenario(quick, "baseline", ramp_to="accent_shift")
    with pytest.raises(ValueError, match=r"request index 5 outside \[0, 5\)"):
        load_scenario(quick, "ramp").shares(5, 5)


@pytest.mark.parametrize(
    ("edit", "bad"),
    [
        ({"x": {"tts": {"espeak_accent": ["en-us"]}}}, "espeak_accent"),
        ({"x": {"tts": {"engine_weights": {"espeak-ng": -1.0}}}}, "engine_weights"),
        ({"x": {"tts": {"rate": [1.2, 0.8]}}}, "x.tts"),
        ({"x": {"augment": {"noise": {"snr_db": [10.0, 0.0]}}}}, "x.augment"),
        ({"x": {"tts": {"heldout": {"voices": ["ked"]}}}}, "heldout"),
        ({"x": {"values": {"area": ["Sun Room"]}}}, "Sun Room"),
        ({"x": {"values": {"area": ["loft", "loft"]}}}, "loft"),
        ({"x": {"domains": {"lights": -1.0}}}, "non-negative"),
        ({"x": {"ramp": {"start": "baseline", "end": "accent_shfit"}}}, "accent_shfit"),
        ({"x": {"mix": {"ramp": 1.0}}}, "itself a mixture"),
        ({"x": {"mix": {"baseline": 1.0}, "domains": {"timers": 1.0}}}, "domains"),
        ({"Bad-Name": {}}, "Bad-Name"),
        ({"x": {"require_values": True}}, "require_values"),
        ({"x": {"surprise": 1}}, "surprise"),
    ],
)
def test_invalid_scenario_configs_raise(tmp_path: Path, edit: dict, bad: str) -> None:
    with pytest.raises(ValueError, match=bad):
        load_settings(_params_with(tmp_path, edit), profile="tiny")


@pytest.mark.parametrize(
    ("config", "bad"),
    [
        ({"domains": {"gardening": 1.0}}, "gardening"),
        ({"intents": {"HassFly": 1.0}}, "HassFly"),
        ({"values": {"name": {"spaceship": ["warp drive"]}}}, "spaceship"),
        ({"intents": {"HassTurnOn": 1.0}, "domains": {"weather": 1.0}}, "domains/intents"),
    ],
)
def test_invalid_scenario_contents_raise(tmp_path: Path, grammar: Grammar, config: dict,
                                         bad: str) -> None:
    settings = load_settings(_params_with(tmp_path, {"x": config}), profile="quick")
    with pytest.raises(ValueError, match=bad):
        ScenarioSampler(settings, load_scenario(settings, "x"), 0, 10, grammar)
