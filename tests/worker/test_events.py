"""worker/events.py: decoding and checking raw input messages (pure, no services)."""

from __future__ import annotations

import base64
import re

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker import events as ev
from worker.encode import RAW_KEEP
from worker.encode import dead_letter_doc as dead_letter
from worker.events import RawMessage, decode_batch, parse_ts


def one(value: bytes | None, key: bytes | None = b"s1", f: int = 1, max_bytes: int = 1_000_000):
    events, rejected = decode_batch([RawMessage(key, value, 2, 40)], "in", f, max_bytes)
    return events, rejected


def code_of(value: bytes | None, key: bytes | None = b"s1", f: int = 1, max_bytes: int = 1_000_000) -> str:
    events, rejected = one(value, key, f, max_bytes)
    assert not events and len(rejected) == 1, (events, rejected)
    return rejected[0].code


def j(**kw) -> bytes:
    return orjson.dumps(kw)


def test_single_event_fields():
    (e,), rej = one(j(stream_id="s1", ts=12.5, values=[1, 2.5], event_id="x-1"), f=2)
    assert not rej
    assert (e.stream_id, e.ts, e.values.tolist(), e.event_id, e.partition, e.offset, e.index) == \
        ("s1", 12.5, [1.0, 2.5], "x-1", 2, 40, None)
    assert e.values.dtype.name == "float64" and e.position == (2, 40, 0)


def test_value_shortcut_for_one_feature_and_no_key():
    (e,), _ = one(j(stream_id="s1", ts=1, value=3), key=None)
    assert e.values.tolist() == [3.0]
    (e,), _ = one(j(stream_id="s1", ts=1, value=3), key=b"")  # an empty key counts as none
    assert e.stream_id == "s1"


@pytest.mark.parametrize("value, code", [
    (None, "bad_json"),
    (b"", "bad_json"),
    (b"{", "bad_json"),
    (b"\xff\xfe", "bad_json"),
    (b"NaN", "bad_json"),
    (b"42", "bad_schema"),
    (b'"text"', "bad_schema"),
    (b"null", "bad_schema"),
    (b"[]", "bad_schema"),
    (j(ts=1, values=[1]), "bad_schema"),
    (j(stream_id="s1", values=[1]), "bad_schema"),
    (j(stream_id="s1", ts=1), "bad_schema"),
    (j(stream_id="s1", ts=1, values=[1], value=1), "bad_schema"),
    (j(stream_id="s1", ts=1, values=[1], event_id=7), "bad_schema"),
    (j(stream_id="s1", ts=1, values=[1], event_id=""), "bad_schema"),
    (j(stream_id="s1", ts=1, values=[1], event_id="e" * 201), "bad_schema"),
    (j(stream_id="", ts=1, values=[1]), "bad_stream_id"),
    (j(stream_id="a b", ts=1, values=[1]), "bad_stream_id"),
    (j(stream_id="x" * 201, ts=1, values=[1]), "bad_stream_id"),
    (j(stream_id=5, ts=1, values=[1]), "bad_stream_id"),
    (j(stream_id="pümp", ts=1, values=[1]), "bad_stream_id"),
    (j(stream_id="s2", ts=1, values=[1]), "key_mismatch"),
    (j(stream_id="s1", ts=1, values=[]), "bad_values"),
    (j(stream_id="s1", ts=1, values=[1, 2]), "bad_values"),
    (j(stream_id="s1", ts=1, values=["1"]), "bad_values"),
    (j(stream_id="s1", ts=1, values=[True]), "bad_values"),
    (j(stream_id="s1", ts=1, values=[None]), "bad_values"),
    (j(stream_id="s1", ts=1, values=1.0), "bad_values"),
    (b'{"stream_id": "s1", "ts": 1, "values": [1e999]}', "bad_json"),  # orjson refuses overflowing numbers
    (j(stream_id="s1", ts=1, value="1"), "bad_values"),
    (j(stream_id="s1", ts="yesterday", values=[1]), "bad_ts"),
    (j(stream_id="s1", ts="2024-01-01T00:00:00", values=[1]), "bad_ts"),
    (j(stream_id="s1", ts="2024-02-30T00:00:00Z", values=[1]), "bad_ts"),
    (j(stream_id="s1", ts=None, values=[1]), "bad_ts"),
    (j(stream_id="s1", ts=True, values=[1]), "bad_ts"),
    (j(stream_id="s1", ts=[1], values=[1]), "bad_ts"),
    (b'{"stream_id": "s1", "ts": 1e999, "values": [1]}', "bad_json"),
])
def test_rejection_codes(value, code):
    assert code_of(value) == code


def test_two_features_reject_the_value_shortcut():
    assert code_of(j(stream_id="s1", ts=1, value=1.0), f=2) == "bad_values"


def test_too_large_is_checked_before_parsing_and_truncated_in_the_dead_letter():
    big = j(stream_id="s1", ts=1, values=[1], pad="x" * 10_000)
    _, (r,) = one(big, max_bytes=5000)
    assert r.code == "too_large" and r.detail == f"expected at most 5000 bytes, got {len(big)}"
    d = dead_letter(r)
    assert d["raw_truncated"] is True and len(d["raw"]) == RAW_KEEP and big.decode().startswith(d["raw"])


def test_details_say_expected_and_got():
    _, (r,) = one(j(stream_id="s1", ts=1, values=[1]), f=2)
    assert r.detail == "expected 2 finite numbers, got 1"
    _, (r,) = one(j(stream_id="s2", ts=1, values=[1]))
    assert r.detail == "expected the message key to equal stream_id 's2', got 's1'"
    _, (r,) = one(j(stream_id="s1", ts=1, values=[1, "x"]), f=2)
    assert r.detail == "expected 2 finite numbers, got str at position 1"


def test_gateway_batch_checks_each_element_and_keeps_order():
    batch = orjson.dumps([
        {"stream_id": "a", "ts": 1, "value": 1},
        {"stream_id": "b", "ts": 1, "values": [1, 2]},
        "not an event",
        {"stream_id": "a", "ts": 2, "value": 2, "event_id": "e2"},
    ])
    events, rejected = decode_batch([RawMessage(b"gw-1", batch, 0, 9)], "in", 1)
    assert [(e.stream_id, e.index, e.values.tolist()) for e in events] == [("a", 0, [1.0]), ("a", 3, [2.0])]
    assert [(r.code, r.index) for r in rejected] == [("bad_values", 1), ("bad_schema", 2)]
    d = dead_letter(rejected[0])
    assert d["source"] == {"topic": "in", "partition": 0, "offset": 9, "index": 1}
    assert d["key"] == "gw-1" and orjson.loads(d["raw"]) == {"stream_id": "b", "ts": 1, "values": [1, 2]}
    assert d["stream_id"] == "b"
    assert events[1].raw_bytes() == orjson.dumps({"stream_id": "a", "ts": 2, "value": 2, "event_id": "e2"})
    # The key of a gateway batch names the gateway: it is not compared with stream ids.
    assert events[0].key == b"gw-1"


def test_dead_letter_of_binary_message_is_base64():
    _, (r,) = one(b"\x00\x01\xff", key=b"\xfe")
    d = dead_letter(r)
    assert d["raw_b64"] is True and base64.b64decode(d["raw"]) == b"\x00\x01\xff"
    assert d["key_b64"] is True and base64.b64decode(d["key"]) == b"\xfe"
    assert set(d) >= {"error", "detail", "source", "key", "raw"}


def test_messages_keep_their_order_across_a_batch():
    msgs = [RawMessage(b"s", j(stream_id="s", ts=i, value=i), 0, i) for i in range(5)]
    msgs.insert(2, RawMessage(b"s", b"oops", 0, 99))
    events, rejected = decode_batch(msgs, "in", 1)
    assert [e.offset for e in events] == [0, 1, 2, 3, 4] and [r.offset for r in rejected] == [99]


@pytest.mark.parametrize("text, want", [
    ("2024-11-26T19:40:00Z", 1732650000.0),
    ("2024-11-26t19:40:00z", 1732650000.0),
    ("2024-11-26T19:40:00.125Z", 1732650000.125),
    ("2024-11-26T21:40:00+02:00", 1732650000.0),
    ("2024-11-26T14:40:00.5-05:00", 1732650000.5),
    ("1970-01-01T00:00:00Z", 0.0),
])
def test_rfc3339(text, want):
    assert parse_ts(text) == want


@settings(max_examples=40, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False, width=64), st.lists(
    st.floats(allow_nan=False, allow_infinity=False), min_size=3, max_size=3))
def test_numbers_round_trip_exactly(ts, values):
    (e,), _ = one(j(stream_id="s1", ts=ts, values=values), f=3)
    assert e.ts == ts and e.values.tolist() == values


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=64))
def test_arbitrary_bytes_never_raise(raw):
    events, rejected = decode_batch([RawMessage(None, raw, 0, 0)], "in", 1)
    assert len(events) + len(rejected) >= 1 or raw.strip().startswith(b"[")
    for r in rejected:
        assert r.code in ev.CODES
        d = dead_letter(r)
        orjson.dumps(d)
        assert d["error"] == r.code and r.detail.startswith(d["detail"].removesuffix("..."))
        # Every detail says what was expected and what came, and neither part is empty.
        assert re.fullmatch(r"expected \S.*, got \S.*", r.detail, re.DOTALL), r.detail


def test_door_limits_reject_magnitudes_and_implausible_times_per_element():
    now = 1_800_000_000.0
    limits = ev.Limits.for_model({"mode": "global", "mean": [5.0, 0.0], "std": [2.0, 1e-3]}, 2, max_skew=3600.0,
                                 clock=lambda: now)
    assert limits.max_abs.tolist() == [5.0 + 2e15, 1e12]
    gateway = orjson.dumps([{"stream_id": "a", "ts": now, "values": [1.0, 1e12]},  # at the limit: fine
                            {"stream_id": "b", "ts": now, "values": [1.0, -2e12]},  # beyond, scaled by std 1e-3
                            {"stream_id": "c", "ts": now + 3600.5, "values": [1.0, 1.0]},  # too far ahead
                            {"stream_id": "d", "ts": -0.5, "values": [1.0, 1.0]},  # before 1970
                            {"stream_id": "e", "ts": now + 3599, "values": [1e300, 1.0]}])
    single = orjson.dumps({"stream_id": "s1", "ts": "0001-01-01T00:00:00Z", "values": [1, 1]})
    events, rejected = decode_batch([RawMessage(b"gw", gateway, 0, 1), RawMessage(b"s1", single, 0, 2)], "in", 2,
                                    limits=limits)
    assert [e.stream_id for e in events] == ["a"]
    assert [(r.stream_id, r.code, r.index) for r in rejected] == [
        ("b", "bad_values", 1), ("c", "bad_ts", 2), ("d", "bad_ts", 3), ("e", "bad_values", 4), ("s1", "bad_ts", None)]
    assert rejected[0].detail == ("expected readings of magnitude at most 1e+12 (what the model can take), "
                                  "got -2000000000000.0 at position 1")
    assert orjson.loads(rejected[1].raw)["stream_id"] == "c"
