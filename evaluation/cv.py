"""Leave-one-category-out cross-validation of the detector's settings on a NAB corpus.

The detector's settings are chosen on every category but one and scored on the one left
out, for each category in turn; the held-out totals are pooled into one NAB score, the
*cross-validated* score, an estimate of what the settings do on files they were not chosen
on. The in-sample score (settings and threshold chosen and scored on every file) is
reported beside it: the gap between the two is how much the choice over-fits.

The forecasts do not depend on the detector's settings, so the model runs once per file
(:func:`collect`, the worker's engine, reading by reading) and keeps each reading's forecast
error in model units; every candidate setting then re-runs only the detector over those
errors (:func:`detector_scores`, a Numba loop: milliseconds a file), exactly the scores the
engine would give (up to float rounding of the recomputed errors: :func:`collect` checks
them against the engine's own scores).

Folds: NAB's categories (the directory of each file), with the artificial ones merged (one
of them holds no anomaly at all, so alone it cannot be scored). Within a fold, NAB's own
threshold optimisation runs on the training categories; the held-out category is scored
at that threshold.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import njit

from evaluation import nab, nab_score
from kernels import detector
from series.csvdata import parse_time, read_csv

# The setting searched by default: how many readings the forecast error is smoothed over
# (3 to 20, about doubling), the one that moves the score most; every other setting keeps
# its reasoned default (docs/detector.md), and the threshold is always NAB's optimum over the
# training categories. A wider search over-fits: searching novelty, habit, smooth, margin and
# still together (96 settings) scored 64.1 cross-validated, against 68.8 for no search at all
# (on an earlier model).
DEFAULT_GRID: dict[str, tuple[float, ...]] = {
    "smooth": (3.0, 5.0, 10.0, 20.0),
}


def fold_of(name: str) -> str:
    """The fold of a NAB file (``category/file.csv``): its category, artificial ones merged.

    >>> fold_of("artificialNoAnomaly/art_flatline.csv"), fold_of("realTweets/Twitter_volume_AAPL.csv")
    ('artificial', 'realTweets')
    """
    category = name.split("/", 1)[0]
    return "artificial" if category.startswith("artificial") else category


@dataclass
class Corpus:
    """What the model said about every reading of every file, and each file's labels."""

    names: list[str]
    x: dict[str, np.ndarray]  # float64 (T, F) readings
    err: dict[str, np.ndarray]  # float64 (T, F) reading minus forecast, model units (0 at row 0)
    labels: dict[str, nab_score.Labels]
    engine_scores: dict[str, np.ndarray]  # the engine's own scores at the model's detector settings
    detector_cfg: dict[str, float]  # the model's own detector settings (model.json over the defaults)

    def folds(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for n in self.names:
            out.setdefault(fold_of(n), []).append(n)
        return out


def _collect_one(job: tuple[str, str, str]) -> tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    name, path, model_dir = job
    series = read_csv(path, columns=["value"])
    engine = nab.make_engine(model_dir)
    st = engine.new_states(1)
    x = np.ascontiguousarray(series.values, dtype=np.float64)
    err = np.zeros_like(x)
    scores = np.empty(len(series))
    for i in range(len(series)):
        # The detector's error, as the engine computes it: the scaled (and clipped) reading
        # minus the forecast, in model units.
        mean, std = engine.normalizer.current(st.norm)
        if i > 0:
            err[i] = engine.normalizer.scale(x[i : i + 1], mean, std)[0] - st.pred[0].astype(np.float64)
        out = engine.advance(st, x[i : i + 1], series.ts[i : i + 1])
        scores[i] = out.score[0]
    return name, series.ts, x, err, scores


def collect(data_dir: str, windows_path: str, model_dir: str, *, workers: int = 2) -> Corpus:
    """Run the model over every file of the corpus once (``workers`` processes)."""
    files = nab.corpus_files(data_dir)
    windows = nab_score.load_windows(windows_path)
    missing = [f.name for f in files if f.name not in windows]
    if missing:
        raise ValueError(f"{windows_path}: no entry for {missing[0]} (expected one per data file, [] for none)")
    jobs = sorted(((f.name, f.path, model_dir) for f in files), key=lambda j: -os.path.getsize(j[1]))
    if workers <= 1 or len(jobs) == 1:
        done = [_collect_one(j) for j in jobs]
    else:
        with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            done = pool.map(_collect_one, jobs, chunksize=1)
    names = sorted(d[0] for d in done)
    by = {d[0]: d for d in done}
    labels = nab_score.labels_for_corpus({n: by[n][1] for n in names}, windows, parse_time)
    cfg = detector.config(nab.make_engine(model_dir).model.detector)
    corpus = Corpus(names, {n: by[n][2] for n in names}, {n: by[n][3] for n in names}, labels,
                    {n: by[n][4] for n in names}, cfg)
    # The recomputed errors must give the engine's own scores, or every result below is moot.
    for n in names:
        mine = detector_scores(corpus, n, cfg)
        if not np.allclose(mine, corpus.engine_scores[n], atol=1e-6):
            k = int(np.argmax(np.abs(mine - corpus.engine_scores[n])))
            raise RuntimeError(f"{n}: the detector over recomputed errors scores {mine[k]} at row {k}, "
                               f"the engine {corpus.engine_scores[n][k]}: the engine's error is not "
                               f"scale(reading) - pred any more; update evaluation/cv.py")
    return corpus


@njit  # not cached: numba's cache would not see a change in detector.update, which this calls
def _run(err: np.ndarray, x: np.ndarray, p: np.ndarray, size: int, out: np.ndarray) -> None:
    st = np.zeros((1, size))
    buf = np.zeros(1)
    valid = np.zeros(1, np.bool_)
    for t in range(err.shape[0]):
        valid[0] = t > 0
        detector.update(st, err[t : t + 1], x[t : t + 1], valid, p, buf)
        out[t] = buf[0]


def detector_scores(corpus: Corpus, name: str, cfg: Mapping[str, Any] | None) -> np.ndarray:
    """One file's anomaly scores under detector settings ``cfg`` (over the model's errors)."""
    x = corpus.x[name]
    out = np.empty(x.shape[0])
    _run(corpus.err[name], x, detector.params(cfg), detector.state_size(x.shape[1]), out)
    return out


def grid(spec: Mapping[str, Sequence[float]], base: Mapping[str, Any] | None = None) -> list[dict[str, float]]:
    """Every combination of the values in ``spec`` over the settings ``base``.

    >>> grid({"a": (1, 2), "b": (3,)}, {"c": 0})
    [{'c': 0.0, 'a': 1.0, 'b': 3.0}, {'c': 0.0, 'a': 2.0, 'b': 3.0}]
    """
    keys = list(spec)
    base_f = {k: float(v) for k, v in (base or {}).items()}
    return [{**base_f, **{k: float(v) for k, v in zip(keys, combo)}}
            for combo in itertools.product(*(spec[k] for k in keys))]


@dataclass
class FoldResult:
    fold: str
    files: int
    settings: dict[str, float]  # chosen on the other folds
    threshold: float  # NAB's optimum on the other folds
    train_score: float  # normalised, on the other folds
    raw: float  # held-out total at that threshold
    null: float
    perfect: float

    @property
    def score(self) -> float:
        return nab_score.normalised(self.raw, self.null, self.perfect) if self.perfect != self.null else float("nan")


@dataclass
class CVResult:
    profile: str
    folds: list[FoldResult]
    cv_score: float  # held-out totals pooled, normalised
    in_sample_score: float  # settings and threshold chosen and scored on every file
    in_sample_settings: dict[str, float]
    in_sample_threshold: float
    candidates: int


def cross_validate(corpus: Corpus, candidates: Sequence[Mapping[str, float]],
                   cost: Mapping[str, float], profile: str = "standard") -> CVResult:
    """Leave-one-fold-out choice among ``candidates`` (detector settings), NAB profile ``cost``."""
    if not candidates:
        raise ValueError("candidates: expected at least one detector setting")
    names = corpus.names
    folds = corpus.folds()
    if len(folds) < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {list(folds)}")
    fn = float(cost["fnWeight"])
    weights = {n: nab_score.row_weights(corpus.labels[n], cost) for n in names}
    nulls = {n: (np.zeros(corpus.labels[n].rows), *weights[n]) for n in names}

    def total(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> nab_score.Sweep:
        return nab_score.sweep_weighted(parts, fn)

    def bounds(members: Sequence[str]) -> tuple[float, float]:
        null = total([nulls[n] for n in members]).best()[1]
        perfect = cost["tpWeight"] * sum(len(corpus.labels[n].windows) for n in members)
        return null, perfect

    fold_names = sorted(folds)
    train = {f: [n for n in names if fold_of(n) != f] for f in fold_names}
    train_bounds = {f: bounds(train[f]) for f in fold_names}
    test_bounds = {f: bounds(folds[f]) for f in fold_names}
    all_bounds = bounds(names)
    best_train: dict[str, tuple[float, int, float]] = {f: (-np.inf, -1, 0.0) for f in fold_names}
    best_all = (-np.inf, -1, 0.0)
    held: dict[tuple[str, int], float] = {}
    for c, cfg in enumerate(candidates):
        parts = {n: (detector_scores(corpus, n, cfg), *weights[n]) for n in names}
        th, raw = total([parts[n] for n in names]).best()
        if raw > best_all[0]:
            best_all = (raw, c, th)
        for f in fold_names:
            th, raw = total([parts[n] for n in train[f]]).best()
            if raw > best_train[f][0]:
                best_train[f] = (raw, c, th)
                held[(f, c)] = total([parts[n] for n in folds[f]]).at(th)
    results = []
    for f in fold_names:
        raw_train, c, th = best_train[f]
        null_t, perf_t = train_bounds[f]
        null, perfect = test_bounds[f]
        results.append(FoldResult(f, len(folds[f]), dict(candidates[c]), th,
                                  nab_score.normalised(raw_train, null_t, perf_t), held[(f, c)], null, perfect))
    raw = sum(r.raw for r in results)
    null = sum(r.null for r in results)
    perfect = sum(r.perfect for r in results)
    return CVResult(profile, results, nab_score.normalised(raw, null, perfect),
                    nab_score.normalised(best_all[0], *all_bounds), dict(candidates[best_all[1]]), best_all[2],
                    len(candidates))


def report(res: CVResult, grid_keys: Sequence[str] = ()) -> str:
    """The CV score first, the in-sample score beside it, then each fold's choice."""
    keys = list(grid_keys) or sorted(res.in_sample_settings)
    lines = [f"NAB {res.profile}, leave-one-category-out CV over {res.candidates} settings: "
             f"{res.cv_score:.2f}   (in-sample: {res.in_sample_score:.2f}, "
             f"gap {res.in_sample_score - res.cv_score:+.2f})",
             "in-sample choice: " + ", ".join(f"{k}={res.in_sample_settings[k]:g}" for k in keys)
             + f", threshold={res.in_sample_threshold:.4f}",
             "",
             f"{'held-out fold':<22} {'files':>5} {'held-out':>9} {'train':>7} {'threshold':>10}  chosen settings"]
    for r in res.folds:
        lines.append(f"{r.fold:<22} {r.files:5d} {r.score:9.2f} {r.train_score:7.2f} {r.threshold:10.4f}  "
                     + ", ".join(f"{k}={r.settings[k]:g}" for k in keys))
    return "\n".join(lines)
