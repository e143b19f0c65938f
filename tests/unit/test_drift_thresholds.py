"""Calibrated drift thresholds applied to windows smaller than the calibration's."""

import math

import pytest

from monitoring.drift import Thresholds
from voiceloop.settings import load_settings


def _thresholds() -> Thresholds:
    return Thresholds(numerical={"snr_db": 0.116}, categorical={"intent": 0.39},
                      embedding=0.5, max_accuracy_drop=0.05, quantile=0.95, margin=1.25,
                      windows=20, window_rows=150)


def test_a_smaller_window_gets_thresholds_raised_by_its_extra_noise() -> None:
    base = load_settings(profile="quick").monitoring.drift  # wasserstein, JS, distance
    calibrated = _thresholds()
    full = calibrated.apply(base, rows=150, reference_rows=600)
    assert full.numerical.thresholds["snr_db"] == pytest.approx(0.116)
    assert calibrated.apply(base).numerical.thresholds == full.numerical.thresholds
    assert calibrated.apply(base, rows=600).embedding.threshold == pytest.approx(0.5)
    # 121 rows (a demo's post-promotion window) against a 600-row live reference
    small = calibrated.apply(base, rows=121, reference_rows=600)
    k = math.sqrt((1 / 600 + 1 / 121) / (1 / 600 + 1 / 150))
    assert small.numerical.thresholds["snr_db"] == pytest.approx(0.116 * k)
    assert small.categorical.thresholds["intent"] == pytest.approx(0.39 * k)
    assert small.max_accuracy_drop == 0.05
    # without a reference size: the window's own noise alone
    assert calibrated.apply(base, rows=121).numerical.thresholds["snr_db"] == pytest.approx(
        0.116 * math.sqrt(150 / 121))
    # configured thresholds that calibration did not set stay as configured
    for col, value in base.numerical.thresholds.items():
        if col not in calibrated.numerical:
            assert small.numerical.thresholds[col] == value
    with pytest.raises(ValueError, match="rows must be >= 1, got 0"):
        calibrated.apply(base, rows=0)


def test_embeddings_scale_by_their_sample_and_divergences_linearly() -> None:
    base = load_settings(profile="full").monitoring.drift
    sample = base.embedding.sample_rows  # 1000 rows a side
    calibrated = _thresholds().model_copy(update={"window_rows": 2000})
    # 1500 rows: fewer than the calibration's 2000, but the embedding score saw `sample`
    # rows either way
    assert calibrated.apply(base, rows=1500, reference_rows=2000).embedding.threshold == \
        pytest.approx(0.5)
    assert calibrated.apply(base, rows=500, reference_rows=2000).embedding.threshold == \
        pytest.approx(0.5 * math.sqrt((1 / sample + 1 / 500) / (2 / sample)))
    psi = base.model_copy(update={"numerical": base.numerical.model_copy(
        update={"method": "psi"})})
    assert calibrated.apply(psi, rows=500).numerical.thresholds["snr_db"] == \
        pytest.approx(0.116 * 4)
