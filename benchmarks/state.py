"""Client CPU cost of the state store: fenced load + save against plain MGET/MSET and GET+SET.

Per batch size n (states of 2 layers x 64, F = 1) it measures the client's CPU time
(``time.process_time``; Redis runs in another process) per stream for

* ``fenced``: :meth:`StateStore.load` + :meth:`StateStore.save` (HMGET + EVALSHA per stream,
  one round trip each, the position advancing so every save applies);
* ``mget/mset``: the same bytes as one blob per stream, one ``MGET`` and one ``MSET`` through
  redis-py, decoded back into arrays (no fencing, no fields: the floor for a batched store);
* ``get+set``: one ``GET`` and one ``SET`` per stream, awaited one after the other.

Run ``python -m benchmarks.state`` (starts its own redis-server) or pass ``--redis-url``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

import numpy as np
import redis.asyncio as aioredis

from kernels.states import StreamStates
from state.store import StateStore

LAYERS, HIDDEN, FEATURES = 2, 64, 1
ROUNDS = 5


def _states(n: int, rng: np.random.Generator) -> StreamStates:
    st = StreamStates.zeros(n, LAYERS, HIDDEN, FEATURES)
    st.h[:] = rng.standard_normal(st.h.shape)
    st.c[:] = rng.standard_normal(st.c.shape)
    st.pred[:] = rng.standard_normal(st.pred.shape)
    st.norm[:] = rng.standard_normal(st.norm.shape)
    st.anomaly[:] = rng.standard_normal(st.anomaly.shape)
    st.steps[:] = rng.integers(0, 10**6, n)
    return st


def _blobs(st: StreamStates) -> list[bytes]:
    n = len(st)
    parts = [st.h.reshape(n, -1).view(np.uint8), st.c.reshape(n, -1).view(np.uint8),
             st.pred.reshape(n, -1).view(np.uint8), st.norm.view(np.uint8), st.anomaly.view(np.uint8),
             st.steps.reshape(n, 1).view(np.uint8), st.episode.reshape(n, 1).view(np.uint8)]
    rows = np.concatenate(parts, axis=1)
    return [r.tobytes() for r in rows]


def _unblob(blobs: Sequence[bytes], n: int) -> StreamStates:
    raw = np.frombuffer(b"".join(blobs), np.uint8).reshape(n, -1)
    st = StreamStates.zeros(n, LAYERS, HIDDEN, FEATURES)
    pos = 0
    for arr in (st.h, st.c, st.pred, st.norm, st.anomaly, st.steps, st.episode):
        width = arr[0].nbytes
        arr.reshape(n, -1).view(np.uint8)[:] = raw[:, pos:pos + width]
        pos += width
    return st


async def _cpu_per_stream(body: Callable[[int], Awaitable[None]], n: int, reps: int, start: int) -> float:
    t0 = time.process_time()
    for r in range(start, start + reps):
        await body(r)
    return (time.process_time() - t0) / (reps * n) * 1e6


async def _run(url: str, sizes: Sequence[int], budget: float) -> list[tuple[int, float, float, float]]:
    rng = np.random.default_rng(0)
    store = await StateStore.connect(url, model_version="m-bench", num_layers=LAYERS, hidden_size=HIDDEN,
                                     input_size=FEATURES, prefix="lstream-bench")
    client = aioredis.from_url(url)
    rows = []
    try:
        for n in sizes:
            ids = [f"bench-{n}-{i}" for i in range(n)]
            keys = [f"lstream-bench:blob:{{{s}}}" for s in ids]
            st = _states(n, rng)
            parts = np.zeros(n, np.int64)
            idx = np.zeros(n, np.int64)
            ts = np.full(n, 1.7e9)
            eids = [f"e-{i}" for i in range(n)]
            reps = max(2, int(budget * 400 / n / ROUNDS))  # a rep of load + save: ~1-3 ms per 100 streams
            await store.save(ids, st, parts, np.zeros(n, np.int64), idx, ts, None)
            await client.mset(dict(zip(keys, _blobs(st))))

            async def fenced(r: int) -> None:
                loaded = await store.load(ids)
                applied = await store.save(ids, loaded.states, parts, np.full(n, r + 10, np.int64), idx,
                                           ts + r + 10, [f"{e}-{r}" for e in eids])
                if not applied.all():
                    raise RuntimeError(f"bench: {int((~applied).sum())} saves refused at rep {r}")

            async def plain(r: int) -> None:
                got = await client.mget(keys)
                loaded = _unblob(got, n)
                await client.mset(dict(zip(keys, _blobs(loaded))))

            async def single(r: int) -> None:
                got = [await client.get(k) for k in keys]
                loaded = _unblob(got, n)
                for k, b in zip(keys, _blobs(loaded)):
                    await client.set(k, b)

            for body in (fenced, plain, single):
                await body(-1)  # warm up: connections, script, caches
            # Rounds alternate the three so that a busy machine slows them alike; medians.
            fs, ps, ss = [], [], []
            for k in range(ROUNDS):
                fs.append(await _cpu_per_stream(fenced, n, reps, k * reps))
                ps.append(await _cpu_per_stream(plain, n, reps, k * reps))
                ss.append(await _cpu_per_stream(single, n, max(1, reps // 8), k * reps))
            f, p, s = (float(np.median(x)) for x in (fs, ps, ss))
            rows.append((n, f, p, s))
            await client.delete(*keys)
            for s_id in ids:
                await store.reset(s_id)
    finally:
        await client.aclose()
        await store.close()
    return rows


def table(rows: Sequence[tuple[int, float, float, float]]) -> str:
    lines = ["client CPU per stream, load + save (us); states 2 x 64, F=1",
             f"{'n':>6} {'fenced':>9} {'mget/mset':>10} {'get+set':>9} {'fenced/mget':>12} {'get+set/fenced':>15}"]
    for n, f, p, s in rows:
        lines.append(f"{n:>6} {f:>9.1f} {p:>10.1f} {s:>9.1f} {f / p:>12.2f} {s / f:>15.1f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.state", description=__doc__.splitlines()[0])
    ap.add_argument("--redis-url", help="use this Redis instead of starting one (keys under lstream-bench:)")
    ap.add_argument("--sizes", default="1,64,256,1024", help="batch sizes, comma separated")
    ap.add_argument("--budget", type=float, default=1.0, help="rough seconds per measurement")
    ap.add_argument("--quick", action="store_true", help="small sizes and budget (a smoke run)")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    budget = args.budget
    if args.quick:
        sizes, budget = [1, 64], 0.05
    if args.redis_url:
        rows = asyncio.run(_run(args.redis_url, sizes, budget))
    else:
        from lstream.devservices import start_redis

        with start_redis() as service:
            rows = asyncio.run(_run(service.url, sizes, budget))
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
