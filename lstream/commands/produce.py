"""``lstream produce``: send CSV rows or a synthetic multi-stream feed to the input topic.

Each CSV file is one stream named after the file (or one stream per value of
``--stream-column``); ``--synthetic N`` generates N streams with injected anomalies. Readings
of all streams are sent in event-time order, each stream's in its own order, keyed by stream
id, with ``event_id`` ``"<stream>:<run id>:<row>"`` (a new run id each run unless ``--run-id``
repeats one, so a second run is not mistaken for duplicates). ``--batch K`` sends gateway
batches instead: JSON arrays of K readings keyed by a gateway id; every stream belongs to one
gateway (so it stays on one partition, in order).

Before sending events with their own timestamps (no ``--ts-now``) it looks at the topic for
newer events of the same streams and warns: a worker dead-letters older events as ``late``.
The feed library itself is :mod:`lstream.feeds`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Mapping

from lstream.cli import CliError, Parser, description, setting


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = Parser(prog=prog, description=description(__doc__))
    p.add_argument("csv", nargs="*", help="CSV files, one stream each (or see --stream-column)")
    src = p.add_argument_group("what to send")
    src.add_argument("--synthetic", type=int, metavar="N", help="send N synthetic streams instead of CSV files")
    setting(src, "--steps", type=int, default_text="1000 synthetic, every row of a CSV file",
            help="readings per stream")
    src.add_argument("--count", type=int, metavar="N", help="stop after N events in total")
    src.add_argument("--stream-column", metavar="NAME",
                     help="CSV column holding the stream id (one file, many streams)")
    setting(src, "--time-column", metavar="NAME", default_text="the first of timestamp, ts, time, datetime, date",
            help="CSV column holding the event time (epoch seconds or ISO 8601)")
    setting(src, "--columns", metavar="A,B", default_text="every numeric column", help="comma-separated value columns")
    src.add_argument("--features", type=int, default=1, help="values per synthetic reading")
    setting(src, "--anomaly-rate", type=float, default_text="0.002", help="injected anomalies per synthetic reading")
    src.add_argument("--seed", type=int, default=0, help="synthetic seed")
    how = p.add_argument_group("how to send")
    how.add_argument("--rate", type=float, default=0.0, help="events per second (0: as fast as possible)")
    how.add_argument("--batch", type=int, default=0, metavar="K",
                     help="send gateway batches: JSON arrays of K readings keyed by gateway id (0: single events)")
    setting(how, "--gateways", type=int, default_text="streams / K", help="number of gateways for --batch")
    how.add_argument("--ts-now", action="store_true", help="stamp readings with the send time, not their own ts")
    setting(how, "--run-id", default_text="a new one each run",
            help="goes into every event_id; repeat a run's id to resend it as duplicates")
    how.add_argument("--no-progress", dest="progress", action="store_false",
                     help="no progress bar (there is none anyway when stderr is not a terminal)")
    setting(p, "--broker", env="LSTREAM_BROKER", default_text="kafka://localhost:9092",
            help="Kafka bootstrap, host:port or kafka://host:port[;host:port...]")
    setting(p, "--topic", env="LSTREAM_INPUT_TOPIC", default_text="sensor-events", help="input topic")
    return p


def _check(args: argparse.Namespace) -> None:
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
    if args.run_id is not None and not args.run_id.replace("-", "").replace("_", "").isalnum():
        raise CliError(f"--run-id: expected letters, digits, - and _, got {args.run_id!r}")


class _Progress:
    """A rich progress bar on stderr when it is a terminal; nothing otherwise."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        if enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("producing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                console=Console(stderr=True), transient=True)
            self.task = self.bar.add_task("produce", total=total)

    def __enter__(self) -> Callable[[int], None] | None:
        if self.bar is None:
            return None
        self.bar.start()
        bar, task = self.bar, self.task
        return lambda n: bar.update(task, completed=n)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from lstream import feeds
    from series.csvdata import DataError
    from worker.settings import from_env

    _check(args)
    settings = from_env(env, broker=args.broker, input_topic=args.topic)
    synthetic = args.synthetic is not None
    try:
        if synthetic:
            feed = feeds.synthetic_feeds(args.synthetic, args.steps or 1000, seed=args.seed,
                                         num_features=args.features, anomaly_rate=args.anomaly_rate)
        else:
            columns = [c.strip() for c in args.columns.split(",")] if args.columns else None
            feed = feeds.csv_feeds(args.csv, args.stream_column, columns, time_column=args.time_column)
    except DataError as exc:
        raise CliError(str(exc)) from None
    steps = None if synthetic else args.steps
    if not args.ts_now:
        risk = asyncio.run(feeds.late_risk(settings.broker, settings.input_topic, feeds.first_times(feed, steps)))
        if risk is not None:
            print(f"lstream produce: {risk.line()}", file=sys.stderr, flush=True)
    gateways = (args.gateways or max(1, round(len(feed) / args.batch))) if args.batch else 1
    total = sum(len(f.ts) if steps is None else min(steps, len(f.ts)) for f in feed)
    total = total if args.count is None else min(total, args.count)
    run_id = args.run_id or feeds.new_run_id()
    rows = feeds.readings(feed, steps=steps, count=args.count)
    with _Progress(total, args.progress) as progress:
        summary = asyncio.run(feeds.send_readings(settings.broker, settings.input_topic, rows, rate=args.rate,
                                                  batch=args.batch, gateways=gateways, ts_now=args.ts_now,
                                                  partitions=settings.partitions, run=run_id, progress=progress))
    print(f"{summary.line()}; run id {run_id}", file=sys.stdout)
    return 0
