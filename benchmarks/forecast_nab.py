"""Forecast accuracy on the NAB development half: MASE of x[t+1] against persistence, per file.

For each NAB file the model is replayed with the worker's own pipeline (``evaluation.replay``,
event times included), and its forecast of the next reading is scored after the probationary
first 15 % of the file: ``MASE = MAE(forecast) / MAE(persistence)`` over the same readings
(< 1: better than repeating the last reading). Constant files (art_flatline) are left out.
Prints per-file MASE, the median, the share of files below 1 and the worst file.

    python benchmarks/forecast_nab.py [--model models/default] [--adapt model|on|off] [--json out.json]
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from evaluation.replay import replay_streams  # noqa: E402
from kernels import load_model  # noqa: E402
from kernels.engine import Engine  # noqa: E402
from series.csvdata import read_csv  # noqa: E402

# The NAB development half beside the checkout (the same place `lstream nab` looks); --data overrides it.
NAB = os.path.join(os.path.dirname(ROOT), "shared", "nab", "data")


def mase(values: np.ndarray, forecast: np.ndarray, start: int) -> tuple[float, float]:
    """(MASE vs persistence, MASE vs seasonal-naive one day back) of forecast[t] for x[t+1], t >= start."""
    x = values[:, 0]
    f = forecast[:-1, 0]
    err = np.abs(f[start:] - x[start + 1:]).mean()
    naive = np.abs(x[start:-1] - x[start + 1:]).mean()
    return float(err / naive), float("nan")


def category(path: str) -> str:
    """A file's NAB category; the two small artificial ones count as one."""
    cat = os.path.basename(os.path.dirname(path))
    return "artificial" if cat.startswith("artificial") else cat


def score_files(engine: Engine, streams: list) -> np.ndarray:
    results = replay_streams(engine, streams)
    return np.array([mase(s.values, r.forecast, int(0.15 * len(s)))[0] for s, r in zip(streams, results)])


def _summary(vals: np.ndarray) -> str:
    return (f"median MASE {np.median(vals):.3f}, below 1: {np.mean(vals < 1):.0%}, "
            f"above 1.2: {int(np.sum(vals > 1.2))}, worst {vals.max():.3f}")


def cross_validate(model: object, args: argparse.Namespace) -> int:
    """Choose the adapt settings on all categories but one (lowest median MASE), score the one
    left out with them; every file is scored by settings chosen without its category."""
    axes = [(k, [float(v) for v in vals.split(",")]) for k, vals in (g.split("=", 1) for g in args.grid)]
    combos = [dict(zip([k for k, _ in axes], c)) for c in itertools.product(*[v for _, v in axes])]
    files = sorted(glob.glob(os.path.join(args.data, "*", "*.csv")))
    streams = [s for s in (read_csv(f) for f in files) if np.ptp(s.values) > 0]
    cats = np.array([category(s.source) for s in streams])
    base = dict(model.meta.get("adapt") or {})  # type: ignore[attr-defined]
    table = []
    for combo in combos:
        model.meta["adapt"] = {**base, **combo}  # type: ignore[attr-defined]
        table.append(score_files(Engine(model, adapt=True), streams))
        print(f"{combo}: in-sample {_summary(table[-1])}", flush=True)
    scores = np.array(table)  # (combos, files)
    cv = np.empty(scores.shape[1])
    for cat in sorted(set(cats)):
        held = cats == cat
        pick = int(np.argmin(np.median(scores[:, ~held], axis=1)))
        cv[held] = scores[pick, held]
        print(f"  {cat:<22} chosen on the others: {combos[pick]}  held-out median {np.median(cv[held]):.3f}")
    best = int(np.argmin(np.median(scores, axis=1)))
    print(f"leave-one-category-out CV: {_summary(cv)}")
    print(f"in-sample best {combos[best]}: {_summary(scores[best])}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=os.path.join(ROOT, "models", "default"))
    p.add_argument("--data", default=NAB)
    p.add_argument("--adapt", choices=("model", "on", "off"), default="model",
                   help="per-stream adaptation: as the model says, forced on (defaults), or off")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override an adapt setting (e.g. eta=2)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="adapt settings to choose from by leave-one-category-out CV (repeatable: the product)")
    p.add_argument("--json", default=None)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    model = load_model(args.model)
    if args.grid:
        return cross_validate(model, args)
    if args.set:
        model.meta["adapt"] = {**dict(model.meta.get("adapt") or {}),
                               **{k: float(v) for k, v in (s.split("=", 1) for s in args.set)}}
    engine = Engine(model, adapt={"model": None, "on": True, "off": False}[args.adapt])
    files = sorted(glob.glob(os.path.join(args.data, "*", "*.csv")))
    streams = [read_csv(f) for f in files]
    keep = [s for s in streams if np.ptp(s.values) > 0]
    t0 = time.perf_counter()
    results = replay_streams(engine, keep)
    seconds = time.perf_counter() - t0
    rows = []
    for s, r in zip(keep, results):
        start = int(0.15 * len(s))
        m, _ = mase(s.values, r.forecast, start)
        rows.append((os.path.relpath(s.source, args.data), m))
    vals = np.array([m for _, m in rows])
    if not args.quiet:
        for name, m in rows:
            print(f"{m:7.3f}  {name}")
    worst = max(rows, key=lambda r: r[1])
    print(f"model {model.version} adapt {'off' if engine.adapter is None else 'on'}: {len(rows)} files, "
          f"median MASE {np.median(vals):.3f}, mean {vals.mean():.3f}, below 1: {np.mean(vals < 1):.0%}, "
          f"above 1.2: {int(np.sum(vals > 1.2))}, worst {worst[1]:.3f} ({worst[0]}); replay {seconds:.1f}s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"model": model.version, "adapt": engine.adapter is not None,
                       "files": dict(rows), "median": float(np.median(vals))}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
