"""Decode and check a batch of raw input messages (pure: no Kafka, no Redis, no Faust).

A message carries one event (a JSON object) or a gateway batch (a JSON array of events).
:func:`decode_batch` turns the raw messages of one micro-batch into the accepted
:class:`Event` s, in message order, and the :class:`Rejection` s (dead letters) with their
contract codes. :class:`Limits` are the sanity limits at the door (magnitudes the model can
take, a plausible event-time window). ``duplicate``, ``late`` and the other codes that need
the stream's state are decided later (worker/plan.py); worker/encode.py writes dead letters.

>>> msgs = [RawMessage(b"pump-1", b'{"stream_id": "pump-1", "ts": 10, "values": [0.5]}', 0, 7),
...         RawMessage(b"pump-2", b'{"stream_id": "pump-2", "ts": 11, "value": "x"}', 0, 8),
...         RawMessage(b"gw", b'[{"stream_id": "a", "ts": "1970-01-01T00:00:12Z", "value": 1},'
...                            b' {"stream_id": "b c", "ts": 12, "value": 2}]', 1, 3)]
>>> events, rejected = decode_batch(msgs, "sensor-events", num_features=1)
>>> [(e.stream_id, e.ts, e.values.tolist(), e.position, e.index) for e in events]
[('pump-1', 10.0, [0.5], (0, 7, 0), None), ('a', 12.0, [1.0], (1, 3, 0), 0)]
>>> [(r.code, r.detail) for r in rejected]
[('bad_values', "expected 'value' to be a finite number, got str"), \
('bad_stream_id', "expected 1 to 200 characters of A-Z a-z 0-9 . _ : / @ -, got 'b c'")]
>>> (rejected[1].partition, rejected[1].offset, rejected[1].index)
(1, 3, 1)
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import orjson

# Dead-letter codes (contract). DUPLICATE and LATE are decided against the stream's state.
BAD_JSON = "bad_json"
BAD_SCHEMA = "bad_schema"
BAD_STREAM_ID = "bad_stream_id"
KEY_MISMATCH = "key_mismatch"
BAD_VALUES = "bad_values"
BAD_TS = "bad_ts"
TOO_LARGE = "too_large"
DUPLICATE = "duplicate"
LATE = "late"
MODEL_MISMATCH = "model_mismatch"  # state of another model version, policy "refuse"
BAD_STATE = "bad_state"  # the stream's stored state cannot be read
FAILED = "failed"  # processing failed for a reason retrying does not cure
CODES = (BAD_JSON, BAD_SCHEMA, BAD_STREAM_ID, KEY_MISMATCH, BAD_VALUES, BAD_TS, TOO_LARGE,
         DUPLICATE, LATE, MODEL_MISMATCH, BAD_STATE, FAILED)

STREAM_ID = re.compile(r"[A-Za-z0-9._:/@-]{1,200}\Z")
MAX_EVENT_ID = 200
# RFC 3339 date-time: full date, 'T' (or space), time, optional fraction, 'Z' or an offset.
RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})\Z")
FIELDS = ("stream_id", "ts", "values", "value", "event_id")


@dataclass(frozen=True, slots=True)
class RawMessage:
    """One input record as the consumer hands it over."""

    key: bytes | None
    value: bytes | None
    partition: int
    offset: int


@dataclass(slots=True)
class Event:
    """A checked event. ``index`` is its place in a gateway batch, None for a single event."""

    stream_id: str
    ts: float
    values: np.ndarray  # float64 (F,)
    event_id: str | None
    partition: int
    offset: int
    index: int | None = None
    key: bytes | None = None  # the message key (for a dead letter decided later)
    raw: bytes | None = None  # the message bytes (single event) ...
    item: Any = None  # ... or the parsed element (gateway batch), serialised only if needed

    def raw_bytes(self) -> bytes | None:
        """The bytes a dead letter of this event carries."""
        return self.raw if self.raw is not None else orjson.dumps(self.item)

    @property
    def position(self) -> tuple[int, int, int]:
        """(partition, offset, index) as the state stores it; a single event has index 0."""
        return (self.partition, self.offset, self.index or 0)


@dataclass(slots=True)
class Rejection:
    """A message (or one element of a gateway batch) that goes to the dead-letter topic."""

    code: str
    detail: str
    topic: str
    partition: int
    offset: int
    key: bytes | None
    raw: bytes | None  # the original bytes (for a batch element: that element as JSON)
    index: int | None = None
    stream_id: str | None = None


# A reading is accepted only if, scaled by the model's global normalisation, it stays under
# MAX_SCALED standard deviations: then no float32 the kernels compute from it (the scaled
# value, its square in the detector) can overflow.
MAX_SCALED = 1e15


@dataclass(frozen=True)
class Limits:
    """Sanity limits at the door: ``max_abs`` (F,) the largest |reading| per feature; ``ts``
    from ``ts_min`` (1970) to ``max_skew`` seconds past ``clock()`` (the worker's clock)."""

    max_abs: np.ndarray
    max_skew: float = 86400.0
    ts_min: float = 0.0
    clock: Callable[[], float] = time.time

    @classmethod
    def for_model(cls, norm: dict[str, Any], num_features: int, *, max_value: float = 1e30,
                  max_skew: float = 86400.0, clock: Callable[[], float] = time.time) -> Limits:
        """``max_value`` for every feature, tighter where a global normalisation would scale a
        reading past :data:`MAX_SCALED`.

        >>> Limits.for_model({"mode": "global", "mean": [5.0], "std": [2.0]}, 1).max_abs.tolist()
        [2000000000000005.0]
        >>> Limits.for_model({"mode": "stream"}, 2, max_value=1e9).max_abs.tolist()
        [1000000000.0, 1000000000.0]
        """
        lim = np.full(num_features, float(max_value))
        if norm.get("mode") == "global":
            mean = np.abs(np.asarray(norm["mean"], np.float64))
            std = np.asarray(norm["std"], np.float64)
            lim = np.minimum(lim, mean + MAX_SCALED * std)
        return cls(lim, max_skew, 0.0, clock)

    def check(self, events: list[Event], topic: str, rejected: list[Rejection]) -> list[Event]:
        """The events within the limits; the others are appended to ``rejected``."""
        if not events:
            return events
        vals = np.array([e.values for e in events])
        ts = np.array([e.ts for e in events])
        latest = self.clock() + self.max_skew
        bad_v = (np.abs(vals) > self.max_abs).any(axis=1)
        bad_t = (ts < self.ts_min) | (ts > latest)
        if not (bad_v.any() or bad_t.any()):
            return events
        keep = []
        for e, bv, bt in zip(events, bad_v.tolist(), bad_t.tolist()):
            if bv:
                j = int(np.flatnonzero(np.abs(e.values) > self.max_abs)[0])
                code, detail = BAD_VALUES, (f"expected readings of magnitude at most {self.max_abs[j]:.3g} (what the "
                                            f"model can take), got {float(e.values[j])!r} at position {j}")
            elif bt:
                code, detail = BAD_TS, (f"expected 'ts' from {self.ts_min:.0f} (1970) to {latest:.0f} (the worker's "
                                        f"clock plus {self.max_skew:g} s), got {e.ts!r}")
            else:
                keep.append(e)
                continue
            rejected.append(Rejection(code, detail, topic, e.partition, e.offset, e.key, e.raw_bytes(), e.index,
                                      e.stream_id))
        return keep


class Invalid(Exception):
    """One check failed: ``code`` and a detail that says what was expected and what came."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


def _type_name(v: Any) -> str:
    return {type(None): "null", bool: "boolean", str: "str", dict: "object", list: "array"}.get(
        type(v), type(v).__name__)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_ts(v: Any) -> float:
    """Event time in epoch seconds from a number or an RFC 3339 string.

    >>> parse_ts(1732650000.25), parse_ts("2024-11-26T19:40:00.25Z"), parse_ts("2024-11-26 20:40:00+01:00")
    (1732650000.25, 1732650000.25, 1732650000.0)
    >>> parse_ts("2024-11-26T19:40:00")
    Traceback (most recent call last):
    ...
    worker.events.Invalid: expected 'ts' as seconds since the epoch or an RFC 3339 time with a zone, got '2024-11-26T19:40:00'
    """  # noqa: E501
    if _is_number(v):
        ts = float(v)
        if not math.isfinite(ts):
            raise Invalid(BAD_TS, f"expected 'ts' to be a finite number, got {v!r}")
        return ts
    if isinstance(v, str):
        m = RFC3339.match(v)
        if m:
            zone = m.group(8)
            text = f"{m.group(1)}-{m.group(2)}-{m.group(3)}T{m.group(4)}:{m.group(5)}:{m.group(6)}"
            frac = m.group(7) or ""
            try:
                base = datetime.fromisoformat(text + ("+00:00" if zone in ("Z", "z") else zone))
            except ValueError:
                raise Invalid(BAD_TS, f"expected 'ts' to be a valid RFC 3339 time, got {v!r}") from None
            # The fraction is added exactly as written (datetime keeps only microseconds).
            return base.timestamp() + (float(frac) if frac else 0.0)
        raise Invalid(BAD_TS, "expected 'ts' as seconds since the epoch or an RFC 3339 time with a zone, "
                              f"got {v[:60]!r}")
    raise Invalid(BAD_TS, f"expected 'ts' to be a number or an RFC 3339 string, got {_type_name(v)}")


def parse_values(obj: dict[str, Any], num_features: int) -> np.ndarray:
    """The readings of an event: ``values`` (a list of F finite numbers) or, if F == 1, ``value``.

    >>> parse_values({"values": [1, 2.5]}, 2).tolist()
    [1.0, 2.5]
    >>> parse_values({"values": [1]}, 2)
    Traceback (most recent call last):
    ...
    worker.events.Invalid: expected 2 finite numbers, got 1
    >>> parse_values({"value": 3}, 2)
    Traceback (most recent call last):
    ...
    worker.events.Invalid: expected 'values' with 2 finite numbers, got 'value' (only a one-feature model accepts it)
    """
    has_values, has_value = "values" in obj, "value" in obj
    if has_values and has_value:
        raise Invalid(BAD_SCHEMA, "expected one of 'values' or 'value', got both")
    if has_value:
        if num_features != 1:
            raise Invalid(BAD_VALUES, f"expected 'values' with {num_features} finite numbers, got 'value' "
                                      "(only a one-feature model accepts it)")
        v = obj["value"]
        if not _is_number(v) or not math.isfinite(v):
            raise Invalid(BAD_VALUES, f"expected 'value' to be a finite number, got {_type_name(v)}")
        return np.array([float(v)])
    if not has_values:
        raise Invalid(BAD_SCHEMA, "expected field 'values' (or 'value'), got neither")
    vals = obj["values"]
    if not isinstance(vals, list):
        raise Invalid(BAD_VALUES, f"expected 'values' to be a list of {num_features} finite numbers, "
                                  f"got {_type_name(vals)}")
    if len(vals) != num_features:
        raise Invalid(BAD_VALUES, f"expected {num_features} finite numbers, got {len(vals)}")
    for j, v in enumerate(vals):
        if not _is_number(v) or not math.isfinite(v):
            raise Invalid(BAD_VALUES, f"expected {num_features} finite numbers, got {_type_name(v)} "
                                      f"at position {j}")
    return np.array(vals, dtype=np.float64)


def check_event(obj: Any, num_features: int, key: str | None) -> tuple[str, float, np.ndarray, str | None]:
    """Check one event object; ``key`` (single-event messages only) must equal its stream id.

    >>> check_event({"stream_id": "s", "ts": 1, "values": [2]}, 1, "t")
    Traceback (most recent call last):
    ...
    worker.events.Invalid: expected the message key to equal stream_id 's', got 't'
    """
    if not isinstance(obj, dict):
        raise Invalid(BAD_SCHEMA, f"expected an event object, got {_type_name(obj)}")
    if "stream_id" not in obj:
        raise Invalid(BAD_SCHEMA, "expected field 'stream_id', got none")
    sid = obj["stream_id"]
    if not isinstance(sid, str) or not STREAM_ID.match(sid):
        shown = repr(sid[:60]) if isinstance(sid, str) else _type_name(sid)
        raise Invalid(BAD_STREAM_ID, f"expected 1 to 200 characters of A-Z a-z 0-9 . _ : / @ -, got {shown}")
    if key is not None and key != sid:
        raise Invalid(KEY_MISMATCH, f"expected the message key to equal stream_id {sid!r}, got {key[:60]!r}")
    if "ts" not in obj:
        raise Invalid(BAD_SCHEMA, "expected field 'ts', got none")
    ts = parse_ts(obj["ts"])
    values = parse_values(obj, num_features)
    eid = obj.get("event_id")
    if eid is not None and (not isinstance(eid, str) or not 0 < len(eid) <= MAX_EVENT_ID):
        shown = f"{len(eid)} characters" if isinstance(eid, str) else _type_name(eid)
        raise Invalid(BAD_SCHEMA, f"expected 'event_id' to be a string of 1 to {MAX_EVENT_ID} characters, "
                                  f"got {shown}")
    return sid, ts, values, eid


def decode_batch(messages: Iterable[RawMessage], topic: str, num_features: int, max_bytes: int = 1_000_000,
                 limits: Limits | None = None) -> tuple[list[Event], list[Rejection]]:
    """Accepted events (message order; a gateway batch in array order) and rejections."""
    events: list[Event] = []
    rejected: list[Rejection] = []
    for m in messages:
        def reject(code: str, detail: str, raw: bytes | None = m.value, index: int | None = None,
                   sid: str | None = None, m: RawMessage = m) -> None:
            rejected.append(Rejection(code, detail, topic, m.partition, m.offset, m.key, raw, index, sid))

        value = m.value
        if value is None:
            reject(BAD_JSON, "expected a JSON event or array of events, got an empty message (null value)")
            continue
        if len(value) > max_bytes:
            reject(TOO_LARGE, f"expected at most {max_bytes} bytes, got {len(value)}")
            continue
        try:
            doc = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            reject(BAD_JSON, f"expected JSON, got a parse error: {exc}")
            continue
        if isinstance(doc, dict):
            key: str | None = None
            if m.key:
                try:
                    key = m.key.decode("utf-8")
                except UnicodeDecodeError:
                    key = m.key.decode("utf-8", "replace")
            try:
                sid, ts, values, eid = check_event(doc, num_features, key)
            except Invalid as exc:
                reject(exc.code, exc.detail, sid=_stream_id_or_none(doc))
                continue
            events.append(Event(sid, ts, values, eid, m.partition, m.offset, None, m.key, value))
        elif isinstance(doc, list):
            if not doc:
                reject(BAD_SCHEMA, "expected a gateway batch with at least one event, got []")
                continue
            # Fast path for well-formed elements (the same checks as check_event, inline, and
            # one array for all readings); anything it does not accept goes through
            # check_event, which says what is wrong.
            good: list[tuple[int, Any, str, float, Any, Any]] = []
            for i, item in enumerate(doc):
                if type(item) is dict and "value" not in item:
                    g_sid, g_ts, vals = item.get("stream_id"), item.get("ts"), item.get("values")
                    g_eid = item.get("event_id")
                    if (type(g_sid) is str and (g_sid in _GOOD_IDS or _good_id(g_sid))
                            and ((type(g_ts) is float and _isfinite(g_ts)) or type(g_ts) is int)
                            and type(vals) is list and len(vals) == num_features
                            and all((type(v) is float and _isfinite(v)) or type(v) is int for v in vals)
                            and (g_eid is None or (type(g_eid) is str and 0 < len(g_eid) <= MAX_EVENT_ID))):
                        good.append((i, item, g_sid, float(g_ts), vals, g_eid))
                        continue
                try:
                    sid, ts, values, eid = check_event(item, num_features, None)
                except Invalid as exc:
                    reject(exc.code, exc.detail, raw=orjson.dumps(item), index=i, sid=_stream_id_or_none(item))
                    continue
                good.append((i, item, sid, ts, values, eid))
            if not good:
                continue
            rows = np.array([g[4] for g in good], dtype=np.float64).reshape(len(good), num_features)
            part, off, mkey = m.partition, m.offset, m.key
            for (i, item, sid, ts, _, eid), values in zip(good, rows):
                events.append(Event(sid, ts, values, eid, part, off, i, mkey, None, item))
        else:
            reject(BAD_SCHEMA, f"expected an event object or an array of events, got {_type_name(doc)}")
    if limits is not None:
        events = limits.check(events, topic, rejected)
    return events, rejected


_isfinite = math.isfinite
_GOOD_IDS: set[str] = set()  # stream ids already checked against STREAM_ID (bounded)


def _good_id(sid: str) -> bool:
    if not STREAM_ID.match(sid):
        return False
    if len(_GOOD_IDS) > 100_000:
        _GOOD_IDS.clear()
    _GOOD_IDS.add(sid)
    return True


def _stream_id_or_none(obj: Any) -> str | None:
    sid = obj.get("stream_id") if isinstance(obj, dict) else None
    return sid if isinstance(sid, str) and STREAM_ID.match(sid) else None
