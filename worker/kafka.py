"""Plain aiokafka plumbing for the tools around the worker: produce, tail, demo, bench (no Faust).

- :func:`bootstrap` turns the ``kafka://a:1;b:2`` setting into aiokafka's ``a:1,b:2``.
- :func:`ensure_topics` creates topics that do not exist yet (existing ones are left alone).
- :class:`Sender` sends many records fast: every send is queued without waiting for its
  acknowledgement; :meth:`Sender.flush` waits for all of them and raises the first failure.
- :func:`follow` yields the records of a topic as they arrive, without a consumer group.

Why no consumer group in :func:`follow`: joining one on the Tansu broker takes half the
session timeout, and a viewer needs no committed offsets. Why not ``end_offsets()``: Tansu
answers with the first offset of the last record batch + 1, not the end, so "start at the end"
(``from_beginning=False``) starts there and then skips records written before the call
(by their timestamp), which is right on any broker. Why ``fetch_max_wait_ms=100``: Tansu holds
a fetch that finds nothing for the whole wait even when records arrive meanwhile, so the
wait is the display latency (aiokafka's default 500 ms made it about a second).

>>> bootstrap("kafka://127.0.0.1:9092;10.0.0.2:9093")
'127.0.0.1:9092,10.0.0.2:9093'
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from types import TracebackType

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError

TOPIC_ALREADY_EXISTS = 36


def bootstrap(broker_url: str) -> str:
    """aiokafka's bootstrap string from the ``LSTREAM_BROKER`` form.

    >>> bootstrap("kafka://localhost:9092")
    'localhost:9092'
    """
    hosts = [h.strip() for h in broker_url.removeprefix("kafka://").split(";") if h.strip()]
    if not hosts:
        raise ValueError(f"broker: expected kafka://host:port[;host:port...], got {broker_url!r}")
    return ",".join(hosts)


def _unreachable(broker_url: str, exc: BaseException) -> ConnectionError:
    return ConnectionError(f"cannot reach the Kafka broker at {broker_url}: {exc}")


async def ensure_topics(broker_url: str, topics: Sequence[str], partitions: int = 8) -> None:
    """Create each of ``topics`` with ``partitions`` partitions unless it exists already."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap(broker_url), request_timeout_ms=15000)
    try:
        await admin.start()
    except KafkaError as exc:
        raise _unreachable(broker_url, exc) from None
    try:
        response = await admin.create_topics([NewTopic(t, partitions, 1) for t in dict.fromkeys(topics)])
        for name, code, message in response.topic_errors:
            if code not in (0, TOPIC_ALREADY_EXISTS):
                raise RuntimeError(f"cannot create topic {name!r}: Kafka error {code}: {message}")
    finally:
        await admin.close()


class Sender:
    """An aiokafka producer that keeps many sends in flight.

    ``await send(...)`` returns once the record is queued (it waits only when the producer's
    buffer is full); delivery is checked by :meth:`flush`, which also runs when the ``async
    with`` block ends without an error.
    """

    def __init__(self, broker_url: str, *, linger_ms: int = 5, acks: int | str = 1,
                 max_request_size: int = 4 * 1024 * 1024) -> None:
        self.broker_url = broker_url
        self.sent = 0
        self.acked = 0
        self._error: BaseException | None = None
        self._producer = AIOKafkaProducer(bootstrap_servers=bootstrap(broker_url), linger_ms=linger_ms,
                                          acks=acks, max_request_size=max_request_size,
                                          max_batch_size=256 * 1024)

    async def start(self) -> Sender:
        try:
            await self._producer.start()
        except KafkaConnectionError as exc:
            await self._producer.stop()
            raise _unreachable(self.broker_url, exc) from None
        return self

    async def stop(self) -> None:
        await self._producer.stop()

    async def __aenter__(self) -> Sender:
        return await self.start()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        try:
            if exc_type is None:
                await self.flush()
        finally:
            await self.stop()

    def _done(self, fut: asyncio.Future[object]) -> None:
        if fut.cancelled():
            return
        if fut.exception() is not None:
            self._error = self._error or fut.exception()
        else:
            self.acked += 1

    async def send(self, topic: str, value: bytes, key: bytes | None = None, partition: int | None = None) -> None:
        if self._error is not None:
            raise self._error
        fut = await self._producer.send(topic, value, key=key, partition=partition)
        fut.add_done_callback(self._done)
        self.sent += 1

    async def flush(self) -> None:
        """Wait until every record sent so far is acknowledged; raise the first failure."""
        await self._producer.flush()
        # flush() returns when batches are drained; give their futures' callbacks a turn.
        for _ in range(100):
            if self.acked + (self._error is not None) >= self.sent or self._error is not None:
                break
            await asyncio.sleep(0.01)
        if self._error is not None:
            raise self._error


@dataclass(frozen=True)
class Record:
    """A record as :func:`follow` yields it; ``timestamp`` in ms since the epoch."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int


async def _partitions(consumer: AIOKafkaConsumer, topic: str, deadline: float | None) -> list[int]:
    while True:
        await consumer._client.force_metadata_update()
        parts = consumer.partitions_for_topic(topic)
        if parts:
            return sorted(parts)
        if deadline is not None and time.monotonic() >= deadline:
            return []
        await asyncio.sleep(0.5)


async def follow(broker_url: str, topic: str, *, from_beginning: bool = False,
                 timeout: float | None = None) -> AsyncIterator[Record]:
    """Yield ``topic``'s records as they arrive (per partition in offset order), until
    ``timeout`` seconds have passed (None: forever). Waits for the topic to appear.

    Without ``from_beginning`` only records written after the call are yielded.
    """
    start_ms = int(time.time() * 1000)
    deadline = None if timeout is None else time.monotonic() + timeout
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap(broker_url), group_id=None,
                                enable_auto_commit=False, auto_offset_reset="earliest", fetch_max_wait_ms=100)
    try:
        await consumer.start()
    except KafkaConnectionError as exc:
        await consumer.stop()
        raise _unreachable(broker_url, exc) from None
    try:
        parts = await _partitions(consumer, topic, deadline)
        if not parts:
            return
        tps = [TopicPartition(topic, p) for p in parts]
        consumer.assign(tps)
        if from_beginning:
            await consumer.seek_to_beginning(*tps)
        else:
            await consumer.seek_to_end(*tps)
        while True:
            wait = 1.0 if deadline is None else deadline - time.monotonic()
            if wait <= 0:
                return
            batch = await consumer.getmany(timeout_ms=max(1, int(min(wait, 1.0) * 1000)))
            for msgs in batch.values():
                for m in msgs:
                    if not from_beginning and m.timestamp < start_ms:
                        continue  # written before we started (see the module docstring)
                    yield Record(m.topic, m.partition, m.offset, m.key, m.value, m.timestamp)
    finally:
        await consumer.stop()
