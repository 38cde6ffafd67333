"""Scale-out benchmark: N worker processes in one consumer group against one, on the same feed.

Run ``python -m benchmarks.scaleout`` (or ``lstream bench scaleout``; ``--quick`` for a smoke
run). On the embedded Tansu broker and a throwaway redis-server, for each feed (single events,
gateway batches of 100 readings) and each process count (``--processes``, default 1 and 2),
one after the other in the same run:

1. fill a fresh input topic (8 partitions) with the feed (fresh stream ids, so every case
   starts from empty states);
2. start N ``lstream worker`` processes in one group (``--batching``, default ``bulk``:
   worker/bulk.py) and note when every one holds partitions and together they hold all of
   them (polling ``/healthz``): the start of the window;
3. read the predictions until every reading has one.

readings/s: the predictions whose record timestamp falls in the window (from the full group to
the last prediction) divided by its length; what the first worker did before the others joined
is left out (``early %``), so the producer and the group join are outside the window. CPU us/reading: the workers'
CPU time (user + system, all N) in that window per reading; ``CPU %``: the workers' CPU
seconds per second of the window (200 % = two cores); ``wait %``: their main threads' time
waiting for a CPU (mean over the N), how much the rest of the machine took. ``vs 1`` compares
each N with one process of the same feed: the target is >= 1.6x for 2 processes on 2 cores. The broker,
Redis and this benchmark share the same cores, so N processes on C cores cannot reach N x;
``load`` is the 1-minute load average at the end of each case (other work on the machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from benchmarks.e2e import GATEWAY_BATCH, ROOT, CpuSampler, Feed, OutputReader, _send, model_dir

if TYPE_CHECKING:
    from lstream.devservices import WorkerProcess


@dataclass
class Config:
    processes: tuple[int, ...] = (1, 2)
    feeds: tuple[str, ...] = ("events", "batches")
    events: int = 60_000  # single-event messages
    batch_messages: int = 3_000  # gateway batches of 100 readings
    streams: int = 2_000
    partitions: int = 8
    batching: str = "bulk"
    join_timeout: float = 90.0
    timeout: float = 240.0


QUICK = Config(events=4_000, batch_messages=200, streams=400, timeout=120.0)


@dataclass
class Result:
    feed: str
    processes: int
    readings: int = 0
    rate: float = float("nan")
    cpu_us: float = float("nan")
    cpu_share: float = float("nan")  # the workers' CPU seconds per second of the window (all N)
    wait_share: float = float("nan")  # their main threads' run-queue wait per second, mean over the N
    join_s: float = float("nan")
    early: float = float("nan")  # share of the readings done before every worker held partitions
    load: float = float("nan")
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _assigned(port: int) -> list[int] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return list(json.loads(r.read()).get("assigned_partitions") or [])
    except (OSError, ValueError):
        return None


class ScaleOut:
    def __init__(self, cfg: Config, broker: str, redis_url: str, workdir: str, log: Any) -> None:
        self.cfg, self.broker, self.redis_url, self.workdir, self.log = cfg, broker, redis_url, workdir, log
        self.model = model_dir(workdir, log)

    def _spawn(self, run_id: str, topics: dict[str, str], i: int) -> WorkerProcess:
        from lstream.devservices import WorkerProcess

        # The workers get no LSTREAM_* variable of the caller's shell: only these.
        env = {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        env.update({
            "LSTREAM_BROKER": self.broker, "LSTREAM_REDIS_URL": self.redis_url,
            "LSTREAM_INPUT_TOPIC": topics["input"], "LSTREAM_PREDICTIONS_TOPIC": topics["output"],
            "LSTREAM_ALERTS_TOPIC": topics["alerts"], "LSTREAM_DLQ_TOPIC": topics["dlq"],
            "LSTREAM_APP_ID": f"scaleout-{run_id}",
            "LSTREAM_SESSION_TIMEOUT": "10", "LSTREAM_PARTITIONS": str(self.cfg.partitions),
            "LSTREAM_LOG_LEVEL": "warning", "LSTREAM_MODEL": self.model, "LSTREAM_BATCHING": self.cfg.batching,
        })
        return WorkerProcess(env=env, log=os.path.join(self.workdir, f"worker-{run_id}-{i}.log"), cwd=ROOT,
                             new_session=True)

    async def _joined(self, procs: list[subprocess.Popen[bytes]], ports: list[int]) -> float:
        """Wait until every worker holds partitions and together they hold all, for 2 s in a row;
        returns the wall time when that was first seen."""
        deadline = time.monotonic() + self.cfg.join_timeout
        stable_since: float | None = None
        stable_wall = 0.0
        while time.monotonic() < deadline:
            for p in procs:
                if p.poll() is not None:
                    raise RuntimeError(f"a worker exited with code {p.returncode}")
            held = await asyncio.gather(*(asyncio.to_thread(_assigned, port) for port in ports))
            parts = [x for h in held for x in (h or [])]
            ok = all(h for h in held) and sorted(parts) == list(range(self.cfg.partitions))
            if ok:
                if stable_since is None:
                    stable_since, stable_wall = time.monotonic(), time.time()
                if time.monotonic() - stable_since >= 2.0:
                    return stable_wall
            else:
                stable_since = None
            await asyncio.sleep(0.2)
        raise RuntimeError(f"the workers did not share the {self.cfg.partitions} partitions within "
                           f"{self.cfg.join_timeout:.0f} s")

    async def run_case(self, feed_kind: str, n: int) -> Result:
        from worker.kafka import ensure_topics

        cfg = self.cfg
        batched = feed_kind == "batches"
        run_id = uuid.uuid4().hex[:8]
        topics = {k: f"so-{k}-{run_id}" for k in ("input", "output", "alerts", "dlq")}
        readings = cfg.batch_messages * GATEWAY_BATCH if batched else cfg.events
        result = Result(feed_kind, n, readings)
        await ensure_topics(self.broker, list(topics.values()), cfg.partitions)
        feed = Feed(cfg.streams, prefix=f"s{run_id}")
        gateways = max(1, cfg.streams // GATEWAY_BATCH)
        await _send(self.broker, topics["input"], feed, readings, GATEWAY_BATCH if batched else 1, gateways)
        workers = [self._spawn(run_id, topics, i) for i in range(n)]
        procs = [w.proc for w in workers]
        samplers = [CpuSampler(p.pid) for p in procs]
        for s in samplers:
            s.start()
        reader = OutputReader(self.broker, topics["output"])
        await reader.start()
        try:
            t0 = time.time()
            start = await self._joined(procs, [w.port for w in workers])
            result.join_s = round(start - t0, 1)
            deadline = time.monotonic() + cfg.timeout
            while len(reader.stamps) < readings:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"timed out with {len(reader.stamps)} of {readings} predictions")
                for p in procs:
                    if p.poll() is not None:
                        raise RuntimeError(f"a worker exited with code {p.returncode}")
                await asyncio.sleep(0.5)
                # Read only while the workers are idle, so reading does not slow them down.
                if sum(s.busy(1.0) for s in samplers) > 0.05 * n:
                    continue
                await reader.drain()
            last = max(reader.stamps) / 1000
            done = sum(1 for t in reader.stamps if t > start * 1000)
            result.early = 1 - done / readings
            if done < readings / 4 or last <= start:
                result.note = "most of the feed was done before the group was complete: use a larger feed"
                return result
            result.rate = done / (last - start)
            cpu = sum(s.at(last) - s.at(start) for s in samplers)
            result.cpu_us = cpu / done * 1e6
            result.cpu_share = cpu / (last - start)
            result.wait_share = sum(s.at(last, 2) - s.at(start, 2) for s in samplers) / n / (last - start)
            result.extra["worker_cpu_s"] = round(cpu, 2)
        except Exception as exc:  # one failed case must not hide the others
            result.note = f"failed: {exc}"
            self.log(f"{feed_kind} x{n}: {result.note}; logs in {self.workdir}")
        finally:
            result.load = os.getloadavg()[0]
            await reader.stop()
            for s in samplers:
                await s.stop()
            for w in workers:
                w.stop(10)
        return result


def table(results: Sequence[Result]) -> str:
    head = f"{'feed':<8} {'processes':>9} {'readings':>9} {'readings/s':>11} {'CPU us/rd':>9} {'vs 1':>6} " \
           f"{'CPU %':>6} {'wait %':>6} {'early %':>7} {'join s':>6} {'load':>5}  note"
    lines = [head, "-" * len(head)]
    one = {r.feed: r.rate for r in results if r.processes == 1}

    def num(x: float, fmt: str) -> str:
        return "-" if x != x else format(x, fmt)

    for r in results:
        ratio = r.rate / one[r.feed] if r.feed in one else float("nan")
        lines.append(f"{r.feed:<8} {r.processes:>9} {r.readings:>9} {num(r.rate, ',.0f'):>11} "
                     f"{num(r.cpu_us, ',.1f'):>9} {num(ratio, '.2f'):>6} {num(100 * r.cpu_share, '.0f'):>6} "
                     f"{num(100 * r.wait_share, '.0f'):>6} {num(100 * r.early, '.0f'):>7} {num(r.join_s, '.1f'):>6} "
                     f"{num(r.load, '.1f'):>5}  {r.note}")
    lines.append("")
    lines.append(f"target: 2 processes >= 1.6x one ({os.cpu_count()} CPUs here, shared with the broker, Redis "
                 "and the producer)")
    return "\n".join(lines)


def build_parser(prog: str = "python -m benchmarks.scaleout") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a small smoke run")
    p.add_argument("--processes", help="comma-separated process counts (default 1,2)")
    p.add_argument("--feeds", help="comma-separated subset of events,batches")
    p.add_argument("--events", type=int, help="single-event messages")
    p.add_argument("--batch-messages", type=int, help="gateway batches of 100 readings")
    p.add_argument("--batching", choices=("smart", "take", "bulk"), help="the workers' batching (default bulk)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    return p


def config_from(args: argparse.Namespace) -> Config:
    cfg = QUICK if args.quick else Config()
    changes: dict[str, Any] = {}
    if args.processes:
        counts = tuple(int(x) for x in args.processes.split(",") if x.strip())
        if not counts or min(counts) < 1:
            raise SystemExit(f"bench scaleout: --processes: expected positive counts, got {args.processes!r}")
        changes["processes"] = counts
    if args.feeds:
        feeds = tuple(x.strip() for x in args.feeds.split(",") if x.strip())
        if not feeds or set(feeds) - {"events", "batches"}:
            raise SystemExit(f"bench scaleout: --feeds: expected events and/or batches, got {args.feeds!r}")
        changes["feeds"] = feeds
    for name in ("events", "batch_messages", "batching"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    return Config(**{**asdict(cfg), **changes})


async def run_bench(cfg: Config, log: Any = None) -> list[Result]:
    import shutil
    from contextlib import ExitStack

    from lstream.devservices import start_broker, start_redis

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    workdir = tempfile.mkdtemp(prefix="lstream-scaleout-")
    results = []
    failed = False
    try:
        with ExitStack() as stack:
            broker = stack.enter_context(start_broker()).url
            redis_url = stack.enter_context(start_redis()).url
            bench = ScaleOut(cfg, broker, redis_url, workdir, log)
            for feed in cfg.feeds:
                for n in cfg.processes:
                    r = await bench.run_case(feed, n)
                    failed = failed or r.note.startswith("failed")
                    log(f"{feed} x{n}: {r.rate:,.0f} readings/s, {r.cpu_us:,.1f} us CPU per reading "
                        f"(join {r.join_s} s, load {r.load:.1f}) {r.note}".rstrip())
                    results.append(r)
    finally:
        if failed:
            log(f"worker logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    cfg = config_from(args)
    results = asyncio.run(run_bench(cfg))
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=1))
    else:
        print(table(results))
    return 1 if any(r.note.startswith("failed") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

