"""Scale benchmark: the worker over 1k ... 1M distinct streams, in gateway batches.

Run ``python -m benchmarks.scale`` (or ``lstream bench scale``); ``--quick`` runs 1k and 10k.
For each number of streams N, on the embedded Tansu broker and a throwaway redis-server:

1. a fresh input topic is filled with k readings of every stream (k >= 2, more for small N so
   that every case has at least ``--min-readings``), one step of every stream at a time, in
   gateway batches of 100 readings;
2. ``lstream worker`` starts and drains it (warm: the held-state cache is on, streams are
   new); readings/s runs from when the worker woke up to the last prediction's timestamp;
3. the worker stops, one more reading per stream is sent, and a new worker process (cold
   cache, as after a rebalance) drains it: every stream's state is loaded from Redis;
   ``cold s`` is that time and ``cold/s`` the readings per second of it.

Reported per N: readings/s (warm) and its ratio to the smallest N, worker peak RSS, Redis
``used_memory`` per stream, Redis server CPU (``INFO cpu``, user + system, all commands)
per applied reading and per stream save (the worker's ``lstream_states_saved_total`` when it
has one, else per reading), the cold drain, and the cost of ``lstream state list``. ``--plot``
draws each against N. The broker, Redis, the worker and this process share the machine's
cores, so absolute numbers move with load; the ratios between sizes in one run are the point.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.e2e import ROOT, CpuSampler, OutputReader, model_dir

if TYPE_CHECKING:
    from lstream.devservices import WorkerProcess
    from lstream.feeds import Reading

GATEWAY_BATCH = 100


@dataclass
class Row:
    streams: int
    readings: int = 0
    rate: float = math.nan  # readings/s, warm
    rss_mb: float = math.nan  # worker peak RSS
    redis_bytes_per_stream: float = math.nan
    redis_us_per_reading: float = math.nan
    redis_us_per_save: float = math.nan
    cold_seconds: float = math.nan
    cold_rate: float = math.nan
    list_seconds: float = math.nan
    note: str = ""


def _redis_info(url: str) -> dict[str, Any]:
    import redis

    client = redis.Redis.from_url(url)
    try:
        info = client.info("all")
    finally:
        client.close()
    return info


def _server_cpu(info: dict[str, Any]) -> float:
    return float(info.get("used_cpu_user", 0.0)) + float(info.get("used_cpu_sys", 0.0))


def _metrics(port: int) -> dict[str, float]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? ([0-9.eE+-]+)$", line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
    return out


def _peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return math.nan


def _readings(ids: Sequence[str], steps: range, t0: float) -> Iterator[Reading]:
    """Readings ``steps`` of every stream, one step of every stream at a time."""
    for k in steps:
        for i, sid in enumerate(ids):
            yield sid, k, t0 + 60.0 * k, [math.sin(k / 7.0 + i) * 10.0 + i % 13]


async def _send(broker: str, topic: str, ids: Sequence[str], steps: range, t0: float, partitions: int) -> None:
    """The readings in gateway batches of GATEWAY_BATCH (lstream.feeds, as ``lstream produce --batch``)."""
    from lstream.feeds import send_readings

    await send_readings(broker, topic, _readings(ids, steps, t0), batch=GATEWAY_BATCH,
                        gateways=max(1, len(ids) // 1000), partitions=partitions)


class Scale:
    def __init__(self, broker: str, redis_url: str, workdir: str, partitions: int, timeout: float,
                 worker_env: dict[str, str], log: Any) -> None:
        self.broker, self.redis_url, self.workdir = broker, redis_url, workdir
        self.partitions, self.timeout, self.extra_env, self.log = partitions, timeout, worker_env, log
        self.model = model_dir(workdir, log)

    def _start_worker(self, run_id: str, topics: dict[str, str], tag: str) -> WorkerProcess:
        from lstream.devservices import WorkerProcess

        # The worker gets no LSTREAM_* variable of the caller's shell: only these and --worker-env.
        env = {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        env.update({
            "LSTREAM_BROKER": self.broker, "LSTREAM_REDIS_URL": self.redis_url,
            "LSTREAM_INPUT_TOPIC": topics["in"], "LSTREAM_PREDICTIONS_TOPIC": topics["out"],
            "LSTREAM_ALERTS_TOPIC": topics["alerts"], "LSTREAM_DLQ_TOPIC": topics["dlq"],
            "LSTREAM_APP_ID": f"scale-{run_id}",
            "LSTREAM_SESSION_TIMEOUT": "10", "LSTREAM_PARTITIONS": str(self.partitions),
            "LSTREAM_LOG_LEVEL": "warning", "LSTREAM_MODEL": self.model,
        })
        env.update(self.extra_env)
        return WorkerProcess(env=env, log=os.path.join(self.workdir, f"worker-{run_id}-{tag}.log"), cwd=ROOT,
                             new_session=True)

    async def _drain(self, proc: subprocess.Popen[bytes], reader: OutputReader, expect: int) -> tuple[float, float]:
        """Wait until ``expect`` more predictions arrived; (seconds from wake-up, worker CPU s)."""
        sampler = CpuSampler(proc.pid)
        sampler.start()
        have = len(reader.stamps)
        deadline = time.monotonic() + self.timeout
        try:
            while len(reader.stamps) - have < expect:
                if proc.poll() is not None:
                    raise RuntimeError(f"worker exited with {proc.returncode} (log in {self.workdir})")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{len(reader.stamps) - have} of {expect} predictions in {self.timeout:.0f} s")
                await reader.poll(200)
            new = reader.stamps[have:]
            first, last = min(new) / 1000.0, max(new) / 1000.0
            start = sampler.wake_up(before=first) or first
            return max(last - start, 1e-3), sampler.busy(1e9)
        finally:
            await sampler.stop()

    async def case(self, n: int, min_readings: int) -> Row:
        from worker.kafka import ensure_topics

        run_id = uuid.uuid4().hex[:8]
        row = Row(n)
        topics = {k: f"scale-{k}-{run_id}" for k in ("in", "out", "alerts", "dlq")}
        await ensure_topics(self.broker, list(topics.values()), self.partitions)
        ids = [f"s{run_id}-{i:07d}" for i in range(n)]
        k = max(2, math.ceil(min_readings / n))
        row.readings = n * k
        t0 = time.time() - 86_400.0
        sent = time.monotonic()
        await _send(self.broker, topics["in"], ids, range(k), t0, self.partitions)
        self.log(f"{n} streams: produced {row.readings} readings in {time.monotonic() - sent:.1f} s")
        before = _redis_info(self.redis_url)
        reader = OutputReader(self.broker, topics["out"])
        await reader.start()
        try:
            w = self._start_worker(run_id, topics, "warm")
            try:
                seconds, _ = await self._drain(w.proc, reader, row.readings)
                row.rate = row.readings / seconds
                row.rss_mb = _peak_rss_mb(w.pid)
                saves = _metrics(w.port).get("lstream_states_saved_total")
            finally:
                w.stop()
            after = _redis_info(self.redis_url)
            cpu_us = (_server_cpu(after) - _server_cpu(before)) * 1e6
            row.redis_us_per_reading = cpu_us / row.readings
            row.redis_us_per_save = cpu_us / saves if saves else math.nan
            row.redis_bytes_per_stream = (after["used_memory"] - before["used_memory"]) / n
            # Cold: a new process holds nothing; every stream is loaded from Redis.
            await _send(self.broker, topics["in"], ids, range(k, k + 1), t0, self.partitions)
            w = self._start_worker(run_id, topics, "cold")
            try:
                row.cold_seconds, _ = await self._drain(w.proc, reader, n)
                row.cold_rate = n / row.cold_seconds
            finally:
                w.stop()
        finally:
            await reader.stop()
        t = time.monotonic()
        subprocess.run([sys.executable, "-m", "lstream.cli", "state", "list", "--limit", "20",
                        "--redis", self.redis_url], check=True, capture_output=True, cwd=str(ROOT))
        row.list_seconds = time.monotonic() - t
        self.log(f"{n} streams: {row.rate:,.0f} readings/s, RSS {row.rss_mb:.0f} MB, "
                 f"{row.redis_bytes_per_stream:.0f} B/stream, cold drain {row.cold_seconds:.1f} s")
        return row


def table(rows: Sequence[Row]) -> str:
    base = rows[0].rate if rows else math.nan
    head = (f"{'streams':>9} {'readings':>9} {'readings/s':>11} {'vs first':>8} {'RSS MB':>7} "
            f"{'Redis B/str':>11} {'srv us/rd':>9} {'srv us/save':>11} {'cold s':>7} {'cold/s':>9} {'list s':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.streams:>9,} {r.readings:>9,} {r.rate:>11,.0f} {r.rate / base:>8.2f} {r.rss_mb:>7.0f} "
                     f"{r.redis_bytes_per_stream:>11.0f} {r.redis_us_per_reading:>9.2f} {r.redis_us_per_save:>11.2f} "
                     f"{r.cold_seconds:>7.1f} {r.cold_rate:>9,.0f} {r.list_seconds:>6.2f}")
    return "\n".join(lines)


def plot(rows: Sequence[Row], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r.streams for r in rows]
    panels = [("readings/s (warm)", [r.rate for r in rows]), ("worker peak RSS (MB)", [r.rss_mb for r in rows]),
              ("Redis bytes per stream", [r.redis_bytes_per_stream for r in rows]),
              ("Redis server us per reading", [r.redis_us_per_reading for r in rows]),
              ("cold drain readings/s", [r.cold_rate for r in rows]),
              ("state list seconds", [r.list_seconds for r in rows])]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (title, ys) in zip(axes.flat, panels):
        ax.plot(xs, ys, marker="o")
        ax.set_xscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("streams")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def build_parser(prog: str = "python -m benchmarks.scale") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--streams", default="1000,10000,100000,1000000", help="comma-separated stream counts")
    p.add_argument("--quick", action="store_true", help="1k and 10k streams, fewer readings")
    p.add_argument("--min-readings", type=int, default=200_000, help="at least this many readings per case")
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per drain")
    p.add_argument("--worker-env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment for the worker (e.g. LSTREAM_STATE_CACHE_ENTRIES=100000)")
    p.add_argument("--plot", default=None, help="write a PNG of each measure against the number of streams")
    p.add_argument("--json", default=None, help="write the rows as JSON")
    return p


async def _main(args: argparse.Namespace) -> list[Row]:
    from lstream.devservices import start_broker, start_redis

    sizes = [1000, 10000] if args.quick else [int(s) for s in args.streams.split(",")]
    min_readings = 20_000 if args.quick else args.min_readings
    extra = dict(kv.split("=", 1) for kv in args.worker_env)
    workdir = tempfile.mkdtemp(prefix="lstream-scale-")

    def log(msg: str) -> None:
        print(f"[scale] {msg}", file=sys.stderr, flush=True)

    rows: list[Row] = []
    with start_broker() as broker, start_redis() as redis_service:
        bench = Scale(broker.url, redis_service.url, workdir, args.partitions, args.timeout, extra, log)
        for n in sizes:
            try:
                rows.append(await bench.case(n, min_readings))
            except (RuntimeError, TimeoutError) as exc:
                log(f"{n} streams: {exc}")
                rows.append(Row(n, note=str(exc)))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rows = asyncio.run(_main(args))
    print(table(rows))
    for r in rows:
        if r.note:
            print(f"{r.streams}: {r.note}")
    if args.plot:
        plot(rows, args.plot)
        print(f"plot: {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0 if all(not r.note for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
