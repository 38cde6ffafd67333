"""The per-event pipeline every consumer shares: worker, ``lstream replay`` and ``lstream nab``.

For each reading x_t of a stream (contract order): compare x_t with the forecast made at the
previous step (``expected``), fold the error into the stream's detector and score it, update
the stream's normalisation, advance (h, c) one step with the scaled x_t, and forecast x_{t+1}.
Episodes: a stream enters one when its score reaches the threshold (that event raises the
alert) and leaves it after ``calm_steps`` consecutive scores under the threshold.

State lives in :class:`StreamStates`, a struct of arrays for n streams, updated in place by
:meth:`Engine.advance`; :func:`step` is the same transition as a pure function of one stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from kernels import detector
from kernels.adapt import Adapter
from kernels.norm import Normalizer
from kernels.states import StreamStates


@dataclass
class Outputs:
    """What one :meth:`Engine.advance` call says about each of its n streams (sensor units)."""

    expected: np.ndarray  # float64 (n, F): the previous forecast; NaN at a stream's first step
    forecast: np.ndarray  # float64 (n, F): prediction of the next reading
    score: np.ndarray  # float64 (n,) in [0, 1]
    anomaly: np.ndarray  # bool (n,): score >= threshold
    alert: np.ndarray  # bool (n,): this reading opened an anomalous episode


class Engine:
    """Advances streams through the model, normalisation and detector of one artifact."""

    def __init__(self, model: Any, threshold: float | None = None, calm_steps: int | None = None,
                 adapt: bool | None = None) -> None:
        self.model = model
        cfg = detector.config(model.detector)
        self.threshold = float(cfg["threshold"] if threshold is None else threshold)
        self.calm_steps = int(cfg["calm_steps"] if calm_steps is None else calm_steps)
        if self.calm_steps < 1:
            raise ValueError(f"calm_steps: expected at least 1, got {self.calm_steps}")
        self.detector_params = detector.params(model.detector)
        self.normalizer = Normalizer(model.norm, model.input_size)
        # model.json "residual": the network predicts the change from the last reading
        self.residual = bool(model.meta.get("residual", False))
        # model.json "adapt": per-stream online adaptation (kernels.adapt); absent or
        # {"enabled": false}: the global forecast alone, as before
        cfg_adapt = dict(model.meta.get("adapt") or {})
        on = bool(cfg_adapt) and bool(cfg_adapt.get("enabled", True)) if adapt is None else adapt
        self.adapter = Adapter(cfg_adapt, model.input_size, self.normalizer.clip) if on else None

    def new_states(self, n: int) -> StreamStates:
        m = self.model
        return StreamStates.zeros(n, m.num_layers, m.hidden_size, m.input_size, detector.state_size(m.input_size))

    def advance(self, st: StreamStates, x: np.ndarray, ts: np.ndarray | None = None) -> Outputs:
        """Apply one reading per stream: ``x`` (n, F) in sensor units, ``ts`` (n,) their event
        times in seconds since the epoch (for models with time features). ``st`` changes in place."""
        x = np.asarray(x, dtype=np.float64)
        n = len(st)
        if x.shape != (n, self.model.input_size):
            raise ValueError(f"readings: expected shape ({n}, {self.model.input_size}), got {x.shape}")
        norm = self.normalizer
        seen = st.steps > 0
        mean, std = norm.current(st.norm)
        pred = st.pred.astype(np.float64)
        expected = np.where(seen[:, None], pred * std + mean, np.nan)
        err = np.where(seen[:, None], norm.scale(x, mean, std) - pred, 0.0)
        score = np.zeros(n)
        detector.update(st.anomaly, err, x, seen, self.detector_params, score)

        mean0, std0 = mean, std
        norm.observe(st.norm, x)
        mean, std = norm.current(st.norm)
        z = norm.scale(x, mean, std).astype(np.float32)
        y = self.model.step(z, st.h, st.c)
        if self.residual:
            y += z
        if self.adapter is not None:
            times = np.full(n, np.nan) if ts is None else np.asarray(ts, dtype=np.float64).reshape(n)
            y = self.adapter.step(st.adapt, x, times, seen, mean0, std0, mean, std, y).astype(np.float32)
        st.pred[:] = y
        st.steps += 1
        forecast = y.astype(np.float64) * std + mean

        anomaly = score >= self.threshold
        alert = track_episodes(st.episode, anomaly, self.calm_steps)
        return Outputs(expected, forecast, score, anomaly, alert)

    def alert_reasons(self, st: StreamStates, rows: Any) -> list[tuple[str, dict[str, float]]]:
        """``(reason, evidence)`` for each stream at ``rows`` (indices or a mask over ``st``), from the
        detector's record of its last step: call it after :meth:`advance` for the streams whose
        alert opened. Codes and fields: :func:`kernels.detector.explain`, docs/detector.md."""
        f = self.model.input_size
        idx = np.atleast_1d(np.asarray(rows))
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        return [detector.explain(st.anomaly[int(i)], f) for i in idx.ravel()]


def track_episodes(episode: np.ndarray, anomaly: np.ndarray, calm_steps: int) -> np.ndarray:
    """Advance each stream's episode counter in place; True where an episode opens.

    An anomalous reading opens an episode (or keeps one open); ``calm_steps`` readings in a
    row under the threshold close it.

    >>> ep = np.array([-1])
    >>> [bool(track_episodes(ep, np.array([a]), 2)[0]) for a in [0, 1, 1, 0, 1, 0, 0, 1]]
    [False, True, False, False, False, False, False, True]
    """
    alert = anomaly & (episode < 0)
    calm = np.where(episode < 0, -1, episode + 1)
    episode[:] = np.where(anomaly, 0, np.where(calm >= calm_steps, -1, calm))
    return alert


def step(model_engine: Engine, state: StreamStates, x: np.ndarray) -> tuple[StreamStates, Outputs]:
    """The transition as a pure function of one stream's state and reading: returns new copies."""
    new = state.take(slice(None))
    out = model_engine.advance(new, np.asarray(x, dtype=np.float64).reshape(1, -1))
    return new, out
