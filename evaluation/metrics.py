"""Forecast accuracy against the two baselines every forecaster must beat.

At each reading t a model forecasts x[t+1]; it is scored on x[t+1] against that forecast,
after the first ``probation`` share of the stream (NAB's probationary 15%: the model and its
normalisation are still learning the stream). Two baselines, scored on the same rows:

- *persistence*: x[t+1] = x[t]. ``mase`` = MAE / MAE of persistence (Hyndman's MASE with the
  one-step naive error of the scored rows as its scale): below 1 beats "no change".
- *seasonal-naive*: x[t+1] = x[t+1-m], m = one day of readings (:func:`season_length`).
  ``mase_seasonal`` = MAE / MAE of seasonal-naive on the rows where it exists.

>>> x = np.array([[0.0], [1.0], [0.0], [1.0], [0.0], [1.0]])
>>> e = np.full_like(x, np.nan); e[1:] = 0.5  # always halfway
>>> m = forecast_metrics(x, e, probation=0.0, season=2)
>>> m.mae, m.mase, m.mase_seasonal  # persistence is always 1 off; seasonal-naive always right
(0.5, 0.5, inf)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

DAY = 86400.0


def season_length(ts: np.ndarray, period: float = DAY, regular: float = 0.9) -> int:
    """Readings per ``period`` seconds if the sampling is regular, else 0 (no season).

    Regular: at least ``regular`` of the gaps equal the median gap (within 1%). The season
    must hold at least 2 readings and be shorter than half the stream.

    >>> season_length(np.arange(0.0, 5 * DAY, 300.0))  # 5-minute readings: 288 a day
    288
    >>> season_length(np.cumsum(np.random.default_rng(0).exponential(300.0, 2000)))  # irregular
    0
    >>> season_length(np.arange(0.0, 100 * DAY, DAY))  # daily readings: a day is 1 reading
    0
    """
    ts = np.asarray(ts, dtype=np.float64)
    if ts.size < 3:
        return 0
    gaps = np.diff(ts)
    dt = float(np.median(gaps))
    if not dt > 0 or np.mean(np.abs(gaps - dt) <= 0.01 * dt) < regular:
        return 0
    m = round(period / dt)
    if m < 2 or abs(m * dt - period) > 0.01 * period or 2 * m >= ts.size:
        return 0
    return m


@dataclass
class Metrics:
    """One stream's accuracy (sensor units; errors pooled over features)."""

    rows: int  # scored forecasts
    mae: float
    rmse: float
    mae_persistence: float
    rmse_persistence: float
    mase: float  # mae / mae_persistence (inf when persistence is exact, nan when both are)
    season: int  # readings per season (0: none)
    mae_seasonal: float | None  # seasonal-naive on its rows (None without a season)
    mase_seasonal: float | None

    def as_dict(self) -> dict[str, Any]:
        return _finite(asdict(self))


def _finite(d: dict[str, Any]) -> dict[str, Any]:
    # JSON has no NaN or infinity: an undefined ratio is null.
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in d.items()}


def _ratio(a: float, b: float) -> float:
    if b > 0:
        return a / b
    return float("nan") if a == 0 else float("inf")


def scored_rows(n: int, probation: float) -> int:
    """Index of the first scored forecast target (at least 1: row 0 has no forecast)."""
    return max(1, int(np.floor(probation * n)))


def forecast_metrics(actual: np.ndarray, expected: np.ndarray, *, probation: float = 0.15,
                     season: int = 0) -> Metrics:
    """Accuracy of ``expected`` (T, F): row t is the forecast of ``actual`` row t made at t-1."""
    x = np.asarray(actual, dtype=np.float64).reshape(len(actual), -1)
    y = np.asarray(expected, dtype=np.float64).reshape(x.shape)
    if not 0 <= probation < 1:
        raise ValueError(f"probation: expected a share in [0, 1), got {probation}")
    start = scored_rows(len(x), probation)
    t = np.arange(start, len(x))
    t = t[np.isfinite(y[t]).all(axis=1)]
    err = x[t] - y[t]
    naive = x[t] - x[t - 1]
    nan = float("nan")
    mae = float(np.mean(np.abs(err))) if t.size else nan
    mae_p = float(np.mean(np.abs(naive))) if t.size else nan
    rmse = float(np.sqrt(np.mean(err**2))) if t.size else nan
    rmse_p = float(np.sqrt(np.mean(naive**2))) if t.size else nan
    mae_s = mase_s = None
    if season > 0:
        ts = t[t >= season]
        if ts.size:
            mae_s = float(np.mean(np.abs(x[ts] - x[ts - season])))
            mase_s = _ratio(float(np.mean(np.abs(x[ts] - y[ts]))), mae_s)
    return Metrics(int(t.size), mae, rmse, mae_p, rmse_p, _ratio(mae, mae_p), int(season), mae_s, mase_s)


@dataclass
class Summary:
    """Accuracy over many streams: per-stream ratios summarised (streams have different units)."""

    streams: int
    scored: int  # streams with a finite MASE (a constant stream has none)
    median_mase: float
    mean_mase: float
    below_one: float  # share of scored streams with MASE < 1
    worst_mase: float
    median_mase_seasonal: float | None
    below_one_seasonal: float | None
    mae: float  # over every scored row of every stream (meaningful when the units agree)
    rmse: float

    def as_dict(self) -> dict[str, Any]:
        return _finite(asdict(self))


def summarise(per_stream: Sequence[Metrics]) -> Summary:
    mase = np.array([m.mase for m in per_stream], dtype=np.float64)
    ok = mase[np.isfinite(mase)]
    seas = np.array([m.mase_seasonal for m in per_stream if m.mase_seasonal is not None], dtype=np.float64)
    seas = seas[np.isfinite(seas)]
    rows = np.array([m.rows for m in per_stream], dtype=np.float64)
    mae = np.array([m.mae for m in per_stream])
    rmse = np.array([m.rmse for m in per_stream])
    has = (rows > 0) & np.isfinite(mae)
    w = rows[has]
    tot = float(w.sum())

    def stat(a: np.ndarray, fn: Any) -> float:
        return float(fn(a)) if a.size else float("nan")

    return Summary(
        streams=len(per_stream), scored=int(ok.size),
        median_mase=stat(ok, np.median), mean_mase=stat(ok, np.mean),
        below_one=stat(ok < 1, np.mean), worst_mase=stat(ok, np.max),
        median_mase_seasonal=float(np.median(seas)) if seas.size else None,
        below_one_seasonal=float(np.mean(seas < 1)) if seas.size else None,
        mae=float((mae[has] * w).sum() / tot) if tot else float("nan"),
        rmse=float(np.sqrt((rmse[has] ** 2 * w).sum() / tot)) if tot else float("nan"),
    )
