"""NAB's published scoring method, re-implemented with numpy (no pandas, no torch).

Follows numenta/NAB's ``sweeper.py`` (per-row weights, threshold sweep), ``optimizer.py`` (one
threshold per profile, the best over the whole corpus) and ``runner.py`` (normalisation):

- The first ``min(floor(0.15 * rows), 750)`` rows of a file are probationary: never scored.
- A row at or over the threshold is a detection. In a labelled window only the earliest
  detection counts: ``tpWeight * S(y) / S(-1)`` with ``S(y) = 2 / (1 + exp(5 y)) - 1`` and
  ``y = -(end - i + 1) / width`` (about +1 at the window's start, 0 past its end). A window
  with no detection costs ``-fnWeight``.
- A detection outside every window costs ``fpWeight * S(y)`` with
  ``y = (i - end_prev) / (width_prev - 1)`` measured from the last window before it, and
  ``-fpWeight`` when no window precedes it (``S(y) = -1`` for ``y > 3``).
- The corpus total S is normalised: ``100 * (S - S_null) / (S_perfect - S_null)``, where the
  null detector never detects (-fnWeight per scored window) and the perfect one scores
  ``tpWeight`` per labelled window.

>>> round(scaled_sigmoid(-1.0), 5), scaled_sigmoid(0.0), scaled_sigmoid(3.5)
(0.98661, 0.0, -1.0)
>>> probation_length(1000), probation_length(10000)
(150, 750)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from numba import njit

PROBATION_PERCENT = 0.15
PROBATION_CAP = 750  # NAB: min(floor(0.15 * n), 0.15 * 5000)
NO_WINDOW = -1
PROBATION = -2

PROFILE_NAMES = ("standard", "reward_low_FP_rate", "reward_low_FN_rate")


def scaled_sigmoid(y: float) -> float:
    """NAB's weight for a relative position ``y`` (negative inside a window, positive after)."""
    if y > 3.0:
        return -1.0
    return 2.0 / (1.0 + math.exp(5.0 * y)) - 1.0


def probation_length(rows: int) -> int:
    """Rows at the start of a file that NAB never scores."""
    return int(min(math.floor(PROBATION_PERCENT * rows), PROBATION_CAP))


@dataclass
class Labels:
    """One data file's ground truth as row indices: ``windows`` are inclusive (start, end) pairs."""

    name: str  # NAB relative path, e.g. "realKnownCause/nyc_taxi.csv"
    rows: int
    windows: list[tuple[int, int]] = field(default_factory=list)


def labels_from_times(name: str, ts: np.ndarray, limits: Sequence[tuple[float, float]]) -> Labels:
    """Windows given as (start, end) epoch seconds -> row indices (rows with start <= ts <= end).

    >>> labels_from_times("a/b.csv", np.arange(10.0), [(2.0, 4.5)]).windows
    [(2, 4)]
    """
    ts = np.asarray(ts, dtype=np.float64)
    windows = []
    for t1, t2 in limits:
        inside = np.flatnonzero((ts >= t1) & (ts <= t2))
        if inside.size == 0:
            raise ValueError(f"{name}: window {t1}..{t2} holds no rows")
        windows.append((int(inside[0]), int(inside[-1])))
    return Labels(name, int(ts.shape[0]), windows)


def load_profiles(path: str) -> dict[str, dict[str, float]]:
    """NAB's ``profiles.json`` -> {profile: CostMatrix}."""
    with open(path) as fh:
        raw = json.load(fh)
    out = {}
    for name, prof in raw.items():
        cost = prof.get("CostMatrix", prof)
        missing = [k for k in ("tpWeight", "fnWeight", "fpWeight") if k not in cost]
        if missing:
            raise ValueError(f"{path}: profile {name!r}: expected keys tpWeight, fnWeight, fpWeight; missing {missing}")
        out[name] = {k: float(cost[k]) for k in ("tpWeight", "fnWeight", "fpWeight")}
    return out


def load_windows(path: str) -> dict[str, list[tuple[str, str]]]:
    """NAB's ``windows.json`` (combined_windows): {relative path: [[start, end], ...]}."""
    with open(path) as fh:
        raw = json.load(fh)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object of file -> windows, got {type(raw).__name__}")
    return {k: [(str(a), str(b)) for a, b in v] for k, v in raw.items()}


def row_weights(labels: Labels, cost: Mapping[str, float], window_base: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the score a detection there would add, and its window id.

    Window ids are ``window_base + k`` for the file's k-th window, ``NO_WINDOW`` outside windows
    and ``PROBATION`` in the probationary period (as NAB's ``calcSweepScore``).

    >>> w, wid = row_weights(Labels("f", 10, [(6, 7)]), {"tpWeight": 1, "fpWeight": 0.11, "fnWeight": 1})
    >>> wid.tolist()
    [-2, -1, -1, -1, -1, -1, 0, 0, -1, -1]
    >>> [round(float(v), 4) for v in w[5:]]  # -fp before any window, +1 at a window's start
    [-0.11, 1.0, 0.8598, -0.1085, -0.11]
    """
    n = labels.rows
    weights = np.empty(n)
    wid = np.full(n, NO_WINDOW, np.int64)
    max_tp = scaled_sigmoid(-1.0)
    prev_end, prev_width = -1, 0.0
    bounds = sorted(labels.windows)
    k = 0
    for i in range(n):
        while k < len(bounds) and bounds[k][1] < i:
            prev_end, prev_width = bounds[k][1], float(bounds[k][1] - bounds[k][0] + 1)
            k += 1
        if k < len(bounds) and bounds[k][0] <= i <= bounds[k][1]:
            start, end = bounds[k]
            width = float(end - start + 1)
            weights[i] = scaled_sigmoid(-(end - i + 1) / width) * cost["tpWeight"] / max_tp
            wid[i] = window_base + labels.windows.index(bounds[k])
        elif prev_end < 0:
            weights[i] = -1.0 * cost["fpWeight"]
        else:
            # NAB divides by (width - 1); a one-row window would divide by zero there too.
            y = abs(i - prev_end) / max(prev_width - 1.0, 1e-12)
            weights[i] = scaled_sigmoid(y) * cost["fpWeight"]
    wid[: probation_length(n)] = PROBATION
    return weights, wid


@njit(cache=True)
def _sweep(scores: np.ndarray, weights: np.ndarray, wid: np.ndarray, n_windows: int,
           fn_weight: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # scores/weights/wid: scorable rows sorted by score, descending. Returns per distinct
    # threshold (first entry 1.1: no detections) the total and the number of detected windows.
    m = scores.shape[0]
    part = np.full(n_windows, -fn_weight)
    hit = np.zeros(n_windows, np.bool_)
    thresholds = np.empty(m + 1)
    totals = np.empty(m + 1)
    found = np.empty(m + 1, np.int64)
    fp = 0.0
    win_sum = -fn_weight * n_windows
    n_found = 0
    thresholds[0] = 1.1
    totals[0] = win_sum
    found[0] = 0
    k = 1
    i = 0
    while i < m:
        s = scores[i]
        while i < m and scores[i] == s:
            w = wid[i]
            if w < 0:
                fp += weights[i]
            else:
                if not hit[w]:
                    hit[w] = True
                    n_found += 1
                if weights[i] > part[w]:
                    win_sum += weights[i] - part[w]
                    part[w] = weights[i]
            i += 1
        thresholds[k] = s
        totals[k] = win_sum + fp
        found[k] = n_found
        k += 1
    return thresholds[:k], totals[:k], found[:k]


@dataclass
class Sweep:
    """Corpus total for every threshold (descending); ``windows`` = windows with scored rows."""

    thresholds: np.ndarray
    totals: np.ndarray
    detected: np.ndarray
    windows: int

    def best(self) -> tuple[float, float]:
        """(threshold, total) with the highest total; ties go to the highest threshold, as in NAB."""
        k = int(np.argmax(self.totals))
        return float(self.thresholds[k]), float(self.totals[k])

    def at(self, threshold: float) -> float:
        """Total when every row scoring at or over ``threshold`` is a detection."""
        k = int(np.searchsorted(-self.thresholds, -threshold, side="right")) - 1
        return float(self.totals[max(k, 0)])


def sweep(files: Sequence[tuple[np.ndarray, Labels]], cost: Mapping[str, float]) -> Sweep:
    """NAB's threshold sweep over the rows of all ``files`` (anomaly scores, labels) at once."""
    parts = []
    for scores, labels in files:
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != (labels.rows,):
            raise ValueError(f"{labels.name}: expected {labels.rows} anomaly scores, got {scores.shape[0]}")
        parts.append((scores, *row_weights(labels, cost)))
    return sweep_weighted(parts, float(cost["fnWeight"]))


def sweep_weighted(parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], fn_weight: float) -> Sweep:
    """:func:`sweep` over files given as (scores, row weights, window ids) with each file's window
    ids from 0 (:func:`row_weights` with ``window_base=0``): weights computed once can be swept
    for many detectors' scores (cross-validation)."""
    all_s, all_w, all_id = [], [], []
    base = 0
    for scores, w, wid in parts:
        keep = wid != PROBATION
        all_s.append(scores[keep])
        all_w.append(w[keep])
        ids = wid[keep]
        all_id.append(np.where(ids >= 0, ids + base, ids))
        base += int(wid.max()) + 1 if wid.size and wid.max() >= 0 else 0
    s = np.concatenate(all_s) if all_s else np.zeros(0)
    w = np.concatenate(all_w) if all_w else np.zeros(0)
    wid = np.concatenate(all_id) if all_id else np.zeros(0, np.int64)
    # Windows are renumbered densely over those that have scored rows (NAB's scoreParts).
    scored = np.unique(wid[wid >= 0])
    dense = np.full(max(base, 1), -1, np.int64)
    dense[scored] = np.arange(scored.size)
    wid = np.where(wid >= 0, dense[np.maximum(wid, 0)], NO_WINDOW)
    order = np.argsort(-s, kind="stable")
    th, tot, det = _sweep(s[order], w[order], wid[order], int(scored.size), fn_weight)
    return Sweep(th, tot, det, int(scored.size))


def file_score(scores: np.ndarray, labels: Labels, cost: Mapping[str, float], threshold: float) -> dict[str, float]:
    """One file at a fixed threshold: its raw score and counts (tp/fn windows, fp rows).

    >>> lab = Labels("f", 10, [(6, 7)])
    >>> cost = {"tpWeight": 1, "fpWeight": 0.11, "fnWeight": 1}
    >>> r = file_score(np.array([0, 0, 0, 1, 0, 0, 0, 1, 0, 0.]), lab, cost, 0.5)
    >>> round(r["score"], 4), r["tp"], r["fp"], r["fn"]
    (0.7498, 1, 1, 0)
    """
    scores = np.asarray(scores, dtype=np.float64)
    w, wid = row_weights(labels, cost, 0)
    det = (scores >= threshold) & (wid != PROBATION)
    fp_rows = det & (wid == NO_WINDOW)
    total = float(w[fp_rows].sum())
    tp = fn = 0
    for k in range(len(labels.windows)):
        rows = wid == k
        if not rows.any():
            continue  # a window wholly inside the probationary period is not scored
        hits = np.flatnonzero(det & rows)
        if hits.size:
            total += float(w[hits].max())
            tp += 1
        else:
            total -= cost["fnWeight"]
            fn += 1
    return {"score": total, "tp": tp, "fn": fn, "fp": int(fp_rows.sum())}


@dataclass
class ProfileResult:
    profile: str
    threshold: float
    raw: float
    null: float
    perfect: float
    score: float  # normalised, 100 = perfect, 0 = null detector
    per_file: dict[str, dict[str, float]]


def normalised(raw: float, null: float, perfect: float) -> float:
    """``100 * (raw - null) / (perfect - null)``.

    >>> normalised(-2.0, -4.0, 4.0)
    25.0
    """
    return 100.0 * (raw - null) / (perfect - null)


def score_corpus(results: Mapping[str, np.ndarray], labels: Mapping[str, Labels],
                 profiles: Mapping[str, Mapping[str, float]],
                 thresholds: Mapping[str, float] | None = None) -> dict[str, ProfileResult]:
    """Score a detector's per-file anomaly scores under each profile (NAB's optimise + score + normalise).

    ``thresholds`` fixes a profile's threshold instead of searching for the best one.
    """
    names = sorted(results)
    missing = [n for n in names if n not in labels]
    if missing:
        raise ValueError(f"no labelled windows for {missing[0]} (expected it in the windows file)")
    files = [(np.asarray(results[n], dtype=np.float64), labels[n]) for n in names]
    nulls = [(np.zeros(labels[n].rows), labels[n]) for n in names]
    out = {}
    for prof, cost in profiles.items():
        sw = sweep(files, cost)
        if thresholds is not None and prof in thresholds:
            th = float(thresholds[prof])
            raw = sw.at(th)
        else:
            th, raw = sw.best()
        null = sweep(nulls, cost).best()[1]
        perfect = cost["tpWeight"] * sum(len(labels[n].windows) for n in names)
        per_file = {n: file_score(s, lab, cost, th) for n, (s, lab) in zip(names, files)}
        denom = perfect - null
        score = normalised(raw, null, perfect) if denom != 0 else float("nan")
        out[prof] = ProfileResult(prof, th, raw, null, perfect, score, per_file)
    return out


def labels_for_corpus(series_ts: Mapping[str, np.ndarray], windows: Mapping[str, Sequence[tuple[str, str]]],
                      parse_time: Callable[[str], float]) -> dict[str, Labels]:
    """Labels for each file in ``series_ts`` ({relative path: timestamps}) from ``windows.json``."""
    out = {}
    for name, ts in series_ts.items():
        key = name.replace(os.sep, "/")
        if key not in windows:
            raise ValueError(f"{key}: not in the windows file (expected an entry, [] for none)")
        limits = [(parse_time(a), parse_time(b)) for a, b in windows[key]]
        out[name] = labels_from_times(key, ts, limits)
    return out
