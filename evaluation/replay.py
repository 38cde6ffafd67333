"""Run a model over recorded streams offline with the worker's own pipeline (numpy, no torch).

Every reading goes through :meth:`kernels.engine.Engine.advance`, the code the worker runs,
so forecasts, scores and anomaly flags are the ones the worker would emit for the same
readings in the same order. Several streams advance in lockstep (one ``advance`` call per
time index for all streams still running), which is what makes long replays cheap.

>>> import tempfile
>>> import numpy as np
>>> from kernels import load_model
>>> from kernels.artifact import write_artifact
>>> from kernels.engine import Engine
>>> from series.csvdata import Series
>>> arrays = {"lstm.weight_ih_l0": np.full((8, 1), 0.1), "lstm.weight_hh_l0": np.zeros((8, 2)),
...           "lstm.bias_ih_l0": np.zeros(8), "lstm.bias_hh_l0": np.zeros(8),
...           "head.0.weight": np.zeros((1, 2)), "head.0.bias": np.zeros(1)}
>>> meta = {"input_size": 1, "hidden_size": 2, "num_layers": 1, "output_size": 1,
...         "head": [{"in": 2, "out": 1, "activation": None}], "features": ["value"],
...         "norm": {"mode": "global", "mean": [10.0], "std": [2.0]}}
>>> d = tempfile.mkdtemp(); _ = write_artifact(d, meta, arrays)
>>> s = Series("a", np.arange(3.0), np.array([[9.0], [11.0], [10.0]]), ["value"])
>>> r = replay_series(Engine(load_model(d)), s)
>>> r.forecast.ravel().tolist(), r.expected.ravel().tolist()  # the head outputs 0: the mean
([10.0, 10.0, 10.0], [nan, 10.0, 10.0])
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kernels.engine import Engine
from kernels.states import StreamStates
from series.csvdata import DataError, Series


@dataclass
class ReplayResult:
    """What the worker would have said at each reading of one stream (sensor units)."""

    name: str
    expected: np.ndarray  # float64 (T, F): forecast made at the previous reading; NaN at row 0
    forecast: np.ndarray  # float64 (T, F): forecast of the next reading
    score: np.ndarray  # float64 (T,)
    anomaly: np.ndarray  # bool (T,)
    alert: np.ndarray  # bool (T,): the reading opened an anomalous episode
    state: StreamStates  # the stream's state after its last reading


def check_features(engine: Engine, series: Series) -> None:
    """Raise DataError when a stream does not carry as many features as the model reads."""
    want = engine.model.input_size
    got = series.values.shape[1]
    if got != want:
        raise DataError(f"{series.name}: the model reads {want} value column(s) {engine.model.features}, "
                        f"got {got} {series.features}; choose them with --columns")


def replay_streams(engine: Engine, streams: Sequence[Series]) -> list[ReplayResult]:
    """Replay every stream from a fresh state, all streams advancing together."""
    for s in streams:
        check_features(engine, s)
    n = len(streams)
    f = engine.model.input_size
    lengths = np.array([len(s) for s in streams], dtype=np.int64)
    horizon = int(lengths.max()) if n else 0
    # Sorted longest first, the streams still running at time t are always a prefix, so a
    # slice selects them; outputs go into padded (n, horizon) arrays.
    order = np.argsort(-lengths, kind="stable")
    sorted_len = lengths[order]
    x = np.zeros((n, horizon, f))
    ts = np.zeros((n, horizon))
    for j, i in enumerate(order):
        x[j, : lengths[i]] = streams[i].values
        ts[j, : lengths[i]] = streams[i].ts
    expected = np.full((n, horizon, f), np.nan)
    forecast = np.full((n, horizon, f), np.nan)
    score = np.zeros((n, horizon))
    anomaly = np.zeros((n, horizon), bool)
    alert = np.zeros((n, horizon), bool)
    st = engine.new_states(n)
    for t in range(horizon):
        k = int(np.count_nonzero(sorted_len > t))
        if k == n:
            out = engine.advance(st, x[:, t], ts=ts[:, t])
        else:
            sub = st.take(slice(0, k))
            out = engine.advance(sub, x[:k, t], ts=ts[:k, t])
            st.put(slice(0, k), sub)
        expected[:k, t] = out.expected
        forecast[:k, t] = out.forecast
        score[:k, t] = out.score
        anomaly[:k, t] = out.anomaly
        alert[:k, t] = out.alert
    results: list[ReplayResult] = [None] * n  # type: ignore[list-item]
    for j, i in enumerate(order):
        m = int(lengths[i])
        results[i] = ReplayResult(streams[i].name, expected[j, :m], forecast[j, :m], score[j, :m],
                                  anomaly[j, :m], alert[j, :m], st.take(slice(j, j + 1)))
    return results


def replay_series(engine: Engine, series: Series) -> ReplayResult:
    """Replay one stream from a fresh state."""
    return replay_streams(engine, [series])[0]


def _cell(v: float) -> str:
    return "" if not np.isfinite(v) else repr(float(v))


def write_csv(series: Series, result: ReplayResult, path: str | os.PathLike[str]) -> None:
    """``timestamp, actual, expected, forecast, score, anomaly`` (anomaly as 0/1; ``expected``
    empty at the first row). With several features: ``actual_<f>``, ``expected_<f>``, ``forecast_<f>``."""
    feats = series.features
    if len(feats) == 1:
        cols = ["actual", "expected", "forecast"]
    else:
        cols = [f"{kind}_{name}" for kind in ("actual", "expected", "forecast") for name in feats]
    stamps = series.ts_text if series.ts_text is not None else [repr(float(t)) for t in series.ts]
    with open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(",".join(["timestamp", *cols, "score", "anomaly"]) + "\n")
        for i in range(len(series)):
            stamp = stamps[i]
            if "," in stamp or '"' in stamp:
                stamp = '"' + stamp.replace('"', '""') + '"'
            cells = [stamp]
            for arr in (series.values, result.expected, result.forecast):
                cells += [_cell(v) for v in arr[i]]
            cells += [repr(float(result.score[i])), "1" if result.anomaly[i] else "0"]
            fh.write(",".join(cells) + "\n")
