"""Benchmark: lstream's LSTM step vs torch.nn.LSTM + head, and vs the arithmetic floor.

    python -m bench.kernels [--quick] [--min-time SECONDS]

For each size (input 1 and 8, hidden 32/64/128, layers 1 and 2) it times one step of torch
(one thread, inference mode, the state passed in and out as a streaming worker would) and of
``kernels`` at n = 1 and n = 256 streams, and prints the floor: the LSTM's FLOPs,
2 * 4H * (I + H) per layer per stream-step, divided by this machine's single-thread float32
matmul rate measured in the same run. Times are the best of several rounds (the box is shared;
the minimum is the least disturbed figure). This is a report, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np

SIZES = [(i, h, layers) for i in (1, 8) for h in (32, 64, 128) for layers in (1, 2)]
QUICK_SIZES = [(8, 64, 2)]
N_BIG = 256


def _openblas(func: str) -> Callable[..., int] | None:
    """numpy's bundled OpenBLAS function ``openblas_<func>`` (any of its symbol spellings)."""
    names = (f"scipy_openblas_{func}64_", f"scipy_openblas_{func}", f"openblas_{func}64_", f"openblas_{func}")
    try:
        with open("/proc/self/maps", encoding="utf-8") as fh:
            libs = sorted({line.split()[-1] for line in fh if "openblas" in line.lower() and ".so" in line})
    except OSError:
        libs = []
    for path in libs:
        lib = ctypes.CDLL(path)
        for name in names:
            if hasattr(lib, name):
                return getattr(lib, name)
    return None


def limit_blas_threads(n: int = 1) -> tuple[str, Callable[[], None]]:
    """Make numpy's BLAS use ``n`` threads; return how, and a function that undoes it."""
    try:
        from threadpoolctl import threadpool_limits

        limiter = threadpool_limits(n, user_api="blas")
        return f"threadpoolctl: blas threads = {n}", limiter.restore_original_limits
    except ImportError:
        pass
    get, put = _openblas("get_num_threads"), _openblas("set_num_threads")
    if get is None or put is None:
        return "could not limit BLAS threads (set OPENBLAS_NUM_THREADS=1 before starting)", lambda: None
    before = int(get())
    put(ctypes.c_int(n))
    return f"openblas_set_num_threads({n})", lambda: put(ctypes.c_int(before))


def best_time(fn: Callable[[], object], min_time: float, rounds: int = 5) -> float:
    """Seconds per call: the fastest of ``rounds`` rounds, each ~min_time/rounds long."""
    fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    per_round = max(1, int(min_time / rounds / once))
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(per_round):
            fn()
        best = min(best, (time.perf_counter() - start) / per_round)
    return best


def matmul_rate(min_time: float) -> float:
    """Single-thread float32 matmul FLOP/s: the best of a few LSTM-like shapes (n=256 rows)."""
    rng = np.random.default_rng(0)
    best = 0.0
    for k, g4 in ((136, 512), (256, 512), (256, 1024)):
        a = rng.normal(size=(N_BIG, k)).astype(np.float32)
        b = rng.normal(size=(k, g4)).astype(np.float32)
        out = np.empty((N_BIG, g4), np.float32)
        seconds = best_time(lambda: np.matmul(a, b, out=out), min_time)
        best = max(best, 2.0 * N_BIG * k * g4 / seconds)
    return best


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


def time_torch(lstm, head, n: int, n_in: int, min_time: float) -> float:
    import torch

    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(size=(n, 1, n_in)).astype(np.float32))
    state = [(torch.zeros(lstm.num_layers, n, lstm.hidden_size), torch.zeros(lstm.num_layers, n, lstm.hidden_size))]

    def step() -> None:
        with torch.inference_mode():
            out, state[0] = lstm(x, state[0])
            head(out[:, 0])

    return best_time(step, min_time)


def time_lstream(model, n: int, min_time: float) -> float:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, model.input_size)).astype(np.float32)
    h, c = model.zero_state(n)
    return best_time(lambda: model.step(x, h, c), min_time)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n")[0])
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

    rate = matmul_rate(min_time)
    env = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS")
           if k in os.environ}
    print(f"numpy {np.__version__}, torch {torch.__version__}, 1 thread each ({how}); "
          f"env {env or 'no OPENBLAS_* set'}")
    print(f"single-thread float32 matmul rate: {rate / 1e9:.1f} GFLOP/s; "
          f"times per stream-step in microseconds, best of 5 rounds")
    header = (f"{'I':>3} {'H':>4} {'L':>2} | {'torch n=1':>9} {'lstream n=1':>11} {'torch/ls':>8} | "
              f"{'torch n=256':>11} {'lstream n=256':>13} {'floor':>7} {'ls/floor':>8} {'torch/ls':>8}")
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for n_in, hid, n_layers in sizes:
            lstm, head, model = build(n_in, hid, n_layers, tmp)
            t1 = time_torch(lstm, head, 1, n_in, min_time) * 1e6
            l1 = time_lstream(model, 1, min_time) * 1e6
            tb = time_torch(lstm, head, N_BIG, n_in, min_time) * 1e6 / N_BIG
            lb = time_lstream(model, N_BIG, min_time) * 1e6 / N_BIG
            floor = lstm_flops(n_in, hid, n_layers) / rate * 1e6
            print(f"{n_in:>3} {hid:>4} {n_layers:>2} | {t1:>9.1f} {l1:>11.2f} {t1 / l1:>7.1f}x | "
                  f"{tb:>11.3f} {lb:>13.3f} {floor:>7.3f} {lb / floor:>7.2f}x {tb / lb:>7.2f}x", flush=True)
    print("torch/ls: how many times faster lstream is; ls/floor: lstream n=256 over the FLOP floor")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
