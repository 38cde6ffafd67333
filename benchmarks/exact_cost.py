"""Cost of exact kernels (``load_model(exact=True)``, ``LSTREAM_EXACT_KERNELS=1``): us per stream
of ``lstm_step`` and of ``Engine.advance``, batch path vs per-stream kernel, side by side in one
run (rounds interleaved, fastest kept: the machine is shared), one BLAS thread as in the worker.

    python benchmarks/exact_cost.py [--model DIR] [--n 256] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from kernels import load_model  # noqa: E402
from kernels.blas import limit_blas_threads  # noqa: E402
from kernels.engine import Engine  # noqa: E402
from worker.settings import DEFAULT_MODEL  # noqa: E402


def one_round(engine: Engine, n: int, calls: int, rng: np.random.Generator) -> tuple[float, float]:
    """us per stream of ``Engine.advance`` and of the bare ``lstm_step``, n streams per call."""
    model = engine.model
    st = engine.new_states(n)
    xs = 10 + rng.normal(size=(calls, n, model.input_size))
    ts = 1_700_000_000.0 + 60.0 * np.arange(calls)
    for i in range(min(calls, 10)):  # warm: states past their first steps
        engine.advance(st, xs[i], np.full(n, ts[i]))
    t0 = time.perf_counter()
    for i in range(calls):
        engine.advance(st, xs[i], np.full(n, ts[i]))
    advance = (time.perf_counter() - t0) / calls / n * 1e6
    z = rng.normal(size=(n, model.input_size)).astype(np.float32)
    h, c = model.zero_state(n)
    t0 = time.perf_counter()
    for _ in range(calls):
        model.step(z, h, c)
    step = (time.perf_counter() - t0) / calls / n * 1e6
    return advance, step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/exact_cost.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--n", type=int, default=256, help="streams per call")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=60, help="calls per round")
    args = p.parse_args(argv)
    limit_blas_threads(1)
    engines = {exact: Engine(load_model(args.model, exact=exact)) for exact in (False, True)}
    best = {exact: [np.inf, np.inf] for exact in engines}
    rng = np.random.default_rng(0)
    for _ in range(args.rounds):
        for exact, engine in engines.items():
            adv, step = one_round(engine, args.n, args.calls, rng)
            best[exact] = [min(best[exact][0], adv), min(best[exact][1], step)]
    print(f"n = {args.n} streams per call, us per stream (fastest of {args.rounds} rounds)")
    print(f"{'':16s}{'batch path':>12s}{'exact':>10s}{'ratio':>8s}")
    for k, name in enumerate(("Engine.advance", "lstm_step")):
        a, b = best[False][k], best[True][k]
        print(f"{name:16s}{a:12.2f}{b:10.2f}{b / a:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
