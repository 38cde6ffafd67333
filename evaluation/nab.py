"""``lstream nab``: run the worker's pipeline over a NAB corpus and score it NAB's way (no torch).

Each CSV under the data directory is one stream, fed reading by reading through
:class:`kernels.engine.Engine` (the model, the stream normalisation and the detector the
worker uses), so the score at row t depends only on rows up to t. Results are written in
NAB's layout, ``<out>/lstream/<category>/lstream_<file>.csv`` with
``timestamp,value,anomaly_score``, then scored with :mod:`evaluation.nab_score`.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from evaluation import nab_score
from series.csvdata import Series, parse_time, read_csv

DETECTOR_NAME = "lstream"


@dataclass(frozen=True)
class DataFile:
    name: str  # relative path with "/", e.g. "realKnownCause/nyc_taxi.csv" (the windows.json key)
    path: str


def corpus_files(data_dir: str) -> list[DataFile]:
    """Every ``*.csv`` under ``data_dir``, sorted by relative path."""
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"{data_dir}: no such directory (expected NAB's data directory)")
    out = []
    for root, _, names in os.walk(data_dir):
        for n in names:
            if n.lower().endswith(".csv"):
                path = os.path.join(root, n)
                out.append(DataFile(os.path.relpath(path, data_dir).replace(os.sep, "/"), path))
    if not out:
        raise FileNotFoundError(f"{data_dir}: no CSV files found")
    return sorted(out, key=lambda f: f.name)


def make_engine(model_dir: str, detector_cfg: Mapping[str, Any] | None = None) -> Any:
    """The worker's engine for ``model_dir``, with detector settings overridden by ``detector_cfg``."""
    from kernels import load_model
    from kernels.engine import Engine

    model = load_model(model_dir)
    if detector_cfg:
        from kernels import detector

        merged = {**(model.detector or {}), **detector_cfg}
        unknown = sorted(set(detector_cfg) - set(detector.DEFAULTS))
        if unknown:
            raise ValueError(f"detector setting {unknown[0]!r}: expected one of {', '.join(detector.DEFAULTS)}")
        eng = Engine(model)
        cfg = detector.config(merged)
        eng.detector_params = detector.params(merged)
        eng.threshold = float(cfg["threshold"])
        eng.calm_steps = int(cfg["calm_steps"])
        return eng
    return Engine(model)


def run_series(engine: Any, series: Series) -> np.ndarray:
    """Anomaly scores of one stream, one reading at a time, exactly as the worker applies them."""
    st = engine.new_states(1)
    x = np.ascontiguousarray(series.values, dtype=np.float64)
    scores = np.empty(len(series))
    for i in range(len(series)):
        out = engine.advance(st, x[i : i + 1], series.ts[i : i + 1])
        scores[i] = out.score[0]
    return scores


def write_result(out_dir: str, name: str, series: Series, scores: np.ndarray) -> str:
    """NAB's results file for one data file; returns its path."""
    category, file = os.path.split(name)
    path = os.path.join(out_dir, DETECTOR_NAME, category, f"{DETECTOR_NAME}_{file}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    stamps = series.ts_text or [repr(float(t)) for t in series.ts]
    with open(path, "w") as fh:
        fh.write("timestamp,value,anomaly_score\n")
        for t, v, s in zip(stamps, series.values[:, 0], scores):
            fh.write(f"{t},{v:.10g},{s:.10g}\n")
    return path


def _run_one(job: tuple[str, str, str, dict[str, Any] | None]) -> tuple[str, np.ndarray, np.ndarray]:
    name, path, model_dir, detector_cfg = job
    series = read_csv(path, columns=["value"])
    engine = make_engine(model_dir, detector_cfg)
    return name, series.ts, run_series(engine, series)


def detect(files: Sequence[DataFile], model_dir: str, *, detector_cfg: Mapping[str, Any] | None = None,
           workers: int = 2) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{file name: (timestamps, scores)} for every file, ``workers`` processes in parallel."""
    jobs = [(f.name, f.path, model_dir, dict(detector_cfg) if detector_cfg else None) for f in files]
    # Longest files first so both workers finish together.
    jobs.sort(key=lambda j: -os.path.getsize(j[1]))
    if workers <= 1 or len(jobs) == 1:
        done = [_run_one(j) for j in jobs]
    else:
        with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            done = pool.map(_run_one, jobs, chunksize=1)
    return {name: (ts, sc) for name, ts, sc in done}


def write_probationary(files: Sequence[DataFile], out_dir: str) -> list[str]:
    """Copy each file's probationary rows (NAB's first ``min(15%, 750)``) to ``out_dir/<name>``.

    The only NAB rows a NAB-specific model may be trained on: no labels, and nothing a file
    is scored on. Returns the paths written.
    """
    paths = []
    for f in files:
        with open(f.path, newline="") as fh:
            lines = [ln for ln in fh.read().splitlines() if ln.strip()]
        keep = nab_score.probation_length(len(lines) - 1)
        path = os.path.join(out_dir, *f.name.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            fh.write("\n".join(lines[: 1 + keep]) + "\n")
        paths.append(path)
    return paths


@dataclass
class Evaluation:
    results: dict[str, nab_score.ProfileResult]  # per profile, NAB's best threshold
    fixed: dict[str, nab_score.ProfileResult] | None  # per profile, at the engine's own threshold
    engine_threshold: float
    files: list[str]


def evaluate(data_dir: str, windows_path: str, profiles_path: str | None, model_dir: str, out_dir: str | None,
             *, detector_cfg: Mapping[str, Any] | None = None, workers: int = 2,
             threshold: float | None = None) -> Evaluation:
    """Detect on every file, write NAB results (if ``out_dir``) and score them."""
    files = corpus_files(data_dir)
    windows = nab_score.load_windows(windows_path)
    missing = [f.name for f in files if f.name not in windows]
    if missing:
        raise ValueError(f"{windows_path}: no entry for {missing[0]} (expected one per data file, [] for none)")
    if profiles_path is None:
        profiles_path = os.path.join(os.path.dirname(os.path.abspath(windows_path)), "profiles.json")
    profiles = nab_score.load_profiles(profiles_path)
    scored = detect(files, model_dir, detector_cfg=detector_cfg, workers=workers)
    if out_dir is not None:
        for f in files:
            series = read_csv(f.path, columns=["value"])
            write_result(out_dir, f.name, series, scored[f.name][1])
    labels = nab_score.labels_for_corpus({n: ts for n, (ts, _) in scored.items()}, windows, parse_time)
    results_in = {n: sc for n, (_, sc) in scored.items()}
    best = nab_score.score_corpus(results_in, labels, profiles)
    eng_th = float(make_engine(model_dir, detector_cfg).threshold)
    th = eng_th if threshold is None else threshold
    fixed = nab_score.score_corpus(results_in, labels, profiles, thresholds={p: th for p in profiles})
    if out_dir is not None:
        summary = {
            "model": os.path.abspath(model_dir),
            "detector": dict(detector_cfg or {}),
            "files": len(files),
            "profiles": {p: {"score": r.score, "threshold": r.threshold, "raw": r.raw, "null": r.null,
                             "perfect": r.perfect} for p, r in best.items()},
            "at_threshold": {p: {"score": r.score, "threshold": r.threshold} for p, r in fixed.items()},
        }
        with open(os.path.join(out_dir, f"{DETECTOR_NAME}_scores.json"), "w") as fh:
            json.dump(summary, fh, indent=1)
    return Evaluation(best, fixed, th, [f.name for f in files])


def report(ev: Evaluation, per_file: bool = False) -> str:
    """A plain-text table of the scores (and, optionally, each file's contribution)."""
    lines = [f"{'profile':<22} {'score':>7} {'threshold':>12} {'raw':>9} {'null':>8} {'perfect':>8}"]
    for p, r in ev.results.items():
        lines.append(f"{p:<22} {r.score:7.2f} {r.threshold:12.6f} {r.raw:9.3f} {r.null:8.2f} {r.perfect:8.1f}")
    if ev.fixed:
        lines.append(f"at the engine's threshold {ev.engine_threshold:g}: " + ", ".join(
            f"{p} {r.score:.2f}" for p, r in ev.fixed.items()))
    if per_file:
        std = ev.results.get("standard") or next(iter(ev.results.values()))
        lines.append("")
        lines.append(f"per file ({std.profile}, threshold {std.threshold:.6f}):")
        lines.append(f"{'file':<58} {'score':>8} {'tp':>3} {'fn':>3} {'fp':>4}")
        for name in ev.files:
            d = std.per_file[name]
            lines.append(f"{name:<58} {d['score']:8.3f} {d['tp']:3d} {d['fn']:3d} {d['fp']:4d}")
    return "\n".join(lines)
