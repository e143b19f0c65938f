"""Baseline windows for threshold calibration: consecutive traffic, in arrival order."""

from __future__ import annotations

import pandas as pd
import pytest

from monitoring.drift import consecutive_windows


def _frame(n: int) -> pd.DataFrame:
    return pd.DataFrame({"request_id": [f"r{i:03d}" for i in range(n)], "x": range(n)})


def test_windows_are_disjoint_runs_of_consecutive_rows_in_arrival_order() -> None:
    windows = consecutive_windows(_frame(100), rows=20, count=4)
    assert [w["x"].tolist() for w in windows] == [list(range(i * 20, i * 20 + 20))
                                                  for i in range(4)]
    assert all(w.index.tolist() == list(range(20)) for w in windows)


def test_a_short_frame_gives_overlapping_runs_spread_over_all_of_it() -> None:
    windows = consecutive_windows(_frame(50), rows=20, count=4)
    starts = [int(w["x"].iloc[0]) for w in windows]
    assert starts[0] == 0 and starts[-1] == 30 and starts == sorted(starts)
    assert all(w["x"].diff().dropna().eq(1).all() for w in windows)


@pytest.mark.parametrize(("rows", "count", "match"), [(0, 3, "rows=0"), (5, 0, "count=0"),
                                                      (60, 2, "rows 60 > the frame's 50")])
def test_bad_sizes_are_refused_with_the_value(rows: int, count: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        consecutive_windows(_frame(50), rows=rows, count=count)
