"""Per-stream online anomaly detector: forecast-error records, step records and range breakouts.

Each kind of evidence is judged against the stream's own recent history, so one setting
serves streams of any scale and noise level:

- **Error record.** ``e_t`` is the forecast error's size in model units (RMS over features),
  smoothed over ``smooth`` steps: ``s_t = s + (e_t - s) / smooth``. Its *record* ``R`` is the
  largest smoothed error of the last ``BLOCKS * block`` steps (kept as the maxima of
  ``BLOCKS`` blocks of ``block`` steps: a sliding window in constant space), and
  ``g1 = s_t / R``. A nonparametric tail test, like Telemanom's dynamic thresholds on
  smoothed errors: forecast errors are heavy-tailed, and a Gaussian tail probability on them
  (Numenta's anomaly likelihood) did much worse on NAB.
- **Step record** (optional, ``persistence`` > 0). The same on the change since the last
  reading, in units of the range seen so far (``g2``): the error of the naive "no change"
  forecast. The two combine as ``g = g1^(1-w) * g2^w`` (``w = persistence``), so a reading
  must surprise both the LSTM and the naive forecast. Off by default: on NAB it helped a
  weak forecaster (+2 points) but not the default model (-2).
- **Range breakout** (the "spatial anomaly" of Numenta's and ARTime's NAB detectors, made
  noise-aware): a reading outside every value the stream has shown so far by ``r``
  *typical steps* (the mean size of the change between consecutive readings, over about
  ``span`` readings). The range's edge is first moved by one step of the stream's drift
  (its mean signed change over about ``trend`` readings), and widened by ``tol`` times the
  range. A breakout counts when ``r >= margin`` and
  ``r * g1 >= novelty * (1 + habit * rate)``, where ``rate`` is the share of the last
  ``span`` or so readings that broke out: a reading just past the range needs a forecast
  error near its record, one far outside needs little, and a stream that keeps breaking
  out (a noisy trend) needs more. Rounding and noise-level new extremes (a fraction of a
  step) never count, while a reading that jumps clear of everything seen does.
- **Flat-line** (a stuck sensor): a feature repeats its reading exactly ``still`` times in a
  row, and more than twice as long as any run of repeats the stream showed before (so
  streams that often repeat a value, like small counts, need a much longer run).

The score is ``g / (1 + g)`` (0.5 when the evidence equals its recent record), or 1 on a
range breakout or at the reading that completes a flat-line; 0 during the first ``warmup``
errors. After a score at or over ``threshold`` the next ``refractory`` scores are
multiplied by ``damp``, so one event is reported once.

Per-stream state (``anomaly`` in Redis, float64, :func:`field_names`; 25 + 7F numbers):
``count`` (errors seen), ``quiet`` (refractory steps left), ``blk_fill`` and ``ring_pos``
(the running block's length and the ring's next slot); per channel (``err_``, ``step_``):
``smooth`` (``s``), ``blk_max`` (the running block's maximum) and ``ring_0..7`` (maxima of
the last 8 blocks); ``breakouts`` (the recent breakout rate: mean of 1 per reading
``margin`` or more typical steps outside the range, 0 otherwise, weight ``1/min(k, span)``
at the k-th reading); per feature: ``lo``, ``hi`` (range seen), ``last`` (last reading),
``jump`` (typical step: mean of ``|x_t - x_{t-1}|``, weight ``1/min(k, span)``),
``drift`` (mean of ``x_t - x_{t-1}``, weight ``1/min(k, trend)``), ``flat`` (readings in the
current run of repeats) and ``flat_max`` (the longest earlier run).

Cost: a pass over 16 numbers and the features per event: about 0.06 microsecond a stream in
a batch of 1 000 (2 microseconds for a call with one stream, mostly call overhead).

>>> import numpy as np
>>> p = params({"warmup": 20, "block": 4, "persistence": 0.5})
>>> st = np.zeros((1, state_size(1)))
>>> out = np.zeros(1)
>>> rng = np.random.default_rng(0)
>>> cycle = [0.0, 1.0, 2.0, 3.0, 4.0, 3.0, 2.0, 1.0]
>>> scores = []
>>> for t in range(40):
...     x = np.array([[cycle[t % 8]]])
...     update(st, np.array([[0.1 * rng.normal()]]), x, np.array([t > 0]), p, out)
...     scores.append(float(out[0]))
>>> max(scores[21:]) < 0.6  # a steady cycle, noisy forecasts: nothing stands out
True
>>> update(st, np.array([[3.0]]), np.array([[4.0]]), np.array([True]), p, out)  # an unforeseen jump
>>> bool(out[0] > 0.75)
True
>>> update(st, np.array([[0.0]]), np.array([[7.0]]), np.array([True]), p, out)  # outside the range
>>> float(out[0])  # a breakout scores 1, damped: the last event's refractory period runs
0.5
>>> p = params(None)
>>> st = np.zeros((1, state_size(1)))
>>> for t in range(600):  # an exactly periodic signal; rounding makes tiny new extremes
...     update(st, np.array([[0.01]]), np.array([[5 + np.sin(2 * np.pi * t / 25)]]), np.array([t > 0]), p, out)
...     assert out[0] < 0.56, t  # constant errors score 0.5 (each equals its record)
>>> scores = []
>>> for t in range(600, 620):  # the sensor sticks at its last reading
...     update(st, np.array([[0.01]]), np.array([[5 + np.sin(2 * np.pi * 599 / 25)]]), np.array([True]), p, out)
...     scores.append(float(out[0]))
>>> scores.index(1.0)  # the 10th repeat of the reading completes a flat-line
9
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from numba import njit

from kernels.states import DETECTOR_FIXED, DETECTOR_PER_FEATURE

BLOCKS = 8  # blocks in the sliding window of recent error maxima (fixed: part of the state layout)

FIELDS = ("count", "quiet", "blk_fill", "ring_pos",
          "err_smooth", "err_blk_max", *(f"err_ring_{k}" for k in range(BLOCKS)),
          "step_smooth", "step_blk_max", *(f"step_ring_{k}" for k in range(BLOCKS)),
          "breakouts",
          "lo", "hi", "last", "jump", "drift", "flat", "flat_max")
_PER = ("lo", "hi", "last", "jump", "drift", "flat", "flat_max")  # per-feature fields, each F long, after the fixed part
_FIXED = len(FIELDS) - len(_PER)
assert (_FIXED, len(_PER)) == (DETECTOR_FIXED, DETECTOR_PER_FEATURE), "update kernels/states.py"

# threshold and calm_steps are read by the engine (episodes); update() reads the rest and the
# threshold (the refractory period starts at a score at or over it).
DEFAULTS: dict[str, float] = {
    "threshold": 0.56,  # NAB's corpus-optimal threshold for these settings: 0.553 to 0.562 (two default models)
    "calm_steps": 20,
    "smooth": 3.0,  # steps the error is averaged over
    "block": 50.0,  # steps per block: the error record spans BLOCKS * block = 400 steps
    "warmup": 150.0,  # errors seen before anything is scored
    "tol": 0.0,  # range breakout: extra margin beyond the seen range, as a fraction of it (< 0: off)
    "margin": 0.45,  # range breakout: typical steps beyond the range a reading must at least go
    "novelty": 0.25,  # ... and (typical steps beyond) x (error ratio g1) must reach this
    "span": 40.0,  # readings the typical step and the breakout rate are averaged over
    "trend": 800.0,  # readings the drift (mean signed step) is averaged over
    "habit": 20.0,  # breakouts on a stream that often breaks out need (1 + habit x its rate) times the evidence
    "still": 10.0,  # flat-line: this many unchanged readings, and twice the longest run seen before (0: off)
    "refractory": 20.0,  # steps damped after a score at or over the threshold
    "damp": 0.5,  # factor on the scores of those steps
    "persistence": 0.0,  # weight of the step-change record against the forecast-error record (0: off)
}


def state_size(num_features: int) -> int:
    """Length of a stream's ``anomaly`` vector for a model with ``num_features`` inputs."""
    return _FIXED + len(_PER) * num_features


def field_names(num_features: int) -> tuple[str, ...]:
    """Names of the ``anomaly`` vector's entries (``FIELDS`` for one feature).

    >>> field_names(2)[-6:]
    ('drift_0', 'drift_1', 'flat_0', 'flat_1', 'flat_max_0', 'flat_max_1')
    """
    if num_features == 1:
        return FIELDS
    return FIELDS[:_FIXED] + tuple(f"{name}_{j}" for name in _PER for j in range(num_features))


def config(cfg: Mapping[str, Any] | None) -> dict[str, float]:
    """The model's detector settings over :data:`DEFAULTS`."""
    merged = dict(DEFAULTS)
    merged.update({k: float(v) for k, v in (cfg or {}).items() if k in DEFAULTS})
    return merged


def params(cfg: Mapping[str, Any] | None) -> np.ndarray:
    """The parameter vector :func:`update` takes."""
    c = config(cfg)
    for key in ("smooth", "block", "span", "trend"):
        if c[key] < 1:
            raise ValueError(f"detector {key}: expected at least 1, got {c[key]}")
    if not 0.0 <= c["persistence"] <= 1.0:
        raise ValueError(f"detector persistence: expected a number in [0, 1], got {c['persistence']}")
    return np.array([c["smooth"], c["block"], c["warmup"], c["tol"], c["refractory"], c["damp"],
                     c["threshold"], c["persistence"], c["margin"], c["novelty"], c["span"],
                     c["trend"], c["habit"], c["still"]], dtype=np.float64)


@njit(cache=True)
def _ratio(s: float, rec: float) -> float:
    # How far s exceeds the record; a stream that was perfectly quiet so far counts as far.
    if rec > 0.0:
        return s / rec
    return 1e9 if s > 0.0 else 0.0


@njit(cache=True)
def _fold(st: np.ndarray, at: int, s: float, full: bool, pos: int) -> None:
    # Channel at st[at]: [smooth, block max, ring...]; s joins the running block.
    st[at] = s
    m = max(st[at + 1], s)
    if full:
        st[at + 2 + pos] = m
        m = 0.0
    st[at + 1] = m


@njit(cache=True)
def _record(st: np.ndarray, at: int) -> float:
    rec = st[at + 1]
    for k in range(BLOCKS):
        rec = max(rec, st[at + 2 + k])
    return rec


@njit(cache=True)
def update(state: np.ndarray, err: np.ndarray, x: np.ndarray, valid: np.ndarray, p: np.ndarray,
           score: np.ndarray) -> None:
    """Fold errors ``err`` (n, F) and readings ``x`` (n, F) into ``state`` (n, D); write ``score`` (n,).

    ``err`` is the reading minus the previous forecast in model units; ``x`` the reading in
    sensor units. Streams with ``valid[i]`` False (their first reading: no forecast to compare
    yet) score 0; only their range and last reading are updated.
    """
    smooth, block, warmup, tol, refractory, damp, threshold, w = p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]
    margin, novelty, span, trend, habit, still = p[8], p[9], p[10], p[11], p[12], p[13]
    n, f = err.shape
    lo0 = _FIXED
    hi0 = lo0 + f
    last0 = hi0 + f
    jump0 = last0 + f
    drift0 = jump0 + f
    flat0 = drift0 + f
    fmax0 = flat0 + f
    for i in range(n):
        st = state[i]
        count = st[0]
        first = count == 0.0 and not valid[i]
        # Range breakout (in typical steps) and the change since the last reading (in units of
        # the range), both judged before this reading widens the range.
        brk = 0.0
        stuck = False
        acc = 0.0
        for j in range(f):
            v = x[i, j]
            if first:
                st[lo0 + j] = v
                st[hi0 + j] = v
                st[last0 + j] = v
                st[jump0 + j] = 0.0
                st[drift0 + j] = 0.0
                st[flat0 + j] = 0.0
                st[fmax0 + j] = 0.0
                continue
            lo, hi = st[lo0 + j], st[hi0 + j]
            dr = st[drift0 + j]  # a trend moves the range's edge by its drift every step
            excess = max(v - hi - max(dr, 0.0), lo + min(dr, 0.0) - v) - tol * (hi - lo)
            if tol >= 0.0 and excess > 0.0:
                # A stream that never moved: any excess well above float rounding is far.
                unit = max(st[jump0 + j], 1e-9 * max(abs(lo), abs(hi)), 1e-300)
                brk = max(brk, min(excess / unit, 1e12))
            st[jump0 + j] += (abs(v - st[last0 + j]) - st[jump0 + j]) / min(count + 1.0, span)
            st[drift0 + j] += (v - st[last0 + j] - st[drift0 + j]) / min(count + 1.0, trend)
            # Flat-line: a run of unchanged readings longer than any before (and >= still).
            if v == st[last0 + j]:
                run = st[flat0 + j] + 1.0
                st[flat0 + j] = run
                if still > 0.0 and run == max(still, 2.0 * st[fmax0 + j] + 1.0):
                    stuck = True
            else:
                st[fmax0 + j] = max(st[fmax0 + j], st[flat0 + j])
                st[flat0 + j] = 0.0
            if hi > lo:
                d = min(abs(v - st[last0 + j]) / (hi - lo), 1e100)  # finite even for a tiny range
                acc += d * d
            st[lo0 + j] = min(lo, v)
            st[hi0 + j] = max(hi, v)
            st[last0 + j] = v
        if not valid[i]:
            score[i] = 0.0
            continue
        rate = st[_FIXED - 1]
        st[_FIXED - 1] = rate + ((1.0 if brk >= margin else 0.0) - rate) / min(count + 1.0, span)
        d = np.sqrt(acc / f)
        acc = 0.0
        for j in range(f):
            acc += err[i, j] * err[i, j]
        e = np.sqrt(acc / f)
        count += 1.0
        a = 1.0 / min(count, smooth)
        s1 = e if count == 1.0 else st[4] + a * (e - st[4])
        s2 = d if count == 1.0 else st[14] + a * (d - st[14])
        raw = 0.0
        if count > warmup:
            g1 = _ratio(s1, _record(st, 4))
            g2 = _ratio(s2, _record(st, 14))
            if w <= 0.0:
                g = g1
            elif w >= 1.0:
                g = g2
            else:
                g = g1 ** (1.0 - w) * g2 ** w
            raw = g / (1.0 + g)
            if stuck or (brk >= margin and brk * g1 >= novelty * (1.0 + habit * rate)):
                raw = 1.0
        quiet = st[1]
        if quiet > 0.0:
            quiet -= 1.0
            raw *= damp
        elif raw >= threshold:
            quiet = refractory
        score[i] = min(max(raw, 0.0), 1.0)
        # Both channels join the running block; a full block enters the ring.
        fill = st[2] + 1.0
        full = fill >= block
        pos = int(st[3])
        _fold(st, 4, s1, full, pos)
        _fold(st, 14, s2, full, pos)
        if full:
            st[3] = float((pos + 1) % BLOCKS)
            fill = 0.0
        st[0] = count
        st[1] = quiet
        st[2] = fill
