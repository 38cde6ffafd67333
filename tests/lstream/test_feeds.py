"""lstream.feeds without a broker: merging, event ids, the late-risk check on record values."""

from __future__ import annotations

import numpy as np
import orjson

from lstream.feeds import Feed, _check_record, event_dict, first_times, gateway_of, new_run_id, readings


def _feed(sid: str, ts: list[float]) -> Feed:
    return Feed(sid, np.array(ts), np.arange(len(ts), dtype=float).reshape(-1, 1))


def test_readings_merge_by_time_and_keep_each_streams_order() -> None:
    rows = list(readings([_feed("a", [1, 3, 3, 5]), _feed("b", [2, 3, 4])]))
    assert [(r[0], r[1]) for r in rows] == [("a", 0), ("b", 0), ("a", 1), ("a", 2), ("b", 1), ("b", 2), ("a", 3)]
    assert [r[0] for r in readings([_feed("a", [1, 2, 3])], steps=2)] == ["a", "a"]
    assert len(list(readings([_feed("a", [1, 2]), _feed("b", [1, 2])], count=3))) == 3


def test_event_ids_carry_the_run() -> None:
    runs = {new_run_id() for _ in range(200)}
    assert len(runs) == 200 and all(len(r) == 8 and r.isalnum() for r in runs)
    assert event_dict("s", 4, 1.0, [2.0], "r1")["event_id"] == "s:r1:4"
    assert event_dict("s", 4, 1.0, [2.0])["event_id"] == "s:4"


def test_gateways_are_stable_and_spread() -> None:
    ids = [f"sensor-{i:03d}" for i in range(200)]
    assert [gateway_of(s, 4) for s in ids] == [gateway_of(s, 4) for s in ids]
    assert len({gateway_of(s, 4) for s in ids}) == 4


def test_late_risk_looks_into_single_events_and_gateway_batches() -> None:
    first = first_times([_feed("a", [100, 200]), _feed("b", [100]), _feed("c", [100])])
    assert first == {"a": 100.0, "b": 100.0, "c": 100.0}
    found: dict[str, float] = {}
    for value in (orjson.dumps({"stream_id": "a", "ts": 150.0}),            # newer: a risk
                  orjson.dumps([{"stream_id": "b", "ts": 90.0},             # older: no risk
                                {"stream_id": "c", "ts": 101.5}, 7]),       # newer, inside a batch
                  orjson.dumps({"stream_id": "b", "ts": 100.0}),            # equal: not late
                  orjson.dumps({"stream_id": "zz", "ts": 1e12}),            # not ours
                  b"\xff not json", None, orjson.dumps({"stream_id": "a", "ts": "2024-01-01"})):
        _check_record(value, first, found)
    assert found == {"a": 150.0, "c": 101.5}
