"""The default model against River's online forecasters on the NAB development half, in one run.

Every forecaster sees each file's readings one at a time, forecasts the next one, then learns
the reading (strictly online, as the worker). Scored as ``lstream eval`` scores
(:mod:`evaluation.metrics`): MASE against persistence after each file's first 15%; per
forecaster the median over files, the share of files below 1 (beats "no change"), the worst
file, and microseconds per step (one stream at a time, forecast + learn; for lstream also the
worker's batched cost, every file in one lockstep replay).

Peers (River, ``pip install 'lstream[peers]'``): SNARIMAX(2,1,1) with BayesianLinearRegression
(plus a bias feature: River 0.26's regressor fails on the first, empty, feature set without
one), simple exponential smoothing, Holt's linear trend, additive Holt-Winters with a one-day
season (from the timestamps; Holt's where there is none), and seasonal-naive.

    lstream bench river_peers            # full files: a few minutes on 2 cores
    lstream bench river_peers --quick    # the first 1200 rows of each file
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

NAB_DATA = Path(__file__).resolve().parents[2] / "shared" / "nab" / "data"
QUICK_ROWS = 1200


def _river_models(season: int) -> dict[str, Callable[[], object]]:
    from river import compose, linear_model, time_series

    def bias(x: dict) -> dict:
        return {**x, "bias": 1.0}

    models: dict[str, Callable[[], object]] = {
        "SNARIMAX(2,1,1)+BLR": lambda: time_series.SNARIMAX(
            p=2, d=1, q=1, regressor=compose.FuncTransformer(bias) | linear_model.BayesianLinearRegression()),
        "exp. smoothing": lambda: time_series.HoltWinters(alpha=0.5),
        "Holt linear": lambda: time_series.HoltWinters(alpha=0.5, beta=0.1),
    }
    if season > 0:
        models["Holt-Winters (day)"] = lambda: time_series.HoltWinters(alpha=0.3, beta=0.05, gamma=0.3,
                                                                       seasonality=season)
    else:
        models["Holt-Winters (day)"] = lambda: time_series.HoltWinters(alpha=0.5, beta=0.1)
    return models


def _river_forecasts(make: Callable[[], object], x: np.ndarray) -> tuple[np.ndarray, float]:
    """Row t: the forecast of x[t] made after learning x[:t] (persistence until the model can forecast)."""
    model = make()
    out = np.full(len(x), np.nan)
    # Holt-Winters' start divides by the first level: shift the stream (by an amount its first
    # reading fixes, so still online) to keep it away from 0; the models are shift-equivariant.
    off = abs(float(x[0])) + 1.0 - float(x[0])
    t0 = time.perf_counter()
    for t in range(len(x)):
        try:
            out[t] = float(model.forecast(horizon=1)[0]) - off  # type: ignore[attr-defined]
        except (IndexError, ValueError, ZeroDivisionError):
            out[t] = np.nan
        if not np.isfinite(out[t]):
            out[t] = x[t - 1] if t > 0 else np.nan
        try:
            model.learn_one(float(x[t]) + off)  # type: ignore[attr-defined]
        except ZeroDivisionError:
            pass
    return out, (time.perf_counter() - t0) / len(x) * 1e6


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lstream bench river_peers", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"only the first {QUICK_ROWS} rows of each file")
    p.add_argument("--data", default=str(NAB_DATA), help="NAB data directory (default: the shared development half)")
    p.add_argument("--model", default=None, help="model artifact (default: the bundled default model)")
    args = p.parse_args(argv)
    try:
        import river  # noqa: F401
    except ImportError:
        print("river is not installed: pip install 'lstream[peers]' (skipped)")
        return 0
    from evaluation.metrics import forecast_metrics, season_length
    from evaluation.nab import corpus_files
    from evaluation.replay import replay_series, replay_streams
    from kernels import load_model
    from kernels.engine import Engine
    from series.csvdata import read_csv
    from worker.settings import DEFAULT_MODEL

    model = load_model(args.model or str(DEFAULT_MODEL))
    streams = []
    for f in corpus_files(args.data):
        s = read_csv(f.path, columns=["value"])
        s.name = f.name
        if args.quick:
            s.values, s.ts = s.values[:QUICK_ROWS], s.ts[:QUICK_ROWS]
            if s.ts_text is not None:
                s.ts_text = s.ts_text[:QUICK_ROWS]
        if np.ptp(s.values[:, 0]) > 0:  # a constant file has no MASE
            streams.append(s)
    rows = sum(len(s) for s in streams)
    mase: dict[str, list[float]] = {}
    micros: dict[str, float] = {}

    def score(name: str, s: object, expected: np.ndarray, season: int) -> None:
        m = forecast_metrics(s.values, expected.reshape(-1, 1), season=season)  # type: ignore[attr-defined]
        mase.setdefault(name, []).append(m.mase)

    # lstream: one stream at a time (per-event cost of a lone stream), then all in lockstep (the worker's batching).
    name = f"lstream {model.version}"
    spent = 0.0
    for s in streams:
        engine = Engine(model)
        t0 = time.perf_counter()
        r = replay_series(engine, s)
        spent += time.perf_counter() - t0
        score(name, s, r.expected[:, 0], season_length(s.ts))
    micros[name] = spent / rows * 1e6
    t0 = time.perf_counter()
    replay_streams(Engine(model), streams)
    batched = (time.perf_counter() - t0) / rows * 1e6
    for s in streams:
        season = season_length(s.ts)
        x = s.values[:, 0]
        if season:
            naive = np.full(len(x), np.nan)
            naive[season:] = x[:-season]
            score("seasonal-naive (day)", s, naive, season)
        else:
            score("seasonal-naive (day)", s, np.r_[np.nan, x[:-1]], season)
        micros["seasonal-naive (day)"] = 0.0
        for peer, make in _river_models(season).items():
            fc, us = _river_forecasts(make, x)
            score(peer, s, fc, season)
            micros[peer] = micros.get(peer, 0.0) + us * len(x) / rows
    print(f"NAB development half: {len(streams)} non-constant files, {rows} readings"
          + (f" (first {QUICK_ROWS} rows each)" if args.quick else "")
          + "; MASE vs persistence after each file's first 15%")
    print(f"{'forecaster':<28} {'median MASE':>11} {'% below 1':>9} {'worst':>7} {'us/step':>8}")
    order = sorted(mase, key=lambda k: float(np.nanmedian(mase[k])))
    for k in order:
        v = np.array(mase[k], dtype=float)
        v = v[np.isfinite(v)]
        print(f"{k:<28} {np.median(v):11.3f} {100 * np.mean(v < 1):9.0f} {v.max():7.2f} {micros[k]:8.1f}")
    print(f"(lstream batched, all files in lockstep: {batched:.1f} us per stream-step)")
    return 0
