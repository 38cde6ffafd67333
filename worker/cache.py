"""Held states: write-through copies of the stream states this worker saved last (skip the load).

:class:`StateCache` keeps, per stream id, the state the pipeline computed and is saving (or
saved), with the position it reflects. All states live in one
:class:`kernels.states.StreamStates` arena, gathered and written back with numpy fancy
indexing. At most ``max_entries`` are held; beyond that the least recently used go. Redis
stays the source of truth: docs/exactly-once.md says when entries are dropped and why that
is enough. ``generation`` changes on every drop or clear, so a batch that read the cache
before such a change does not write its states back afterwards.

>>> from kernels.states import StreamStates
>>> cache = StateCache(lambda n: StreamStates.zeros(n, 1, 2, 1), max_entries=2, max_age=60.0)
>>> st = StreamStates.zeros(2, 1, 2, 1); st.steps[:] = [5, 7]
>>> cache.put(["a", "b"], st, [0, 0], [10, 11], [0, 0], [1.0, 2.0], [None, "e"], now=0.0)
>>> cache.split(["b", "x", "a"], now=1.0)
([0, 2], [1])
>>> states, start = cache.get(["b", "a"])
>>> states.steps.tolist(), start.offset.tolist(), start.event_id
([7, 5], [11, 10], ['e', None])
>>> cache.split(["a"], now=61.0)  # too old: read it from Redis again
([], [0])
>>> cache.put(["c"], st.take([0]), [0], [3], [0], [3.0], [None], now=62.0)  # full: "b" was used least recently
>>> sorted(cache.ids()), cache.evictions, round(cache.hit_rate, 2)
(['a', 'c'], 1, 0.5)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

import numpy as np

from kernels.states import StreamStates
from worker.plan import Start


class StateCache:
    """States by stream id: at most ``max_entries`` (least recently used evicted first), each
    read from Redis at most ``max_age`` seconds ago (then read again, so a change made behind
    the worker's back, e.g. ``lstream state reset``, is seen within that time)."""

    def __init__(self, fresh: Callable[[int], StreamStates], *, max_entries: int = 50_000,
                 max_age: float = 30.0) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries: expected at least 1, got {max_entries}")
        self.fresh = fresh
        self.max_entries = max_entries
        self.max_age = max_age
        self.generation = 0
        self.hits = 0  # lookups answered from memory
        self.misses = 0  # lookups that needed Redis
        self.evictions = 0  # entries dropped to stay within max_entries
        self._slot: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self._free: list[int] = []
        self._cap = 0
        self._arena = fresh(0)
        self._pos = np.zeros((0, 3), np.int64)  # partition, offset, index
        self._ts = np.zeros(0)
        self._born = np.zeros(0)  # when the chain of this entry was last read from Redis
        self._eid: list[str | None] = []
        one = fresh(1)
        self.entry_bytes = sum(getattr(one, f.name).nbytes for f in fields(one)) + 3 * 8 + 2 * 8

    def __len__(self) -> int:
        return len(self._slot)

    def ids(self) -> list[str]:
        return list(self._slot)

    @property
    def hit_rate(self) -> float:
        """Share of lookups answered from memory since start (0 before any)."""
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    @property
    def nbytes(self) -> int:
        """Memory the held entries take (the arena may have room for more)."""
        return len(self._slot) * self.entry_bytes

    def clear(self) -> None:
        self._slot.clear()
        self._free = list(range(self._cap))
        self.generation += 1

    def drop(self, ids: Sequence[str]) -> None:
        for s in ids:
            k = self._slot.pop(s, None)
            if k is not None:
                self._free.append(k)
        self.generation += 1

    def split(self, ids: Sequence[str], now: float) -> tuple[list[int], list[int]]:
        """Positions in ``ids`` of the streams held (and young enough) and of the others."""
        hit: list[int] = []
        miss: list[int] = []
        slot, born, limit = self._slot, self._born, now - self.max_age
        for i, s in enumerate(ids):
            k = slot.get(s)
            if k is not None and born[k] >= limit:
                hit.append(i)
                slot.move_to_end(s)
            else:
                miss.append(i)
        self.hits += len(hit)
        self.misses += len(miss)
        return hit, miss

    def get(self, ids: Sequence[str]) -> tuple[StreamStates, Start]:
        """Copies of the held states of ``ids`` (all must be held) and their positions."""
        slots = np.fromiter((self._slot[s] for s in ids), np.int64, len(ids))
        n = len(ids)
        pos = self._pos[slots]
        start = Start(pos[:, 0].copy(), pos[:, 1].copy(), pos[:, 2].copy(), self._ts[slots],
                      [self._eid[k] for k in slots.tolist()], np.ones(n, bool), np.zeros(n, bool), [None] * n)
        return self._arena.take(slots), start

    def born(self, ids: Sequence[str]) -> np.ndarray:
        """When each held stream's chain was read from Redis (for entries that carry on)."""
        return self._born[[self._slot[s] for s in ids]]

    def put(self, ids: Sequence[str], states: StreamStates, partitions: Any, offsets: Any, indexes: Any,
            ts: Any, event_ids: Sequence[str | None], now: float | np.ndarray) -> None:
        """Hold ``states`` (row i: ``ids[i]``) at their positions; ``now``: when read from Redis."""
        n = len(ids)
        rows = np.arange(n)
        if n > self.max_entries:  # hold the last ones only
            rows = rows[n - self.max_entries:]
        slot = self._slot
        new = 0
        for i in rows.tolist():  # the batch's own streams become the most recent: never evicted below
            if ids[i] in slot:
                slot.move_to_end(ids[i])
            else:
                new += 1
        while len(slot) + new > self.max_entries:
            _, k = slot.popitem(last=False)
            self._free.append(k)
            self.evictions += 1
        slots = np.empty(len(rows), np.int64)
        for j, i in enumerate(rows.tolist()):
            s = ids[i]
            held = slot.get(s)
            if held is None:
                if not self._free:
                    self._grow(max(len(rows), self._cap))
                held = slot[s] = self._free.pop()
            else:
                slot.move_to_end(s)
            slots[j] = held
        sub = states if len(rows) == n else states.take(rows)
        self._arena.put(slots, sub)
        self._pos[slots, 0] = np.asarray(partitions)[rows]
        self._pos[slots, 1] = np.asarray(offsets)[rows]
        self._pos[slots, 2] = np.asarray(indexes)[rows]
        self._ts[slots] = np.asarray(ts)[rows]
        self._born[slots] = np.broadcast_to(np.asarray(now, np.float64), (n,))[rows]
        eid = self._eid
        for k, i in zip(slots.tolist(), rows.tolist()):
            eid[k] = event_ids[i]

    def _grow(self, extra: int) -> None:
        extra = min(max(extra, 256), max(self.max_entries - self._cap, 1))
        self._arena = StreamStates.concat([self._arena, self.fresh(extra)])
        self._pos = np.concatenate([self._pos, np.zeros((extra, 3), np.int64)])
        self._ts = np.concatenate([self._ts, np.zeros(extra)])
        self._born = np.concatenate([self._born, np.zeros(extra)])
        self._eid.extend([None] * extra)
        self._free.extend(range(self._cap + extra - 1, self._cap - 1, -1))
        self._cap += extra
