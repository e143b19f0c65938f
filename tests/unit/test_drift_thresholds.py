"""Calibrated drift thresholds applied to windows smaller than the calibration's."""

import math

import pytest

from monitoring.drift import Thresholds
from voiceloop.settings import load_settings


def _thresholds() -> Thresholds:
    return Thresholds(numerical={"snr_db": 0.116}, categorical={"intent": 0.39},
                      embedding=0.5, max_accuracy_drop=0.05, quantile=0.95, margin=1.25,
                      windows=20, window_rows=150)


def test_a_smaller_window_gets_thresholds_raised_by_the_square_root_of_the_ratio() -> None:
    base = load_settings(profile="quick").monitoring.drift
    calibrated = _thresholds()
    full = calibrated.apply(base, rows=150)
    assert full.numerical.thresholds["snr_db"] == pytest.approx(0.116)
    assert calibrated.apply(base).numerical.thresholds == full.numerical.thresholds
    assert calibrated.apply(base, rows=600).embedding.threshold == pytest.approx(0.5)
    # 121 rows (a demo's post-promotion window) against 150-row calibration windows
    small = calibrated.apply(base, rows=121)
    k = math.sqrt(150 / 121)
    assert small.numerical.thresholds["snr_db"] == pytest.approx(0.116 * k)
    assert small.categorical.thresholds["intent"] == pytest.approx(0.39 * k)
    assert small.embedding.threshold == pytest.approx(0.5 * k)
    assert small.max_accuracy_drop == 0.05
    # configured thresholds that calibration did not set stay as configured
    for col, value in base.numerical.thresholds.items():
        if col not in calibrated.numerical:
            assert small.numerical.thresholds[col] == value
    with pytest.raises(ValueError, match="got 0"):
        calibrated.apply(base, rows=0)
