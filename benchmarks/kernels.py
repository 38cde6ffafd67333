"""Benchmark: lstream's LSTM step vs torch.nn.LSTM + head, and vs the arithmetic floor.

    python -m benchmarks.kernels [--quick] [--min-time SECONDS]

For each size (input 1 and 8, hidden 32/64/128, layers 1 and 2) it times one step of torch
(one thread, inference mode, the state passed in and out as a streaming worker would) and of
``kernels`` at n = 1 and n = 256 streams, and prints the floor: the LSTM's FLOPs,
2 * 4H * (I + H) per layer per stream-step, divided by this machine's single-thread float32
matmul rate measured in the same rounds. Times are process CPU time (everything runs on one
thread), the best of several interleaved rounds: the box is shared, and the minimum is the least
disturbed figure. This is a report, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np

SIZES = [(i, h, layers) for i in (1, 8) for h in (32, 64, 128) for layers in (1, 2)]
QUICK_SIZES = [(8, 64, 2)]
N_BIG = 256


def limit_blas_threads(n: int = 1) -> tuple[str, Callable[[], None]]:
    """Make numpy's BLAS use ``n`` threads (threadpoolctl, a dependency of lstream); return how,
    and a function that undoes it."""
    from threadpoolctl import threadpool_limits

    limiter = threadpool_limits(n, user_api="blas")
    return f"threadpoolctl: blas threads = {n}", limiter.restore_original_limits


# CPU time of this process, not wall time: on the shared 2-core box other jobs preempt us often,
# and preempted time is not ours (everything here runs on one thread: torch and BLAS are set so).
CLOCK = time.process_time


def best_times(fns: list[Callable[[], object]], min_time: float, rounds: int = 7) -> list[float]:
    """CPU seconds per call of each function: the fastest of ``rounds`` rounds. The functions
    take turns within each round, so a busy neighbour slows all of them alike."""
    loops = []
    for fn in fns:
        fn()
        start = time.perf_counter()
        fn()
        fn()
        once = max((time.perf_counter() - start) / 2, 1e-7)
        loops.append(max(1, int(min_time / rounds / once)))
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, (fn, count) in enumerate(zip(fns, loops)):
            start = CLOCK()
            for _ in range(count):
                fn()
            best[i] = min(best[i], (CLOCK() - start) / count)
    return best


def matmul_caller(k: int, g4: int) -> Callable[[], object]:
    """One (256 x k) @ (k x g4) float32 matmul into a preallocated output."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(N_BIG, k)).astype(np.float32)
    b = rng.normal(size=(k, g4)).astype(np.float32)
    out = np.empty((N_BIG, g4), np.float32)
    return lambda: np.matmul(a, b, out=out)


# LSTM-like matmul shapes (k = I + H, 4H) whose best rate is taken as the machine's
RATE_SHAPES = ((136, 512), (256, 512), (256, 1024))


def rate_of(seconds: list[float]) -> float:
    """FLOP/s: the best over RATE_SHAPES, given their times."""
    return max(2.0 * N_BIG * k * g4 / t for (k, g4), t in zip(RATE_SHAPES, seconds))


def rate_without_openblas_env() -> str:
    """Where OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are set (some machines set them for old
    OpenBLAS builds; they slow a current numpy), the matmul rate with both unset, measured in a
    child process: the environment of this one is left alone."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    env["OPENBLAS_NUM_THREADS"] = "1"
    code = ("from benchmarks.kernels import *; fns=[matmul_caller(k, g) for k, g in RATE_SHAPES]; "
            "print(f'{rate_of(best_times(fns, 0.3)) / 1e9:.1f}')")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                             timeout=120, check=True).stdout.strip()
    except (subprocess.SubprocessError, OSError) as exc:
        return f"(could not measure without them: {exc})"
    return f"with both unset: {out} GFLOP/s"


def lstm_flops(n_in: int, hid: int, n_layers: int) -> float:
    """FLOPs of the LSTM matmuls for one stream-step (the head and activations not counted)."""
    return sum(2.0 * 4 * hid * ((n_in if layer == 0 else hid) + hid) for layer in range(n_layers))


def build(n_in: int, hid: int, n_layers: int, tmp: str):
    """A torch LSTM + head with torch's random init, exported and loaded by kernels."""
    import torch

    from kernels import load_model
    from training.export import export_model

    torch.manual_seed(0)
    lstm = torch.nn.LSTM(n_in, hid, n_layers, batch_first=True).eval()
    head = torch.nn.Sequential(torch.nn.Linear(hid, 32), torch.nn.ReLU(), torch.nn.Linear(32, n_in)).eval()
    out = os.path.join(tmp, f"m{n_in}_{hid}_{n_layers}")
    export_model(lstm, head, out, features=[f"f{i}" for i in range(n_in)], norm={"mode": "stream"})
    return lstm, head, load_model(out)


def torch_caller(lstm, head, n: int, n_in: int) -> Callable[[], object]:
    """One streaming step of torch: the state goes in and comes out, as in a worker."""
    import torch

    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(size=(n, 1, n_in)).astype(np.float32))
    state = [(torch.zeros(lstm.num_layers, n, lstm.hidden_size), torch.zeros(lstm.num_layers, n, lstm.hidden_size))]

    def step() -> None:
        with torch.inference_mode():
            out, state[0] = lstm(x, state[0])
            head(out[:, 0])

    return step


def lstream_caller(model, n: int) -> Callable[[], object]:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, model.input_size)).astype(np.float32)
    h, c = model.zero_state(n)
    return lambda: model.step(x, h, c)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one size, short timings (a smoke run)")
    parser.add_argument("--min-time", type=float, default=None, help="seconds per measurement (default 0.3)")
    args = parser.parse_args(argv)
    min_time = args.min_time if args.min_time is not None else (0.05 if args.quick else 0.3)
    sizes = QUICK_SIZES if args.quick else SIZES

    import torch

    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    how, restore = limit_blas_threads(1)
    try:
        _run(sizes, min_time, how)
    finally:  # `lstream bench all` runs other benchmarks in this process afterwards
        restore()
        torch.set_num_threads(torch_threads)
    return 0


def _run(sizes: list[tuple[int, int, int]], min_time: float, how: str) -> None:
    import torch

    env = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS")
           if k in os.environ}
    print(f"numpy {np.__version__}, torch {torch.__version__}, 1 thread each ({how}); "
          f"env {env or 'no OPENBLAS_* set'}")
    print("CPU microseconds per stream-step, best of 7 interleaved rounds; floor = LSTM FLOPs / "
          "best single-thread float32 matmul rate of the same rounds")
    if "OPENBLAS_CORETYPE" in env or "OPENBLAS_L2_SIZE" in env:
        print(f"note: OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE are set; matmul rate {rate_without_openblas_env()}")
    header = (f"{'I':>3} {'H':>4} {'L':>2} | {'torch n=1':>9} {'lstream n=1':>11} {'torch/ls':>8} | "
              f"{'torch n=256':>11} {'lstream n=256':>13} {'floor':>7} {'ls/floor':>8} {'torch/ls':>8} | "
              f"{'GFLOP/s':>7}")
    print(header)
    print("-" * len(header))
    matmuls = [matmul_caller(k, g4) for k, g4 in RATE_SHAPES]
    with tempfile.TemporaryDirectory() as tmp:
        for n_in, hid, n_layers in sizes:
            lstm, head, model = build(n_in, hid, n_layers, tmp)
            fns = [torch_caller(lstm, head, 1, n_in), lstream_caller(model, 1),
                   torch_caller(lstm, head, N_BIG, n_in), lstream_caller(model, N_BIG), *matmuls]
            times = best_times(fns, min_time)
            t1, l1 = times[0] * 1e6, times[1] * 1e6
            tb, lb = times[2] * 1e6 / N_BIG, times[3] * 1e6 / N_BIG
            rate = rate_of(times[4:])
            floor = lstm_flops(n_in, hid, n_layers) / rate * 1e6
            print(f"{n_in:>3} {hid:>4} {n_layers:>2} | {t1:>9.1f} {l1:>11.2f} {t1 / l1:>7.1f}x | "
                  f"{tb:>11.3f} {lb:>13.3f} {floor:>7.3f} {lb / floor:>7.2f}x {tb / lb:>7.2f}x | "
                  f"{rate / 1e9:>7.1f}", flush=True)
    print("torch/ls: how many times faster lstream is; ls/floor: lstream n=256 over the FLOP floor")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
