"""The thread cap that keeps parallel processes from oversubscribing the cores."""

from __future__ import annotations

import pytest

from model.training.fit import capped_threads


def test_omp_num_threads_lowers_but_never_raises_the_requested_count(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert capped_threads(2) == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert capped_threads(2) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    assert capped_threads(2) == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "1,4")  # per nesting level: the outer one counts
    assert capped_threads(2) == 1


@pytest.mark.parametrize("value", ["0", "two", "-1", ",2"])
def test_a_malformed_omp_num_threads_is_named(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    with pytest.raises(ValueError, match=repr(value)):
        capped_threads(2)


def test_fewer_than_one_requested_thread_is_refused() -> None:
    with pytest.raises(ValueError, match="got 0"):
        capped_threads(0)
