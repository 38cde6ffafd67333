"""worker/plan.py (pure): what a batch applies, decided from the stored positions alone."""

from __future__ import annotations

import numpy as np
import pytest

from worker.events import Event
from worker.plan import Start, plan


def _ev(off: int, ts: float, eid: str | None = None, part: int = 0, index: int | None = None) -> Event:
    return Event("s", ts, np.zeros(1), eid, part, off, index)


def _start(part: int = 0, off: int = 100, ts: float = 1000.0, eid: str | None = "e100") -> Start:
    st = Start.fresh(1)
    st.found[0], st.partition[0], st.offset[0], st.index[0], st.ts[0], st.event_id[0] = True, part, off, 0, ts, eid
    return st


def _plan(events, start=None, **kw):
    return plan(["s"], {"s": events}, start if start is not None else _start(), topic="t", version="m", **kw)


def test_reused_event_ids_are_refused_before_anything_is_computed():
    # Issue 12.9: a second `produce --synthetic` reuses event ids 0..4; the stored state's last
    # applied event_id is "e4". The fence refuses a save whose event_id equals the stored one,
    # so the plan must refuse it too (no output for it) and apply the others.
    events = [_ev(101 + k, 2000.0 + k, f"e{k}") for k in range(5)]
    p = _plan(events, _start(eid="e4"))
    assert [e.event_id for e in p.events[0]] == ["e0", "e1", "e2", "e3"]
    assert [(r.code, r.offset) for r in p.rejected] == [("duplicate", 105)]
    # What the fence will see: the last planned event_id never equals the stored one.
    assert p.events[0][-1].event_id != "e4"


def test_replays_are_skipped_and_a_regressed_topic_is_detected_per_stream():
    # Offsets at or below the stored one with event times not newer: a replay after a crash.
    replay = [_ev(98, 998.0), _ev(99, 999.0), _ev(100, 1000.0)]
    p = _plan(replay)
    assert p.replayed == 3 and p.regressed == 0 and not p.ids
    # Offsets below the stored one but newer event times: the topic went back (recreated).
    fresh = [_ev(0, 1001.0), _ev(1, 1002.0)]
    skip = _plan(fresh)
    assert skip.regressed == 2 and skip.replayed == 0 and not skip.ids
    applied = _plan(fresh, offset_regression="apply")
    assert applied.regressed == 1 and [e.offset for e in applied.events[0]] == [0, 1] and applied.rewound == ["s"]
    with pytest.raises(ValueError, match="offset_regression"):
        _plan(fresh, offset_regression="maybe")


def test_other_partition_late_and_gateway_positions():
    st = _start()
    p = _plan([_ev(5, 999.0, part=1), _ev(6, 1000.0, part=1), _ev(100, 1001.0, index=2),
               _ev(100, 1000.0, index=0)], st)
    # another partition: event time decides (the fence's rule); same offset, a higher gateway
    # index is newer; index 0 at the stored offset is not.
    assert [r.code for r in p.rejected] == ["late"]
    assert [(e.partition, e.offset, e.index) for e in p.events[0]] == [(1, 6, None), (0, 100, 2)]
    assert p.replayed == 1


def test_unreadable_state_and_model_mismatch_reject_only_their_stream():
    st = Start.concat([_start(), _start(), _start()])
    st.unreadable[0] = "field 'steps': expected an integer, got b'abc'"
    st.other_model[1] = True
    groups = {sid: [Event(sid, 2000.0, np.zeros(1), None, 0, 200)] for sid in "abc"}
    p = plan(["a", "b", "c"], groups, st, topic="t", version="m", refuse_other_model=True)
    assert [(r.stream_id, r.code) for r in p.rejected] == [("a", "bad_state"), ("b", "model_mismatch")]
    assert "steps" in p.rejected[0].detail
    assert p.ids == ["c"] and p.rows == [2]
