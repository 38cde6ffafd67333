"""Per-stream online adaptation: a readout learnt from the stream's own errors and a mixture
of experts weighted by their recent error.

A global LSTM cannot know each stream's daily shape, and on a stream it does not fit it can
lose to "repeat the last reading". So every stream, per feature, keeps a few cheap experts
and mixes their forecasts of the next reading (model units, i.e. scaled with the stream's
current normalisation):

- ``global``: the LSTM's forecast;
- ``persistence``: the last reading;
- ``seasonal``: the reading one day before the next one (``seasonal_diff``: the last reading
  plus the change seen one day earlier). The day is cut into time-of-day bins by the event
  ``ts``, so the period comes from the timestamps, gaps and jitter included; the experts are
  silent until a bin holds yesterday's reading;
- ``level``: an exponentially weighted mean (noisy streams around a level);
- ``adapted``: recursive least squares (forgetting ``forget``) over [1, last reading, the one
  before, global forecast, seasonal, levels at three speeds, time of day and day of week as
  sin/cos]; its error is clipped to ``robust`` times its typical error, so a spike moves it little.

Each expert's mean absolute error is tracked with weight ``max(1/count, err_rate)``; the
forecast is ``sum w_k f_k / sum w_k`` with ``w_k = exp(-eta * (mae_k / min mae - 1))``, so the
best recent expert dominates and a bad one fades quickly: the mixture cannot lose to
persistence by much. Everything runs in one private ``@njit`` kernel over all n streams,
writing into the caller's buffers.

The state of a stream is one float64 vector (``StreamStates.adapt``; layout in
:func:`kernels.states.adapt_layout`), version number first, so a vector of another layout is
detected and restarted, never misread.

>>> import numpy as np
>>> from kernels.states import adapt_size
>>> ad = Adapter({"enabled": True}, 1)
>>> st = np.zeros((1, adapt_size(1)))
>>> one = np.ones((1, 1)); zero = np.zeros((1, 1))
>>> ts = 1_700_000_000.0
>>> for k in range(50):   # a level stream: the global forecast (0) is wrong by one unit
...     y = ad.step(st, np.full((1, 1), 5.0), np.array([ts + 60 * k]), np.array([k > 0]), zero, one,
...                 zero, one, zero)
>>> round(float(y[0, 0]), 3)
5.0
>>> int(st[0, 0]) == LAYOUT_VERSION
True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from numba import njit

from kernels.states import ADAPT_EXPERTS, ADAPT_REGRESSORS, adapt_layout

LAYOUT_VERSION = 1
DAY = 86400.0
WEEK = 604800.0
EXPERTS = ADAPT_EXPERTS
REGRESSORS = ADAPT_REGRESSORS
TIME_FEATURES = ("tod_sin", "tod_cos", "dow_sin", "dow_cos")
DEFAULTS: dict[str, Any] = {"enabled": True, "forget": 0.999, "delta": 10.0, "err_rate": 0.01,
                            "eta": 8.0, "level_rate": 0.1, "dt_rate": 0.05, "robust": 3.0}



@njit(cache=True, nogil=True, error_model="numpy")
def _clip(v, lim):  # pragma: no cover - compiled
    return -lim if v < -lim else (lim if v > lim else v)


@njit(cache=True, nogil=True, error_model="numpy")
def _bin_value(st, off_bts, off_bval, nb, f, j, t):  # pragma: no cover - compiled
    """Value stored for time ``t`` (its time-of-day bin, if the reading there is from within
    one bin width of ``t``), else NaN."""
    width = DAY / nb
    b = int(np.floor((t % DAY) / width))
    if b >= nb:
        b = nb - 1
    bt = st[off_bts + b]
    if bt > 0.0 and abs(bt - t) < width:
        return st[off_bval + b * f + j]
    return np.nan


@njit(cache=True, nogil=True, error_model="numpy")
def _adapt(state, x, ts, seen, mean0, std0, mean1, std1, g, params, lay, out):  # pragma: no cover - compiled
    """One step for n streams, in place on ``state``; forecasts (model units) into ``out``.

    x (n, F) sensor units; mean0/std0: the statistics the previous forecast was scaled with;
    mean1/std1: the current ones; g (n, F): the global forecast, current model units."""
    forget, delta, err_rate, eta, level_rate, dt_rate, clip, robust = (
        params[0], params[1], params[2], params[3], params[4], params[5], params[6], params[7])
    nb, k_exp, d, per, off_feat, off_bts, off_bval = lay[0], lay[1], lay[2], lay[3], lay[4], lay[5], lay[6]
    n, f = x.shape
    phi = np.empty(d)
    pphi = np.empty(d)
    fc = np.empty(k_exp)
    for i in range(n):
        st = state[i]
        if st[0] != LAYOUT_VERSION:  # fresh (0) or another layout: start over
            st[:] = 0.0
            st[0] = LAYOUT_VERSION
            for j in range(f):
                base = off_feat + j * per
                pb = base + 4 + 4 * k_exp + d
                for a in range(d):
                    st[pb + a * d + a] = delta
        t = ts[i]
        t_ok = np.isfinite(t)
        if t_ok and seen[i] and st[1] > 0.0:
            dt = t - st[1]
            if dt > 0.0:
                st[2] = dt if st[3] == 0.0 else st[2] + dt_rate * (dt - st[2])
                st[3] += 1.0
        # 1. score each expert's forecast of this reading and update the readout
        if seen[i]:
            for j in range(f):
                base = off_feat + j * per
                target = _clip((x[i, j] - mean0[i, j]) / std0[i, j], clip)
                for k in range(k_exp):
                    fk = st[base + 4 + k]
                    if st[base + 4 + 3 * k_exp + k] == 1.0:  # the expert made a forecast
                        cnt = st[base + 4 + 2 * k_exp + k] + 1.0
                        st[base + 4 + 2 * k_exp + k] = cnt
                        a = max(1.0 / cnt, err_rate)
                        mae_at = base + 4 + k_exp + k
                        e = abs(target - fk)
                        st[mae_at] = e if cnt == 1.0 else st[mae_at] + a * (e - st[mae_at])
                th = base + 4 + 4 * k_exp
                pb = th + d
                ph = pb + d * d
                if st[ph] == 1.0:  # a regressor vector was stored at the previous step
                    den = forget
                    pred = 0.0
                    for a in range(d):
                        s = 0.0
                        for b in range(d):
                            s += st[pb + a * d + b] * st[ph + b]
                        pphi[a] = s
                        den += st[ph + a] * s
                        pred += st[th + a] * st[ph + a]
                    err = target - pred
                    # robust: an outlier moves the readout no more than a few typical errors
                    typical = st[base + 4 + k_exp + k_exp - 1]
                    if st[base + 4 + 3 * k_exp - 1] > 10.0 and np.isfinite(typical):
                        lim = robust * max(typical, 1e-6)
                        err = _clip(err, lim)
                    trace = 0.0
                    inv_den = 1.0 / den
                    inv_forget = 1.0 / forget
                    for a in range(d):
                        st[th + a] += pphi[a] * inv_den * err
                    for a in range(d):
                        ka = pphi[a] * inv_den
                        row = pb + a * d
                        for b in range(d):
                            st[row + b] = (st[row + b] - ka * pphi[b]) * inv_forget
                        trace += st[row + a]
                    if trace > 100.0 * delta * d:  # unexcited directions: stop forgetting them
                        shrink = 100.0 * delta * d / trace
                        for a in range(d * d):
                            st[pb + a] *= shrink
        # 2. remember this reading in its time-of-day bin (yesterday's value there first)
        prev_day = np.empty(f)
        for j in range(f):
            prev_day[j] = _bin_value(st, off_bts, off_bval, nb, f, j, t - DAY) if t_ok else np.nan
        if t_ok:
            width = DAY / nb
            b = int(np.floor((t % DAY) / width))
            if b >= nb:
                b = nb - 1
            st[off_bts + b] = t
            for j in range(f):
                st[off_bval + b * f + j] = x[i, j]
            st[1] = t
        # 3. the experts' forecasts of the next reading and their mixture
        tn = t + st[2] if (t_ok and st[3] > 0.0) else np.nan
        for j in range(f):
            base = off_feat + j * per
            m, s = mean1[i, j], std1[i, j]
            z = _clip((x[i, j] - m) / s, clip)
            prev = st[base + 3] if st[4] > 0.0 else x[i, j]
            if st[4] == 0.0:
                st[base] = st[base + 1] = st[base + 2] = x[i, j]
            else:
                st[base] += level_rate * (x[i, j] - st[base])
                st[base + 1] += 0.5 * (x[i, j] - st[base + 1])
                st[base + 2] += 0.01 * (x[i, j] - st[base + 2])
            st[base + 3] = x[i, j]
            fc[0] = g[i, j]
            fc[1] = z
            fc[2] = np.nan
            fc[3] = np.nan
            if np.isfinite(tn):
                nxt = _bin_value(st, off_bts, off_bval, nb, f, j, tn - DAY)
                if np.isfinite(nxt):
                    fc[2] = _clip((nxt - m) / s, clip)
                    if np.isfinite(prev_day[j]):
                        fc[3] = _clip(z + (nxt - prev_day[j]) / s, clip)
            fc[4] = _clip((st[base] - m) / s, clip)
            th = base + 4 + 4 * k_exp
            ph = th + d + d * d
            phi[0] = 1.0
            phi[1] = z
            phi[2] = _clip((prev - m) / s, clip)
            phi[3] = g[i, j]
            phi[4] = fc[2] if np.isfinite(fc[2]) else z
            phi[5] = fc[4]
            phi[6] = _clip((st[base + 1] - m) / s, clip)
            phi[7] = _clip((st[base + 2] - m) / s, clip)
            if np.isfinite(tn):
                tod = 2.0 * np.pi * (tn % DAY) / DAY
                dow = 2.0 * np.pi * (tn % WEEK) / WEEK
                phi[8], phi[9], phi[10], phi[11] = np.sin(tod), np.cos(tod), np.sin(dow), np.cos(dow)
            else:
                phi[8] = phi[9] = phi[10] = phi[11] = 0.0
            r = 0.0
            for a in range(d):
                r += st[th + a] * phi[a]
                st[ph + a] = phi[a]
            fc[5] = _clip(r, 2.0 * clip)
            best = np.inf
            for k in range(k_exp):
                mae = st[base + 4 + k_exp + k]
                if np.isfinite(fc[k]) and st[base + 4 + 2 * k_exp + k] > 0.0 and mae < best:
                    best = mae
            num = 0.0
            den = 0.0
            if np.isfinite(best):
                scale = max(best, 1e-9)
                for k in range(k_exp):
                    mae = st[base + 4 + k_exp + k]
                    if np.isfinite(fc[k]) and st[base + 4 + 2 * k_exp + k] > 0.0:
                        w = np.exp(-eta * (mae / scale - 1.0))
                        num += w * fc[k]
                        den += w
            out[i, j] = num / den if den > 0.0 else g[i, j]
            for k in range(k_exp):  # stored without NaN: a flag says whether the expert spoke
                ok = np.isfinite(fc[k])
                st[base + 4 + k] = fc[k] if ok else 0.0
                st[base + 4 + 3 * k_exp + k] = 1.0 if ok else 0.0
        st[4] += 1.0


class Adapter:
    """The per-stream adaptation of one artifact (``model.json`` ``adapt``; see the module doc)."""

    def __init__(self, cfg: Mapping[str, Any] | None, num_features: int, clip: float = 10.0) -> None:
        merged = {**DEFAULTS, **dict(cfg or {})}
        unknown = set(merged) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"adapt: expected keys among {sorted(DEFAULTS)}, got {sorted(unknown)}")
        self.config = merged
        self.num_features = num_features
        self.layout = adapt_layout(num_features)
        self.params = np.array([merged["forget"], merged["delta"], merged["err_rate"], merged["eta"],
                                merged["level_rate"], merged["dt_rate"], clip if np.isfinite(clip) else 1e6,
                                merged["robust"]],
                               dtype=np.float64)
        if not 0.9 <= self.params[0] <= 1.0:
            raise ValueError(f"adapt.forget: expected a number in [0.9, 1], got {self.params[0]}")
        lay = self.layout
        self._lay = np.array([lay["bins"], len(EXPERTS), len(REGRESSORS), lay["per_feature"],
                              lay["features_at"], lay["bin_ts_at"], lay["bin_values_at"]], dtype=np.int64)

    def step(self, state: np.ndarray, x: np.ndarray, ts: np.ndarray, seen: np.ndarray,
             mean0: np.ndarray, std0: np.ndarray, mean1: np.ndarray, std1: np.ndarray,
             g: np.ndarray) -> np.ndarray:
        """Advance n streams' adaptation (``state`` (n, A) in place); returns the mixed
        forecast, float64 (n, F), model units."""
        n = x.shape[0]
        f = self.num_features
        if state.shape != (n, self.layout["size"]) or state.dtype != np.float64:
            raise ValueError(f"adapt state: expected float64 ({n}, {self.layout['size']}), "
                             f"got {state.dtype} {state.shape}")
        out = np.empty((n, f))
        _adapt(state, np.ascontiguousarray(x, np.float64), np.ascontiguousarray(ts, np.float64),
               np.ascontiguousarray(seen, np.bool_), np.ascontiguousarray(mean0), np.ascontiguousarray(std0),
               np.ascontiguousarray(mean1), np.ascontiguousarray(std1), np.ascontiguousarray(g, np.float64),
               self.params, self._lay, out)
        return out
