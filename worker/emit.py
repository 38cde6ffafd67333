"""Send many output records fast: one Kafka record batch per (topic, partition).

Per-record ``send`` (Faust's or aiokafka's) costs 100-300 us of Python per record; building
one record batch per partition with aiokafka's batch API and submitting it costs a few us per
record. Partitions are chosen as Kafka's default partitioner does (murmur2 of the key), so a
stream's outputs land on one partition, in order, and other clients' keyed records agree.

Example (needs a broker, so not run as a doctest)::

    sender = await BatchSender.start("kafka://localhost:9092")
    await sender.send([("predictions", b"pump-1", b'{...}'), ("anomaly-alerts", b"pump-1", b'{...}')])
    await sender.stop()
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2

from worker.encode import Output
from worker.kafka import bootstrap


def partition_for(key: bytes | None, partitions: Sequence[int]) -> int:
    """Kafka's default partitioner for a keyed record (a record without a key: the first).

    >>> partition_for(b"pump-17", [0, 1, 2, 3])  # the Java client picks the same
    2
    """
    if key is None:
        return partitions[0]
    return partitions[(murmur2(key) & 0x7FFFFFFF) % len(partitions)]


class BatchSender:
    """An aiokafka producer used through its batch API. :meth:`send` returns once the broker
    acknowledged every record (acks=all), or raises."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self.producer = producer
        self._partitions: dict[str, list[int]] = {}
        self._cache: dict[tuple[str, bytes | None], int] = {}

    @classmethod
    async def start(cls, broker_url: str, **kwargs: Any) -> BatchSender:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap(broker_url), acks="all", linger_ms=0,
                                    max_request_size=4 * 1024 * 1024, max_batch_size=512 * 1024,
                                    request_timeout_ms=30000, **kwargs)
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
        return cls(producer)

    async def stop(self) -> None:
        await self.producer.stop()

    async def _partition(self, topic: str, key: bytes | None) -> int:
        p = self._cache.get((topic, key))
        if p is None:
            parts = self._partitions.get(topic)
            if parts is None:
                parts = self._partitions[topic] = sorted(await self.producer.partitions_for(topic))
            p = partition_for(key, parts)
            if len(self._cache) > 100_000:  # bounded: stream ids come and go
                self._cache.clear()
            self._cache[(topic, key)] = p
        return p

    async def send(self, records: Sequence[Output]) -> None:
        groups: dict[tuple[str, int], list[tuple[bytes | None, bytes]]] = {}
        cache = self._cache
        last_key: Any = None
        group: list[tuple[bytes | None, bytes]] = []
        for topic, key, value in records:
            tk = (topic, key)
            if tk != last_key:  # a stream's records often come one after another: one lookup
                p = cache.get(tk)  # no await per record: a coroutine costs more than the lookup
                if p is None:
                    p = await self._partition(topic, key)
                tp = (topic, p)
                got = groups.get(tp)
                if got is None:
                    got = groups[tp] = []
                group, last_key = got, tk
            group.append((key, value))
        futures = []
        producer = self.producer
        for (topic, partition), items in groups.items():
            batch = producer.create_batch()
            append = batch.append
            for key, value in items:
                if append(key=key, value=value, timestamp=None) is None:
                    futures.append(await producer.send_batch(batch, topic, partition=partition))
                    batch = producer.create_batch()
                    append = batch.append
                    if append(key=key, value=value, timestamp=None) is None:
                        raise ValueError(f"a record of {len(value)} bytes does not fit in a record batch")
            if batch.record_count():
                futures.append(await producer.send_batch(batch, topic, partition=partition))
        await asyncio.gather(*futures)
