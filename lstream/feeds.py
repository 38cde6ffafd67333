"""The feed library: readings from CSV files or the synthetic generator, sent to the input topic.

``lstream produce`` is a thin command over this module; ``lstream demo`` and the end-to-end
benchmark use it too. A *feed* is one stream's readings; :func:`readings` merges feeds in
event-time order (each stream's own rows keep their order); :func:`send_readings` sends
them, paced or as fast as possible, as single events keyed by stream id or as gateway batches.

Event ids are ``"<stream>:<run>:<row>"`` with a per-run id (:func:`new_run_id`), so a second
run of the same feed is not taken for duplicates of the first; without a run id they are
``"<stream>:<row>"`` (the demo, whose streams are new each run).

>>> feeds = synthetic_feeds(2, 3, seed=1)
>>> rows = list(readings(feeds))
>>> [(r[0], r[1]) for r in rows]
[('sensor-000', 0), ('sensor-001', 0), ('sensor-000', 1), ('sensor-001', 1), ('sensor-000', 2), ('sensor-001', 2)]
>>> event_json("pump-1", 7, 1700000000.5, [0.25])
b'{"stream_id":"pump-1","ts":1700000000.5,"values":[0.25],"event_id":"pump-1:7"}'
>>> event_json("pump-1", 7, 1700000000.5, [0.25], run="r1")
b'{"stream_id":"pump-1","ts":1700000000.5,"values":[0.25],"event_id":"pump-1:r1:7"}'
>>> gateway_of("pump-1", 4) == gateway_of("pump-1", 4), gateway_of("pump-1", 1)
(True, 'gw-000')
"""

from __future__ import annotations

import asyncio
import heapq
import secrets
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

Reading = tuple[str, int, float, list[float]]  # (stream_id, row index, ts, values)


@dataclass
class Feed:
    """One stream's readings: ``values[i]`` (F numbers) at ``ts[i]`` (epoch seconds)."""

    stream_id: str
    ts: np.ndarray
    values: np.ndarray


@dataclass
class Summary:
    """What :func:`send_readings` sent."""

    events: int
    messages: int
    streams: int
    seconds: float
    topic: str

    def line(self) -> str:
        rate = self.events / self.seconds if self.seconds > 0 else float("inf")
        unit = "" if self.messages == self.events else f" in {self.messages} messages"
        return (f"produced {self.events} events{unit} from {self.streams} streams to {self.topic!r} "
                f"in {self.seconds:.2f} s ({rate:,.0f} events/s)")


def csv_feeds(paths: Sequence[str], stream_column: str | None = None, columns: Sequence[str] | None = None,
              time_column: str | None = None) -> list[Feed]:
    """Feeds from CSV files (raises ``series.csvdata.DataError`` with a one-line message)."""
    from series.csvdata import read_streams

    streams = read_streams(list(paths), stream_column, columns, time_column=time_column)
    return [Feed(s.name, s.ts, s.values) for s in streams]


def synthetic_feeds(n_streams: int, n_steps: int, *, seed: int = 0, num_features: int = 1,
                    anomaly_rate: float | None = None, start_ts: float | None = None,
                    period_s: float = 60.0) -> list[Feed]:
    """Feeds from ``series.synthetic.generate`` (seasonal signals with injected anomalies)."""
    from series.synthetic import generate

    extra: dict[str, Any] = {}
    if anomaly_rate is not None:
        extra["anomaly_rate"] = anomaly_rate
    if start_ts is not None:
        extra["start_ts"] = start_ts
    streams = generate(n_streams, n_steps, seed=seed, num_features=num_features, period_s=period_s, **extra)
    return [Feed(s.stream_id, s.ts, s.values) for s in streams]


def _one(feed: Feed, steps: int | None) -> Iterator[Reading]:
    n = len(feed.ts) if steps is None else min(steps, len(feed.ts))
    ts = feed.ts[:n].tolist()
    values = feed.values[:n].tolist()
    sid = feed.stream_id
    for i in range(n):
        yield sid, i, ts[i], values[i]


def readings(feeds: Sequence[Feed], steps: int | None = None, count: int | None = None) -> Iterator[Reading]:
    """All feeds' readings merged by event time; ties and each stream's own rows keep their order."""
    merged = heapq.merge(*(_one(f, steps) for f in feeds), key=lambda r: r[2])
    for k, r in enumerate(merged):
        if count is not None and k >= count:
            return
        yield r


def new_run_id() -> str:
    """A short random id for one run of a feed: 8 base-36 characters (36^8 ~ 2.8e12 values).

    >>> len(new_run_id()), new_run_id() != new_run_id()
    (8, True)
    """
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    return "".join(digits[b % 36] for b in secrets.token_bytes(8))


def event_dict(stream_id: str, i: int, ts: float, values: list[float], run: str | None = None) -> dict[str, object]:
    eid = f"{stream_id}:{run}:{i}" if run else f"{stream_id}:{i}"
    return {"stream_id": stream_id, "ts": ts, "values": values, "event_id": eid}


def event_json(stream_id: str, i: int, ts: float, values: list[float], run: str | None = None) -> bytes:
    """One event as the contract's JSON."""
    return orjson.dumps(event_dict(stream_id, i, ts, values, run))


def gateway_of(stream_id: str, gateways: int) -> str:
    """The gateway a stream is always sent under (stable across runs and machines)."""
    return f"gw-{zlib.crc32(stream_id.encode()) % max(1, gateways):03d}"


def first_times(feeds: Sequence[Feed], steps: int | None = None) -> dict[str, float]:
    """The first event time each stream will be sent with."""
    return {f.stream_id: float(f.ts[0]) for f in feeds if len(f.ts) and (steps is None or steps > 0)}


@dataclass
class LateRisk:
    """Streams already in the topic with events newer than the ones about to be sent."""

    streams: list[str]  # a few of them, sorted
    count: int  # how many such streams were found
    newest: float  # the newest such event time seen

    def line(self) -> str:
        more = f" and {self.count - len(self.streams)} more" if self.count > len(self.streams) else ""
        return (f"warning: the topic already holds newer events of {self.count} of these streams "
                f"({', '.join(self.streams)}{more}); a worker that applied them dead-letters the older "
                f"events sent now as 'late'. Use --ts-now to stamp events with the send time.")


async def late_risk(broker_url: str, topic: str, first_ts: dict[str, float], *, seconds: float = 1.5,
                    max_records: int = 50_000) -> LateRisk | None:
    """Look at the topic's existing records (at most ``seconds`` / ``max_records``) for events of
    the streams in ``first_ts`` newer than the first event about to be sent for them.

    A cheap, sound hint rather than a proof: a record found means the worker, once it applies
    it, rejects our older events as ``late`` (contract: ts older than the last applied event).
    Gateway batches (JSON arrays) are looked into too. Returns None when nothing was found.
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.errors import KafkaError

    from worker.kafka import bootstrap

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap(broker_url), group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest", fetch_max_wait_ms=100)
    found: dict[str, float] = {}
    try:
        await asyncio.wait_for(consumer.start(), timeout=seconds + 5)
        if topic not in await consumer.topics():  # also refreshes the metadata
            return None
        parts = consumer.partitions_for_topic(topic) or set()
        if not parts:
            return None
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        deadline = time.monotonic() + seconds
        seen = idle = 0
        while seen < max_records and idle < 2:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            batch = await consumer.getmany(timeout_ms=max(1, int(min(left, 0.5) * 1000)), max_records=5000)
            n = sum(len(msgs) for msgs in batch.values())
            idle = idle + 1 if n == 0 else 0  # two empty fetches in a row: nothing more to read
            seen += n
            for msgs in batch.values():
                for m in msgs:
                    _check_record(m.value, first_ts, found)
    except (TimeoutError, KafkaError, OSError):
        return None  # a hint only: the send that follows reports an unreachable broker properly
    finally:
        await consumer.stop()
    if not found:
        return None
    return LateRisk(sorted(found)[:5], len(found), max(found.values()))


def _check_record(value: bytes | None, first_ts: dict[str, float], found: dict[str, float]) -> None:
    try:
        doc = orjson.loads(value or b"null")
    except orjson.JSONDecodeError:
        return
    for ev in doc if isinstance(doc, list) else [doc]:
        if not isinstance(ev, dict):
            continue
        sid, ts = ev.get("stream_id"), ev.get("ts")
        if isinstance(sid, str) and isinstance(ts, (int, float)) and sid in first_ts and ts > first_ts[sid]:
            found[sid] = max(ts, found.get(sid, ts))


async def _paced(rows: Iterable[Reading], rate: float) -> AsyncIterator[Reading]:
    """Yield rows at ``rate`` per second (0: as fast as possible; yields to the loop now and then)."""
    t0 = time.monotonic()
    for k, r in enumerate(rows):
        if rate > 0:
            ahead = t0 + k / rate - time.monotonic()
            if ahead > 0.002:
                await asyncio.sleep(ahead)
        elif k % 1000 == 999:
            await asyncio.sleep(0)
        yield r


async def send_readings(broker_url: str, topic: str, rows: Iterable[Reading], *, rate: float = 0.0,
                        batch: int = 0, gateways: int = 1, ts_now: bool = False, partitions: int = 8,
                        run: str | None = None, stop: asyncio.Event | None = None,
                        progress: Callable[[int], None] | None = None) -> Summary:
    """Send ``rows`` to ``topic`` (created with ``partitions`` if missing) and wait for delivery.

    ``batch`` > 0 sends arrays of up to ``batch`` readings per message, keyed by
    :func:`gateway_of`; ``ts_now`` stamps each reading with the wall-clock time when it is
    sent instead of its own ``ts`` (for live demos and latency measurements); ``run`` goes into
    every ``event_id``. ``stop`` ends the feed early; ``progress(events)`` is called now and then.
    """
    from worker.kafka import Sender, ensure_topics

    await ensure_topics(broker_url, [topic], partitions)
    events = messages = 0
    streams: set[str] = set()
    buffers: dict[str, list[dict[str, object]]] = {}
    t0 = time.monotonic()
    async with Sender(broker_url) as sender:
        async for sid, i, ts, values in _paced(rows, rate):
            if stop is not None and stop.is_set():
                break
            streams.add(sid)
            events += 1
            if progress is not None and events % 100 == 0:
                progress(events)
            if ts_now:
                ts = time.time()
            if batch <= 0:
                await sender.send(topic, event_json(sid, i, ts, values, run), sid.encode())
                messages += 1
                continue
            gw = gateway_of(sid, gateways)
            buf = buffers.setdefault(gw, [])
            buf.append(event_dict(sid, i, ts, values, run))
            if len(buf) >= batch:
                await sender.send(topic, orjson.dumps(buf), gw.encode())
                messages += 1
                buffers[gw] = []
        for gw, buf in buffers.items():
            if buf:
                await sender.send(topic, orjson.dumps(buf), gw.encode())
                messages += 1
    if progress is not None:
        progress(events)
    return Summary(events, messages, len(streams), time.monotonic() - t0, topic)
