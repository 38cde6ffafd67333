"""Latency benchmark: event -> prediction and event -> alert at a steady rate, before/after.

Run ``python -m benchmarks.latency`` (or ``lstream bench latency``; ``--quick`` for a short
run). On the embedded Tansu broker and a throwaway redis-server (or ``--broker``/``--redis-url``)
it runs the real worker (``lstream worker`` subprocesses) once per configuration, one after the
other in the same run:

- ``before``: ``--fetch-wait 1.5 --batching take --batch-wait 0.05``: the consumer's fetch wait
  Faust hard-codes and the worker's batching before (Faust's ``stream.take``, 50 ms);
- ``after``: the worker's defaults (worker/settings.py: ``fetch_wait`` 10 ms, ``batching`` smart,
  no linger).

For each, once the worker holds its partitions, single events are produced at a steady rate
(``--rate`` events/s over ``--streams`` streams, keys = stream ids), each stamped with its send
time in ``ts``; every stream gets one spike after its detector's warm-up, so alerts come too.
A reader without a consumer group takes the predictions and alerts as they arrive. Two
latencies per output:

- ``emitted``: the output record's Kafka timestamp (set by the worker's producer when it
  appends the record) minus the event's ``ts``: the worker's share;
- ``received``: when the reader got the output minus ``ts``: what a consumer sees (adds the
  broker's delivery and the reader's own fetch wait, 5 ms).

The row ``(input)`` is the same reader reading the input records: producer -> broker ->
consumer without the worker, the floor that the machine and the broker set.

The first ``--skip`` seconds are left out (group join, first compiles). Numbers depend on
what else runs on the machine (broker, Redis, producer, reader and worker share its cores).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parent.parent

CASES: dict[str, list[str]] = {
    "before": ["--fetch-wait", "1.5", "--batching", "take", "--batch-wait", "0.05"],
    "after": [],
}


@dataclass
class Result:
    case: str
    events: int = 0
    predictions: dict[str, list[float]] = field(default_factory=lambda: {"emitted": [], "received": []})
    alerts: dict[str, list[float]] = field(default_factory=lambda: {"emitted": [], "received": []})
    # The input records themselves, read by the same reader: the broker's and the machine's
    # share (producer -> broker -> a consumer), without the worker.
    inputs: dict[str, list[float]] = field(default_factory=lambda: {"emitted": [], "received": []})
    worker: dict[str, tuple[float, float]] = field(default_factory=dict)  # its /metrics: path -> (p50, p99)
    cpu: float = 0.0  # the worker's CPU seconds (process_cpu_seconds_total) during the feed
    wall: float = 0.0


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def _series(i: int, step: int, spike_at: int) -> float:
    value = 20.0 + 5.0 * math.sin(2 * math.pi * step / 25.0)
    return value + (60.0 if step == spike_at else 0.0)


async def _produce(broker: str, topic: str, rate: float, seconds: float, streams: int, tag: str,
                   warmup: int) -> int:
    from aiokafka import AIOKafkaProducer

    from worker.kafka import bootstrap

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap(broker), linger_ms=0, acks=1)
    await producer.start()
    ids = [f"{tag}-{i:03d}" for i in range(streams)]
    keys = [s.encode() for s in ids]
    spikes = [warmup + 10 + 7 * i for i in range(streams)]
    tick = 0.005
    per_tick = rate * tick
    sent, owed = 0, 0.0
    start = time.monotonic()
    try:
        while time.monotonic() - start < seconds:
            owed += per_tick
            while owed >= 1.0:
                i = sent % streams
                step = sent // streams
                doc = {"stream_id": ids[i], "ts": time.time(), "values": [_series(i, step, spikes[i])]}
                await producer.send(topic, orjson.dumps(doc), key=keys[i])
                sent += 1
                owed -= 1.0
            next_at = start + (round((time.monotonic() - start) / tick) + 1) * tick
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        await producer.flush()
    finally:
        await producer.stop()
    return sent


async def _read(broker: str, topics: list[str], stop: asyncio.Event,
                out: list[tuple[str, float, float, float]]) -> None:
    """(topic, event ts, record timestamp s, received at) per output, until ``stop`` is set
    and nothing came for a second."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from worker.kafka import bootstrap

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap(broker), group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest", fetch_max_wait_ms=5)
    await consumer.start()
    try:
        tps = []
        for t in topics:
            parts: set[int] | None = None
            while not parts:
                await consumer._client.force_metadata_update()
                parts = consumer.partitions_for_topic(t)
                if not parts:
                    await asyncio.sleep(0.2)
            tps += [TopicPartition(t, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        quiet_since = None
        while True:
            batch = await consumer.getmany(timeout_ms=100)
            now = time.time()
            n = 0
            for records in batch.values():
                for r in records:
                    doc = orjson.loads(r.value)
                    out.append((r.topic, float(doc["ts"]), r.timestamp / 1000.0, now))
                    n += 1
            if stop.is_set():
                if n:
                    quiet_since = None
                elif quiet_since is None:
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since > 1.5:
                    return
    finally:
        await consumer.stop()


def _worker_args(broker: str, redis_url: str, topics: dict[str, str], app_id: str, extra: list[str]) -> list[str]:
    return ["--broker", broker, "--redis-url", redis_url, "--session-timeout", "10", "--app-id", app_id,
            "--partitions", "4", "--input-topic", topics["input"], "--predictions-topic", topics["predictions"],
            "--alerts-topic", topics["alerts"], "--dlq-topic", topics["dlq"], "--log-level", "warning", *extra]


def _cpu(port: int) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    _, body = _get(port, "/metrics")
    for fam in text_string_to_metric_families(body.decode()):
        if fam.name == "process_cpu_seconds":
            return float(fam.samples[0].value)
    return 0.0


def _worker_quantiles(port: int) -> dict[str, tuple[float, float]]:
    """(p50, p99) per path of the worker's lstream_end_to_end_latency_seconds (bucket upper bounds)."""
    from prometheus_client.parser import text_string_to_metric_families

    status, body = _get(port, "/metrics")
    out: dict[str, tuple[float, float]] = {}
    if status != 200:
        return out
    for fam in text_string_to_metric_families(body.decode()):
        if fam.name in ("lstream_stage_seconds", "lstream_batch_size_messages"):
            sums = {s.labels.get("stage", "size"): s.value for s in fam.samples if s.name.endswith("_sum")}
            counts = {s.labels.get("stage", "size"): s.value for s in fam.samples if s.name.endswith("_count")}
            for k, total in sums.items():
                if counts.get(k):
                    scale = 1.0 if k == "size" else 1000.0  # stages in ms, batch size in messages
                    out[f"mean {k}"] = (total / counts[k] * scale, counts[k])
        if fam.name != "lstream_end_to_end_latency_seconds":
            continue
        series: dict[str, list[tuple[float, float]]] = {}
        for s in fam.samples:
            if s.name.endswith("_bucket"):
                series.setdefault(f"{s.labels['path']}/{s.labels['kind']}", []).append((float(s.labels["le"]), s.value))
        for key, buckets in series.items():
            buckets.sort()
            total = buckets[-1][1]
            if total:
                out[key] = tuple(next(le for le, n in buckets if n >= q * total) for q in (0.5, 0.99))  # type: ignore[assignment]
    return out


async def _case(case: str, extra: list[str], broker: str, redis_url: str, opts: argparse.Namespace,
                log: Path) -> Result:
    from lstream.devservices import WorkerProcess
    from worker.kafka import ensure_topics

    uid = uuid.uuid4().hex[:6]
    topics = {k: f"lat-{case}-{k}-{uid}" for k in ("input", "predictions", "alerts", "dlq")}
    await ensure_topics(broker, list(topics.values()), 4)
    # Started once, before anything is timed: a blocking start is fine here.
    w = WorkerProcess(_worker_args(broker, redis_url, topics, f"lat-{case}-{uid}",
                                   [*extra, *(["--model", opts.model] if opts.model else [])]), log=log, cwd=ROOT)
    port = w.port
    res = Result(case)
    try:
        await asyncio.to_thread(w.wait_ready, 120.0, healthy=True)
        stop = asyncio.Event()
        got: list[tuple[str, float, float, float]] = []
        reader = asyncio.create_task(_read(broker, [topics["predictions"], topics["alerts"], topics["input"]], stop,
                                           got))
        t0 = time.time()
        cpu0 = _cpu(port)
        res.events = await _produce(broker, topics["input"], opts.rate, opts.seconds, opts.streams, f"lat{uid}",
                                    opts.warmup)
        stop.set()
        res.cpu, res.wall = _cpu(port) - cpu0, time.time() - t0
        await asyncio.wait_for(reader, 60)
        res.worker = _worker_quantiles(port)
        for topic, ts, emitted, received in got:
            if ts < t0 + opts.skip:
                continue
            bucket = {topics["predictions"]: res.predictions, topics["alerts"]: res.alerts}.get(topic, res.inputs)
            bucket["emitted"].append(emitted - ts)
            bucket["received"].append(received - ts)
    finally:
        w.stop(30)
    return res


def _stats(xs: list[float]) -> str:
    if not xs:
        return "-"
    a = np.asarray(xs) * 1000.0
    return f"{np.percentile(a, 50):7.1f} {np.percentile(a, 99):7.1f} {a.max():7.1f}"


def table(results: Sequence[Result]) -> str:
    head = (f"{'case':<7} {'events':>6} {'output':<10} {'n':>6}  {'emitted p50/p99/max ms':>24}  "
            f"{'received p50/p99/max ms':>24}")
    lines = [head, "-" * len(head)]
    for r in results:
        for kind, d in (("prediction", r.predictions), ("alert", r.alerts), ("(input)", r.inputs)):
            lines.append(f"{r.case:<7} {r.events:>6} {kind:<10} {len(d['emitted']):>6}  {_stats(d['emitted']):>24}  "
                         f"{_stats(d['received']):>24}")
    lines.append("")
    lines.append("the worker's own histograms (lstream_end_to_end_latency_seconds, bucket bounds, whole run):")
    for r in results:
        parts = [f"{k} p50<={v[0] * 1000:g} p99<={v[1] * 1000:g} ms" for k, v in sorted(r.worker.items())
                 if not k.startswith("mean")]
        lines.append(f"  {r.case:<7} " + "; ".join(parts))
        means = [f"{k[5:]} {v[0]:.1f}" for k, v in sorted(r.worker.items()) if k.startswith("mean")]
        if r.wall and r.events:
            lines.append(f"  {'':<7} worker CPU: {r.cpu / r.wall:.2f} cores, {r.cpu / r.events * 1e6:.0f} us per event")
        if means:
            lines.append(f"  {'':<7} per batch (ms; size in messages): " + ", ".join(means))
    return "\n".join(lines)


def build_parser(prog: str = "python -m benchmarks.latency") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Event -> prediction / alert latency, before and after.")
    p.add_argument("--rate", type=float, default=1000.0, help="events per second (default 1000)")
    p.add_argument("--seconds", type=float, default=20.0, help="seconds of feed per case (default 20)")
    p.add_argument("--streams", type=int, default=40, help="streams (default 40)")
    p.add_argument("--warmup", type=int, default=200, help="events per stream before its spike (default 200)")
    p.add_argument("--skip", type=float, default=2.0, help="seconds left out at the start (default 2)")
    p.add_argument("--cases", default="before,after", help="comma-separated: before, after (default both) or "
                   "names given with --case")
    p.add_argument("--case", action="append", default=[], metavar="NAME=FLAGS",
                   help="an extra configuration: worker flags, e.g. 'fw100=--fetch-wait 0.1' (repeatable)")
    p.add_argument("--model", help="model artifact directory (default: the worker's default model)")
    p.add_argument("--broker", help="kafka://host:port (default: an embedded Tansu broker)")
    p.add_argument("--redis-url", help="redis:// URL (default: a throwaway redis-server)")
    p.add_argument("--quick", action="store_true", help="a short run: 12 s per case, 20 streams")
    p.add_argument("--json", action="store_true", help="print the raw percentiles as JSON too")
    return p


async def _main(opts: argparse.Namespace) -> list[Result]:
    from contextlib import ExitStack

    from lstream.devservices import start_broker, start_redis

    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="lstream-latency-") as workdir:
        broker = opts.broker or stack.enter_context(start_broker()).url
        redis_url = opts.redis_url or stack.enter_context(start_redis()).url
        log = Path(workdir) / "workers.log"  # every worker appends to it
        results = []
        for case in opts.cases.split(","):
            print(f"-- {case}: {opts.rate:.0f} events/s for {opts.seconds:.0f} s over {opts.streams} streams "
                  f"(worker flags: {' '.join(CASES[case]) or 'defaults'})", flush=True)
            try:
                results.append(await _case(case, CASES[case], broker, redis_url, opts, log))
            except Exception as exc:
                tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
                raise RuntimeError(f"{case}: {exc}\n{tail}") from exc
        return results


def main(argv: Sequence[str] | None = None) -> int:
    opts = build_parser().parse_args(argv)
    if opts.quick:
        opts.seconds, opts.streams = 12.0, 20
    for spec in opts.case:
        name, _, flags = spec.partition("=")
        CASES[name.strip()] = flags.split()
    results = asyncio.run(_main(opts))
    print(table(results))
    if opts.json:
        print(json.dumps({r.case: {k: {m: _stats(v) for m, v in d.items()}
                                   for k, d in (("prediction", r.predictions), ("alert", r.alerts))}
                          for r in results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
