"""The test helpers in tests/kafkautil.py against the real Tansu broker."""

from __future__ import annotations

import time

from tests import kafkautil as ku


def test_create_produce_read_back(broker_url: str) -> None:
    topic = ku.unique_topic("ku")
    ku.create_topics(broker_url, [topic], partitions=3)
    ku.create_topics(broker_url, [topic], partitions=3)  # already exists: no error
    assert ku.partitions(broker_url, topic) == [0, 1, 2]
    msgs = [(f"s{i % 5}", f"v{i}".encode()) for i in range(500)] + [(b"pinned", b"p", 2)]
    assert ku.produce(broker_url, topic, msgs) == 501
    records = ku.read_all(broker_url, topic, count=501, timeout=20)
    assert len(records) == 501
    assert {r.key_text for r in records} == {"s0", "s1", "s2", "s3", "s4", "pinned"}
    pinned = [r for r in records if r.key == b"pinned"]
    assert [(r.partition, r.value) for r in pinned] == [(2, b"p")]
    # per key: one partition, produce order kept, offsets consecutive per partition
    for k in range(5):
        mine = [r for r in records if r.key_text == f"s{k}"]
        assert len({r.partition for r in mine}) == 1
        assert [int(r.value[1:]) for r in mine] == list(range(k, 500, 5))
    for p in {r.partition for r in records}:
        offs = [r.offset for r in records if r.partition == p]
        assert offs == list(range(len(offs)))


def test_read_stops_on_timeout_and_idle(broker_url: str) -> None:
    topic = ku.unique_topic("ku")
    ku.create_topics(broker_url, topic, partitions=2)
    ku.produce_json(broker_url, topic, [{"stream_id": "a", "value": 1}, {"stream_id": "b", "value": 2}])
    t0 = time.monotonic()
    records = ku.read_all(broker_url, topic, count=10, timeout=2.0)
    assert len(records) == 2 and 1.5 < time.monotonic() - t0 < 10
    assert sorted(r.json()["value"] for r in records) == [1, 2]
    assert len(ku.read_all(broker_url, topic, timeout=20, idle=0.5)) == 2
    assert ku.read_all(broker_url, ku.unique_topic("missing"), timeout=0.5) == []
