"""Cost of the state store: fenced load + save against redis-py's own per-stream path and MGET/MSET.

Per batch size n (states of 2 layers x 64, F = 1) and per method it measures, for one load and
one save of n streams:

* client CPU per stream (``time.process_time``; Redis runs in another process);
* Redis *server* CPU per saved stream: the ``usec`` of ``INFO commandstats`` (what the commands
  cost, summed over every node of a cluster) and ``used_cpu_sys + used_cpu_user`` of ``INFO cpu``
  (also networking and the event loop), before/after, divided by the streams saved.

Methods:

* ``store``: :meth:`StateStore.load` + :meth:`StateStore.save` (the product's path);
* ``store-save``: :meth:`StateStore.save` alone (the save's own server cost);
* ``redis-py``: the fenced load + save as lstream did it before (one ``HMGET`` per stream, then
  one ``EVALSHA`` per stream of the old one-key fence, plus the index ``ZADD``), sent through
  redis-py's own ``pipeline(transaction=False)`` and ``Script``: the same server work as the
  old hand-framed path (its server columns are the "before" of the batched fence);
* ``old-save``: the old per-stream fence's save alone (the "before" of ``store-save``);
* ``mget/mset``: the same bytes as one blob per stream, one ``MGET`` and one ``MSET`` (in a
  cluster: redis-py's ``mget_nonatomic``/``mset_nonatomic``), decoded back into arrays (no
  fencing, no fields: the floor for a batched store);
* ``get+set``: one ``GET`` and one ``SET`` per stream, awaited one after the other (single node).

Run ``python -m benchmarks.state`` (starts its own redis-server; ``--cluster`` starts a
3-primary Redis Cluster instead) or pass ``--redis-url``.
"""

# ruff: noqa: B023  (each method body is defined and run within one iteration of the sizes loop)
from __future__ import annotations

import argparse
import asyncio
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from kernels.states import Positions, StreamStates
from state.store import StateStore

LAYERS, HIDDEN, FEATURES = 2, 64, 1
ROUNDS = 3

# The one-key fence lstream used before the batched script (state/fence.lua as of 1aa2f95,
# verbatim): one EVALSHA per stream, numbers as 56 binary bytes formatted to decimal in Lua. Run
# through redis-py's pipeline it does on the server exactly what the old hand-framed path did, so
# its server CPU column is the "before" of the batched fence.
PER_STREAM_FENCE = r"""
-- Fenced save of one stream's state (lstream). Atomic: the check and the write run as one
-- script, so no reader ever sees a state without the position it reflects.
-- KEYS[1]: the stream's hash, lstream:state:{<stream_id>}
-- ARGV[1]: event_id ('' = none)
-- ARGV[2]: the numbers, 56 bytes little-endian: int64 partition, offset, index, steps,
--          episode; float64 ts, updated_at. They are stored as decimal strings (binary on
--          the wire saves the client from formatting them; integers must stay below 2^53).
-- ARGV[3]: model version; ARGV[4]: TTL in ms (0 = keep forever)
-- ARGV[5..9]: h, c, pred, norm, anomaly (raw little-endian bytes, stored as they come)
-- Returns 1 applied, 0 refused (position not newer than the stored one),
--         2 refused (event_id equal to the stored one: a duplicate).
local key = KEYS[1]
local eid = ARGV[1]
if #ARGV[2] ~= 56 then
  return redis.error_reply('ERR lstream fence: expected 56 bytes of numbers, got ' .. #ARGV[2])
end
local p, o, i, nsteps, nepisode, nts, nupdated = struct.unpack('<i8<i8<i8<i8<i8<d<d', ARGV[2])
-- Shortest of %.15g/%.16g/%.17g that reads back as the same double (like Python's repr).
local function dec(x)
  for _, f in ipairs({'%.15g', '%.16g', '%.17g'}) do
    local s = string.format(f, x)
    if tonumber(s) == x then return s end
  end
  return string.format('%.17g', x)
end
local ps, ofs, is = string.format('%d', p), string.format('%d', o), string.format('%d', i)
local ts, updated = dec(nts), dec(nupdated)
local cur = redis.call('HMGET', key, 'partition', 'offset', 'index', 'ts', 'event_id', 'updated_at')
if cur[1] or cur[2] then
  local cp, co, ci = tonumber(cur[1]) or -1, tonumber(cur[2]) or -1, tonumber(cur[3]) or 0
  local newer
  if cp == p then
    newer = o > co or (o == co and i > ci)
  else
    -- The stream moved to another partition (repartitioned topic, new gateway key): offsets
    -- of two partitions do not compare, so event time decides.
    newer = nts >= (tonumber(cur[4]) or 0)
  end
  if not newer then
    -- Our own write sent again after a lost reply: report it as applied.
    if cp == p and o == co and i == ci and cur[6] == updated then return 1 end
    return 0
  end
  if eid ~= '' and cur[5] == eid then return 2 end
end
redis.call('HSET', key, 'h', ARGV[5], 'c', ARGV[6], 'pred', ARGV[7], 'model', ARGV[3],
  'steps', string.format('%d', nsteps), 'partition', ps, 'offset', ofs, 'index', is, 'ts', ts, 'norm', ARGV[8],
  'anomaly', ARGV[9], 'episode', string.format('%d', nepisode), 'updated_at', updated)
if eid == '' then
  redis.call('HDEL', key, 'event_id')
else
  redis.call('HSET', key, 'event_id', eid)
end
local ttl = tonumber(ARGV[4])
if ttl > 0 then
  redis.call('PEXPIRE', key, ttl)
else
  redis.call('PERSIST', key)
end
return 1
"""
READ_FIELDS = ("h", "c", "pred", "model", "steps", "partition", "offset", "index", "ts", "event_id", "norm",
               "anomaly", "episode", "updated_at")


def _fresh(n: int) -> StreamStates:
    """States of a model without per-stream adaptation (as the default model): no ``adapt`` values."""
    return StreamStates.zeros(n, LAYERS, HIDDEN, FEATURES, adapt=0)


def _states(n: int, rng: np.random.Generator) -> StreamStates:
    st = _fresh(n)
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
    st = _fresh(n)
    pos = 0
    for arr in (st.h, st.c, st.pred, st.norm, st.anomaly, st.steps, st.episode):
        width = arr[0].nbytes
        arr.reshape(n, -1).view(np.uint8)[:] = raw[:, pos:pos + width]
        pos += width
    return st


def _decode_rows(rows: Sequence[Sequence[bytes | None]], n: int) -> StreamStates:
    """HMGET rows (READ_FIELDS order) -> states, the way a careful client would (numpy joins)."""
    st = _fresh(n)
    cols = list(zip(*rows))
    for name, col in (("h", 0), ("c", 1), ("pred", 2), ("norm", 10), ("anomaly", 11)):
        dest = getattr(st, name)
        dest[:] = np.frombuffer(b"".join(cols[col]), dest.dtype).reshape(dest.shape)  # type: ignore[arg-type]
    st.steps[:] = [int(v) for v in cols[4]]  # type: ignore[arg-type]
    st.episode[:] = [int(v) for v in cols[12]]  # type: ignore[arg-type]
    return st


class Server:
    """Redis server CPU, summed over the nodes given (commandstats usec and INFO cpu seconds)."""

    def __init__(self, urls: Sequence[str]) -> None:
        self.clients = [aioredis.from_url(u) for u in urls]

    async def sample(self) -> tuple[float, float]:
        usec = cpu = 0.0
        for c in self.clients:
            stats = await c.info("commandstats")
            usec += sum(float(v["usec"]) for v in stats.values())
            info = await c.info("cpu")
            cpu += float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
        return usec, cpu * 1e6

    async def close(self) -> None:
        for c in self.clients:
            await c.aclose()


@dataclass
class Row:
    n: int
    method: str
    client_us: float  # client CPU per stream (load + save)
    server_cmd_us: float  # Redis commandstats usec per saved stream (load + save)
    server_cpu_us: float  # Redis INFO cpu per saved stream (load + save)


async def _measure(body: Callable[[int], Awaitable[None]], n: int, reps: int, start: int,
                   server: Server) -> tuple[float, float, float]:
    s0 = await server.sample()
    t0 = time.process_time()
    for r in range(start, start + reps):
        await body(r)
    dt = time.process_time() - t0
    s1 = await server.sample()
    per = reps * n
    return dt / per * 1e6, (s1[0] - s0[0]) / per, (s1[1] - s0[1]) / per


async def _run(url: str, sizes: Sequence[int], budget: float, node_urls: Sequence[str], cluster: bool,
               methods: Sequence[str]) -> list[Row]:
    rng = np.random.default_rng(0)
    store = await StateStore.connect(url, model_version="m-bench", num_layers=LAYERS, hidden_size=HIDDEN,
                                     input_size=FEATURES, prefix="lstream-bench", fresh=_fresh)
    client: Any = RedisCluster.from_url(url) if cluster else aioredis.from_url(url)
    fence = client.register_script(PER_STREAM_FENCE)
    server = Server(node_urls)
    for c in server.clients:  # every primary knows the per-stream fence
        await c.script_load(PER_STREAM_FENCE)
    rows: list[Row] = []
    try:
        for n in sizes:
            ids = [f"bench-{n}-{i}" for i in range(n)]
            sids = [f"bench-save-{n}-{i}" for i in range(n)]  # streams of the save-only rows
            oids = [f"bench-old-{n}-{i}" for i in range(n)]
            okeys = [f"lstream-bench:state:{{{s}}}" for s in oids]
            keys = [f"lstream-bench:blob:{{{s}}}" for s in ids]
            pkeys = [f"lstream-bench:py:{{{s}}}" for s in ids]
            st = _states(n, rng)
            oh = [r.tobytes() for r in st.h.reshape(n, -1)]
            oc = [r.tobytes() for r in st.c.reshape(n, -1)]
            opred = [r.tobytes() for r in st.pred.reshape(n, -1)]
            onorm = [r.tobytes() for r in st.norm]
            oanom = [r.tobytes() for r in st.anomaly]
            zero = np.zeros(n, np.int64)
            ts = np.full(n, 1.7e9)
            eids = [f"e-{i}" for i in range(n)]
            reps = max(2, int(budget * 400 / n / ROUNDS))  # a rep of load + save: ~1-3 ms per 100 streams
            await store.save(ids, st, Positions.build(zero, zero, zero, ts, None))
            if cluster:
                await client.mset_nonatomic(dict(zip(keys, _blobs(st))))
            else:
                await client.mset(dict(zip(keys, _blobs(st))))

            async def fenced(r: int) -> None:
                loaded = await store.load(ids)
                pos = Positions.build(zero, np.full(n, r + 10, np.int64), zero, ts + r + 10,
                                      [f"{e}-{r}" for e in eids])
                saved = await store.save(ids, loaded.states, pos)
                if not saved.applied.all():
                    raise RuntimeError(f"bench: {int((~saved.applied).sum())} saves refused at rep {r}")

            async def save_only(r: int) -> None:
                pos = Positions.build(zero, np.full(n, r + 10, np.int64), zero, ts + r + 10,
                                      [f"{e}-s{r}" for e in eids])
                saved = await store.save(sids, st, pos)
                if not saved.applied.all():
                    raise RuntimeError(f"bench: {int((~saved.applied).sum())} saves refused at rep {r}")

            async def pyredis(r: int) -> None:
                pipe = client.pipeline(transaction=False)
                for k in pkeys:
                    pipe.hmget(k, READ_FIELDS)
                got = await pipe.execute()
                loaded = _decode_rows(got, n) if got[0][0] is not None else st
                h = loaded.h.reshape(n, -1)
                c = loaded.c.reshape(n, -1)
                pred = loaded.pred.reshape(n, -1)
                now = time.time()
                pipe = client.pipeline(transaction=False)
                for j, k in enumerate(pkeys):
                    nums = struct.pack("<qqqqqdd", 0, r + 10, 0, int(loaded.steps[j]), int(loaded.episode[j]),
                                       float(ts[0]) + r + 10, now)
                    argv = [f"{eids[j]}-{r}", nums, "m-bench", 0, h[j].tobytes(), c[j].tobytes(), pred[j].tobytes(),
                            loaded.norm[j].tobytes(), loaded.anomaly[j].tobytes()]
                    if cluster:  # redis-py's cluster pipeline blocks .evalsha(); the raw command is routed by key
                        pipe.execute_command("EVALSHA", fence.sha, 1, k, *argv)
                    else:
                        await fence(keys=[k], args=argv, client=pipe)
                pipe.zadd("lstream-bench:pyindex", dict.fromkeys(ids, float(now)))
                res = await pipe.execute()
                if len(res) != n + 1 or any(x != 1 for x in res[:-1]):
                    raise RuntimeError(f"bench: redis-py fence refused saves at rep {r}")

            async def old_save(r: int) -> None:  # the save alone, as before: one old fence call per stream
                now = time.time()
                pipe = client.pipeline(transaction=False)
                for j, k in enumerate(okeys):
                    nums = struct.pack("<qqqqqdd", 0, r + 10, 0, int(st.steps[j]), int(st.episode[j]),
                                       float(ts[0]) + r + 10, now)
                    argv = [f"{eids[j]}-{r}", nums, "m-bench", 0, oh[j], oc[j], opred[j], onorm[j], oanom[j]]
                    if cluster:
                        pipe.execute_command("EVALSHA", fence.sha, 1, k, *argv)
                    else:
                        await fence(keys=[k], args=argv, client=pipe)
                pipe.zadd("lstream-bench:pyindex", dict.fromkeys(oids, float(now)))
                res = await pipe.execute()
                if len(res) != n + 1 or any(x != 1 for x in res[:-1]):
                    raise RuntimeError(f"bench: old fence refused saves at rep {r}")

            async def plain(r: int) -> None:
                got = await (client.mget_nonatomic(keys) if cluster else client.mget(keys))
                loaded = _unblob(got, n)
                blobs = dict(zip(keys, _blobs(loaded)))
                await (client.mset_nonatomic(blobs) if cluster else client.mset(blobs))

            async def single(r: int) -> None:
                got = [await client.get(k) for k in keys]
                loaded = _unblob(got, n)
                for k, b in zip(keys, _blobs(loaded)):
                    await client.set(k, b)

            bodies = {"store": fenced, "store-save": save_only, "redis-py": pyredis, "old-save": old_save,
                      "mget/mset": plain, "get+set": single}
            chosen = [(m, bodies[m]) for m in methods if not (cluster and m == "get+set")]
            for _, body in chosen:
                await body(-1)  # warm up: connections, scripts, caches
            # Rounds alternate the methods so that a busy machine slows them alike; medians.
            got: dict[str, list[tuple[float, float, float]]] = {m: [] for m, _ in chosen}
            for k in range(ROUNDS):
                for m, body in chosen:
                    r = reps if m != "get+set" else max(1, reps // 8)
                    got[m].append(await _measure(body, n, r, (k + 1) * reps, server))
            for m, _ in chosen:
                a = np.median(np.array(got[m]), axis=0)
                rows.append(Row(n, m, float(a[0]), float(a[1]), float(a[2])))
            await client.delete(*keys) if not cluster else [await client.delete(k) for k in keys]
            for k in pkeys + okeys:
                await client.delete(k)
            for s_id in ids + sids:
                await store.reset(s_id)
    finally:
        await client.aclose()
        await server.close()
        await store.close()
    return rows


def table(rows: Sequence[Row], title: str = "") -> str:
    lines = [f"fenced load + save per stream{title}; states 2 x 64, F=1 (us; server = Redis CPU per saved stream)",
             f"{'n':>6} {'method':<10} {'client':>8} {'server cmd':>11} {'server cpu':>11} {'client vs store':>16}"]
    base = {r.n: r.client_us for r in rows if r.method == "store"}
    for r in rows:
        ratio = r.client_us / base[r.n] if r.n in base else float("nan")
        lines.append(f"{r.n:>6} {r.method:<10} {r.client_us:>8.1f} {r.server_cmd_us:>11.2f} "
                     f"{r.server_cpu_us:>11.2f} {ratio:>16.2f}")
    return "\n".join(lines)


@contextmanager
def start_cluster(primaries: int = 3, replicas: int = 0) -> Iterator[list[str]]:
    """A throwaway Redis Cluster of ``primaries`` primaries (each with ``replicas`` replicas) on
    free ports (no persistence); yields the URLs of every node (the first is the seed)."""
    from lstream.devservices import _wait_for_port, child_setup, free_port, stop_process

    if not (shutil.which("redis-server") and shutil.which("redis-cli")):
        raise RuntimeError("a cluster needs redis-server and redis-cli on PATH")
    tmp = Path(tempfile.mkdtemp(prefix="lstream-cluster-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        ports = [free_port() for _ in range(primaries * (1 + replicas))]
        for p in ports:
            # An explicit bus port: the default (port + 10000) may be taken or above 65535.
            proc = subprocess.Popen(
                ["redis-server", "--port", str(p), "--cluster-port", str(free_port()), "--bind", "127.0.0.1",
                 "--cluster-enabled", "yes", "--cluster-config-file", str(tmp / f"nodes-{p}.conf"),
                 "--cluster-node-timeout", "2000", "--save", "", "--appendonly", "no", "--dir", str(tmp)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                preexec_fn=child_setup())
            procs.append(proc)
            _wait_for_port(p, proc, "redis-server (cluster)", 15.0)
        made = subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
                               "--cluster-replicas", str(replicas), "--cluster-yes"],
                              capture_output=True, text=True, timeout=30, check=False)
        if made.returncode != 0:
            raise RuntimeError(made.stdout + made.stderr)
        deadline = time.monotonic() + 15
        while not all("cluster_state:ok" in subprocess.run(["redis-cli", "-p", str(p), "cluster", "info"],
                                                           capture_output=True, text=True, timeout=10).stdout
                      for p in ports):
            if time.monotonic() > deadline:
                raise RuntimeError("cluster_state never became ok")
            time.sleep(0.1)
        yield [f"redis://127.0.0.1:{p}/0" for p in ports]
    finally:
        from lstream.devservices import stop_process

        for proc in procs:  # all told at once, then each waited for (SIGKILL after 5 s)
            proc.terminate()
        for proc in procs:
            stop_process(proc, 5.0)
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def start_server(*extra: str) -> Iterator[str]:
    """A throwaway redis-server on a free port with ``extra`` arguments; yields its URL."""
    from lstream.devservices import _wait_for_port, child_setup, free_port, stop_process

    tmp = Path(tempfile.mkdtemp(prefix="lstream-redis-"))
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp),
                             "--save", "", *extra], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, preexec_fn=child_setup())
    try:
        _wait_for_port(port, proc, "redis-server", 15.0)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_process(proc, 5.0)
        shutil.rmtree(tmp, ignore_errors=True)


async def _save_cost(url: str, durability: str, n: int, reps: int) -> tuple[float, float]:
    """(ms per fenced save of n streams, client CPU us per stream) with ``durability``."""
    store = await StateStore.connect(url, model_version="m-bench", num_layers=LAYERS, hidden_size=HIDDEN,
                                     input_size=FEATURES, prefix="lstream-bench", fresh=_fresh, durability=durability)
    try:
        st = _states(n, np.random.default_rng(1))
        ids = [f"dur-{i}" for i in range(n)]
        zero = np.zeros(n, np.int64)
        walls, cpus = [], []
        for r in range(reps + 1):
            pos = Positions.build(zero, np.full(n, r + 1), zero, np.full(n, 1.7e9 + r))
            t0, c0 = time.perf_counter(), time.process_time()
            saved = await store.save(ids, st, pos)
            if r:  # the first is a warm-up
                walls.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - c0)
            if not saved.applied.all():
                raise RuntimeError("bench: durability saves refused")
        return float(np.median(walls)) * 1e3, float(np.median(cpus)) / n * 1e6
    finally:
        await store.close()


def durability_table(n: int = 256, reps: int = 30) -> str:
    """The cost of each durability setting: a fenced save of n streams, ms per batch."""
    lines = [f"durability cost: one fenced save of {n} streams (states 2 x 64), median of {reps}",
             f"{'server persistence':<34} {'durability':<12} {'ms/save':>8} {'client us/stream':>17}"]

    def row(persistence: str, durability: str, url: str) -> None:
        try:
            ms, cpu = asyncio.run(_save_cost(url, durability, n, reps))
            lines.append(f"{persistence:<34} {durability:<12} {ms:>8.2f} {cpu:>17.1f}")
        except Exception as exc:
            lines.append(f"{persistence:<34} {durability:<12} {'n/a':>8}  {str(exc)[:70]}")

    with start_server("--appendonly", "no") as url:
        row("none", "none", url)
    with start_server("--appendonly", "yes", "--appendfsync", "everysec") as url:
        row("aof, appendfsync everysec", "none", url)
        row("aof, appendfsync everysec", "aof-local", url)
    with start_server("--appendonly", "yes", "--appendfsync", "always") as url:
        row("aof, appendfsync always", "none", url)
    with start_server("--appendonly", "no") as url:
        port = url.rsplit(":", 1)[1].split("/")[0]
        with start_server("--appendonly", "no", "--replicaof", "127.0.0.1", port) as replica:
            client = __import__("redis").Redis.from_url(replica)
            deadline = time.monotonic() + 10
            while client.info("replication").get("master_link_status") != "up" and time.monotonic() < deadline:
                time.sleep(0.05)
            row("none + 1 replica", "replicas=1", url)
    return "\n".join(lines)


def memory_table(total: int = 4096) -> str:
    """Redis used_memory per stream (default model shape 2 x 32, 1 feature), by hash encoding."""
    lines = [f"Redis memory per stream, {total} streams of 2 x 32, F=1 (hash + index entry)",
             f"{'hash-max-listpack-value':<24} {'encoding':<10} {'used_memory/stream':>19} {'MEMORY USAGE':>13}"]

    async def one(url: str) -> tuple[str, float, int]:
        import redis.asyncio as r

        c = r.from_url(url)
        store = await StateStore.connect(url, model_version="m-mem", num_layers=2, hidden_size=32, input_size=1,
                                         fresh=lambda k: StreamStates.zeros(k, 2, 32, 1, adapt=0))
        try:
            base = (await c.info("memory"))["used_memory"]
            n = 256
            st = StreamStates.zeros(n, 2, 32, 1, adapt=0)
            rng = np.random.default_rng(0)
            st.h[:] = rng.standard_normal(st.h.shape)
            st.c[:] = st.h
            st.anomaly[:] = rng.standard_normal(st.anomaly.shape)
            zero = np.zeros(n, np.int64)
            for b in range(total // n):
                await store.save([f"m{b}-{i}" for i in range(n)], st,
                                 Positions.build(zero, zero, zero, np.ones(n), [f"e-{i}" for i in range(n)]))
            per = ((await c.info("memory"))["used_memory"] - base) / total
            enc = (await c.object("encoding", "lstream:state:{m0-1}")).decode()
            usage = await c.memory_usage("lstream:state:{m0-1}", samples=0)
            return enc, per, int(usage)
        finally:
            await store.close()
            await c.aclose()

    for lp in ("64", "1024"):
        with start_server("--appendonly", "no", "--hash-max-listpack-value", lp) as url:
            enc, per, usage = asyncio.run(one(url))
        lines.append(f"{lp + (' (default)' if lp == '64' else ''):<24} {enc:<10} {per:>19.0f} {usage:>13}")
    return "\n".join(lines)


METHODS = ("store", "store-save", "redis-py", "old-save", "mget/mset", "get+set")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.state", description=__doc__.splitlines()[0])
    ap.add_argument("--redis-url", help="use this Redis instead of starting one (keys under lstream-bench:)")
    ap.add_argument("--cluster", action="store_true", help="start a 3-primary Redis Cluster and measure on it too")
    ap.add_argument("--sizes", default="1,64,256,1024", help="batch sizes, comma separated")
    ap.add_argument("--budget", type=float, default=1.0, help="rough seconds per measurement")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma separated subset of " + ",".join(METHODS))
    ap.add_argument("--durability", action="store_true", help="also measure the durability settings' cost")
    ap.add_argument("--memory", action="store_true", help="also measure Redis memory per stream")
    ap.add_argument("--quick", action="store_true", help="small sizes and budget (a smoke run)")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    budget = args.budget
    if args.quick:
        sizes, budget = [1, 64], 0.05
    if args.redis_url:
        print(table(asyncio.run(_run(args.redis_url, sizes, budget, [args.redis_url], False, methods))))
    else:
        from lstream.devservices import start_redis

        with start_redis() as service:
            print(table(asyncio.run(_run(service.url, sizes, budget, [service.url], False, methods)),
                        ", single node"))
    if args.cluster:
        with start_cluster() as urls:
            print(table(asyncio.run(_run(urls[0], sizes, budget, urls, True, methods)), ", 3-primary cluster"))
    if args.durability:
        print(durability_table())
    if args.memory:
        print(memory_table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
