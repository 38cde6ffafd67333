"""Bulk consumption: records go from Faust's consumer to the pipeline a fetch at a time.

Faust hands records to an agent one by one: for each record its fetch loop
(``Consumer._drain_messages``) builds a ``ConsumerMessage``, races the conductor's callback
against ``suspend_flow`` in ``wait_first`` (a task per record), the conductor takes a lock,
checks flow control and the producer buffer, decodes into an ``Event``, queues it; the
stream then dequeues it, tracks it as unacknowledged, calls the sensors, and our agent
appends it to a batch. That is ~60 us of CPU per record (docs/benchmarks-throughput.md
has the profile) for a worker that wants whole batches anyway.

``batching=bulk`` replaces only that fetch loop: :func:`bulk_transport` gives Faust's
transport a consumer whose ``_drain_messages`` takes each fetch (``_wait_next_records``,
Faust's own, which honours paused partitions and flow control) as a list of aiokafka records
and hands it to :class:`BulkFeed`, which forms micro-batches exactly as the agent's
``Batcher`` does (worker/app.py) and submits them to the pipeline. Everything else stays
Faust's: group membership, the rebalance callbacks (they still drop held states), seeking to
committed offsets, the periodic commit. Acknowledgement keeps its meaning: a batch's offsets
are marked acknowledged (Faust's ``_acked`` bookkeeping, the same as ``Consumer.ack``) only
after its outputs are delivered and its states saved, and a token per chunk of records sits in
Faust's set of unacknowledged messages from the fetch until then, so a rebalance or stop waits
for the batch in hand (``Consumer.wait_empty``) just as with per-record messages.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from worker.events import RawMessage

log = logging.getLogger("lstream.worker")


class InFlight:
    """Stands for a chunk of fetched records in Faust's set of unacknowledged messages (a
    WeakSet: the chunk holds the only strong reference) until the chunk is acknowledged."""

    __slots__ = ("__weakref__", "acked", "refcount")

    def __init__(self) -> None:
        self.acked = False
        self.refcount = 1  # read by Consumer.wait_empty's warning

    def __repr__(self) -> str:
        return f"<lstream bulk chunk acked={self.acked}>"


class Chunk:
    """Records of one partition from one fetch (at most ``size`` of them), with their token."""

    __slots__ = ("arrived", "records", "token", "tp")

    def __init__(self, tp: Any, records: Sequence[Any], arrived: float, token: InFlight) -> None:
        self.tp, self.records, self.arrived, self.token = tp, records, arrived, token


def acknowledge(consumer: Any, chunks: Sequence[Chunk]) -> None:
    """Mark the chunks' offsets acknowledged in Faust's bookkeeping, as ``Consumer.ack`` does
    for one message (under the same lock), and take their tokens out of the unacknowledged set."""
    from faust.types.tuples import ack_lock
    from mode.utils.futures import notify

    acks_enabled_for = consumer.app.topics.acks_enabled_for
    with ack_lock:
        n = 0
        for chunk in chunks:
            tp = chunk.tp
            if acks_enabled_for(tp.topic):
                committed = consumer._committed_offset[tp]
                index = consumer._acked_index[tp]
                acked = consumer._acked[tp]
                for r in chunk.records:
                    o = r.offset
                    if (committed is None or o >= committed) and o not in index:
                        index.add(o)
                        acked.append(o)
                        n += 1
            chunk.token.acked = True
            consumer._unacked_messages.discard(chunk.token)
        consumer._n_acked += n
        notify(consumer._waiting_for_ack)


class BulkFeed:
    """Micro-batches from fetched chunks, for :meth:`worker.pipeline.Pipeline.submit`.

    The same policy as the agent's ``Batcher`` (worker/app.py): a batch is what was fetched
    while the previous one was computed (at most ``size`` records; whole chunks, so a chunk is
    acknowledged at once), optionally lingering ``linger`` seconds; at most two batches are
    buffered, beyond that the fetch loop waits (backpressure).
    """

    def __init__(self, runtime: Any, consumer: Any, size: int, linger: float) -> None:
        self.runtime, self.consumer, self.size, self.linger = runtime, consumer, size, linger
        self.chunks: deque[Chunk] = deque()
        self.pending = 0
        self.ready = asyncio.Event()
        self.room = asyncio.Event()
        self.room.set()

    async def put(self, tp: Any, records: Sequence[Any]) -> None:
        """Queue one partition's records from a fetch (waits while two batches are buffered)."""
        size = self.size
        for i in range(0, len(records), size):
            while self.pending >= 2 * size:
                self.room.clear()
                await self.room.wait()
            part = records[i:i + size]
            token = InFlight()
            self.consumer._unacked_messages.add(token)
            self.chunks.append(Chunk(tp, part, time.time(), token))
            self.pending += len(part)
            self.consumer._read_offset[tp] = part[-1].offset
            self.ready.set()

    def _take(self) -> list[Chunk]:
        taken: list[Chunk] = []
        n = 0
        chunks = self.chunks
        while chunks and (not taken or n + len(chunks[0].records) <= self.size):
            c = chunks.popleft()
            taken.append(c)
            n += len(c.records)
        self.pending -= n
        if not chunks:
            self.ready.clear()
        if self.pending < 2 * self.size:
            self.room.set()
        return taken

    async def run(self) -> None:
        runtime, consumer = self.runtime, self.consumer
        while runtime.pipeline is None:  # noqa: ASYNC110 (built before the consumer joins; just in case)
            await asyncio.sleep(0.05)
        while True:
            await self.ready.wait()
            if self.linger:
                await asyncio.sleep(self.linger)
            taken = self._take()
            if not taken:
                continue
            msgs = [RawMessage(r.key, r.value, r.partition, r.offset) for c in taken for r in c.records]
            arrived = [c.arrived for c in taken for _ in c.records]
            record_ts = [(r.timestamp or 0) / 1000.0 for c in taken for r in c.records]

            async def ack(taken: list[Chunk] = taken, arrived: list[float] = arrived,
                          record_ts: list[float] = record_ts) -> None:
                runtime.observe_batch(arrived, record_ts)
                acknowledge(consumer, taken)

            await runtime.pipeline.submit(msgs, ack)


# What drain_in_bulk and acknowledge use of faust.transport.consumer.Consumer (as in faust-streaming 0.15.3).
FAUST_INTERNALS = ("_wait_next_records", "_read_offset", "_add_gap", "_commit_every", "_n_acked", "_acked",
                   "_acked_index", "_committed_offset", "_unacked_messages", "_waiting_for_ack",
                   "_buffered_partitions", "perform_seek", "flow_active", "suspend_flow", "commit", "wait_first")


async def drain_in_bulk(self: Any, fetcher: Any) -> None:
    """``Consumer._drain_messages`` for :func:`bulk_transport`: Faust's fetch loop (the same
    checks: stop flags, flow control, generation changes, paused partitions, read offsets,
    offset gaps, commit every N acks), with each fetch handed over per partition in one call."""
    missing = [name for name in FAUST_INTERNALS if not hasattr(self, name)]
    if missing:  # another faust-streaming release: fail loudly rather than commit wrongly
        raise RuntimeError(f"batching=bulk needs Faust consumer internals this faust-streaming lacks: {missing}; "
                           "use batching=smart")
    runtime = self.app.lstream
    s = runtime.settings
    feed = BulkFeed(runtime, self, s.batch_size, s.batch_wait)
    task = asyncio.ensure_future(feed.run())
    consumer_should_stop = self._stopped.is_set
    fetcher_should_stop = fetcher._stopped.is_set
    acks_enabled_for = self.app.topics.acks_enabled_for
    commit_every = self._commit_every
    try:
        while not (consumer_should_stop() or fetcher_should_stop()):
            if task.done():  # the feed failed: fail the fetcher with its error, as the agent would
                task.result()
            records, active = await self._wait_next_records(1.0)
            await self.sleep(0)
            if records is None or self.should_stop:
                continue
            if not self.flow_active:
                try:
                    await self.perform_seek()
                except Exception as exc:  # as Faust's getmany: log, fetch again
                    log.warning("exception performing seek when flow not active: %r", exc)
                continue
            generation = self.app.consumer_generation_id
            for tp, recs in records.items():
                if self.app.consumer_generation_id != generation or not self.flow_active:
                    break
                if active is not None and tp not in active and tp not in self._buffered_partitions:
                    continue
                r_offset = self._read_offset[tp]
                if r_offset is not None:
                    recs = [r for r in recs if r.offset >= r_offset]
                if not recs:
                    continue
                if acks_enabled_for(tp.topic):
                    prev = r_offset
                    for r in recs:  # offsets skipped by the broker (compaction, transaction markers)
                        if prev and r.offset - prev > 1:
                            await self._add_gap(tp, prev + 1, r.offset - 1)
                        prev = r.offset
                if commit_every is not None and self._n_acked >= commit_every:
                    self._n_acked = 0
                    await self.commit()
                await self.wait_first(feed.put(tp, recs), self.suspend_flow.wait())
    except self.consumer_stopped_errors:
        if self.transport.app.should_stop:
            log.info("Broker stopped consumer, shutting down...")
            return
        raise
    except asyncio.CancelledError:
        if self.transport.app.should_stop:
            return
        raise
    finally:
        task.cancel()


def bulk_transport(base: Any) -> Any:
    """A subclass of the Faust transport class ``base`` (e.g. worker/transport.py's) whose
    consumer drains fetches in bulk (:func:`drain_in_bulk`); needs ``app.lstream`` (the
    worker's Runtime)."""

    class Consumer(base.Consumer):
        _drain_messages = drain_in_bulk

    class Transport(base):
        bulk = True

    Transport.Consumer = Consumer
    return Transport
