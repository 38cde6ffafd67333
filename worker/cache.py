"""Write-through copies of the stream states this worker saved last (skip the Redis load).

:class:`StateCache` keeps, per stream id, the state the pipeline computed and is saving (or
saved), with the position it reflects (partition, offset, index, ts, event_id). All states
live in one :class:`kernels.engine.StreamStates` arena, so a batch's states are gathered and
written back with numpy fancy indexing, not per stream.

The copies are only ever a shortcut for a load: Redis, with its fenced saves, stays the
source of truth. The pipeline drops entries whenever they might differ from what Redis holds
(worker/pipeline.py explains when and why that is enough). ``generation`` changes on every
drop or clear, so a batch that read the cache before such a change does not write its
states back afterwards.

>>> import numpy as np
>>> from kernels.states import StreamStates
>>> cache = StateCache(lambda n: StreamStates.zeros(n, 1, 2, 1), max_entries=3, max_age=60.0)
>>> st = StreamStates.zeros(2, 1, 2, 1); st.steps[:] = [5, 7]
>>> cache.put(["a", "b"], st, [0, 0], [10, 11], [0, 0], [1.0, 2.0], [None, "e"], now=0.0)
>>> hit, miss = cache.split(["b", "x", "a"], now=1.0)
>>> hit, miss
([0, 2], [1])
>>> got = cache.get(["b", "a"])
>>> got.states.steps.tolist(), got.offset.tolist(), got.event_id
([7, 5], [11, 10], ['e', None])
>>> cache.split(["a"], now=61.0)  # too old: read it from Redis again
([], [0])
>>> cache.drop(["a"]); len(cache)
1
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from kernels.states import StreamStates
from state.store import Loaded


class StateCache:
    """States by stream id, at most ``max_entries`` (then everything is dropped: simple, and
    rare), each read from Redis at most ``max_age`` seconds ago (then it is read again, so a
    change made behind the worker's back, e.g. ``lstream state reset``, is seen within that
    time)."""

    def __init__(self, fresh: Callable[[int], StreamStates], *, max_entries: int = 50_000,
                 max_age: float = 30.0) -> None:
        self.fresh = fresh
        self.max_entries = max_entries
        self.max_age = max_age
        self.generation = 0
        self._slot: dict[str, int] = {}
        self._free: list[int] = []
        self._cap = 0
        self._arena = fresh(0)
        self._pos = np.zeros((0, 3), np.int64)  # partition, offset, index
        self._ts = np.zeros(0)
        self._born = np.zeros(0)  # when the chain of this entry was last read from Redis
        self._eid: list[str | None] = []
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._slot)

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
            else:
                miss.append(i)
        self.hits += len(hit)
        self.misses += len(miss)
        return hit, miss

    def get(self, ids: Sequence[str]) -> Loaded:
        """Copies of the held states of ``ids`` (all must be held), as a load would return them."""
        slots = np.fromiter((self._slot[s] for s in ids), np.int64, len(ids))
        n = len(ids)
        pos = self._pos[slots]
        return Loaded(self._arena.take(slots), pos[:, 0].copy(), pos[:, 1].copy(), pos[:, 2].copy(),
                      self._ts[slots], [self._eid[k] for k in slots.tolist()], np.ones(n, bool),
                      np.zeros(n, bool))

    def born(self, ids: Sequence[str]) -> np.ndarray:
        """When each held stream's chain was read from Redis (for entries that carry on)."""
        return self._born[[self._slot[s] for s in ids]]

    def put(self, ids: Sequence[str], states: StreamStates, partitions: Any, offsets: Any, indexes: Any,
            ts: Any, event_ids: Sequence[str | None], now: float | np.ndarray) -> None:
        """Hold ``states`` (row i: ``ids[i]``) at their positions; ``now``: when read from Redis."""
        n = len(ids)
        if len(self._slot) + n > self.max_entries:
            self.clear()
        slots = np.empty(n, np.int64)
        for i, s in enumerate(ids):
            k = self._slot.get(s)
            if k is None:
                if not self._free:
                    self._grow(max(n, self._cap))
                k = self._slot[s] = self._free.pop()
            slots[i] = k
        self._arena.put(slots, states)
        self._pos[slots, 0] = partitions
        self._pos[slots, 1] = offsets
        self._pos[slots, 2] = indexes
        self._ts[slots] = ts
        self._born[slots] = now
        eid = self._eid
        for k, e in zip(slots.tolist(), event_ids):
            eid[k] = e

    def _grow(self, extra: int) -> None:
        extra = max(extra, 256)
        self._arena = StreamStates.concat([self._arena, self.fresh(extra)])
        self._pos = np.concatenate([self._pos, np.zeros((extra, 3), np.int64)])
        self._ts = np.concatenate([self._ts, np.zeros(extra)])
        self._born = np.concatenate([self._born, np.zeros(extra)])
        self._eid.extend([None] * extra)
        self._free.extend(range(self._cap + extra - 1, self._cap - 1, -1))
        self._cap += extra
