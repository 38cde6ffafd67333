"""Output records as bytes: predictions, alerts and dead letters (contract shapes).

Predictions are the bulk of the output, so :meth:`Encoder.predictions` assembles their JSON
from bytes: a fixed template, the stream's head, and the numbers of each column formatted by
one ``orjson.dumps`` call (a third of the time of one ``orjson.dumps`` per dict). The bytes are
the same as ``orjson.dumps`` of the dict :func:`prediction_doc` builds (tests/worker/test_encode.py
checks it). Alerts and dead letters are rare and go through ``orjson.dumps`` directly.

A dead letter always fits ``max_record`` bytes (key plus value): its key and ``raw`` are cut
(``key_truncated`` / ``raw_truncated``) until it does.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from worker.events import TOO_LARGE, Event, Rejection

Output = tuple[str, bytes | None, bytes]  # (topic, key, value): one record to send

# A dead letter's key (in the record and in its JSON) keeps at most KEY_MAX bytes; its raw
# text RAW_MAX (RAW_KEEP for a too_large message: its head is all anyone needs).
KEY_MAX = 1024
RAW_MAX = 256 * 1024
RAW_KEEP = 4096
DETAIL_MAX = 1000
# Kafka's default record limit (message.max.bytes) is 1048588 bytes including overhead.
MAX_RECORD = 1_000_000


@dataclass(frozen=True)
class Topics:
    input: str = "sensor-events"
    predictions: str = "predictions"
    alerts: str = "anomaly-alerts"
    dlq: str = "sensor-events-dlq"


def severity(score: float, threshold: float) -> str:
    """``critical`` when the score is ten times less likely than the threshold allows.

    >>> severity(0.9995, 0.999), severity(0.99995, 0.999)
    ('warning', 'critical')
    """
    return "critical" if 1.0 - score <= (1.0 - threshold) / 10.0 else "warning"


def source_doc(topic: str, e: Event) -> dict[str, Any]:
    source: dict[str, Any] = {"topic": topic, "partition": e.partition, "offset": e.offset}
    if e.index is not None:
        source["index"] = e.index
    return source


def prediction_doc(topic: str, version: str, e: Event, step: int, expected: np.ndarray, forecast: np.ndarray,
                   score: float, anomaly: bool) -> dict[str, Any]:
    """The prediction of one applied event as a dict (the reference for the byte encoder)."""
    return {"stream_id": e.stream_id, "ts": e.ts, "source": source_doc(topic, e), "step": step, "model": version,
            "actual": e.values.tolist(), "expected": None if step == 1 else expected.tolist(),
            "forecast": forecast.tolist(), "score": score, "anomaly": anomaly}


def alert_doc(topic: str, version: str, threshold: float, e: Event, step: int, expected: np.ndarray,
              score: float, reason: str | None = None, evidence: dict[str, Any] | None = None) -> dict[str, Any]:
    """The alert that opens an episode; ``reason``/``evidence`` when the engine gives them."""
    doc = {"stream_id": e.stream_id, "ts": e.ts, "source": source_doc(topic, e), "score": score,
           "threshold": threshold, "severity": severity(score, threshold),
           "expected": None if step == 1 else expected.tolist(), "actual": e.values.tolist(), "model": version}
    if reason is not None:
        doc["reason"] = reason
        doc["evidence"] = evidence or {}
    return doc


class Encoder:
    """Encodes the outputs of one model on one set of topics."""

    def __init__(self, topics: Topics, version: str, threshold: float, max_record: int = MAX_RECORD) -> None:
        self.topics, self.version, self.threshold, self.max_record = topics, version, threshold, max_record
        self._template = (b'{"stream_id":"%b","ts":%b,"source":{"topic":' + orjson.dumps(topics.input)
                          + b',"partition":%d,"offset":%d%b},"step":%d,"model":' + orjson.dumps(version)
                          + b',"actual":%b,"expected":%b,"forecast":%b,"score":%b,"anomaly":%b}')

    def predictions(self, keys: Sequence[bytes], evs: Sequence[Event], steps: Sequence[int], x: np.ndarray,
                    expected: np.ndarray, forecast: np.ndarray, score: np.ndarray, anomaly: np.ndarray) -> list[bytes]:
        """Row k: the prediction of event ``evs[k]`` of stream ``keys[k]`` (a valid stream id,
        which needs no JSON escapes)."""
        actual, exp, fc = _json_rows(x), _json_rows(expected), _json_rows(forecast)
        sc = _json_items(score)
        ts = _json_items(np.array([e.ts for e in evs]))
        template = self._template
        out = []
        for k, e in enumerate(evs):
            step = steps[k]
            out.append(template % (
                keys[k], ts[k], e.partition, e.offset, b"" if e.index is None else b',"index":%d' % e.index,
                step, actual[k], b"null" if step == 1 else exp[k], fc[k], sc[k],
                b"true" if anomaly[k] else b"false"))
        return out

    def alert(self, e: Event, step: int, expected: np.ndarray, score: float, reason: str | None = None,
              evidence: dict[str, Any] | None = None) -> bytes:
        return orjson.dumps(alert_doc(self.topics.input, self.version, self.threshold, e, step, expected, score,
                                      reason, evidence), option=orjson.OPT_SERIALIZE_NUMPY)

    def dead_letter(self, r: Rejection) -> Output:
        """The dead-letter record of a rejection, cut to fit ``max_record`` bytes."""
        key = r.key if r.key is None or len(r.key) <= KEY_MAX else _cut_utf8(r.key, KEY_MAX)
        keep = RAW_KEEP if r.code == TOO_LARGE else RAW_MAX
        while True:
            value = orjson.dumps(dead_letter_doc(r, keep))
            if len(value) + len(key or b"") <= self.max_record or keep == 0:
                return (self.topics.dlq, key, value)
            keep //= 2  # escapes can make raw text up to 6x its bytes: cut until it fits


def _cut_utf8(b: bytes, n: int) -> bytes:
    """At most ``n`` bytes of ``b``, not ending inside a UTF-8 character (if it is UTF-8)."""
    cut = b[:n]
    for drop in range(4):
        try:
            (cut[:len(cut) - drop] if drop else cut).decode("utf-8")
            return cut[:len(cut) - drop] if drop else cut
        except UnicodeDecodeError:
            continue
    return cut


def _text_or_b64(raw: bytes) -> tuple[str, bool]:
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return base64.b64encode(raw).decode("ascii"), True


def dead_letter_doc(r: Rejection, raw_max: int | None = None) -> dict[str, Any]:
    """The dead-letter JSON of a rejection (contract shape); ``raw`` cut at ``raw_max`` bytes.

    >>> r = Rejection("bad_json", "expected JSON", "t", 0, 5, b"k", b"\\xff\\x00")
    >>> dead_letter_doc(r)
    {'error': 'bad_json', 'detail': 'expected JSON', 'source': {'topic': 't', 'partition': 0, 'offset': 5}, \
'key': 'k', 'raw': '/wA=', 'raw_b64': True}
    """
    if raw_max is None:
        raw_max = RAW_KEEP if r.code == TOO_LARGE else RAW_MAX
    source: dict[str, Any] = {"topic": r.topic, "partition": r.partition, "offset": r.offset}
    if r.index is not None:
        source["index"] = r.index
    detail = r.detail if len(r.detail) <= DETAIL_MAX else r.detail[:DETAIL_MAX] + "..."
    doc: dict[str, Any] = {"error": r.code, "detail": detail, "source": source}
    _put_bytes(doc, "key", r.key, KEY_MAX)
    if r.stream_id is not None and r.stream_id != doc["key"]:
        doc["stream_id"] = r.stream_id
    _put_bytes(doc, "raw", r.raw, raw_max)
    return doc


def _put_bytes(doc: dict[str, Any], name: str, value: bytes | None, limit: int) -> None:
    """``doc[name]``: ``value`` as text (base64 with ``<name>_b64``), cut to ``limit`` bytes on a
    UTF-8 boundary with ``<name>_truncated``; None stays None."""
    if value is None:
        doc[name] = None
        return
    if len(value) > limit:
        value = _cut_utf8(value, limit)
        doc[f"{name}_truncated"] = True
    text, b64 = _text_or_b64(value)
    doc[name] = text
    if b64:
        doc[f"{name}_b64"] = True


def _json_items(a: np.ndarray) -> list[bytes]:
    """JSON text of each number of a 1-d array (orjson's formatting; NaN and inf as null).

    >>> _json_items(np.array([0.5, 1e-7, np.nan]))
    [b'0.5', b'1e-7', b'null']
    """
    return orjson.dumps(a.tolist())[1:-1].split(b",")


def _json_rows(a: np.ndarray) -> list[bytes]:
    """JSON text of each row of a 2-d array, as lists.

    >>> _json_rows(np.array([[1.5, 2.0], [3.0, np.nan]]))
    [b'[1.5,2.0]', b'[3.0,null]']
    >>> _json_rows(np.array([[1.5], [0.25]]))
    [b'[1.5]', b'[0.25]']
    """
    if a.shape[1] == 1:
        return [b"[%b]" % v for v in _json_items(a[:, 0])]
    return [b"[%b]" % v for v in orjson.dumps(a.tolist())[2:-2].split(b"],[")]
