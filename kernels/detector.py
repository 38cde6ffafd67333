"""Per-stream online anomaly detector: forecast-error records, range breakouts and flat-lines.

Each kind of evidence is judged against the stream's own recent history, so one setting
serves streams of any scale and noise level, and no statistic can be captured for good by
one reading (every memory is a sliding window or a clipped average):

- **Forecast error** (``forecast_error``). ``e_t`` is the forecast error's size in model units
  (RMS over features), smoothed over ``smooth`` steps: ``s_t = s + (e_t - s) / smooth``. Its
  *record* ``R`` is the largest smoothed error of the last ``BLOCKS * block`` steps (the
  maxima of ``BLOCKS`` blocks of ``block`` steps: a sliding window in constant space; it
  restarts halfway through the warm-up, with the smoothed error, forgetting the errors made
  while the stream's normalisation settled), and
  ``g = s_t / R``. A nonparametric tail test, like Telemanom's dynamic thresholds on
  smoothed errors: forecast errors are heavy-tailed, and a Gaussian tail probability on them
  (Numenta's anomaly likelihood) did much worse.
- **Range breakout** (``range_breakout``; the "spatial anomaly" of Numenta's and ARTime's
  detectors, made noise-aware): a reading outside every value of the last ``memory`` readings
  (or so: ``BLOCKS`` blocks of ``memory / BLOCKS``) by ``r`` *typical steps* (the mean size of
  the change between consecutive readings, over about ``span`` readings). The range's edge
  is first moved by one step of the stream's drift (its mean signed change over about
  ``trend`` readings). A breakout counts when ``r >= margin`` and
  ``r * g >= novelty * (1 + habit * rate)``, where ``rate`` is the share of the last
  ``span`` or so readings that broke out: a reading just past the range needs a forecast
  error near its record, one far outside needs little, and a stream that keeps breaking
  out (a noisy trend) needs more.
- **Flat-line** (``flat_line``, a stuck sensor): a feature repeats its reading exactly
  ``still`` times in a row, and more than twice as long as any run of repeats the stream
  showed before (so streams that often repeat a value, like small counts, need a much
  longer run).

Robustness: a forecast error is clipped to ``CAP`` times its record (or the smoothed
error, if larger) before it is smoothed; the changes that feed the typical step and the
drift are clipped to ``CAP`` typical steps (a change larger than that is itself an anomaly and must not set the
scale; the scale can still grow by ``(CAP - 1) / span`` per step, so a real change of regime
is learnt within tens of readings); the seen range forgets a reading after at most
``memory * (1 + 1 / BLOCKS)`` readings, the error record after ``BLOCKS * block``; every
difference is clipped to ``BIG``, so no finite input puts NaN or infinity into the state.

The score is ``g / (1 + g)`` (0.5 when the error equals its recent record), or 1 on a range
breakout or at the reading that completes a flat-line; 0 during the first ``warmup``
errors. After a score at or over ``threshold`` the next ``refractory`` scores are 0, so
one event is reported once.

At every scored step the state records which evidence decided the score (``reason``: an
index into :data:`REASONS`) and the numbers behind it (``ev_*`` fields); :func:`explain`
turns them into the ``reason`` and ``evidence`` of an alert.

Per-stream state (``anomaly`` in Redis, float64, :func:`field_names`; 23 + 23F numbers):
``count`` (errors seen), ``quiet`` (refractory steps left), ``blk_fill`` and ``ring_pos``
(the error block's length and the ring's next slot), ``err_smooth`` (``s``),
``err_blk_max`` (the running block's maximum), ``err_ring_0..7`` (maxima of the last 8
blocks), ``breakouts`` (recent breakout rate: mean of 1 per reading ``margin`` or more
typical steps outside the range, 0 otherwise, weight ``1/min(k, span)`` at the k-th
reading), ``rng_fill`` and ``rng_pos`` (the range block's length and ring slot),
``reason``, ``ev_error`` (``s``), ``ev_record`` (``R``), ``ev_distance`` (``r``),
``ev_run`` (the longest current run of repeats), ``ev_feature`` (the feature that broke out
or stuck); per feature: ``lo_blk``, ``hi_blk`` (the running range block), ``lo_ring_0..7``,
``hi_ring_0..7`` (the last 8 range blocks), ``last`` (last reading), ``jump`` (typical step),
``drift`` (mean signed step, weight ``1/min(k, trend)``), ``flat`` (readings in the current
run of repeats) and ``flat_max`` (the longest earlier run). A layout of another length
(an older detector) is detected by the state store and restarted, never misread.

>>> import numpy as np
>>> p = params({"warmup": 20, "block": 4, "smooth": 3})
>>> st = np.zeros((1, state_size(1)))
>>> out = np.zeros(1)
>>> rng = np.random.default_rng(0)
>>> cycle = [0.0, 1.0, 2.0, 3.0, 4.0, 3.0, 2.0, 1.0]
>>> scores = []
>>> for t in range(40):
...     x = np.array([[cycle[t % 8]]])
...     update(st, np.array([[0.1 * rng.normal()]]), x, np.array([t > 0]), p, out)
...     scores.append(float(out[0]))
>>> max(scores[21:]) < 0.75  # a steady cycle, noisy forecasts: nothing stands out
True
>>> update(st, np.array([[3.0]]), np.array([[4.0]]), np.array([True]), p, out)  # an unforeseen jump
>>> bool(out[0] > 0.75), explain(st[0], 1)[0]
(True, 'forecast_error')
>>> update(st, np.array([[0.0]]), np.array([[7.0]]), np.array([True]), p, out)  # outside the range
>>> float(out[0]), explain(st[0], 1)[0]  # a breakout, silenced: the jump's refractory period runs
(0.0, 'range_breakout')
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

from kernels.states import DETECTOR_BLOCKS, DETECTOR_FIELDS, detector_field_names

BLOCKS = DETECTOR_BLOCKS  # blocks in each sliding window (error record, seen range): fixed, part of the state layout
CAP = 10.0  # changes beyond this many typical steps are clipped before they update the scale and drift
BIG = 1e300  # every difference is clipped to +-BIG: finite inputs never overflow to infinity
ERR_CAP = 1e100  # a forecast error's size is clipped here (its square stays finite)

# The evidence an alert can name, indexed by the state's ``reason`` field.
REASONS = ("none", "forecast_error", "range_breakout", "flat_line")

FIELDS = DETECTOR_FIELDS  # the vector's entry names (kernels/states.py: readable without numba)
_FIXED = FIELDS.index("lo_blk")
_PER = FIELDS[_FIXED:]  # per-feature fields, each F long, after the fixed part
_REASON = FIELDS.index("reason")

# threshold and calm_steps are read by the engine (episodes); update() reads the rest and the
# threshold (the refractory period starts at a score at or over it). docs/detector.md gives
# each setting's reason.
DEFAULTS: dict[str, float] = {
    "threshold": 0.548,  # NAB's optimum at smooth 10 (in-sample choice of `lstream nab --cv`: 0.5488), rounded down
    "calm_steps": 20,
    "smooth": 10.0,  # steps the error is averaged over: an adaptive forecaster's misses come in bursts of 1-3
    "block": 50.0,  # steps per block: the error record spans BLOCKS * block = 400 steps
    "warmup": 150.0,  # errors seen before anything is scored
    "memory": 8192.0,  # readings the seen range remembers (about four weeks of 5-minute readings; chosen by CV)
    "margin": 0.45,  # range breakout: typical steps beyond the range a reading must at least go
    "novelty": 0.1,  # ... and (typical steps beyond) x (error ratio g) must reach this (chosen by CV)
    "span": 40.0,  # readings the typical step and the breakout rate are averaged over
    "trend": 800.0,  # readings the drift (mean signed step) is averaged over
    "habit": 20.0,  # breakouts on a stream that often breaks out need (1 + habit x its rate) times the evidence
    "still": 10.0,  # flat-line: this many unchanged readings, and twice the longest run seen before (0: off)
    "refractory": 20.0,  # steps silenced after a score at or over the threshold
}


def state_size(num_features: int) -> int:
    """Length of a stream's ``anomaly`` vector for a model with ``num_features`` inputs."""
    return _FIXED + len(_PER) * num_features


def field_names(num_features: int) -> tuple[str, ...]:
    """Names of the ``anomaly`` vector's entries (``FIELDS`` for one feature).

    >>> field_names(2)[-6:]
    ('drift_0', 'drift_1', 'flat_0', 'flat_1', 'flat_max_0', 'flat_max_1')
    """
    return detector_field_names(num_features)


def config(cfg: Mapping[str, Any] | None) -> dict[str, float]:
    """The model's detector settings over :data:`DEFAULTS` (settings of older detectors are ignored)."""
    merged = dict(DEFAULTS)
    merged.update({k: float(v) for k, v in (cfg or {}).items() if k in DEFAULTS})
    return merged


def params(cfg: Mapping[str, Any] | None) -> np.ndarray:
    """The parameter vector :func:`update` takes."""
    c = config(cfg)
    for key in ("smooth", "block", "span", "trend", "memory"):
        if not c[key] >= 1:
            raise ValueError(f"detector {key}: expected at least 1, got {c[key]}")
    for key in ("warmup", "margin", "novelty", "habit", "still", "refractory"):
        if not c[key] >= 0:
            raise ValueError(f"detector {key}: expected a number >= 0, got {c[key]}")
    return np.array([c["smooth"], c["block"], c["warmup"], c["memory"] / BLOCKS, c["refractory"], c["threshold"],
                     c["margin"], c["novelty"], c["span"], c["trend"], c["habit"], c["still"]], dtype=np.float64)


def explain(row: np.ndarray, num_features: int) -> tuple[str, dict[str, float]]:
    """``(reason, evidence)`` of a stream's last scored step, from its ``anomaly`` vector.

    ``forecast_error``: ``error`` (smoothed size, model units), ``record`` (the largest of the
    last ``BLOCKS * block`` steps before it) and ``ratio``; ``range_breakout``: ``distance_steps``
    (typical steps outside the range), ``feature``, and the error numbers; ``flat_line``:
    ``run_length`` (repeats of one reading), ``longest_before`` and ``feature``.
    """
    row = np.asarray(row, dtype=np.float64)
    if row.shape != (state_size(num_features),):
        raise ValueError(f"anomaly vector: expected {state_size(num_features)} numbers, got shape {row.shape}")
    k = int(row[_REASON])
    reason = REASONS[k] if 0 <= k < len(REASONS) else "none"
    err, rec = float(row[_REASON + 1]), float(row[_REASON + 2])
    ratio = err / rec if rec > 0 else (1e9 if err > 0 else 0.0)
    j = min(max(int(row[_REASON + 5]), 0), num_features - 1)
    if reason == "range_breakout":
        return reason, {"distance_steps": float(row[_REASON + 3]), "feature": float(j), "error": err,
                        "record": rec, "ratio": ratio}
    if reason == "flat_line":
        fmax = _FIXED + _PER.index("flat_max") * num_features + j
        return reason, {"run_length": float(row[_REASON + 4]), "longest_before": float(row[fmax]),
                        "feature": float(j)}
    return reason, {"error": err, "record": rec, "ratio": ratio}


@njit(cache=True)
def _sub(a: float, b: float) -> float:
    # a - b, clipped so that finite inputs never give infinity (or, later, NaN).
    return min(max(a - b, -BIG), BIG)


@njit(cache=True)
def _ratio(s: float, rec: float) -> float:
    # How far s exceeds the record; a stream that was perfectly quiet so far counts as far.
    if rec > 0.0:
        return s / rec
    return 1e9 if s > 0.0 else 0.0


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
    sensor units (finite). Streams with ``valid[i]`` False (their first reading: no forecast
    to compare yet) score 0; only their range and last reading are updated.
    """
    smooth, block, warmup, rblock, refractory, threshold = p[0], p[1], p[2], p[3], p[4], p[5]
    margin, novelty, span, trend, habit, still = p[6], p[7], p[8], p[9], p[10], p[11]
    n, f = err.shape
    lob = _FIXED
    hib = lob + f
    lor = hib + f
    hir = lor + BLOCKS * f
    last0 = hir + BLOCKS * f
    jump0 = last0 + f
    drift0 = jump0 + f
    flat0 = drift0 + f
    fmax0 = flat0 + f
    for i in range(n):
        st = state[i]
        count = st[0]
        first = count == 0.0 and not valid[i]
        rfill = st[15]
        # Range breakout (in typical steps), judged before this reading joins the range.
        brk = 0.0
        brk_j = 0
        stuck = False
        stuck_j = 0
        run_max = 0.0
        for j in range(f):
            v = x[i, j]
            if first:
                st[lob + j] = v
                st[hib + j] = v
                for k in range(BLOCKS):
                    st[lor + k * f + j] = v
                    st[hir + k * f + j] = v
                st[last0 + j] = v
                st[jump0 + j] = 0.0
                st[drift0 + j] = 0.0
                st[flat0 + j] = 0.0
                st[fmax0 + j] = 0.0
                continue
            lo = st[lob + j] if rfill > 0.0 else st[lor + j]
            hi = st[hib + j] if rfill > 0.0 else st[hir + j]
            for k in range(BLOCKS):
                lo = min(lo, st[lor + k * f + j])
                hi = max(hi, st[hir + k * f + j])
            jump = st[jump0 + j]
            dr = st[drift0 + j]  # a trend moves the range's edge by its drift every step
            excess = max(_sub(v, hi) - max(dr, 0.0), _sub(lo, v) + min(dr, 0.0))
            if excess > 0.0:
                # A stream that never moved: any excess well above float rounding is far.
                unit = max(jump, 1e-9 * max(abs(lo), abs(hi)), 1e-300)
                r = min(excess / unit, 1e12)
                if r > brk:
                    brk = r
                    brk_j = j
            dv = _sub(v, st[last0 + j])
            if jump > 0.0:  # a change far beyond the typical step must not set the scale
                dv = min(max(dv, -CAP * jump), CAP * jump)
            st[jump0 + j] = jump + (abs(dv) - jump) / min(count + 1.0, span)
            st[drift0 + j] = dr + (dv - dr) / min(count + 1.0, trend)
            # Flat-line: a run of unchanged readings longer than any before (and >= still).
            if v == st[last0 + j]:
                run = st[flat0 + j] + 1.0
                st[flat0 + j] = run
                run_max = max(run_max, run)
                if still > 0.0 and run == max(still, 2.0 * st[fmax0 + j] + 1.0) and not stuck:
                    stuck = True
                    stuck_j = j
            else:
                st[fmax0 + j] = max(st[fmax0 + j], st[flat0 + j])
                st[flat0 + j] = 0.0
            # The reading joins the running range block.
            if rfill > 0.0:
                st[lob + j] = min(st[lob + j], v)
                st[hib + j] = max(st[hib + j], v)
            else:
                st[lob + j] = v
                st[hib + j] = v
            st[last0 + j] = v
        if not first:
            rfill += 1.0
            if rfill >= rblock:  # a full range block enters the ring
                pos = int(st[16])
                for j in range(f):
                    st[lor + pos * f + j] = st[lob + j]
                    st[hir + pos * f + j] = st[hib + j]
                st[16] = float((pos + 1) % BLOCKS)
                rfill = 0.0
        st[15] = rfill
        if not valid[i]:
            score[i] = 0.0
            continue
        rate = st[14]
        st[14] = rate + ((1.0 if brk >= margin else 0.0) - rate) / min(count + 1.0, span)
        acc = 0.0
        for j in range(f):
            e = err[i, j]
            e = min(abs(e), ERR_CAP) if e == e else ERR_CAP  # NaN or infinity: as large as can be
            acc += e * e
        e = np.sqrt(acc / f)
        count += 1.0
        rec = _record(st, 4)
        if count > 1.0:
            # An error beyond CAP times the record (or the smoothed error) is anomalous at any
            # size: clipped, it still scores, and its size cannot hold the smoothed error up.
            top = CAP * max(rec, st[4])
            if top > 0.0:
                e = min(e, top)
        s1 = e if count == 1.0 else st[4] + (e - st[4]) / min(count, smooth)
        raw = 0.0
        reason = 0.0
        if count > warmup:
            g = _ratio(s1, rec)
            raw = g / (1.0 + g)
            reason = 1.0
            if stuck:
                raw = 1.0
                reason = 3.0
            elif brk >= margin and brk * g >= novelty * (1.0 + habit * rate):
                raw = 1.0
                reason = 2.0
        quiet = st[1]
        if quiet > 0.0:
            quiet -= 1.0
            raw = 0.0
        elif raw >= threshold:
            quiet = refractory
        score[i] = min(max(raw, 0.0), 1.0)
        st[_REASON] = reason
        st[_REASON + 1] = s1
        st[_REASON + 2] = rec
        st[_REASON + 3] = brk
        st[_REASON + 4] = run_max
        st[_REASON + 5] = float(stuck_j if stuck else brk_j)
        if count == np.floor(0.5 * warmup):
            # Halfway through the warm-up the record restarts: the errors made while the
            # stream's normalisation settled (often huge) must not mask the first anomalies;
            # the smoothed error restarts too (over 10 steps it would carry them for ~50 more).
            s1 = e
            for k in range(BLOCKS + 1):
                st[5 + k] = 0.0
            st[2] = 0.0
            st[3] = 0.0
        # The smoothed error joins the running block; a full block enters the ring.
        fill = st[2] + 1.0
        pos = int(st[3])
        st[4] = s1
        m = max(st[5], s1)
        if fill >= block:
            st[6 + pos] = m
            m = 0.0
            st[3] = float((pos + 1) % BLOCKS)
            fill = 0.0
        st[5] = m
        st[0] = count
        st[1] = quiet
        st[2] = fill
