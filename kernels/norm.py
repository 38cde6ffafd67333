"""Normalisation between sensor units and model units.

``global``: fixed ``mean``/``std`` from training. ``stream``: each stream learns its own
statistics online, an exponentially weighted mean and variance whose weight is ``1/count``
until ``count`` reaches ``window`` (so the first ``window`` readings are a plain running
mean) and ``1/window`` after, which lets the statistics follow slow drift. Scaled values are
clipped to ``[-clip, clip]`` (stream mode; global mode only if it sets ``clip``) so
that an early reading (little spread seen yet) or a wild spike cannot saturate the LSTM.
Per stream the state is ``[count, mean_1..mean_F, var_1..var_F]`` (float64, kept in Redis as ``norm``).

At each reading x_t the statistics are first updated with x_t, then x_t is scaled with
them; the forecast made at t is scaled back with the same statistics. Training applies the
very same function to each file (:func:`normalize_series`), so the model sees exactly
what the worker will feed it.

>>> import numpy as np
>>> cfg = {"mode": "stream", "window": 100, "min_std": 1e-3, "clip": 10}
>>> z, target, stats = normalize_series(np.array([[1.0], [3.0], [5.0]]), cfg)
>>> z.ravel().round(3).tolist()
[0.0, 1.0, 1.225]
>>> target.ravel().round(3).tolist()  # the first target is clipped: one reading has no spread
[10.0, 3.0]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from numba import njit

from kernels.states import norm_size

STREAM_DEFAULTS = {"window": 2000.0, "min_std": 1e-3, "clip": 10.0}


stats_size = norm_size  # the name this module's callers use


@njit(cache=True)
def _update(stats: np.ndarray, x: np.ndarray, window: float) -> None:
    # stats (n, 1+2F), x (n, F); in place.
    n, f = x.shape
    for i in range(n):
        count = stats[i, 0] + 1.0
        stats[i, 0] = count
        a = max(1.0 / count, 1.0 / window)
        for j in range(f):
            d = x[i, j] - stats[i, 1 + j]
            stats[i, 1 + j] += a * d
            stats[i, 1 + f + j] = (1.0 - a) * (stats[i, 1 + f + j] + a * d * d)


@njit(cache=True)
def _scale(stats: np.ndarray, min_std: float, mean: np.ndarray, std: np.ndarray) -> None:
    # mean/std (n, F) out: the statistics a stream's readings are scaled with.
    n = stats.shape[0]
    f = mean.shape[1]
    for i in range(n):
        for j in range(f):
            m = stats[i, 1 + j]
            mean[i, j] = m
            floor = min_std * (1.0 + abs(m))  # flat streams must not divide by ~0
            std[i, j] = max(np.sqrt(max(stats[i, 1 + f + j], 0.0)), floor)


class Normalizer:
    """Scales a batch of streams' readings into model units and back."""

    def __init__(self, cfg: Mapping[str, Any], num_features: int) -> None:
        self.mode = str(cfg.get("mode", "global"))
        self.num_features = num_features
        if self.mode == "global":
            self.mean = np.asarray(cfg["mean"], dtype=np.float64).reshape(1, num_features)
            self.std = np.asarray(cfg["std"], dtype=np.float64).reshape(1, num_features)
        elif self.mode == "stream":
            self.window = float(cfg.get("window", STREAM_DEFAULTS["window"]))
            self.min_std = float(cfg.get("min_std", STREAM_DEFAULTS["min_std"]))
        else:
            raise ValueError(f"norm.mode: expected 'global' or 'stream', got {self.mode!r}")
        # Stream mode clips by default (early readings have seen little spread); global
        # mode only when the artifact asks, so a plain (x - mean) / std model stays exact.
        default_clip = STREAM_DEFAULTS["clip"] if self.mode == "stream" else np.inf
        self.clip = float(cfg.get("clip", default_clip))

    def current(self, stats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std), each (n, F), that the streams' readings are scaled with now."""
        n = stats.shape[0]
        if self.mode == "global":
            return (np.broadcast_to(self.mean, (n, self.num_features)),
                    np.broadcast_to(self.std, (n, self.num_features)))
        mean = np.empty((n, self.num_features))
        std = np.empty((n, self.num_features))
        _scale(stats, self.min_std, mean, std)
        return mean, std

    def scale(self, x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
        """``x`` in model units: ``(x - mean) / std``, clipped to ``[-clip, clip]``."""
        return np.clip((x - mean) / std, -self.clip, self.clip)

    def observe(self, stats: np.ndarray, x: np.ndarray) -> None:
        """Fold readings ``x`` (n, F) into the streams' statistics (stream mode only)."""
        if self.mode == "stream":
            _update(stats, x, self.window)


def series_stats(x: np.ndarray, cfg: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The (mean, std) each reading of one stream is scaled with, reading by reading as the
    worker does: ``means`` (T, F), ``stds`` (T, F) and the final ``norm`` vector."""
    x = np.asarray(x, dtype=np.float64)
    t, f = x.shape
    norm = Normalizer(cfg, f)
    stats = np.zeros((1, stats_size(f)))
    means = np.empty((t, f))
    stds = np.empty((t, f))
    for i in range(t):
        norm.observe(stats, x[i : i + 1])
        mean, std = norm.current(stats)
        means[i], stds[i] = mean[0], std[0]
    return means, stds, stats[0].copy()


def normalize_series(x: np.ndarray, cfg: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scale one stream's whole history as the worker would, reading by reading.

    Returns ``z`` (T, F), the model inputs; ``target`` (T-1, F), the next reading scaled
    with the statistics of the step that forecasts it; and the final ``norm`` vector.
    """
    x = np.asarray(x, dtype=np.float64)
    norm = Normalizer(cfg, x.shape[1])
    means, stds, final = series_stats(x, cfg)
    z = norm.scale(x, means, stds)
    target = norm.scale(x[1:], means[:-1], stds[:-1])
    return z, target, final
