"""``lstream produce``: send CSV rows or a synthetic multi-stream feed to the input topic.

Each CSV file is one stream named after the file (or one stream per value of
``--stream-column``); ``--synthetic N`` generates N streams with injected anomalies
(:func:`series.synthetic.generate`). Readings of all streams are sent in event-time order,
each stream's in its own order, keyed by stream id, with ``event_id`` ``"<stream>:<row>"``.
``--batch K`` sends gateway batches instead: JSON arrays of K readings keyed by a gateway
id; every stream belongs to one gateway (so it stays on one partition, in order).

The pieces are importable (``lstream demo`` and the benchmark use them):

>>> feeds = synthetic_feeds(2, 3, seed=1)
>>> rows = list(readings(feeds))
>>> [(r[0], r[1]) for r in rows]
[('sensor-000', 0), ('sensor-001', 0), ('sensor-000', 1), ('sensor-001', 1), ('sensor-000', 2), ('sensor-001', 2)]
>>> event_json("pump-1", 7, 1700000000.5, [0.25])
b'{"stream_id":"pump-1","ts":1700000000.5,"values":[0.25],"event_id":"pump-1:7"}'
>>> gateway_of("pump-1", 4) == gateway_of("pump-1", 4), gateway_of("pump-1", 1)
(True, 'gw-000')
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import sys
import time
import zlib
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import orjson

Reading = tuple[str, int, float, list[float]]  # (stream_id, row index, ts, values)


class OneLineParser(argparse.ArgumentParser):
    """Bad flags: one line on stderr and exit code 2 (no usage block)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


@dataclass
class Feed:
    """One stream's readings: ``values[i]`` (F numbers) at ``ts[i]`` (epoch seconds)."""

    stream_id: str
    ts: np.ndarray
    values: np.ndarray


@dataclass
class Summary:
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


def csv_feeds(paths: Sequence[str], stream_column: str | None = None,
              columns: Sequence[str] | None = None) -> list[Feed]:
    """Feeds from CSV files (raises ``series.csvdata.DataError`` with a one-line message)."""
    from series.csvdata import read_streams

    return [Feed(s.name, s.ts, s.values) for s in read_streams(list(paths), stream_column, columns)]


def synthetic_feeds(n_streams: int, n_steps: int, *, seed: int = 0, num_features: int = 1,
                    anomaly_rate: float | None = None, start_ts: float | None = None,
                    period_s: float = 60.0) -> list[Feed]:
    """Feeds from :func:`series.synthetic.generate` (seasonal signals with injected anomalies)."""
    from series.synthetic import generate

    extra: dict[str, float] = {}
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


def event_dict(stream_id: str, i: int, ts: float, values: list[float]) -> dict[str, object]:
    return {"stream_id": stream_id, "ts": ts, "values": values, "event_id": f"{stream_id}:{i}"}


def event_json(stream_id: str, i: int, ts: float, values: list[float]) -> bytes:
    """One event as the contract's JSON."""
    return orjson.dumps(event_dict(stream_id, i, ts, values))


def gateway_of(stream_id: str, gateways: int) -> str:
    """The gateway a stream is always sent under (stable across runs and machines)."""
    return f"gw-{zlib.crc32(stream_id.encode()) % max(1, gateways):03d}"


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
                        stop: asyncio.Event | None = None) -> Summary:
    """Send ``rows`` to ``topic`` (created with ``partitions`` if missing) and wait for delivery.

    ``batch`` > 0 sends arrays of up to ``batch`` readings per message, keyed by
    :func:`gateway_of`; ``ts_now`` stamps each reading with the wall-clock time when it is
    sent instead of its own ``ts`` (for live demos and latency measurements). ``stop`` ends
    the feed early.
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
            if ts_now:
                ts = time.time()
            if batch <= 0:
                await sender.send(topic, event_json(sid, i, ts, values), sid.encode())
                messages += 1
                continue
            gw = gateway_of(sid, gateways)
            buf = buffers.setdefault(gw, [])
            buf.append(event_dict(sid, i, ts, values))
            if len(buf) >= batch:
                await sender.send(topic, orjson.dumps(buf), gw.encode())
                messages += 1
                buffers[gw] = []
        for gw, buf in buffers.items():
            if buf:
                await sender.send(topic, orjson.dumps(buf), gw.encode())
                messages += 1
    return Summary(events, messages, len(streams), time.monotonic() - t0, topic)


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = OneLineParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("csv", nargs="*", help="CSV files, one stream each (or see --stream-column)")
    p.add_argument("--synthetic", type=int, metavar="N", help="send N synthetic streams instead of CSV files")
    p.add_argument("--steps", type=int, help="readings per stream (synthetic default 1000; CSV: all rows)")
    p.add_argument("--count", type=int, help="stop after this many events in total")
    p.add_argument("--rate", type=float, default=0.0, help="events per second (0: as fast as possible)")
    p.add_argument("--batch", type=int, default=0, metavar="K",
                   help="send gateway batches: JSON arrays of K readings keyed by gateway id")
    p.add_argument("--gateways", type=int, help="number of gateways for --batch (default: streams / K)")
    p.add_argument("--stream-column", help="CSV column holding the stream id (one file, many streams)")
    p.add_argument("--columns", help="comma-separated value columns (default: every numeric column)")
    p.add_argument("--features", type=int, default=1, help="values per synthetic reading (default 1)")
    p.add_argument("--anomaly-rate", type=float, help="injected anomalies per synthetic reading (default 0.002)")
    p.add_argument("--seed", type=int, default=0, help="synthetic seed (default 0)")
    p.add_argument("--ts-now", action="store_true", help="stamp readings with the send time, not their own ts")
    p.add_argument("--broker", help="Kafka bootstrap kafka://host:port (env LSTREAM_BROKER)")
    p.add_argument("--topic", help="input topic (env LSTREAM_INPUT_TOPIC, default sensor-events)")
    return p


def _check(args: argparse.Namespace) -> None:
    from lstream.cli import CliError

    if args.synthetic is None and not args.csv:
        raise CliError("expected CSV files or --synthetic N, got neither")
    if args.synthetic is not None and args.csv:
        raise CliError(f"expected CSV files or --synthetic N, got both ({len(args.csv)} files and --synthetic)")
    for name, low in (("synthetic", 1), ("steps", 1), ("count", 0), ("batch", 0), ("gateways", 1),
                      ("features", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            raise CliError(f"--{name}: expected at least {low}, got {value}")
    if args.rate < 0 or args.rate != args.rate:
        raise CliError(f"--rate: expected events per second >= 0, got {args.rate}")
    if args.anomaly_rate is not None and not 0 <= args.anomaly_rate <= 1:
        raise CliError(f"--anomaly-rate: expected a number in [0, 1], got {args.anomaly_rate}")


def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from lstream.cli import CliError
    from series.csvdata import DataError
    from worker.settings import from_env

    _check(args)
    settings = from_env(env, broker=args.broker, input_topic=args.topic)
    try:
        if args.synthetic is not None:
            feeds = synthetic_feeds(args.synthetic, args.steps or 1000, seed=args.seed,
                                    num_features=args.features, anomaly_rate=args.anomaly_rate)
        else:
            columns = [c.strip() for c in args.columns.split(",")] if args.columns else None
            feeds = csv_feeds(args.csv, args.stream_column, columns)
    except DataError as exc:
        raise CliError(str(exc)) from None
    gateways = (args.gateways or max(1, round(len(feeds) / args.batch))) if args.batch else 1
    rows = readings(feeds, steps=None if args.synthetic is not None else args.steps, count=args.count)
    summary = asyncio.run(send_readings(settings.broker, settings.input_topic, rows, rate=args.rate,
                                        batch=args.batch, gateways=gateways, ts_now=args.ts_now,
                                        partitions=settings.partitions))
    print(summary.line(), file=sys.stdout)
    return 0
