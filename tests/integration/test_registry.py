"""The registry helper on a real SQLite MLflow: promotion and rollback keep exactly one
``production`` at every moment — also when the flow dies between two alias moves — and
every version's rollout history is readable from its tags."""

from __future__ import annotations

from pathlib import Path

import pytest

from voiceloop.registry import JOURNAL_TAG, Registry, VersionRef
from voiceloop.settings import Settings, load_settings
from voiceloop.tracking import make_client

pytestmark = pytest.mark.integration


def _registry(tmp_path: Path, versions: int = 3) -> tuple[Registry, list[str]]:
    settings: Settings = load_settings(profile="tiny", workspace=tmp_path / "ws")
    client = make_client(settings)
    name = settings.tracking.registered_model
    client.create_registered_model(name)
    made = []
    for i in range(versions):
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        made.append(str(client.create_model_version(name, source=str(folder)).version))
    return Registry(settings, client), made


def _production_count(reg: Registry) -> int:
    return sum(1 for alias in reg.aliases() if alias == "production")


def test_promote_keeps_previous_and_clears_the_canary(tmp_path: Path) -> None:
    reg, (v1, v2, _) = _registry(tmp_path)
    reg.set_production(v1, "seed")
    reg.start_canary(v2, 5)
    assert reg.canary_share() == 5 and reg.alias("canary").version == v2
    reg.promote(v2, "canary passed 4 steps")
    assert reg.aliases() == {"production": v2, "previous": v1}
    assert reg.canary_share() == 0 and reg.journal() is None
    tags = reg.version_tags(v2)
    assert tags["rollout.status"] == "promoted" and "canary passed" in tags["rollout.reason"]


@pytest.mark.parametrize("crash_after", range(6))
def test_a_crash_between_alias_moves_leaves_one_production_and_recovers(
    tmp_path: Path, crash_after: int,
) -> None:
    reg, (v1, v2, _) = _registry(tmp_path)
    reg.set_production(v1, "seed")
    reg.start_canary(v2, 25)
    with pytest.raises(RuntimeError, match="simulated crash"):
        reg.promote(v2, "passed", crash_after=crash_after)
    # The dead flow left a valid state: one production, either the old or the new one.
    assert _production_count(reg) == 1 and reg.alias("production").version in (v1, v2)
    assert reg.journal() is not None
    reg.recover()  # the next flow run finishes the change
    assert reg.aliases() == {"production": v2, "previous": v1}
    assert JOURNAL_TAG not in reg.client.get_registered_model(reg.name).tags


def test_automatic_rollback_of_a_canary_and_manual_rollback_to_previous(tmp_path: Path) -> None:
    reg, (v1, v2, v3) = _registry(tmp_path)
    reg.set_production(v1, "seed")
    reg.start_canary(v2, 25)
    assert reg.rollback("canary step 2: intent disagreement 0.31 > 0.15") == v1
    assert reg.aliases() == {"production": v1} and reg.canary_share() == 0
    assert reg.version_tags(v2)["rollout.status"] == "rolled_back"
    # A promoted version that turns out bad: `voiceloop rollback` restores `previous`.
    reg.start_canary(v3, 5)
    reg.promote(v3, "passed")
    assert reg.rollback("users complain") == v1
    assert reg.aliases() == {"production": v1}  # `previous` used up: no flip-flop back
    assert reg.version_tags(v3)["rollout.status"] == "rolled_back"
    with pytest.raises(LookupError, match="nothing to roll back"):
        reg.rollback("again")


@pytest.mark.parametrize("crash_after", range(4))
def test_a_crash_during_manual_rollback_recovers(tmp_path: Path, crash_after: int) -> None:
    reg, (v1, v2, _) = _registry(tmp_path)
    reg.set_production(v1, "seed")
    reg.promote(v2, "passed")
    with pytest.raises(RuntimeError):
        reg.rollback("bad", crash_after=crash_after)
    assert _production_count(reg) == 1
    reg.recover()
    assert reg.aliases() == {"production": v1}


def test_registry_table_lists_versions_with_aliases_and_history(tmp_path: Path) -> None:
    reg, (v1, v2, v3) = _registry(tmp_path)
    reg.set_production(v1, "seed")
    reg.tag_version(v2, {"gate.result": "fail", "gate.reasons": ["slot_f1 -2.1 pt"]})
    rows = reg.versions()
    assert [r["version"] for r in rows] == [v3, v2, v1]
    assert rows[2]["aliases"] == ["production"] and rows[1]["tags"]["gate.result"] == "fail"


def test_a_new_store_is_a_migrated_copy_and_an_existing_store_is_kept(tmp_path: Path) -> None:
    """New SQLite stores start as a copy of the migrated empty template (no migration
    run per workspace); the copy is a working store whose Default experiment lives under
    the workspace's artifact root; a store that exists is never replaced."""
    import sqlite3

    from voiceloop.tracking import _empty_store_template

    settings = load_settings(profile="tiny", workspace=tmp_path / "ws")
    client = make_client(settings)
    db = Path(settings.tracking_uri.removeprefix("sqlite:///"))
    template = _empty_store_template()
    with sqlite3.connect(template) as t, sqlite3.connect(db) as d:
        head = t.execute("SELECT version_num FROM alembic_version").fetchall()
        assert head and d.execute("SELECT version_num FROM alembic_version").fetchall() == head
    default = client.get_experiment("0")
    assert Path(default.artifact_location) == settings.artifact_root / "0"
    client.create_registered_model("seeded-store-check")
    run = client.create_run(client.create_experiment("x"))
    client.log_param(run.info.run_id, "p", "1")

    make_client(settings)  # again: the store with its model and run is kept
    assert client.get_registered_model("seeded-store-check").name == "seeded-store-check"
    assert client.get_run(run.info.run_id).data.params == {"p": "1"}


def test_a_failing_canary_step_rolls_back_and_says_which_checks_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run_canary on a real registry: a conclusive failure (three times production's
    clarify rate) rolls back at once, production untouched, canary alias gone, and the
    reason names the failed check (it once crashed joining a bool instead)."""
    import logging
    from datetime import UTC, datetime, timedelta

    from flows import promote
    from tests.unit.test_canary import frame, route_records

    reg, (v1, v2, _) = _registry(tmp_path)
    reg.set_production(v1, "seed")
    settings = reg.settings
    canary = settings.promotion.canary.model_copy(update={
        "steps": [25.0, 100.0],
        "step": settings.promotion.canary.step.model_copy(
            update={"interval_s": 0.01, "min_samples": 50, "max_wait_s": 5})})
    settings = settings.model_copy(update={"promotion": settings.promotion.model_copy(
        update={"canary": canary})})
    later = datetime.now(UTC) + timedelta(seconds=30)  # after the step begins
    traffic = frame(route_records("production", v1, 400, start=later),
                    route_records("canary", v2, 200, start=later, clarify_per_20=6))
    # The store read is the one stand-in: the registry, the analysis and the rollback are real.
    monkeypatch.setattr(promote, "collect_traffic", lambda root, since: traffic)
    passed, reason, analyses = promote.run_canary(
        settings, reg, VersionRef(reg.name, v2, None, ""), VersionRef(reg.name, v1, None, ""),
        logging.getLogger("test"))
    assert not passed and len(analyses) == 1 and analyses[0].verdict == "fail"
    assert reason.startswith("canary step 1 (25 %): clarify rate"), reason
    assert reg.aliases().get("production") == v1 and "canary" not in reg.aliases()
    assert _production_count(reg) == 1
    assert reg.canary_share() == 0


def _fetch(workspace: str, version: str) -> list[tuple[str, int]]:
    """In a process of its own: the version's local copy, as (file, size) pairs."""
    from voiceloop.registry import Registry
    from voiceloop.settings import load_settings

    reg = Registry(load_settings(profile="tiny", workspace=Path(workspace)))
    folder = reg.model_folder(VersionRef(reg.name, version, None, ""))
    return sorted((p.name, p.stat().st_size) for p in folder.iterdir())


def test_processes_loading_one_version_at_once_each_get_the_whole_copy(tmp_path: Path) -> None:
    # Server processes start together and each loads production: they once shared one
    # temporary download folder, and one loaded the other's half-written copy.
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    reg, (v1, *_) = _registry(tmp_path, versions=1)
    source = tmp_path / "m0"
    for i in range(40):
        (source / f"part{i:02d}.bin").write_bytes(bytes([i]) * 200_000)
    want = sorted((p.name, p.stat().st_size) for p in source.iterdir())
    with ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("spawn")) as pool:
        copies = list(pool.map(_fetch, [str(tmp_path / "ws")] * 4, [v1] * 4))
    assert copies == [want] * 4
    cache = tmp_path / "ws" / "registry-cache" / reg.name
    assert sorted(p.name for p in cache.iterdir()) == [v1]  # no temporary folder left
