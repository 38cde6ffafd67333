"""Plain aiokafka helpers for tests (independent of the worker's own Kafka code).

Every helper takes the broker url as the fixtures give it (``kafka://127.0.0.1:PORT``, or a
bare ``host:port``). Async functions end in ``_async``; the sync wrappers run them with
:func:`asyncio.run`, so call those only from sync test code (not inside a running loop).

    create_topics(broker_url, ["sensor-events"], partitions=4)
    produce(broker_url, "sensor-events", [(b"pump-1", b'{"stream_id": ...}'), ...])
    records = read_all(broker_url, "predictions", count=100, timeout=30)
    records[0].key, records[0].value, records[0].partition, records[0].offset, records[0].json()

Tansu quirks (the embedded broker, ``lstream.devservices.start_broker``), measured with aiokafka 0.14:

- ``end_offsets()`` is wrong: it answers the last record *batch*'s first offset + 1, not the
  last record's offset + 1 (batches of 5, 3, 7, 1 records at offsets 0-15 gave 1, 6, 9, 16).
  Never use it, nor ``highwater``/lag or ``seek_to_end()``, to decide whether a topic is
  drained or where "new" starts; count records by reading them (:func:`read_all` does).
- Record offsets themselves are right: consecutive per partition, starting at 0.
- Consumer-group join takes about half of ``session_timeout_ms`` (5 s at 10,000 ms, 15 s at
  the default 30,000 ms) before the first fetch. Tests that need no group should ``assign()``
  partitions and read without a group (as here); code that needs a group should use
  ``session_timeout_ms=10000`` (the broker refuses much smaller values with some clients).
- A fetch that finds no new data is held for the full ``fetch_max_wait_ms`` even if records
  arrive meanwhile (no early wake-up), so a consumer's latency is about that long: aiokafka's
  default 500 ms gave ~1.1 s p50 end to end, 20 ms gave ~13 ms. Faust hard-codes 1500 ms
  (faust/transport/drivers/aiokafka.py), so a Faust worker on Tansu adds ~1-2 s of latency
  unless that is patched. :func:`read_all` uses 50 ms.
- Producing to an unknown topic auto-creates it (with the broker's default partition count,
  4 here); a metadata request alone (``consumer.topics()``, ``partitions_for_topic``) does not.
  Create topics explicitly with the partition count you want *before* producing.
- Creating a topic that exists answers error code 36 (TopicAlreadyExists) in the response
  instead of raising; :func:`create_topics_async` accepts it.
- Memory storage: everything is lost when the broker stops; topics are per broker process, so
  tests sharing the session broker must use unique topic names (:func:`unique_topic`).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

TOPIC_ALREADY_EXISTS = 36


@dataclass(frozen=True)
class Record:
    """One record read back from a topic."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int

    def json(self) -> Any:
        """The value parsed as JSON."""
        return json.loads(self.value or b"null")

    @property
    def key_text(self) -> str | None:
        return None if self.key is None else self.key.decode()


def hosts(broker_url: str) -> str:
    """aiokafka bootstrap string from a broker url.

    >>> hosts("kafka://127.0.0.1:9092;127.0.0.1:9093")
    '127.0.0.1:9092,127.0.0.1:9093'
    """
    return ",".join(h for h in broker_url.removeprefix("kafka://").split(";") if h)


def unique_topic(prefix: str = "t") -> str:
    """A topic name no other test uses on the shared session broker."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def create_topics_async(broker_url: str, topics: Iterable[str], partitions: int = 1) -> None:
    """Create ``topics`` with ``partitions`` each; topics that already exist are left as they are."""
    admin = AIOKafkaAdminClient(bootstrap_servers=hosts(broker_url))
    await admin.start()
    try:
        response = await admin.create_topics([NewTopic(t, partitions, 1) for t in topics])
        for name, code, message in response.topic_errors:
            if code not in (0, TOPIC_ALREADY_EXISTS):
                raise RuntimeError(f"create topic {name!r}: error {code} {message}")
    finally:
        await admin.close()


async def partitions_async(broker_url: str, topic: str, timeout: float = 10.0) -> list[int]:
    """Partition ids of ``topic`` (waits up to ``timeout`` for its metadata)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=hosts(broker_url))
    await consumer.start()
    try:
        deadline = time.monotonic() + timeout
        while True:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic)
            if parts:
                return sorted(parts)
            if time.monotonic() > deadline:
                raise RuntimeError(f"topic {topic!r} has no partitions after {timeout} s")
            await asyncio.sleep(0.1)
    finally:
        await consumer.stop()


Message = tuple[Any, ...]  # (key, value) or (key, value, partition); key/value bytes, str or None


def _bytes(x: bytes | str | None) -> bytes | None:
    return x.encode() if isinstance(x, str) else x


async def produce_async(broker_url: str, topic: str, messages: Iterable[Message], linger_ms: int = 5) -> int:
    """Send ``messages`` (many in flight at once, then flush); returns how many were acknowledged."""
    producer = AIOKafkaProducer(bootstrap_servers=hosts(broker_url), linger_ms=linger_ms, acks=1)
    await producer.start()
    try:
        futures = []
        for m in messages:
            key, value = _bytes(m[0]), _bytes(m[1])
            partition = m[2] if len(m) > 2 else None
            futures.append(await producer.send(topic, value, key=key, partition=partition))
        await producer.flush()
        await asyncio.gather(*futures)  # raises if any send failed
        return len(futures)
    finally:
        await producer.stop()


async def read_all_async(broker_url: str, topic: str, count: int | None = None, timeout: float = 10.0,
                         idle: float | None = None) -> list[Record]:
    """Read ``topic`` from the beginning, without a consumer group.

    Stops when ``count`` records have been read, when ``timeout`` seconds have passed, or (if
    ``idle`` is given) when nothing new arrived for ``idle`` seconds. Records come sorted by
    (partition, offset). Waits for the topic to exist within ``timeout``.
    """
    records: list[Record] = []
    deadline = time.monotonic() + timeout
    consumer = AIOKafkaConsumer(bootstrap_servers=hosts(broker_url), enable_auto_commit=False,
                                auto_offset_reset="earliest", group_id=None, fetch_max_wait_ms=50)
    await consumer.start()
    try:
        parts: set[int] | None = None
        while not parts:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic)
            if not parts:
                if time.monotonic() > deadline:
                    return records
                await asyncio.sleep(0.1)
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        last_new = time.monotonic()
        while count is None or len(records) < count:
            now = time.monotonic()
            if now >= deadline or (idle is not None and now - last_new >= idle):
                break
            wait = min(deadline - now, 0.5)
            batch = await consumer.getmany(timeout_ms=max(1, int(wait * 1000)))
            for msgs in batch.values():
                for m in msgs:
                    records.append(Record(m.topic, m.partition, m.offset, m.key, m.value, m.timestamp))
            if batch:
                last_new = time.monotonic()
    finally:
        await consumer.stop()
    records.sort(key=lambda r: (r.partition, r.offset))
    return records


# Sync wrappers for plain (non-async) tests.

def create_topics(broker_url: str, topics: Sequence[str] | str, partitions: int = 1) -> None:
    asyncio.run(create_topics_async(broker_url, [topics] if isinstance(topics, str) else topics, partitions))


def partitions(broker_url: str, topic: str, timeout: float = 10.0) -> list[int]:
    return asyncio.run(partitions_async(broker_url, topic, timeout))


def produce(broker_url: str, topic: str, messages: Iterable[Message], linger_ms: int = 5) -> int:
    return asyncio.run(produce_async(broker_url, topic, messages, linger_ms))


def read_all(broker_url: str, topic: str, count: int | None = None, timeout: float = 10.0,
             idle: float | None = None) -> list[Record]:
    return asyncio.run(read_all_async(broker_url, topic, count, timeout, idle))


def produce_json(broker_url: str, topic: str, events: Iterable[dict[str, Any]], key_field: str = "stream_id") -> int:
    """Send dicts as JSON, keyed by ``event[key_field]``."""
    return produce(broker_url, topic, ((e[key_field], json.dumps(e).encode()) for e in events))
