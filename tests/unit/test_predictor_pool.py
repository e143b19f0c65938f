"""PredictorPool: every predictor is warmed up before the pool serves; requests that wait
together run as one batch, each caller gets its own answer, and a failing batch fails
each of its callers."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from model.inference.batch import BatchPredictor
from model.inference.onnx import load_predictor
from model.inference.prediction import Prediction
from model.nn.export import export_onnx
from serving.models import PredictorPool
from tests.support import tiny_package, tone


class _Counting:
    """A real predictor (a tiny fp32 bundle) that records the size of every batch it runs
    and can be held at the start of a call, so a test can make requests queue up."""

    def __init__(self, inner: BatchPredictor) -> None:
        self.inner = inner
        self.version, self.min_samples = inner.version, inner.min_samples
        self.feature_config = inner.feature_config
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail = False

    def predict_waveforms(self, ids: list[str], waveforms: list[np.ndarray],
                          rates: list[int]) -> list[Prediction]:
        self.gate.wait(10)
        self.batches.append(len(ids))
        if self.fail:
            raise RuntimeError("model failed")
        return self.inner.predict_waveforms(ids, waveforms, rates)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(export_onnx(tiny_package("pool-test"), tmp_path_factory.mktemp("b") / "fp32").folder)


def _pool(bundle: Path, max_batch: int) -> tuple[PredictorPool, _Counting]:
    made: list[_Counting] = []

    def factory(folder: Path) -> BatchPredictor:
        made.append(_Counting(load_predictor(folder, batch_size=max_batch, use_lm=False)))
        return made[-1]  # type: ignore[return-value]

    pool = PredictorPool(bundle, 1, factory, max_batch=max_batch)
    made[0].batches.clear()  # the warm-up's calls
    return pool, made[0]


def test_every_predictor_is_warmed_up_before_the_pool_serves(bundle: Path) -> None:
    made: list[_Counting] = []

    def factory(folder: Path) -> BatchPredictor:
        made.append(_Counting(load_predictor(folder, use_lm=False)))
        return made[-1]  # type: ignore[return-value]

    pool = PredictorPool(bundle, 2, factory)
    assert [m.batches for m in made] == [[1, 1, 1], [1, 1, 1]]
    assert pool.warm_up_ms > 0


def _call_all(pool: PredictorPool, waves: list[np.ndarray]) -> dict[str, object]:
    """``pool.predict`` of every wave, each from a thread of its own, all at once."""
    out: dict[str, object] = {}

    def one(i: int) -> None:
        try:
            out[f"r{i}"] = pool.predict(f"r{i}", waves[i], 16000)
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            out[f"r{i}"] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(waves))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def test_waiting_requests_run_together_and_each_gets_its_own_answer(bundle: Path) -> None:
    pool, predictor = _pool(bundle, max_batch=4)
    waves = [tone(0.5 + 0.1 * i, freq=200.0 + 60 * i) for i in range(9)]
    alone = {f"r{i}": predictor.inner.predict_waveforms([f"r{i}"], [w], [16000])[0]
             for i, w in enumerate(waves)}
    predictor.gate.clear()  # the first call holds the only predictor: the rest queue up

    def release() -> None:  # once the other 8 wait in the queue
        for _ in range(1000):
            if len(pool._pending) == 8:
                break
            threading.Event().wait(0.01)
        predictor.gate.set()

    threading.Thread(target=release, daemon=True).start()
    out = _call_all(pool, waves)
    assert set(out) == set(alone)
    for rid, prediction in out.items():
        assert prediction.id == rid  # type: ignore[attr-defined]
        assert prediction.transcript == alone[rid].transcript  # fp32: batch-mates change nothing
        assert prediction.intent == alone[rid].intent  # type: ignore[attr-defined]
    assert sum(predictor.batches) == 9 and max(predictor.batches) <= 4
    assert len(predictor.batches) <= 4  # 1 alone, then the 8 that queued in batches of 4


def test_max_batch_one_runs_every_request_alone(bundle: Path) -> None:
    pool, predictor = _pool(bundle, max_batch=1)
    out = _call_all(pool, [tone(0.6, freq=300.0 + 50 * i) for i in range(5)])
    assert {rid: p.id for rid, p in out.items()} == {f"r{i}": f"r{i}" for i in range(5)}  # type: ignore[attr-defined]
    assert predictor.batches == [1] * 5


def test_a_failing_batch_fails_each_caller_and_the_pool_keeps_serving(bundle: Path) -> None:
    pool, predictor = _pool(bundle, max_batch=4)
    predictor.fail = True
    out = _call_all(pool, [tone(0.6)] * 3)
    assert len(out) == 3
    assert all(isinstance(v, RuntimeError) and "model failed" in str(v.__cause__)
               for v in out.values())
    predictor.fail = False
    assert pool.predict("again", tone(0.6), 16000).id == "again"


def test_bad_pool_sizes_are_refused(bundle: Path) -> None:
    with pytest.raises(ValueError, match="got 0"):
        PredictorPool(bundle, 1, lambda f: load_predictor(f), max_batch=0)
