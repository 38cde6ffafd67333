"""evaluation/metrics.py: MASE against persistence and seasonal-naive, seasons from timestamps."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.metrics import DAY, forecast_metrics, scored_rows, season_length, summarise


def test_a_perfect_forecast_scores_zero_and_persistence_scores_one() -> None:
    x = np.cumsum(np.random.default_rng(0).normal(size=200)).reshape(-1, 1)
    perfect = np.r_[np.nan, x[1:, 0]].reshape(-1, 1)
    m = forecast_metrics(x, perfect)
    assert m.mae == 0.0 and m.rmse == 0.0 and m.mase == 0.0
    assert m.rows == 200 - scored_rows(200, 0.15) == 170
    naive = np.r_[np.nan, x[:-1, 0]].reshape(-1, 1)
    m = forecast_metrics(x, naive)
    assert m.mase == 1.0 and m.mae == m.mae_persistence and m.rmse == m.rmse_persistence


def test_mase_is_scored_after_the_probationary_rows_only() -> None:
    x = np.zeros((100, 1))
    x[::2] = 1.0  # persistence is always 1 off
    y = np.full_like(x, 0.5)
    y[0] = np.nan
    y[1:15] = 100.0  # awful during the first 15%: not scored
    m = forecast_metrics(x, y)
    assert m.mae == pytest.approx(0.5) and m.mase == pytest.approx(0.5)
    assert forecast_metrics(x, y, probation=0.0).mae > 10


def test_seasonal_naive_uses_the_lag_and_its_own_rows() -> None:
    t = np.arange(300)
    x = np.sin(2 * np.pi * t / 24).reshape(-1, 1) + 0.01 * t.reshape(-1, 1)
    y = np.r_[np.nan, x[:-1, 0]].reshape(-1, 1)  # persistence
    m = forecast_metrics(x, y, season=24)
    lag = x[24:, 0] - x[:-24, 0]  # seasonal-naive's error is the 24-step trend, 0.24
    assert m.mae_seasonal == pytest.approx(np.mean(np.abs(lag[max(45 - 24, 0):])))
    assert m.mase_seasonal == pytest.approx(m.mae / m.mae_seasonal)
    assert forecast_metrics(x, y).mae_seasonal is None


def test_undefined_ratios_are_null_in_json() -> None:
    x = np.ones((50, 1))  # constant: persistence is exact
    y = np.full_like(x, 2.0)
    d = forecast_metrics(x, y).as_dict()
    assert d["mase"] is None and d["mae"] == 1.0
    assert forecast_metrics(x, np.ones_like(x)).as_dict()["mase"] is None  # 0 / 0


def test_season_length_needs_regular_sampling_and_two_readings_a_day() -> None:
    assert season_length(np.arange(0, 10 * DAY, 3600.0)) == 24
    jitter = np.arange(0, 10 * DAY, 3600.0) + np.random.default_rng(1).uniform(-600, 600, 240)
    assert season_length(jitter) == 0
    assert season_length(np.arange(0, 1.5 * DAY, 3600.0)) == 0  # fewer than two seasons
    assert season_length(np.arange(0, 10 * DAY, 7 * 3600.0)) == 0  # a day is not a whole number of readings


def test_summary_over_streams() -> None:
    x = np.zeros((100, 1))
    x[::2] = 1.0
    good = forecast_metrics(x, np.full_like(x, 0.5))  # MASE 0.5
    bad = forecast_metrics(x, np.r_[np.nan, x[:-1, 0] * 0 + 3].reshape(-1, 1))  # far off
    flat = forecast_metrics(np.ones((100, 1)), np.ones((100, 1)))  # no MASE
    s = summarise([good, bad, flat])
    assert s.streams == 3 and s.scored == 2
    assert s.below_one == 0.5 and s.worst_mase == bad.mase
    assert s.median_mase == pytest.approx((good.mase + bad.mase) / 2)
