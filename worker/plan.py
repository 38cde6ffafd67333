"""Which events of a batch to apply, decided from the states the batch starts from (pure).

:func:`plan` walks each stream's events in order against its stored position and decides,
before anything is computed or sent, exactly what the fenced save (state/fence.lua) would
accept: an event is applied only if its position is newer than the stored one and its
``event_id`` differs from the stored one and from the previous applied event's. So outputs
are only ever sent for events whose state change will be saved (docs/exactly-once.md).

The other events are skipped or rejected:

- ``replayed``: same partition, position not newer than the stored one, event time not newer
  than the stored one: the state already reflects it (a partition read again after a crash).
- offset regression: same partition, position not newer, but an event time newer than the
  stored one. Applied events are never newer than the stored event time, so this event was
  never applied: the topic went back (recreated or truncated). Policy ``skip`` leaves it
  (counted); ``apply`` treats the partition's offsets as a fresh history for that stream.
- ``bad_state`` (unreadable stored state), ``model_mismatch`` (state of another model under
  policy ``refuse``), ``duplicate`` (a repeated ``event_id``), ``late`` (older than the last
  applied event): dead letters.

>>> import numpy as np
>>> from worker.events import Event
>>> ev = lambda off, ts, eid=None: Event("s", ts, np.zeros(1), eid, 0, off)
>>> start = Start.fresh(1)
>>> start.found[0], start.partition[0], start.offset[0], start.ts[0], start.event_id[0] = True, 0, 5, 100.0, "e5"
>>> p = plan(["s"], {"s": [ev(4, 99.0), ev(5, 100.0), ev(6, 101.0, "e5"), ev(7, 98.0), ev(8, 102.0)]}, start,
...          topic="t", version="m")
>>> [e.offset for e in p.events[0]], p.replayed, [(r.code, r.offset) for r in p.rejected]
([8], 2, [('duplicate', 6), ('late', 7)])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from worker.events import BAD_STATE, DUPLICATE, LATE, MODEL_MISMATCH, Event, Rejection

SKIP, APPLY = "skip", "apply"  # offset_regression policies


@dataclass
class Start:
    """Per stream (row i), what the batch starts from: the stored (or held) position."""

    partition: np.ndarray  # int64; -1 where nothing is stored
    offset: np.ndarray  # int64
    index: np.ndarray  # int64: element of a gateway batch (0 for a single event)
    ts: np.ndarray  # float64: event time of the last applied event; NaN where nothing is stored
    event_id: list[str | None]
    found: np.ndarray  # bool: a state is stored
    other_model: np.ndarray  # bool: it belongs to another model version (started fresh)
    unreadable: list[str | None]  # why the stored state cannot be read, None where it can

    @classmethod
    def fresh(cls, n: int) -> Start:
        return cls(np.full(n, -1, np.int64), np.full(n, -1, np.int64), np.zeros(n, np.int64), np.full(n, np.nan),
                   [None] * n, np.zeros(n, bool), np.zeros(n, bool), [None] * n)

    @classmethod
    def concat(cls, parts: Sequence[Start]) -> Start:
        def arr(name: str) -> np.ndarray:
            return np.concatenate([getattr(p, name) for p in parts])

        return cls(arr("partition"), arr("offset"), arr("index"), arr("ts"), [e for p in parts for e in p.event_id],
                   arr("found"), arr("other_model"), [u for p in parts for u in p.unreadable])


@dataclass
class Plan:
    """Row r: stream ``ids[r]`` (row ``rows[r]`` of the loaded states) applies ``events[r]``."""

    ids: list[str] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    events: list[list[Event]] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    replayed: int = 0
    regressed: int = 0  # events behind the stored position that were never applied
    rewound: list[str] = field(default_factory=list)  # streams whose position restarts (policy apply)


def plan(ids: Sequence[str], groups: dict[str, list[Event]], start: Start, *, topic: str, version: str,
         refuse_other_model: bool = False, offset_regression: str = SKIP) -> Plan:
    """Decide per stream (``groups[ids[i]]``, in order, against row i of ``start``)."""
    if offset_regression not in (SKIP, APPLY):
        raise ValueError(f"offset_regression: expected 'skip' or 'apply', got {offset_regression!r}")
    out = Plan()

    def reject(e: Event, code: str, detail: str) -> None:
        out.rejected.append(Rejection(code, detail, topic, e.partition, e.offset, e.key, e.raw_bytes(), e.index,
                                      e.stream_id))

    for i, sid in enumerate(ids):
        found = bool(start.found[i])
        part, pos = int(start.partition[i]), (int(start.offset[i]), int(start.index[i]))
        stored_ts = float(start.ts[i]) if found else math.nan
        stored_eid = start.event_id[i] if found else None
        last_ts, last_eid = stored_ts, stored_eid
        problem = start.unreadable[i]
        refuse = refuse_other_model and bool(start.other_model[i])
        rewound = False
        todo: list[Event] = []
        for e in groups[sid]:
            if problem is not None:
                reject(e, BAD_STATE, f"expected a readable stored state for stream {sid!r}, got {problem}")
                continue
            if found and not rewound and e.partition == part and (e.offset, e.index or 0) <= pos:
                if not e.ts > stored_ts:
                    out.replayed += 1  # already in the stored state
                    continue
                out.regressed += 1
                if offset_regression == SKIP:
                    continue
                rewound = True  # policy apply: this partition's offsets start a fresh history
            if refuse:
                reject(e, MODEL_MISMATCH, f"expected a state of model {version}, got one of another model "
                                          "(policy refuse; 'lstream state reset' starts the stream fresh)")
                continue
            if e.event_id is not None and (e.event_id == last_eid or e.event_id == stored_eid):
                reject(e, DUPLICATE, f"expected a new event_id, got {e.event_id!r} again (already applied)")
                continue
            if not math.isnan(last_ts) and e.ts < last_ts:
                reject(e, LATE, f"expected ts >= {last_ts!r} (the stream's last applied event), got {e.ts!r}")
                continue
            todo.append(e)
            last_ts, last_eid = e.ts, e.event_id
        if todo:
            out.ids.append(sid)
            out.rows.append(i)
            out.events.append(todo)
            if rewound:
                out.rewound.append(sid)
    return out
