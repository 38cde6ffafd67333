"""Per-stream state in Redis: batched load and fenced save, one round trip each, on redis-py.

:class:`StateStore` reads the states of n streams in one request and writes them back, fenced,
in one request: the Lua script ``state/fence.lua`` writes a stream's state together with its
position only if that position is newer than the stored one, and tells per stream what it did
(:class:`Saved`). On one Redis node a batch is one script call (and the index update, in the
same pipeline); on a Redis Cluster (redis-py's ``RedisCluster``: slot map, MOVED/ASK,
topology refresh) it is one call per stream, pipelined per node, because the keys of one
script call must share a slot.

The store does not retry. A transient failure raises :class:`StateUnavailable` (the caller's
one retry policy waits and calls again: a save is idempotent, the fence reports its own
earlier write as ``already``), a permanent one :class:`StateAuthError` or :class:`StateError`.
An unreadable stored hash fails only its stream (``Loaded.unreadable``).

Example (needs a running Redis, so not run as a doctest)::

    store = await StateStore.connect("redis://localhost:6379/0", model_version=model.version,
                                     num_layers=2, hidden_size=64, input_size=1)
    loaded = await store.load(["pump-1", "pump-2"])     # loaded.states: StreamStates
    engine.advance(loaded.states, x)
    saved = await store.save(["pump-1", "pump-2"], loaded.states,
                             Positions.build(partitions, offsets, indexes, ts, event_ids))
    saved.applied                                       # bool mask: the state stored is ours
"""

from __future__ import annotations

import builtins
import fnmatch
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from redis.exceptions import NoScriptError, ResponseError

from kernels.states import Positions, StreamStates, field_names, layout_of
from state import codec
from state.connection import Connection, safe_url
from state.durability import Durability
from state.errors import StateError, StateNotFound
from state.loaded import ROW_FIELDS, Loaded, decode_rows
from state.saved import ALREADY, APPLIED, DUPLICATE, STALE, Saved

__all__ = ["ALREADY", "APPLIED", "DUPLICATE", "STALE", "Loaded", "Saved", "StateStore", "safe_url"]

HERE = Path(__file__).resolve().parent
FENCE_LUA = (HERE / "fence.lua").read_text()
# Streams per script call. A call's cost grows with its streams (~10 KB each with adaptation),
# and Redis runs nothing else meanwhile: bounded calls keep other clients served and every
# round trip within the connection's timeout per CHUNK streams (state.connection).
CHUNK = 2048
LOAD_LUA = (HERE / "load.lua").read_text()


def lua_string(raw: bytes) -> str:
    """A Lua string literal of any bytes (every byte as a decimal escape: nothing to misquote).

    >>> print(lua_string(b"m-1'"))
    '\\109\\45\\49\\39'
    """
    return "'" + "".join(f"\\{b}" for b in raw) + "'"


def fence_source(names: Sequence[str], stable: int, *, model: bytes = b"", layers: int = 0, hidden: int = 0,
                 layout: bytes = b"", ttl_ms: int = 0) -> str:
    """``state/fence.lua`` for these StreamStates fields (the first ``stable`` of them compared
    before they are written) and this store's model, shape, layout tag and TTL: constants of the
    script, not arguments of every call (in a cluster the script runs once per stream).

    >>> "local names = {'norm', 'h'}" in fence_source(["norm", "h"], 1)
    True
    """
    for n in names:
        if not n.isidentifier():
            raise StateError(f"state field name: expected an identifier, got {n!r}")
    listed = ", ".join(f"'{n}'" for n in names)
    read = "".join(f", '{n}'" for n in names[:stable])
    return (FENCE_LUA.replace("{--[[FIELDS]]}", "{" + listed + "}").replace("--[[STABLE]]0", str(int(stable)))
            .replace("--[[READ]]", read).replace("--[[MODEL]]''", lua_string(model))
            .replace("--[[LAYERS]]''", lua_string(b"%d" % layers)).replace("--[[HIDDEN]]''", lua_string(b"%d" % hidden))
            .replace("--[[LAYOUT]]''", lua_string(layout)).replace("--[[TTL]]0", str(int(ttl_ms))))


class StateStore:
    """Async store of per-stream state in one Redis or one Redis Cluster. Build it with :meth:`connect`."""

    SUMMARY = ("model", "steps", "partition", "offset", "index", "ts", "updated_at", "event_id", "layers", "hidden")

    def __init__(self, conn: Connection, *, model_version: str | None, num_layers: int | None,
                 hidden_size: int | None, input_size: int | None, anomaly_size: int | None,
                 fresh: Callable[[int], StreamStates] | None, ttl: float, clock: Callable[[], float], prefix: str,
                 index_cap: int, durability: Durability) -> None:
        if ttl < 0:
            raise StateError(f"state TTL: expected seconds >= 0, got {ttl}")
        self.conn = conn
        self.url = conn.url
        self.model_version = model_version
        self.num_layers, self.hidden_size, self.input_size = num_layers, hidden_size, input_size
        self.anomaly_size = anomaly_size
        self._fresh_fn = fresh
        self.ttl, self.clock, self.prefix, self.index_cap = float(ttl), clock, prefix, index_cap
        self.durability = durability
        self.index = codec.index_key(prefix)
        self._next_trim = -math.inf
        self._fence_sha = self._load_sha = ""
        self._model_b = (model_version or "").encode()
        self._names = field_names()
        self._layout_b = codec.layout_tag(self._names).encode()
        # The fence's field order: "stable" fields first (compared before they are written: see
        # kernels.states.FieldLayout; a field with no values per stream is always stable).
        template = self.fresh(1) if num_layers and hidden_size and input_size else None

        def stable(name: str) -> bool:
            arr = getattr(template, name) if template is not None else None
            return layout_of(name, np.float64).stable or (arr is not None and arr[0].size == 0)

        self._order = tuple([n for n in self._names if stable(n)] + [n for n in self._names if not stable(n)])
        self._stable = sum(stable(n) for n in self._names)
        self._fence_src = fence_source(self._order, self._stable, model=self._model_b, layers=int(num_layers or 0),
                                       hidden=int(hidden_size or 0), layout=self._layout_b,
                                       ttl_ms=round(self.ttl * 1000))
        self._keys: dict[str, str] = {}
        # Counters for /metrics.
        self.loads = 0  # streams loaded
        self.resets = 0  # states of another model version replaced by fresh ones
        self.unreadable = 0  # stored states that could not be read (their streams' events: bad_state)
        self.applied = 0  # saves written
        self.already = 0  # saves found already stored (our own earlier write, its reply lost)
        self.stale = 0  # saves refused: a newer position is stored
        self.duplicates = 0  # saves refused: event_id equal to the stored one
        self.layout_resets: dict[str, int] = {}  # fields of another layout started afresh, by field

    # ----------------------------------------------------------------- setup

    @classmethod
    async def connect(cls, url: str, *, model_version: str | None = None, num_layers: int | None = None,
                      hidden_size: int | None = None, input_size: int | None = None,
                      anomaly_size: int | None = None, fresh: Callable[[int], StreamStates] | None = None,
                      ttl: float = 0.0, policy: str = "reset", clock: Callable[[], float] = time.time,
                      prefix: str = codec.PREFIX, timeout: float = 5.0, index_cap: int = 1_000_000,
                      cluster: bool | None = None, durability: str = "none", retries: int | None = None) -> StateStore:
        """Connect (plain Redis or Redis Cluster: ``cluster`` None asks the server), check it
        answers, load the scripts. Raises :class:`StateUnavailable` / :class:`StateAuthError`.

        ``model_version`` and the sizes are needed by :meth:`load` / :meth:`save` only (``fresh``:
        n fresh states of the model, by default ``StreamStates.zeros`` of the sizes); the
        inspection calls work without them. ``ttl`` (seconds, 0 = forever) expires idle
        streams; ``timeout`` bounds every round trip; ``index_cap`` bounds the index;
        ``durability``: ``none``, ``aof-local`` or ``replicas=N`` (see :mod:`state.durability`).
        ``policy`` and ``retries`` are accepted for older callers and have no effect: a state of
        another model always loads fresh with ``Loaded.other_model`` set (the pipeline applies the
        policy), and the caller retries.
        """
        del retries
        if policy not in ("reset", "refuse"):
            raise StateError(f"model policy: expected 'reset' or 'refuse', got {policy!r}")
        mode = Durability.parse(durability)
        conn = await Connection.open(url, timeout=timeout, cluster=cluster)
        try:
            store = cls(conn, model_version=model_version, num_layers=num_layers, hidden_size=hidden_size,
                        input_size=input_size, anomaly_size=anomaly_size, fresh=fresh, ttl=ttl, clock=clock,
                        prefix=prefix, index_cap=index_cap, durability=mode)
            if mode.kind != "none":
                await mode.check(conn)
            await store._load_scripts()
        except BaseException:
            await conn.close()
            raise
        return store

    async def _load_scripts(self) -> None:
        c = self.conn
        if c.cluster:  # RedisCluster sends SCRIPT LOAD to every primary
            self._fence_sha = await c.call(c.client.script_load(self._fence_src), "SCRIPT LOAD")
        else:
            self._fence_sha = await c.call(c.client.script_load(self._fence_src), "SCRIPT LOAD")
            self._load_sha = await c.call(c.client.script_load(LOAD_LUA), "SCRIPT LOAD")
        if isinstance(self._fence_sha, dict):  # RedisCluster: one answer per node, all the same SHA1
            self._fence_sha = next(iter(self._fence_sha.values()))

    async def close(self) -> None:
        await self.conn.close()

    async def __aenter__(self) -> StateStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def cluster(self) -> bool:
        return self.conn.cluster

    def fresh(self, n: int) -> StreamStates:
        """n fresh states of the loaded model."""
        if self._fresh_fn is not None:
            return self._fresh_fn(n)
        st = StreamStates.zeros(n, self.num_layers or 1, self.hidden_size or 1, self.input_size or 1,
                                self.anomaly_size)
        return st

    def _need_model(self) -> None:
        if not (self.model_version and self.num_layers and self.hidden_size and self.input_size):
            raise StateError("state store: load/save need model_version, num_layers, hidden_size and input_size")

    def _key_list(self, ids: Sequence[str]) -> list[str]:
        cache = self._keys
        if len(cache) > 500_000:  # bound memory with many short-lived streams
            cache.clear()
        out = []
        for s in ids:
            k = cache.get(s)
            if k is None:
                k = cache[s] = codec.state_key(s, self.prefix)
            out.append(k)
        return out

    def counters(self) -> dict[str, int]:
        """Counters for the worker's /metrics."""
        return {"loads": self.loads, "resets": self.resets, "unreadable": self.unreadable, "applied": self.applied,
                "already": self.already, "stale": self.stale, "duplicates": self.duplicates, "retried": 0,
                "detector_resets": self.layout_resets.get("anomaly", 0),
                "layout_resets": sum(self.layout_resets.values())}

    # ------------------------------------------------------------------ load

    async def load(self, ids: Sequence[str]) -> Loaded:
        """The states of ``ids`` (one round trip). Streams without a hash start fresh; a hash of
        another model version gives a fresh state and ``reset``; an unreadable one a fresh state
        and a reason in ``unreadable``."""
        self._need_model()
        n = len(ids)
        if n == 0:
            return decode_rows([], self.fresh(0), model=self._model_b, shape=self._shape())
        keys = self._key_list(ids)
        c = self.conn
        if c.cluster:
            pipe = c.client.pipeline()
            for k in keys:
                pipe.hmget(k, ROW_FIELDS)
            rows = [c.check(r) for r in await c.call(pipe.execute(raise_on_error=False), "HMGET", len(keys))]
        else:
            rows = await self._evalsha_load(keys)
        loaded = decode_rows(rows, self.fresh(n), model=self._model_b, shape=self._shape())
        self.loads += n
        self.resets += int(loaded.other_model.sum())
        self.unreadable += sum(u is not None for u in loaded.unreadable)
        for name, count in loaded.layout_resets.items():
            self.layout_resets[name] = self.layout_resets.get(name, 0) + int(count)
        return loaded

    def _shape(self) -> tuple[int, int]:
        return int(self.num_layers or 0), int(self.hidden_size or 0)

    async def _evalsha_load(self, keys: builtins.list[str]) -> builtins.list[Any]:
        c = self.conn
        rows: builtins.list[Any] = []
        for a in range(0, len(keys), CHUNK):  # one round trip per CHUNK streams (see _save_chunk)
            part = keys[a:a + CHUNK]
            for _ in range(2):
                reply = (await c.call(c.client.pipeline(transaction=False)
                                      .evalsha(self._load_sha, len(part), *part, *ROW_FIELDS)
                                      .execute(raise_on_error=False), "load", len(part)))[0]
                if isinstance(reply, NoScriptError):
                    await self._load_scripts()  # the server restarted or flushed its scripts
                    continue
                rows.extend(c.check(reply))
                break
            else:
                raise StateError(f"Redis at {self.url}: the load script keeps disappearing (SCRIPT FLUSH?)")
        return rows

    # ------------------------------------------------------------------ save

    async def save(self, ids: Sequence[str], states: StreamStates, positions: Positions) -> Saved:
        """Write the states of ``ids`` with their positions, fenced (one round trip); row i of
        ``states`` and ``positions`` belongs to ``ids[i]``.

        A stream's save is written only if its position (partition, offset, index) is newer than
        the stored one (same partition: a larger (offset, index); another partition: an event
        time ``ts`` not older than the stored one) and its ``event_id``, if any, differs from the
        stored one. Returns the code per stream (:class:`Saved`)."""
        self._need_model()
        n = len(ids)
        if len(states) != n or len(positions) != n:
            raise StateError(f"save: expected {n} states and positions for {n} streams, got {len(states)} and "
                             f"{len(positions)}")
        if n == 0:
            return Saved(np.zeros(0, np.int64))
        if not np.isfinite(positions.ts).all():
            raise StateError(f"save: ts: expected {n} finite event times, got {positions.ts!r}")
        now = float(self.clock())
        keys = self._key_list(ids)
        head, rows = self._save_args(n, states, positions, now)
        c = self.conn
        if c.cluster:
            codes = await self._save_cluster(keys, head, rows, ids, now)
        else:
            codes = await self._save_single(keys, head, rows, ids, now)
        saved = Saved(codes)
        self.applied += int((codes == APPLIED).sum())
        self.already += int((codes == ALREADY).sum())
        self.stale += int((codes == STALE).sum())
        self.duplicates += int((codes == DUPLICATE).sum())
        return saved

    def _save_args(self, n: int, states: StreamStates, positions: Positions,
                   now: float) -> tuple[list[Any], list[list[Any]]]:
        """The script's fixed arguments and, per stream, its 5 + k values (numpy for the bytes)."""
        names = self._order
        template = self.fresh(1)
        cols: list[list[Any]] = [[b"%d" % v for v in positions.partition.tolist()],
                                 [b"%d" % v for v in positions.offset.tolist()],
                                 [b"%d" % v for v in positions.index.tolist()],
                                 [repr(v).encode() for v in positions.ts.tolist()],
                                 [(e or "").encode() for e in positions.event_id]]
        for name in names:
            arr = getattr(states, name)
            spec = layout_of(name, arr.dtype)
            want = getattr(template, name).shape[1:]
            if arr.shape != (n, *want):
                raise StateError(f"save: field {name}: expected shape {(n, *want)}, got {arr.shape}")
            if spec.text:
                cols.append([b"%d" % v for v in arr.tolist()])
            else:
                flat = np.ascontiguousarray(arr, dtype=spec.dtype).reshape(n, -1)
                blob = flat.tobytes()
                w = flat.shape[1] * flat.itemsize
                cols.append([blob[i:i + w] for i in range(0, n * w, w)] if w else [b""] * n)
        head = [repr(now)]
        return head, [list(r) for r in zip(*cols)]

    async def _save_single(self, keys: list[str], head: list[Any], rows: list[list[Any]], ids: Sequence[str],
                           now: float) -> np.ndarray:
        codes = [await self._save_chunk(keys[a:a + CHUNK], head, rows[a:a + CHUNK], ids[a:a + CHUNK], now,
                                        last=a + CHUNK >= len(keys))
                 for a in range(0, len(keys), CHUNK)]
        return np.concatenate(codes)

    async def _save_chunk(self, keys: list[str], head: list[Any], rows: list[list[Any]], ids: Sequence[str],
                          now: float, last: bool) -> np.ndarray:
        """One round trip: the fence script for at most CHUNK streams (Redis runs nothing else
        meanwhile, and the request must be written within the socket timeout), their index
        entries and, after the last chunk, the durability wait. A retry of the whole save after
        a failed chunk finds the chunks that landed "already" saved: nothing applies twice."""
        c = self.conn
        flat = [v for r in rows for v in r]
        wait = last and self.durability.kind != "none"
        for _ in range(2):
            pipe = c.client.pipeline(transaction=False)
            pipe.evalsha(self._fence_sha, len(keys), *keys, *head, *flat)
            self._index_commands(pipe, ids, now)
            if wait:
                self.durability.queue(pipe)
            replies = await c.call(pipe.execute(raise_on_error=False), "save", len(keys))
            if isinstance(replies[0], NoScriptError):
                await self._load_scripts()  # did not run: the server restarted or flushed its scripts
                continue
            codes = np.asarray(c.check(replies[0]), np.int64)
            for r in replies[1:-1] if wait else replies[1:]:
                c.check(r)
            if wait:
                self.durability.verify(c.check(replies[-1]), self.url)
            return codes
        raise StateError(f"Redis at {self.url}: the fence script keeps disappearing (SCRIPT FLUSH?)")

    async def _save_cluster(self, keys: list[str], head: list[Any], rows: list[list[Any]], ids: Sequence[str],
                            now: float) -> np.ndarray:
        c = self.conn
        codes = np.full(len(keys), -1, np.int64)
        todo = list(range(len(keys)))
        index_done = False
        for _ in range(2):
            pipe = c.client.pipeline()
            for j in todo:  # one call per stream: the keys of one call must share a slot
                pipe.execute_command("EVALSHA", self._fence_sha, 1, keys[j], *head, *rows[j])
            if not index_done:
                self._index_commands(pipe, ids, now)
            replies = await c.call(pipe.execute(raise_on_error=False), "save", len(keys))
            again = []
            for j, r in zip(todo, replies):
                if isinstance(r, NoScriptError) or (isinstance(r, ResponseError) and str(r).startswith("NOSCRIPT")):
                    again.append(j)  # a node that lost its scripts (restart, failover): did not run
                else:
                    codes[j] = c.check(r)[0]
            for r in replies[len(todo):]:
                c.check(r)
            index_done = True
            if not again:
                return codes
            todo = again
            await self._load_scripts()
        raise StateError(f"Redis at {self.url}: the fence script keeps disappearing (SCRIPT FLUSH?)")

    def _index_commands(self, pipe: Any, ids: Sequence[str], now: float) -> None:
        """ZADD of the saved ids (score ``now``), plus, at most once a second, the index trims."""
        pipe.zadd(self.index, dict.fromkeys(ids, now))
        if now >= self._next_trim:
            self._next_trim = now + 1.0
            if self.ttl > 0:
                pipe.zremrangebyscore(self.index, "-inf", f"({now - self.ttl!r}")
            pipe.zremrangebyrank(self.index, 0, -(self.index_cap + 1))

    # ------------------------------------------------------------ inspection

    async def get(self, stream_id: str) -> dict[str, Any]:
        """The full decoded record of one stream (raises :class:`StateNotFound` if there is none,
        :class:`StateError` if it cannot be read)."""
        key = codec.state_key(stream_id, self.prefix)
        c = self.conn
        raw = await c.call(c.client.hgetall(key), "HGETALL")
        pttl = await c.call(c.client.pttl(key), "PTTL")
        if not raw:
            raise StateNotFound(f"no state for stream {stream_id!r} (key {key}) in Redis at {self.url}")
        rec = codec.decode_record(raw, num_layers=self.num_layers, hidden_size=self.hidden_size,
                                  stream_id=stream_id)
        rec["stream_id"] = stream_id
        rec["key"] = key
        rec["ttl"] = pttl / 1000.0 if pttl is not None and pttl >= 0 else None
        rec["loaded_model"] = self.model_version
        return rec

    async def list(self, pattern: str = "*", limit: int = 50, *, scan: bool = False) -> builtins.list[dict[str, Any]]:
        """Streams whose id matches ``pattern`` (glob), most recently updated first.

        From the index; entries whose hash has gone (expired or deleted) are removed on the way.
        ``scan=True`` walks the keys instead (SCAN: slower, but finds hashes the index does not
        list, e.g. written by another tool or trimmed from a full index).
        """
        if scan:
            return await self._list_scan(pattern, limit)
        c = self.conn
        out: builtins.list[dict[str, Any]] = []
        start, chunk = 0, max(100, 2 * limit)
        while len(out) < limit:
            entries = await c.call(c.client.zrevrange(self.index, start, start + chunk - 1), "ZREVRANGE")
            if not entries:
                break
            start += chunk
            ids = [s for s in (m.decode() for m in entries) if fnmatch.fnmatchcase(s, pattern)]
            gone = []
            for s, rec in zip(ids, await self._summaries(ids) if ids else []):
                if rec is None:
                    gone.append(s)
                else:
                    out.append(rec)
            if gone:
                await c.call(c.client.zrem(self.index, *gone), "ZREM")
                start -= len(gone)
        return out[:limit]

    async def _summaries(self, ids: Sequence[str]) -> builtins.list[dict[str, Any] | None]:
        c = self.conn
        pipe = c.client.pipeline(transaction=False) if not c.cluster else c.client.pipeline()
        for k in self._key_list(ids):
            pipe.hmget(k, self.SUMMARY)
        rows = await c.call(pipe.execute(), "HMGET")
        out: builtins.list[dict[str, Any] | None] = []
        for s, row in zip(ids, rows):
            if all(v is None for v in row):
                out.append(None)
                continue
            rec = codec.decode_record({k: v for k, v in zip(self.SUMMARY, row) if v is not None}, stream_id=s)
            out.append({**{k: rec.get(k) for k in self.SUMMARY}, "stream_id": s})
        return out

    async def _list_scan(self, pattern: str, limit: int) -> builtins.list[dict[str, Any]]:
        c = self.conn
        match = codec.state_key(pattern, self.prefix)

        async def keys() -> builtins.list[str]:  # RedisCluster's scan_iter walks every primary
            return [codec.stream_id_of(k) async for k in c.client.scan_iter(match=match, count=1000)]

        found_ids = await c.call(keys(), "SCAN")
        ids = [s for s in found_ids if fnmatch.fnmatchcase(s, pattern)]
        found = [r for r in await self._summaries(ids) if r is not None]
        found.sort(key=lambda r: -(r["updated_at"] or 0.0))
        return found[:limit]

    async def reset(self, stream_id: str) -> bool:
        """Delete a stream's state and its index entry; False if there was no state."""
        key = codec.state_key(stream_id, self.prefix)
        c = self.conn
        deleted = await c.call(c.client.delete(key), "DEL")  # the hash and the index may live on two nodes
        await c.call(c.client.zrem(self.index, stream_id), "ZREM")
        return bool(deleted)
