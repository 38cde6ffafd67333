"""worker/encode.py: the hand-built output bytes equal orjson.dumps of the same dict, for every
output kind; dead letters always fit the record limit."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from worker.encode import KEY_MAX, MAX_RECORD, Encoder, Topics, alert_doc, dead_letter_doc, prediction_doc
from worker.events import Event, Rejection

TOPICS = Topics("in-topic", "preds", "alerts", "dlq")


def _events(n: int, f: int, rng: np.random.Generator) -> list[Event]:
    out = []
    for k in range(n):
        vals = rng.normal(0, 10.0 ** rng.integers(-8, 9), f)
        index = None if k % 3 == 0 else int(rng.integers(0, 5000))
        ts = float(rng.choice([1_700_000_000.25, 12.0, 1e9 + k * 1e-6, 0.0]))
        out.append(Event(f"s-{k}:a/b@c.d_e", ts, vals, None, int(rng.integers(0, 64)), int(rng.integers(0, 2**40)),
                         index))
    return out


@pytest.mark.parametrize("features", [1, 3])
def test_prediction_bytes_equal_orjson_of_the_dict(features):
    rng = np.random.default_rng(features)
    enc = Encoder(TOPICS, "m-3f9a1c2e", 0.999)
    evs = _events(60, features, rng)
    n = len(evs)
    steps = [1 if k % 7 == 0 else int(rng.integers(2, 10**6)) for k in range(n)]
    x = np.array([e.values for e in evs])
    expected = np.where(np.array(steps)[:, None] == 1, np.nan, rng.normal(0, 100, (n, features)))
    forecast = rng.normal(0, 1e-7, (n, features)) * 10.0 ** rng.integers(-5, 12, (n, 1))
    score = rng.uniform(0, 1, n)
    score[:3] = [0.0, 1.0, 0.9999999999]
    anomaly = score >= 0.999
    got = enc.predictions([e.stream_id.encode() for e in evs], evs, steps, x, expected, forecast, score, anomaly)
    for k, e in enumerate(evs):
        doc = prediction_doc(TOPICS.input, "m-3f9a1c2e", e, steps[k], expected[k], forecast[k], float(score[k]),
                             bool(anomaly[k]))
        assert got[k] == orjson.dumps(doc), k
        assert ("index" in orjson.loads(got[k])["source"]) == (e.index is not None)


def test_alert_bytes_equal_orjson_of_the_dict_with_and_without_reason():
    rng = np.random.default_rng(1)
    enc = Encoder(TOPICS, "m-1", 0.99)
    for k, e in enumerate(_events(10, 2, rng)):
        step = 1 if k == 0 else 5
        exp = rng.normal(size=2)
        reason, evidence = (None, None) if k % 2 else ("range_breakout", {"low": 1.5, "high": 2.0})
        doc = alert_doc(TOPICS.input, "m-1", 0.99, e, step, exp, 0.9995, reason, evidence)
        got = enc.alert(e, step, exp, 0.9995, reason, evidence)
        assert got == orjson.dumps(doc)
        parsed = orjson.loads(got)
        assert parsed["severity"] == "critical" and (parsed["expected"] is None) == (step == 1)
        assert ("reason" in parsed) == (reason is not None)


def test_dead_letter_bytes_equal_orjson_of_the_dict():
    enc = Encoder(TOPICS, "m-1", 0.99)
    for r in [Rejection("bad_json", "expected JSON", "in-topic", 0, 5, b"k", b"\xff\x00"),
              Rejection("late", "x", "in-topic", 1, 7, b"gw", b'{"a":1}', 3, "pump-1"),
              Rejection("bad_json", "expected JSON", "in-topic", 0, 5, None, None)]:
        topic, key, value = enc.dead_letter(r)
        assert topic == "dlq" and key == r.key and value == orjson.dumps(dead_letter_doc(r))


def test_dead_letter_of_a_huge_key_and_value_fits_the_record_limit():
    # 700 KB key + 290 KB bad value: before, ~1.7 MB (the key twice, untruncated) and unsendable.
    key = ("k" * 700_000).encode()
    raw = b"\x01" * 290_000  # control characters: JSON escapes make them 6 bytes each
    enc = Encoder(TOPICS, "m-1", 0.99)
    topic, rkey, value = enc.dead_letter(Rejection("bad_json", "expected JSON", "in-topic", 0, 1, key, raw))
    assert topic == "dlq" and len(rkey) + len(value) <= MAX_RECORD
    doc = orjson.loads(value)
    assert doc["key_truncated"] is True and doc["raw_truncated"] is True
    assert len(rkey) == KEY_MAX and doc["key"] == "k" * KEY_MAX and raw.decode().startswith(doc["raw"])
    assert len(doc["raw"]) > 10_000  # cut to fit, not emptied


def test_dead_letter_key_cut_keeps_utf8_whole():
    key = "é".encode() * 5000  # 2 bytes per character
    doc = dead_letter_doc(Rejection("bad_json", "x", "t", 0, 1, key, b"{"))
    assert doc["key_truncated"] is True and "key_b64" not in doc and set(doc["key"]) == {"é"}
