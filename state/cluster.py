"""Redis Cluster support for :class:`state.store.StateStore`: one store per primary.

:meth:`StateStore.connect` asks the seed node ``INFO cluster``; with ``cluster_enabled:1`` it
builds a :class:`Cluster`: the slot map from ``CLUSTER SLOTS`` and one plain (single-node)
``StateStore`` per primary, so every node gets the same hand-framed fast path. A load or save
is split by node (each key's slot, ``redis.crc.key_slot``), the parts run concurrently, and the
results go back in the caller's order. A ``MOVED``/``ASK`` reply or an unreachable node
refreshes the slot map and retries the affected streams (a save is idempotent: the fence
reports its own earlier write as applied).

>>> node_url("redis://:pw@seed:7000/0", "10.0.0.2", 7001)
'redis://:pw@10.0.0.2:7001/0'
>>> node_url("rediss://db", "::1", 7002)
'rediss://[::1]:7002'
>>> slot_of("lstream:state:{pump-1}") == slot_of("{pump-1}")
True
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from redis.crc import key_slot
from redis.exceptions import AskError, ClusterDownError, ResponseError, TryAgainError

from state.errors import StateUnavailable

if TYPE_CHECKING:
    from state.store import Loaded, StateStore

SLOTS = 16384
REDIRECT = ("MOVED ", "ASK ", "TRYAGAIN", "CLUSTERDOWN")


class Redirected(StateUnavailable):
    """A node answered MOVED/ASK/TRYAGAIN/CLUSTERDOWN: the slot map must be refreshed."""


def is_redirect(reply: Any) -> bool:
    """A reply (hiredis: the full text) or error (redis-py: typed, prefix removed) that says
    "ask another node" or "try again once the cluster settles".

    >>> is_redirect(ResponseError("MOVED 12 10.0.0.2:7001")), is_redirect(ResponseError("ERR x"))
    (True, False)
    """
    if isinstance(reply, (AskError, TryAgainError, ClusterDownError)):
        return True
    return isinstance(reply, ResponseError) and str(reply).startswith(REDIRECT)


def slot_of(key: str) -> int:
    """The cluster hash slot of ``key`` (honours ``{hash tags}``)."""
    return key_slot(key.encode())


def node_url(seed: str, host: str, port: int) -> str:
    """``seed`` with its host and port replaced (scheme, credentials, path and query kept)."""
    parts = urlsplit(seed)
    auth = ""
    if parts.username is not None or parts.password is not None:
        auth = (parts.username or "") + (f":{parts.password}" if parts.password is not None else "") + "@"
    h = f"[{host}]" if ":" in host else host
    return urlunsplit((parts.scheme, f"{auth}{h}:{port}", parts.path, parts.query, parts.fragment))


async def gather(jobs: Sequence[Awaitable[Any]]) -> list[Any]:
    """``asyncio.gather`` that lets every job finish before raising (no job left running to
    write into a batch that is being retried); a user error wins over an unreachable node."""
    res = await asyncio.gather(*jobs, return_exceptions=True)
    errors = [r for r in res if isinstance(r, BaseException)]
    if errors:
        errors.sort(key=lambda e: isinstance(e, StateUnavailable))
        raise errors[0]
    return res


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class Cluster:
    """Slot map and one single-node :class:`StateStore` per primary."""

    def __init__(self, top: StateStore, seed: str, make: Callable[[str], Awaitable[StateStore]]) -> None:
        self.top, self.seed, self.make = top, seed, make
        self.nodes: dict[tuple[str, int], StateStore] = {}
        self.slot_node: list[tuple[str, int] | None] = [None] * SLOTS
        self._slots: dict[str, int] = {}  # key -> slot cache
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------ slot map

    async def refresh(self) -> None:
        """Read ``CLUSTER SLOTS`` (from any node that answers) and connect new primaries."""
        async with self._lock:
            clients = [s.client for s in self.nodes.values()] + [self.top.client]
            last: Exception | None = None
            for client in clients:
                try:
                    reply = await client.execute_command("CLUSTER SLOTS")
                    break
                except Exception as exc:
                    last = exc
            else:
                raise StateUnavailable(f"Redis Cluster at {self.top.url}: no node answers CLUSTER SLOTS: {last}")
            owner: list[tuple[str, int] | None] = [None] * SLOTS
            for entry in reply:
                start, end, primary = int(entry[0]), int(entry[1]), entry[2]
                host = _text(primary[0]) or urlsplit(self.seed).hostname or "127.0.0.1"
                addr = (host, int(primary[1]))
                owner[start:end + 1] = [addr] * (end - start + 1)
            if None in owner:
                missing = owner.index(None)
                raise StateUnavailable(f"Redis Cluster at {self.top.url}: slot {missing} has no primary "
                                       f"(cluster_state not ok?)")
            for addr in set(owner) - set(self.nodes):  # type: ignore[arg-type]
                self.nodes[addr] = await self.make(node_url(self.seed, *addr))  # type: ignore[misc]
            for addr in set(self.nodes) - set(owner):
                await self.nodes.pop(addr).close()
            self.slot_node = owner

    def node_of(self, key: str) -> StateStore:
        slot = self._slots.get(key)
        if slot is None:
            if len(self._slots) > 500_000:
                self._slots.clear()
            slot = self._slots[key] = slot_of(key)
        return self.nodes[self.slot_node[slot]]  # type: ignore[index]

    def split(self, keys: Sequence[str]) -> list[tuple[StateStore, list[int]]]:
        """Positions of ``keys`` grouped by the node that owns them."""
        groups: dict[int, tuple[StateStore, list[int]]] = {}
        for i, k in enumerate(keys):
            node = self.node_of(k)
            groups.setdefault(id(node), (node, []))[1].append(i)
        return list(groups.values())

    async def retrying(self, op: Callable[[], Awaitable[Any]]) -> Any:
        """Run ``op``; on a redirect or an unreachable node refresh the map and run it again."""
        delay = 0.05
        for attempt in range(self.top.retries + 1):
            try:
                return await op()
            except StateUnavailable:
                if attempt == self.top.retries:
                    raise
                self.top.retried += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                try:
                    await self.refresh()
                except StateUnavailable:
                    pass  # keep the old map, try again later
        raise AssertionError("unreachable")

    async def close(self) -> None:
        for node in self.nodes.values():
            await node.close()
        self.nodes.clear()

    # ----------------------------------------------------------- load/save

    async def load(self, ids: Sequence[str], keys: Sequence[str], out: Loaded) -> None:
        """Fill ``out`` (fresh, n rows) with the stored states of ``ids``."""
        todo = list(range(len(ids)))

        async def part(node: StateStore, pos: list[int]) -> None:
            rows = [todo[p] for p in pos]
            got = await node.load([ids[j] for j in rows])
            idx = np.asarray(rows)
            out.states.put(idx, got.states)
            for name in ("partition", "offset", "index", "ts", "found", "reset"):
                getattr(out, name)[idx] = getattr(got, name)
            for j, e in zip(rows, got.event_id):
                out.event_id[j] = e

        async def op() -> None:
            groups = self.split([keys[j] for j in todo])
            await gather([part(node, pos) for node, pos in groups])

        await self.retrying(op)

    async def save(self, ids: Sequence[str], keys: Sequence[str], rows_of: Callable[[StateStore, list[int]],
                   Awaitable[np.ndarray]], index: Callable[[StateStore], Awaitable[None]]) -> np.ndarray:
        """Fenced save split by node; returns the fence codes in ``ids`` order. ``rows_of(node,
        positions)`` saves those streams on ``node`` (codes, -1 where redirected); ``index(node)``
        updates the index on the node that owns it."""
        result = np.full(len(ids), -1, np.int64)
        todo = list(range(len(ids)))
        index_done = False

        async def part(node: StateStore, pos: list[int]) -> None:
            rows = [todo[p] for p in pos]
            result[rows] = await rows_of(node, rows)

        async def idx() -> None:
            nonlocal index_done
            await index(self.node_of(self.top.index))
            index_done = True

        async def op() -> None:
            nonlocal todo
            todo = [j for j in range(len(ids)) if result[j] < 0]
            groups = self.split([keys[j] for j in todo])
            jobs = [part(node, pos) for node, pos in groups]
            if not index_done:
                jobs.append(idx())
            await gather(jobs)
            if (result < 0).any():
                raise Redirected(f"Redis Cluster at {self.top.url}: {int((result < 0).sum())} stream(s) redirected")

        await self.retrying(op)
        return result


def cluster_info_enabled(info: Any) -> bool:
    """True if an ``INFO cluster`` reply says ``cluster_enabled:1``.

    >>> cluster_info_enabled({"cluster_enabled": 1}), cluster_info_enabled({"cluster_enabled": 0})
    (True, False)
    """
    if isinstance(info, dict):
        return str(info.get("cluster_enabled", "0")) == "1"
    return False

