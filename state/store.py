"""Per-stream state in Redis: batched load and fenced save, one round trip each.

:class:`StateStore` reads the states of n streams with one pipelined request (an ``HMGET`` of
every field per stream, fixed order) and writes them back with one pipelined request: a Lua
script (``state/fence.lua``, loaded once with ``SCRIPT LOAD``, run with ``EVALSHA``) per
stream key, which writes the state together with its position only if that position is newer
than the stored one. One key per script call, so the layout stays Redis Cluster friendly;
the index (a sorted set of stream ids by last update) is updated by a separate command in the
same request, not inside the script.

Requests are framed by hand (RESP, numpy for the fixed-size parts) and sent on a pooled
redis-py connection, because redis-py's per-command machinery would cost more client CPU than
the whole save. Connection errors are retried with exponential backoff: a save is idempotent
(the fence refuses what is already there, and recognises its own write after a lost reply).

Redis Cluster: :meth:`StateStore.connect` asks the node it is given ``INFO cluster``; if it
says ``cluster_enabled:1`` the store maps keys to slots and slots to primaries
(``CLUSTER SLOTS``) and keeps one fast-path store per primary (see :mod:`state.cluster`). The
URL stays a plain ``redis://`` / ``rediss://`` one naming any node (the seed);
``connect(..., cluster=False)`` skips the check.

Example (needs a running Redis, so not run as a doctest)::

    store = await StateStore.connect("redis://localhost:6379/0", model_version=model.version,
                                     num_layers=2, hidden_size=64, input_size=1)
    loaded = await store.load(["pump-1", "pump-2"])     # loaded.states: StreamStates
    engine.advance(loaded.states, x)
    applied = await store.save(["pump-1", "pump-2"], loaded.states, partitions, offsets,
                               indexes, ts, event_ids)
"""

from __future__ import annotations

import asyncio
import fnmatch
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from kernels.states import StreamStates
from state import codec
from state.cluster import Cluster, Redirected, cluster_info_enabled, gather, is_redirect
from state.errors import StateError, StateNotFound, StateUnavailable

FENCE_LUA = (Path(__file__).resolve().parent / "fence.lua").read_text()
APPLIED, STALE, DUPLICATE = 1, 0, 2
try:
    import hiredis
except ImportError:  # redis-py then parses in Python: correct, slower
    hiredis = None

_MORE = object()  # hiredis: not enough data yet
NETWORK_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


def _bulk(b: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(b), b)


def _command(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(_bulk(a) for a in args)


NUM_WIDTH = 56  # ARGV[2]: int64 partition, offset, index, steps, episode; float64 ts, updated_at
_EMPTY = _bulk(b"")


def _event_frames(event_ids: Sequence[str | None] | None, n: int) -> list[bytes]:
    if event_ids is None:
        return [_EMPTY] * n
    if len(event_ids) != n:
        raise StateError(f"save: event_ids: expected {n}, got {len(event_ids)}")
    encoded = [e.encode() if e else b"" for e in event_ids]
    return [b"$%d\r\n%b\r\n" % (len(b), b) for b in encoded]


def safe_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for messages).

    >>> safe_url("redis://:secret@db:6379/0")
    'redis://:***@db:6379/0'
    >>> safe_url("redis://localhost:6379/0")
    'redis://localhost:6379/0'
    """
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit((parts.scheme, f"{user}:***@{host}{port}", parts.path, parts.query, parts.fragment))


async def _read_replies(stream: asyncio.StreamReader, n: int) -> list[Any]:
    """Parse ``n`` RESP replies straight from the socket with one hiredis reader.

    redis-py's ``read_response`` costs several microseconds per reply (timeouts, checks, error
    mapping); a batch of 256 streams has 257 replies, so it would dominate the client's CPU.
    """
    reader = hiredis.Reader(replyError=ResponseError, notEnoughData=_MORE)
    out: list[Any] = []
    gets, feed, append = reader.gets, reader.feed, out.append
    while len(out) < n:
        r = gets()
        if r is _MORE:
            data = await stream.read(1 << 16)
            if not data:
                raise RedisConnectionError("Redis closed the connection")
            feed(data)
        else:
            append(r)
    if reader.has_data():
        raise RedisConnectionError("Redis sent more replies than requests")
    return out


async def _read_one(conn: Any) -> Any:
    try:
        return await conn.read_response(timeout=math.inf)
    except ResponseError as exc:
        if isinstance(exc, AuthenticationError):
            raise
        return exc


@dataclass
class Loaded:
    """What :meth:`StateStore.load` found for n streams (row i is ``ids[i]``)."""

    states: StreamStates  # the stored states; fresh ones where ``fresh`` is True
    partition: np.ndarray  # int64: position of the last applied event; -1 where no hash exists
    offset: np.ndarray  # int64; -1 where no hash exists
    index: np.ndarray  # int64; -1 where no hash exists
    ts: np.ndarray  # float64: event time of the last applied event; NaN where no hash exists
    event_id: list[str | None]  # last applied event_id (None: none stored)
    found: np.ndarray  # bool: a state hash exists (of any model version)
    reset: np.ndarray  # bool: it belonged to another model version and was replaced by a fresh state

    @property
    def fresh(self) -> np.ndarray:
        """bool: the stream starts from a fresh state (no hash, or reset)."""
        return ~self.found | self.reset


class StateStore:
    """Async store of per-stream state in one Redis. Build it with :meth:`connect`."""

    def __init__(self, client: aioredis.Redis, url: str, *, model_version: str | None, num_layers: int | None,
                 hidden_size: int | None, input_size: int | None, anomaly_size: int | None, ttl: float,
                 policy: str, clock: Callable[[], float], prefix: str, retries: int, timeout: float,
                 index_cap: int) -> None:
        if policy not in ("reset", "refuse"):
            raise StateError(f"model policy: expected 'reset' or 'refuse', got {policy!r}")
        if ttl < 0:
            raise StateError(f"state TTL: expected seconds >= 0, got {ttl}")
        self.client = client
        self.url = safe_url(url)
        self.model_version = model_version
        self.num_layers, self.hidden_size, self.input_size = num_layers, hidden_size, input_size
        self.anomaly_size = anomaly_size
        self.ttl, self.policy, self.clock, self.prefix = float(ttl), policy, clock, prefix
        self.retries, self.timeout, self.index_cap = retries, timeout, index_cap
        self.index = codec.index_key(prefix)
        self._index_b = self.index.encode()
        self._sha = ""
        self._next_trim = -math.inf
        self._idle: list[Any] = []  # connections of the hand-framed path, see _roundtrip
        self._cluster: Cluster | None = None  # set by connect on a Redis Cluster
        self._in_cluster = False  # this store is one primary of a cluster: MOVED is retried above
        # Counters for /metrics.
        self.loads = 0  # streams loaded
        self.resets = 0  # states of another model version replaced by fresh ones (policy reset)
        self.applied = 0  # streams whose save was applied
        self.stale = 0  # saves refused: position not newer than the stored one
        self.duplicates = 0  # saves refused: event_id equal to the stored one
        self.retried = 0  # round trips repeated after a connection error
        self.detector_resets = 0  # anomaly statistics of another detector layout, started afresh
        self._build_templates()

    # ----------------------------------------------------------------- setup

    @classmethod
    async def connect(cls, url: str, *, model_version: str | None = None, num_layers: int | None = None,
                      hidden_size: int | None = None, input_size: int | None = None,
                      anomaly_size: int | None = None, ttl: float = 0.0, policy: str = "reset",
                      clock: Callable[[], float] = time.time, prefix: str = codec.PREFIX, retries: int = 20,
                      timeout: float = 10.0, index_cap: int = 1_000_000,
                      cluster: bool | None = None) -> StateStore:
        """Connect, check the server answers, load the fence script.

        ``model_version`` and the sizes are needed by :meth:`load` / :meth:`save` only; the
        inspection calls (:meth:`get`, :meth:`list`, :meth:`reset`) work without them.
        ``ttl`` (seconds, 0 = forever) expires idle streams; ``policy`` says what :meth:`load`
        does with a state of another model version; ``retries`` bounds reconnect attempts
        (exponential backoff, at most 1 s apart); ``index_cap`` bounds the index's size.
        ``cluster``: None asks the server (``INFO cluster``), False treats it as one node.
        """
        if policy not in ("reset", "refuse"):
            raise StateError(f"model policy: expected 'reset' or 'refuse', got {policy!r}")
        try:
            client = aioredis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                       retry=Retry(NoBackoff(), 0), protocol=2)
        except ValueError as exc:
            raise StateError(f"redis url {safe_url(url)!r}: {exc}") from None
        try:
            store = cls(client, url, model_version=model_version, num_layers=num_layers, hidden_size=hidden_size,
                        input_size=input_size, anomaly_size=anomaly_size, ttl=ttl, policy=policy, clock=clock,
                        prefix=prefix, retries=retries, timeout=timeout, index_cap=index_cap)
        except BaseException:
            await client.aclose()
            raise
        try:
            await store._with_retry(store._load_script)
            if cluster is not False and await store._with_retry(store._cluster_enabled):
                async def node(node_url: str) -> StateStore:
                    sub = await cls.connect(node_url, model_version=model_version, num_layers=num_layers,
                                            hidden_size=hidden_size, input_size=input_size,
                                            anomaly_size=anomaly_size, ttl=ttl, policy=policy, clock=clock,
                                            prefix=prefix, retries=min(retries, 1), timeout=timeout,
                                            index_cap=index_cap, cluster=False)
                    sub._in_cluster = True
                    return sub

                store._cluster = Cluster(store, url, node)
                await store._cluster.refresh()
        except BaseException:
            await store.close()
            raise
        return store

    async def _cluster_enabled(self) -> bool:
        try:
            return cluster_info_enabled(await self.client.info("cluster"))
        except ResponseError as exc:
            if "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
                raise
            return False  # INFO disabled or unknown section: treat as one node

    async def close(self) -> None:
        if self._cluster is not None:
            await self._cluster.close()
        pool = self.client.connection_pool
        while self._idle:
            await pool.release(self._idle.pop())
        await self.client.aclose()

    async def __aenter__(self) -> StateStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _load_script(self) -> None:
        self._sha = await self.client.script_load(FENCE_LUA)
        # 13 = EVALSHA, sha, numkeys, key and 9 ARGV (see fence.lua).
        self._save_head = b"*13\r\n" + _bulk(b"EVALSHA") + _bulk(self._sha.encode()) + _bulk(b"1")

    def _build_templates(self) -> None:
        self._key_frames: dict[str, bytes] = {}
        self._id_frames: dict[str, bytes] = {}
        self._load_tail = b"".join(_bulk(f.encode()) for f in codec.FIELDS)
        self._load_head = b"*%d\r\n" % (2 + len(codec.FIELDS)) + _bulk(b"HMGET")
        self._model_b = (self.model_version or "").encode()
        dims = (self.num_layers, self.hidden_size, self.input_size)
        if any(d is None for d in dims):
            self._blob_sizes = None
            return
        L, H, F = dims  # type: ignore[misc]
        D = self.anomaly_size if self.anomaly_size is not None else self._fresh(1).anomaly.shape[1]
        self.anomaly_size = D
        # One fixed-width row per stream holds ARGV[2..9], each framed: the numbers (binary,
        # the script writes them as decimal strings), model, TTL and the raw arrays.
        self._blob_sizes = [4 * L * H, 4 * L * H, 4 * F, 8 * (1 + 2 * F), 8 * D]
        row = bytearray(b"$%d\r\n" % NUM_WIDTH)
        self._num_col = len(row)
        row += bytes(NUM_WIDTH) + b"\r\n" + _bulk(self._model_b) + _bulk(b"%d" % round(self.ttl * 1000))
        self._blob_cols = []
        for size in self._blob_sizes:
            row += b"$%d\r\n" % size
            self._blob_cols.append((len(row), len(row) + size))
            row += bytes(size) + b"\r\n"
        self._row_template = np.frombuffer(bytes(row), np.uint8)

    def _frames(self, ids: Sequence[str]) -> list[bytes]:
        """Framed keys ``$len\\r\\nlstream:state:{id}\\r\\n`` (cached per id)."""
        cache = self._key_frames
        out = [cache.get(s) for s in ids]
        if None in out:
            if len(cache) > 500_000:  # bound memory with many short-lived streams
                cache.clear()
                self._id_frames.clear()
            for j, s in enumerate(ids):
                if out[j] is None:
                    sid = s.encode()
                    cache[s] = out[j] = _bulk(codec.state_key(s, self.prefix).encode())
                    self._id_frames[s] = _bulk(sid)
        return out  # type: ignore[return-value]

    def _fresh(self, n: int) -> StreamStates:
        st = StreamStates.zeros(n, self.num_layers or 1, self.hidden_size or 1, self.input_size or 1)
        if self.anomaly_size is not None and st.anomaly.shape[1] != self.anomaly_size:
            st.anomaly = np.zeros((n, self.anomaly_size))
        return st

    def _need_model(self) -> None:
        if self._blob_sizes is None or not self.model_version:
            raise StateError("state store: load/save need model_version, num_layers, hidden_size and input_size")

    def counters(self) -> dict[str, int]:
        """Counters for the worker's /metrics."""
        out = {"loads": self.loads, "resets": self.resets, "applied": self.applied, "stale": self.stale,
               "duplicates": self.duplicates, "retried": self.retried,
               "detector_resets": self.detector_resets}
        for node in self._cluster.nodes.values() if self._cluster is not None else ():
            for k, v in node.counters().items():
                out[k] += v
        return out

    # ----------------------------------------------------------- round trips

    async def _with_retry(self, op: Callable[[], Any]) -> Any:
        delay = 0.05
        for attempt in range(self.retries + 1):
            try:
                return await op()
            except AuthenticationError as exc:
                raise StateError(f"Redis at {self.url} refused the credentials: {exc}") from None
            except NETWORK_ERRORS as exc:
                if attempt == self.retries:
                    raise StateUnavailable(f"Redis at {self.url} is unreachable: {exc}") from None
                self.retried += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
            except ResponseError as exc:
                if "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
                    raise StateError(f"Redis at {self.url} refused the credentials: {exc}") from None
                raise
        raise AssertionError("unreachable")

    async def _roundtrip(self, payload: bytes, nreplies: int) -> list[Any]:
        """Send a pre-framed request, read ``nreplies`` replies (error replies come back as
        :class:`ResponseError` objects, in place)."""
        # Connections taken from redis-py's pool once and kept: the pool's get/release costs
        # more than a small batch. A connection that failed is disconnected and reconnects on
        # its next send.
        conn = self._idle.pop() if self._idle else await self.client.connection_pool.get_connection()
        try:
            async with asyncio.timeout(self.timeout):
                await conn.send_packed_command(payload, check_health=False)
                stream = getattr(conn, "_reader", None)
                buffered = getattr(getattr(conn, "_parser", None), "_reader", None)
                if (hiredis is not None and isinstance(stream, asyncio.StreamReader)
                        and isinstance(buffered, hiredis.Reader) and not buffered.has_data()):
                    replies = await _read_replies(stream, nreplies)
                else:  # redis-py internals changed: the slower public path
                    replies = [await _read_one(conn) for _ in range(nreplies)]
            for r in replies:
                if isinstance(r, ResponseError) and str(r).startswith(("NOAUTH", "WRONGPASS")):
                    raise AuthenticationError(str(r))
            return replies
        except BaseException:
            await conn.disconnect()
            raise
        finally:
            self._idle.append(conn)

    # ------------------------------------------------------------------ load

    async def load(self, ids: Sequence[str]) -> Loaded:
        """The states of ``ids`` (one round trip). Streams without a hash start fresh."""
        self._need_model()
        n = len(ids)
        st = self._fresh(n)
        found = np.zeros(n, bool)
        reset = np.zeros(n, bool)
        part = np.full(n, -1, np.int64)
        off = np.full(n, -1, np.int64)
        idx = np.full(n, -1, np.int64)
        ts = np.full(n, np.nan)
        event_ids: list[str | None] = [None] * n
        if n == 0:
            return Loaded(st, part, off, idx, ts, event_ids, found, reset)
        if self._cluster is not None:
            out = Loaded(st, part, off, idx, ts, event_ids, found, reset)
            await self._cluster.load(ids, [codec.state_key(s, self.prefix) for s in ids], out)
            return out
        sep = self._load_tail + self._load_head
        payload = self._load_head + sep.join(self._frames(ids)) + self._load_tail
        rows = await self._with_retry(lambda: self._roundtrip(payload, n))
        for r in rows:
            if isinstance(r, Exception):
                if self._in_cluster and is_redirect(r):
                    raise Redirected(f"Redis at {self.url}: {r}")
                raise StateError(f"Redis at {self.url}: {r}")
        cols = list(zip(*rows))  # one tuple per field, codec.FIELDS order
        model_col = cols[3]
        model_b = self._model_b
        ok = [i for i, m in enumerate(model_col) if m == model_b]
        there = [i for i, r in enumerate(rows) if any(v is not None for v in r)] if len(ok) < n else ok
        found[there] = True
        other = [i for i in there if model_col[i] != model_b]
        if other:
            if self.policy == "refuse":
                i = other[0]
                got = model_col[i].decode() if model_col[i] is not None else "none"
                raise StateError(f"stream {ids[i]!r}: stored state belongs to model {got}, the loaded model is "
                                 f"{self.model_version} (policy refuse; {len(other)} stream(s) affected; "
                                 f"'lstream state reset' or policy reset starts them fresh)")
            reset[other] = True
            self.resets += len(other)
        if there:
            nums = self._numbers(cols, there, ids)  # (6, k): steps, partition, offset, index, episode, ts
            part[there], off[there], idx[there], ts[there] = nums[1], nums[2], nums[3], nums[5]
            eid_col = cols[9]
            for i in there:
                e = eid_col[i]
                if e:
                    event_ids[i] = e.decode()
            if ok:
                sub = nums if len(ok) == len(there) else nums[:, np.searchsorted(there, ok)]
                self._fill(st, cols, ok, ids, sub[0], sub[4])
        self.loads += n
        return Loaded(st, part, off, idx, ts, event_ids, found, reset)

    # Hash fields read as numbers (codec.FIELDS positions), with the value a missing field takes.
    NUMBERS = ((4, "steps", 0.0), (5, "partition", -1.0), (6, "offset", -1.0), (7, "index", 0.0),
               (12, "episode", -1.0), (8, "ts", math.nan))

    def _numbers(self, cols: list[tuple[Any, ...]], rows: list[int], ids: Sequence[str]) -> np.ndarray:
        """The numeric fields of ``rows`` as a (6, k) float64 array (one C parse for all of them;
        integers are exact below 2**53, as in the fence script)."""
        k = len(rows)
        every = k == len(cols[0])
        picked = [cols[c] if every else [cols[c][i] for i in rows] for c, _, _ in self.NUMBERS]
        flat = [v for col in picked for v in col]
        if None not in flat:
            try:
                vals = np.fromstring(b" ".join(flat).decode("ascii"), dtype=np.float64, sep=" ")
                if vals.size == len(flat):
                    return vals.reshape(len(self.NUMBERS), k)
            except (ValueError, UnicodeDecodeError):
                pass
        out = np.empty((len(self.NUMBERS), k))  # slow path: missing fields, or a bad value to name
        for r, (col, (_, name, default)) in enumerate(zip(picked, self.NUMBERS)):
            for j, v in enumerate(col):
                try:
                    out[r, j] = default if v is None else float(v)
                except ValueError:
                    raise StateError(f"stream {ids[rows[j]]!r}: field {name}: expected a decimal number, "
                                     f"got {v!r}") from None
        return out

    def _fill(self, st: StreamStates, cols: list[tuple[Any, ...]], ok: list[int], ids: Sequence[str],
              steps: np.ndarray, episode: np.ndarray) -> None:
        all_rows = len(ok) == len(st)
        target: Any = slice(None) if all_rows else np.asarray(ok)
        for field, col in (("h", 0), ("c", 1), ("pred", 2), ("norm", 10), ("anomaly", 11)):
            dest = getattr(st, field)
            shape = dest.shape[1:]
            width = int(np.prod(shape)) * dest.itemsize
            vals = cols[col] if all_rows else [cols[col][i] for i in ok]
            if None not in vals:
                blob = b"".join(vals)
                if len(blob) == width * len(vals):
                    dest[target] = np.frombuffer(blob, dest.dtype.newbyteorder("<")).reshape((len(vals), *shape))
                    continue
            for j, v in zip(ok, vals):  # slow path: a missing field keeps the fresh value, a bad one is an error
                if v is None:
                    continue
                if field == "anomaly" and len(v) != width:
                    # Written by another lstream version's detector: its statistics cannot be
                    # read back, so the detector starts afresh (and warms up again) while the
                    # LSTM state, which belongs to the same model, is kept. Counted.
                    self.detector_resets += 1
                    dest[j] = 0.0
                    continue
                if len(v) != width:
                    raise StateError(f"stream {ids[j]!r}: field {field}: expected {width} bytes (shape {shape}), "
                                     f"got {len(v)}")
                dest[j] = np.frombuffer(v, dest.dtype.newbyteorder("<")).reshape(shape)
        st.steps[target] = steps
        st.episode[target] = episode

    # ------------------------------------------------------------------ save

    async def save(self, ids: Sequence[str], states: StreamStates, partitions: Any, offsets: Any, indexes: Any,
                   ts: Any, event_ids: Sequence[str | None] | None = None) -> np.ndarray:
        """Write the states of ``ids`` with their positions (one round trip); returns a bool mask
        of the streams whose save applied. Row i of ``states`` belongs to ``ids[i]``.

        A save applies only if its position (partition, offset, index) is newer than the stored
        one (same partition: a larger (offset, index); another partition: an event time ``ts``
        not older than the stored one) and its ``event_id``, if any, differs from the stored one.
        """
        self._need_model()
        n = len(ids)
        if len(states) != n:
            raise StateError(f"save: expected {n} states for {n} streams, got {len(states)}")
        if n == 0:
            return np.zeros(0, bool)
        now = float(self.clock())
        rows = self._save_rows(n, states, partitions, offsets, indexes, ts, now)
        eframes = _event_frames(event_ids, n)
        frames = self._frames(ids)
        if self._cluster is None:
            result = await self._send_saves(list(range(n)), frames, eframes, rows, ids, now, index=True)
        else:
            async def on_node(node: StateStore, todo: list[int]) -> np.ndarray:
                return await node._send_saves(todo, frames, eframes, rows, ids, now, index=False)

            async def index(node: StateStore) -> None:
                tail, extra = self._index_commands(ids, now)
                for r in await node._with_retry(lambda: node._roundtrip(tail, extra)):
                    if is_redirect(r):
                        raise Redirected(f"Redis at {node.url}: updating the index: {r}")
                    if isinstance(r, Exception):
                        raise StateError(f"Redis at {node.url}: updating the index: {r}")

            keys = [codec.state_key(s, self.prefix) for s in ids]
            result = await self._cluster.save(ids, keys, on_node, index)
        applied = result == APPLIED
        self.applied += int(applied.sum())
        self.stale += int((result == STALE).sum())
        self.duplicates += int((result == DUPLICATE).sum())
        return applied

    async def _send_saves(self, todo: list[int], frames: list[bytes], eframes: list[bytes], rows: memoryview,
                          ids: Sequence[str], now: float, index: bool) -> np.ndarray:
        """Run the fence for the streams at positions ``todo`` (one round trip, more only after
        NOSCRIPT); their codes in ``todo`` order, -1 where a cluster node redirected (MOVED)."""
        result = np.full(len(todo), -1, np.int64)
        where: Sequence[int] = range(len(todo))  # position in result of each entry of todo
        for _ in range(3):
            payload, extra = self._save_payload(todo, frames, eframes, rows, ids, now, index)
            replies = await self._with_retry(lambda: self._roundtrip(payload, len(todo) + extra))
            missing, again = [], []
            for k, j, r in zip(where, todo, replies):
                if isinstance(r, ResponseError) and str(r).startswith("NOSCRIPT"):
                    missing.append(j)
                    again.append(k)
                elif self._in_cluster and is_redirect(r):
                    continue  # did not run; the cluster layer refreshes its map and resends it
                elif isinstance(r, Exception):
                    raise StateError(f"Redis at {self.url}: saving stream {ids[j]!r}: {r}")
                else:
                    result[k] = r
            for r in replies[len(todo):]:
                if isinstance(r, Exception):
                    raise StateError(f"Redis at {self.url}: updating the index: {r}")
            if not missing:
                break
            # The server restarted or flushed its scripts. The sha is the SHA1 of the text, so
            # the framed requests stay valid; run the missing ones again (they did not run).
            await self._with_retry(self._load_script)
            todo, where = missing, again
        else:
            raise StateError(f"Redis at {self.url}: the fence script keeps disappearing (SCRIPT FLUSH?)")
        return result

    def _save_rows(self, n: int, states: StreamStates, partitions: Any, offsets: Any, indexes: Any, ts: Any,
                   now: float) -> memoryview:
        """ARGV[2..9] of every stream, framed: n rows of equal width, built with numpy."""
        ints = np.empty((n, 5), np.int64)
        for col, (name, a) in enumerate((("partitions", partitions), ("offsets", offsets), ("indexes", indexes),
                                         ("steps", states.steps), ("episode", states.episode))):
            arr = np.asarray(a)
            if arr.shape != (n,) or not np.issubdtype(arr.dtype, np.integer):
                raise StateError(f"save: {name}: expected {n} integers, got shape {arr.shape} of {arr.dtype}")
            ints[:, col] = arr
        ts_arr = np.asarray(ts, dtype=np.float64)
        if ts_arr.shape != (n,) or not np.isfinite(ts_arr).all():
            raise StateError(f"save: ts: expected {n} finite event times, got {ts_arr!r}")
        nums = np.empty((n, 7), "<i8")
        nums[:, :5] = ints
        nums.view("<f8")[:, 5] = ts_arr
        nums.view("<f8")[:, 6] = now
        buf = np.empty((n, self._row_template.size), np.uint8)
        buf[:] = self._row_template
        buf[:, self._num_col:self._num_col + NUM_WIDTH] = nums.view(np.uint8)
        arrays = (states.h, states.c, states.pred, states.norm, states.anomaly)
        dtypes = (codec.F32, codec.F32, codec.F32, codec.F64, codec.F64)
        for (a, b), arr, dt, size in zip(self._blob_cols, arrays, dtypes, self._blob_sizes):
            flat = np.ascontiguousarray(arr, dtype=dt).reshape(n, -1).view(np.uint8)
            if flat.shape[1] != size:
                raise StateError(f"save: state arrays: expected {size} bytes per stream, got {flat.shape[1]} "
                                 f"(shape {arr.shape})")
            buf[:, a:b] = flat
        return memoryview(buf).cast("B")

    def _save_payload(self, todo: list[int], frames: list[bytes], eframes: list[bytes], rows: memoryview,
                      ids: Sequence[str], now: float, index: bool = True) -> tuple[bytes, int]:
        width = self._row_template.size
        m = len(todo)
        parts: list[Any] = [self._save_head] * (4 * m)
        if m == len(frames):
            parts[1::4] = frames
            parts[2::4] = eframes
            parts[3::4] = [rows[i:i + width] for i in range(0, m * width, width)]
        else:
            parts[1::4] = [frames[j] for j in todo]
            parts[2::4] = [eframes[j] for j in todo]
            parts[3::4] = [rows[j * width:(j + 1) * width] for j in todo]
        if not index:
            return b"".join(parts), 0
        tail, extra = self._index_commands([ids[j] for j in todo] if m < len(frames) else ids, now)
        parts.append(tail)
        return b"".join(parts), extra

    def _index_commands(self, ids: Sequence[str], now: float) -> tuple[bytes, int]:
        """ZADD of the saved ids (score ``now``), plus, at most once a second, the index trims."""
        members: list[bytes] = [_bulk(codec.encode_float(now))] * (2 * len(ids))
        id_frames = self._id_frames
        members[1::2] = [id_frames[s] for s in ids]
        cmds = [b"*%d\r\n" % (2 + 2 * len(ids)) + _bulk(b"ZADD") + _bulk(self._index_b) + b"".join(members)]
        if now >= self._next_trim:
            self._next_trim = now + 1.0
            if self.ttl > 0:
                cmds.append(_command(b"ZREMRANGEBYSCORE", self._index_b, b"-inf",
                                     b"(" + codec.encode_float(now - self.ttl)))
            cmds.append(_command(b"ZREMRANGEBYRANK", self._index_b, b"0", b"%d" % -(self.index_cap + 1)))
        return b"".join(cmds), len(cmds)

    # ------------------------------------------------------------ inspection

    async def _on(self, key: str, fn: Callable[[aioredis.Redis], Any]) -> Any:
        """``fn(client)`` on the client that owns ``key`` (the one client unless in a cluster)."""
        if self._cluster is None:
            return await self._with_retry(lambda: fn(self.client))
        cluster = self._cluster

        async def op() -> Any:
            node = cluster.node_of(key)
            try:
                return await node._with_retry(lambda: fn(node.client))
            except ResponseError as exc:
                if is_redirect(exc):
                    raise Redirected(f"Redis at {node.url}: {exc}") from None
                raise

        return await cluster.retrying(op)

    async def get(self, stream_id: str) -> dict[str, Any]:
        """The full decoded record of one stream (raises :class:`StateError` if there is none)."""
        key = codec.state_key(stream_id, self.prefix)

        async def op(client: aioredis.Redis) -> list[Any]:
            async with client.pipeline(transaction=False) as pipe:
                pipe.hgetall(key)
                pipe.pttl(key)
                return await pipe.execute()

        raw, pttl = await self._on(key, op)
        if not raw:
            raise StateNotFound(f"no state for stream {stream_id!r} (key {key}) in Redis at {self.url}")
        rec = codec.decode_record(raw, num_layers=self.num_layers, hidden_size=self.hidden_size,
                                  stream_id=stream_id)
        rec["stream_id"] = stream_id
        rec["key"] = key
        rec["ttl"] = pttl / 1000.0 if pttl is not None and pttl >= 0 else None
        return rec

    SUMMARY = ("model", "steps", "partition", "offset", "index", "ts", "updated_at", "event_id")

    async def list(self, pattern: str = "*", limit: int = 50, *, scan: bool = False) -> list[dict[str, Any]]:
        """Streams whose id matches ``pattern`` (glob), most recently updated first.

        From the index; entries whose hash has gone (expired or deleted) are removed on the way.
        ``scan=True`` walks the keys instead (SCAN: slower, but finds hashes the index does not
        list, e.g. written by another tool or trimmed from a full index).
        """
        if scan:
            return await self._list_scan(pattern, limit)
        out: list[dict[str, Any]] = []
        start, chunk = 0, max(100, 2 * limit)
        while len(out) < limit:
            entries = await self._on(self.index, lambda c: c.zrevrange(self.index, start, start + chunk - 1))
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
                await self._on(self.index, lambda c: c.zrem(self.index, *gone))
                start -= len(gone)
        return out[:limit]

    async def _summaries(self, ids: Sequence[str]) -> list[dict[str, Any] | None]:
        keys = [codec.state_key(s, self.prefix) for s in ids]

        async def op(client: aioredis.Redis, pos: Sequence[int]) -> list[Any]:
            async with client.pipeline(transaction=False) as pipe:
                for j in pos:
                    pipe.hmget(keys[j], self.SUMMARY)
                return await pipe.execute()

        if self._cluster is None:
            rows = await self._with_retry(lambda: op(self.client, range(len(ids))))
        else:
            cluster = self._cluster
            rows = [None] * len(ids)

            async def part(node: StateStore, pos: list[int]) -> None:
                try:
                    got = await node._with_retry(lambda: op(node.client, pos))
                except ResponseError as exc:
                    if is_redirect(exc):
                        raise Redirected(f"Redis at {node.url}: {exc}") from None
                    raise
                for j, row in zip(pos, got):
                    rows[j] = row

            await cluster.retrying(lambda: gather([part(node, pos) for node, pos in cluster.split(keys)]))
        out: list[dict[str, Any] | None] = []
        for s, row in zip(ids, rows):
            if all(v is None for v in row):
                out.append(None)
                continue
            rec = codec.decode_record(dict(zip(self.SUMMARY, row)), stream_id=s)
            out.append({**{k: rec[k] for k in self.SUMMARY}, "stream_id": s})
        return out

    async def _list_scan(self, pattern: str, limit: int) -> list[dict[str, Any]]:
        async def keys(client: aioredis.Redis) -> list[str]:
            match = codec.state_key(pattern, self.prefix)
            return [codec.stream_id_of(k) async for k in client.scan_iter(match=match, count=1000)]

        if self._cluster is None:
            found_ids = await self._with_retry(lambda: keys(self.client))
        else:  # every primary holds its share of the keys
            cluster = self._cluster

            async def every() -> list[str]:
                nodes = list(cluster.nodes.values())
                parts = await gather([n._with_retry(lambda n=n: keys(n.client)) for n in nodes])
                return [s for p in parts for s in p]

            found_ids = await cluster.retrying(every)
        ids = [s for s in found_ids if fnmatch.fnmatchcase(s, pattern)]
        found = [r for r in await self._summaries(ids) if r is not None]
        found.sort(key=lambda r: -(r["updated_at"] or 0.0))
        return found[:limit]

    async def reset(self, stream_id: str) -> bool:
        """Delete a stream's state and its index entry; False if there was no state."""
        key = codec.state_key(stream_id, self.prefix)
        if self._cluster is not None:  # the hash and the index live on different nodes
            deleted = await self._on(key, lambda c: c.delete(key))
            await self._on(self.index, lambda c: c.zrem(self.index, stream_id))
            return bool(deleted)

        async def op() -> list[Any]:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.delete(key)
                pipe.zrem(self.index, stream_id)
                return await pipe.execute()

        deleted, _ = await self._with_retry(op)
        return bool(deleted)
