"""Per-stream online anomaly detector on forecast errors.

First version: a running z-score of the error's size. Each stream keeps an exponentially
weighted mean and variance of ``e_t = |x_t - expected_t|`` (model units, RMS over features);
the score is the normal CDF of e_t's z-score against the statistics before e_t, so it lies
in [0, 1]. A stream scores 0 until it has seen ``warmup`` errors.

Per-stream state (``anomaly`` in Redis, float64): ``FIELDS``.

>>> import numpy as np
>>> p = params({"warmup": 2, "window": 100})
>>> st = np.zeros((1, len(FIELDS)))
>>> out = np.zeros(1)
>>> for e in [0.1, 0.12, 0.09, 0.11, 2.0]:
...     update(st, np.array([[e]]), np.array([True]), p, out)
>>> bool(out[0] > 0.999)
True
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from numba import njit

FIELDS = ("count", "err_mean", "err_var")

# threshold and calm_steps are read by the engine (episodes); the rest by update().
DEFAULTS: dict[str, float] = {"threshold": 0.999, "calm_steps": 20, "window": 1000.0, "warmup": 50.0}


def config(cfg: Mapping[str, Any] | None) -> dict[str, float]:
    """The model's detector settings over :data:`DEFAULTS`."""
    merged = dict(DEFAULTS)
    merged.update({k: float(v) for k, v in (cfg or {}).items() if k in DEFAULTS})
    return merged


def params(cfg: Mapping[str, Any] | None) -> np.ndarray:
    """The parameter vector :func:`update` takes."""
    c = config(cfg)
    return np.array([c["window"], c["warmup"]], dtype=np.float64)


@njit(cache=True)
def update(state: np.ndarray, err: np.ndarray, valid: np.ndarray, p: np.ndarray, score: np.ndarray) -> None:
    """Fold errors ``err`` (n, F) into ``state`` (n, len(FIELDS)); write ``score`` (n,).

    Streams with ``valid[i]`` False (no forecast to compare yet) score 0 and keep their state.
    """
    window, warmup = p[0], p[1]
    n, f = err.shape
    for i in range(n):
        if not valid[i]:
            score[i] = 0.0
            continue
        acc = 0.0
        for j in range(f):
            acc += err[i, j] * err[i, j]
        e = math.sqrt(acc / f)
        count, mean, var = state[i, 0], state[i, 1], state[i, 2]
        if count >= warmup and var > 0.0:
            z = (e - mean) / math.sqrt(var)
            score[i] = 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))
        else:
            score[i] = 0.0
        count += 1.0
        a = max(1.0 / count, 1.0 / window)
        d = e - mean
        state[i, 0] = count
        state[i, 1] = mean + a * d
        state[i, 2] = (1.0 - a) * (var + a * d * d)
