"""Cost of one ``Engine.advance`` call (us per call and per stream) with and without the
per-stream adaptation, for n = 1 and n = 256 streams, side by side in one run.

    python benchmarks/adapt_cost.py [--model DIR ...] [--seconds 1.0]
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
from kernels.engine import Engine  # noqa: E402


def per_call(engine: Engine, n: int, seconds: float) -> float:
    """Fastest of 7 rounds of the mean us per advance() call of n streams (the machine is
    shared: the fastest round is the one least disturbed)."""
    rng = np.random.default_rng(0)
    st = engine.new_states(n)
    f = engine.model.input_size
    xs = 10 + rng.normal(size=(512, n, f))
    ts0 = 1_700_000_000.0
    for k in range(50):  # warm: JIT, first steps
        engine.advance(st, xs[k % 512], ts=np.full(n, ts0 + 300 * k))
    rounds = []
    k = 50
    for _ in range(7):
        calls = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds / 7:
            engine.advance(st, xs[k % 512], ts=np.full(n, ts0 + 300 * k))
            k += 1
            calls += 1
        rounds.append((time.perf_counter() - t0) / calls * 1e6)
    return float(np.min(rounds))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", default=None, help="artifact directory (repeatable)")
    p.add_argument("--seconds", type=float, default=1.0, help="measuring time per cell")
    args = p.parse_args(argv)
    models = args.model or [os.path.join(ROOT, "models", "default")]
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)  # as the worker runs: one BLAS thread
    print(f"{'model':<14}{'adapt':<7}{'n':>5}{'us/call':>10}{'us/stream':>11}")
    for path in models:
        model = load_model(path)
        for adapt in (False, True):
            engine = Engine(model, adapt=adapt)
            for n in (1, 256):
                us = per_call(engine, n, args.seconds)
                print(f"{model.version:<14}{'on' if adapt else 'off':<7}{n:>5}{us:>10.1f}{us / n:>11.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
