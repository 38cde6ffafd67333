"""``lstream nab``: score the worker's detector on the Numenta Anomaly Benchmark.

Runs every CSV under ``--data`` as one stream through the worker's pipeline (model, stream
normalisation, detector), online, writes NAB-layout results under ``--out`` and prints NAB's
standard, reward_low_FP_rate and reward_low_FN_rate scores (threshold chosen over the corpus,
as NAB does; the score at the engine's own threshold is printed too).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path

from lstream.cli import CliError

# The NAB half shipped beside the repository in this project's workspace, if present.
SHARED_NAB = Path(__file__).resolve().parents[3] / "shared" / "nab"


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None,
                   help=f"NAB data directory: <category>/<file>.csv (default: {SHARED_NAB / 'data'} if it exists)")
    p.add_argument("--windows", default=None, help="NAB windows JSON (default: windows.json beside --data)")
    p.add_argument("--profiles", default=None, help="NAB profiles JSON (default: profiles.json beside --windows)")
    p.add_argument("--model", default=None,
                   help="model artifact directory (default: LSTREAM_MODEL or the bundled model)")
    p.add_argument("--out", default=None, help="results directory, NAB layout (default: write nothing)")
    p.add_argument("--threshold", type=float, default=None,
                   help="also report the scores at this fixed threshold (default: the engine's threshold)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a detector setting for this run, e.g. --set still=0 (repeatable)")
    p.add_argument("--workers", type=int, default=2, help="processes, one file each at a time (default 2)")
    p.add_argument("--per-file", action="store_true", help="print each file's standard-profile contribution")
    p.add_argument("--cv", action="store_true",
                   help="choose the detector's settings by leave-one-category-out cross-validation over --grid "
                        "and print the cross-validated score, with the in-sample score beside it")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="with --cv: values to try for a detector setting (repeatable; default: "
                        "evaluation.cv.DEFAULT_GRID); --set fixes the others")
    p.add_argument("--cut-probationary", default=None, metavar="DIR",
                   help="only write each file's probationary rows (the first min(15%%, 750)) under DIR, "
                        "as training data for `lstream train`, and exit")
    return p


def _overrides(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[key.strip()] = float(value)
        except ValueError:
            raise CliError(f"--set: expected KEY=NUMBER, got {item!r}") from None
    return out


def _grid(items: list[str]) -> dict[str, tuple[float, ...]]:
    out = {}
    for item in items:
        key, sep, values = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[key.strip()] = tuple(float(v) for v in values.split(",") if v.strip())
            if not out[key.strip()]:
                raise ValueError
        except ValueError:
            raise CliError(f"--grid: expected KEY=NUMBER,NUMBER,..., got {item!r}") from None
    return out


def _cross_validate(args: argparse.Namespace, data: str, windows: str, model: str) -> int:
    from evaluation import cv, nab_score
    from kernels import detector

    spec = _grid(args.grid) or dict(cv.DEFAULT_GRID)
    fixed = _overrides(args.set)
    unknown = sorted((set(spec) | set(fixed)) - set(detector.DEFAULTS))
    if unknown:
        raise CliError(f"detector setting {unknown[0]!r}: expected one of {', '.join(detector.DEFAULTS)}")
    profiles_path = args.profiles or os.path.join(os.path.dirname(os.path.abspath(windows)), "profiles.json")
    profiles = nab_score.load_profiles(profiles_path)
    if "standard" not in profiles:
        raise CliError(f"{profiles_path}: expected a 'standard' profile")
    for c in cv.grid(spec, fixed):
        detector.params(c)  # refuse bad settings before the model runs
    corpus = cv.collect(data, windows, model, workers=args.workers)
    # Candidates: the model's own detector settings, --set over them, each --grid combination over that.
    candidates = cv.grid(spec, {**corpus.detector_cfg, **fixed})
    res = cv.cross_validate(corpus, candidates, profiles["standard"])
    print(f"NAB: {len(corpus.names)} files, model {model}")
    print(cv.report(res, list(spec)))
    return 0


def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from evaluation import nab
    from kernels.blas import limit_blas_threads
    from series.csvdata import DataError
    from worker.settings import DEFAULT_MODEL

    limit_blas_threads(1)  # small batched matmuls: one BLAS thread is faster (kernels/blas.py)
    data = args.data or str(SHARED_NAB / "data")
    if not os.path.isdir(data):
        raise CliError(f"--data: expected NAB's data directory, {data!r} is not a directory")
    if args.cut_probationary:
        paths = nab.write_probationary(nab.corpus_files(data), args.cut_probationary)
        print(f"wrote the probationary rows of {len(paths)} files under {args.cut_probationary}")
        return 0
    windows = args.windows or os.path.join(os.path.dirname(os.path.abspath(data)), "windows.json")
    if not os.path.isfile(windows):
        raise CliError(f"--windows: expected NAB's windows JSON file, {windows!r} does not exist")
    if args.profiles is not None and not os.path.isfile(args.profiles):
        raise CliError(f"--profiles: expected NAB's profiles JSON file, {args.profiles!r} does not exist")
    if args.workers < 1:
        raise CliError(f"--workers: expected at least 1, got {args.workers}")
    model = args.model or env.get("LSTREAM_MODEL") or DEFAULT_MODEL
    if args.cv:
        try:
            return _cross_validate(args, data, windows, str(model))
        except (DataError, ValueError) as exc:
            raise CliError(str(exc)) from None
    try:
        ev = nab.evaluate(data, windows, args.profiles, model, args.out, detector_cfg=_overrides(args.set),
                          workers=args.workers, threshold=args.threshold)
    except (DataError, ValueError) as exc:
        raise CliError(str(exc)) from None
    print(f"NAB: {len(ev.files)} files, model {model}")
    print(nab.report(ev, per_file=args.per_file))
    if args.out:
        print(f"results: {os.path.join(args.out, nab.DETECTOR_NAME)}")
    return 0
