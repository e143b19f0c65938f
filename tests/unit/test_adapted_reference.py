"""A version adapted by a retraining is judged against its own first live traffic
(``monitoring.adapted_reference: live``): the earliest curated rows it embedded, and its
parent's calibrated thresholds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from model.nn.export import export_onnx, load_bundle_config
from model.nn.package import save_package
from monitoring.drift import ReferenceStore, Thresholds
from monitoring.reference import load_first, load_window
from tests.support import tiny_package
from voiceloop.retrain import inherit_thresholds
from voiceloop.settings import load_settings

T0 = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)


def _batch(curated: Path, batch_id: str, rows: list[tuple[str, str, int]]) -> None:
    """One curated batch file: rows of (request id, embedding model, seconds after T0)."""
    folder = curated / "traffic" / "dt=2026-12-01"
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({
        "request_id": [r for r, _, _ in rows], "embedding_model": [m for _, m, _ in rows],
        "timestamp": [T0 + timedelta(seconds=s) for _, _, s in rows], "batch_id": batch_id,
        # the first batch was answered by the previous version and embedded by the new one
        "model_version": "v1" if batch_id.endswith("aa") else [m for _, m, _ in rows],
    }).to_parquet(folder / f"{batch_id}.parquet", index=False)


def test_first_and_latest_rows_of_one_model(tmp_path: Path) -> None:
    # Batch ids sort by commit time; rows of another model version are never mixed in.
    _batch(tmp_path, "20261201T080010-aa", [("a1", "v2", 2), ("a0", "v2", 1), ("x", "v1", 0)])
    _batch(tmp_path, "20261201T080020-bb", [("b0", "v2", 11), ("b1", "v2", 12)])
    _batch(tmp_path, "20261201T080030-cc", [("c0", "v2", 21), ("y", "v1", 22)])
    assert load_first(tmp_path, "v2", 3)["request_id"].tolist() == ["a0", "a1", "b0"]
    assert load_window(tmp_path, "v2", 3)["request_id"].tolist() == ["b0", "b1", "c0"]
    assert load_first(tmp_path, "v2", 99)["request_id"].tolist() == ["a0", "a1", "b0", "b1", "c0"]
    assert load_first(tmp_path, "v3", 5).empty
    # served_by: only rows that version answered itself (model_version, set per batch here)
    assert load_first(tmp_path, "v2", 3, served_by="v2")["request_id"].tolist() == ["b0", "b1", "c0"]


def _thresholds() -> Thresholds:
    return Thresholds(numerical={"snr_db": 0.2}, categorical={"intent": 0.3}, embedding=0.9,
                      max_accuracy_drop=0.05, quantile=0.95, margin=1.25, windows=20,
                      window_rows=150)


@pytest.mark.parametrize("parent_has_thresholds", [True, False])
def test_a_retrained_version_inherits_its_parents_thresholds(
    tmp_path: Path, parent_has_thresholds: bool
) -> None:
    settings = load_settings(profile="tiny", workspace=tmp_path / "ws")
    parent = tiny_package("parent-v1")
    parent_dir = tmp_path / "parent"
    save_package(parent, parent_dir)
    bundle = export_onnx(tiny_package("child-v2", seed=1), tmp_path / "child").folder
    store = ReferenceStore.for_workspace(settings.workspace)
    if parent_has_thresholds:
        store.save_thresholds("parent-v1", _thresholds())
    assert inherit_thresholds(settings, parent_dir, bundle) is parent_has_thresholds
    child = store.load_thresholds(load_bundle_config(bundle).version)
    if parent_has_thresholds:
        assert child is not None and child.numerical == {"snr_db": 0.2}
        assert child.embedding == 0.9
    else:
        assert child is None


def test_the_monitor_warms_up_then_takes_the_first_live_rows_as_reference(tmp_path: Path) -> None:
    from flows.common import MonitoredModel
    from flows.monitor import reference_task
    from monitoring.ingest import curated_root
    from tests.traffic_support import synthetic_traffic

    settings = load_settings(profile="tiny", workspace=tmp_path / "ws")  # reference_rows 50
    rows = settings.monitoring.reference_rows
    target = MonitoredModel(tmp_path / "unused", "adapted-v2", "2", adapted=True)
    folder = curated_root(settings) / "traffic" / "dt=2026-03-01"
    folder.mkdir(parents=True)
    traffic = synthetic_traffic(rows + 20, seed=3, model_version="adapted-v2")
    traffic.head(rows - 1).to_parquet(folder / "20260301T000001-aa.parquet", index=False)
    warming = reference_task.fn(settings, target)  # one row short: warming up
    assert warming.frame is None and warming.live_rows == rows - 1
    traffic.iloc[rows - 1:].to_parquet(folder / "20260301T000002-bb.parquet", index=False)
    reference = reference_task.fn(settings, target).frame
    assert reference is not None
    assert reference["request_id"].tolist() == traffic["request_id"].head(rows).tolist()
    store = ReferenceStore.for_workspace(settings.workspace)
    meta = store.meta("adapted-v2")
    assert meta is not None and meta.rows == rows and "live traffic" in meta.source_split
