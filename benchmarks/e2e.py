"""End-to-end benchmark: events through a real broker, worker and Redis, into predictions.

Run ``python -m benchmarks.e2e`` (or ``lstream bench e2e``); ``--quick`` for a smoke run. On the
embedded Tansu broker and a throwaway redis-server it measures, one after the other:

- ``noop``: a Faust agent that only consumes (the framework's own ceiling);
- ``naive``: a small Faust app doing per event what a first design would: JSON decode,
  Redis GET of the stream's state, one torch LSTM step, Redis SET, one ``send``;
- ``lstream``: the real worker (``lstream worker``) on single-event messages;
- ``lstream-batch`` (and ``noop-batch``): the same on gateway batches of 100 readings;
- ``bulk`` and ``bulk-batch``: the real worker with ``batching=bulk`` (worker/bulk.py: records
  taken from Faust's consumer a fetch at a time instead of one by one through an agent).

Every worker runs as a subprocess, so its CPU time can be read from ``/proc``. For each case
the input topic is filled first (``--events``), then the worker starts and drains it:

- events/s: readings processed per second of wall time, from when the worker woke up after
  joining its group (the end of its last idle second, from the CPU samples) to the last
  output's record timestamp; the no-op agent reports its own first/last event times;
- CPU us/event: the worker process's CPU time (user + system, with its children) in that
  same window, divided by the readings processed in it;
- latency: afterwards, readings are produced at a steady rate (half the measured drain rate,
  at most 2,000 readings/s, or 200,000 in gateway batches) stamped with the send time in
  ``ts``; each prediction's arrival at the benchmark minus its ``ts`` gives p50/p99. On
  Tansu this is dominated by the consumer's ``fetch_max_wait_ms`` (Faust hard-codes 1500 ms
  and Tansu holds an empty fetch that long); ``--faust-fetch-wait MS`` lowers it for the
  no-op and naive apps to show the difference.

Numbers depend on the machine and on what else runs on it: the broker, Redis and the
benchmark itself share the same cores. ``wait %`` (the worker's main thread waiting for a
CPU, from /proc/<pid>/schedstat) shows how much other processes took, and ``uncont./s``
takes that wait out of the window: an estimate for an otherwise idle machine. For the
lstream worker the table also shows its micro-batch sizes and seconds per pipeline stage
(from its /metrics page).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
GATEWAY_BATCH = 100


# --------------------------------------------------------------------------------------
# The Faust apps under test (run in a subprocess: python -m benchmarks.e2e --agent KIND ...)
# --------------------------------------------------------------------------------------

def _model_shape(model_dir: str) -> tuple[int, int, int]:
    """(input_size, hidden_size, num_layers) of the model the lstream worker runs, so the naive
    worker's LSTM costs what the real one would."""
    meta = json.loads((Path(model_dir) / "model.json").read_text())
    return int(meta["input_size"]), int(meta["hidden_size"]), int(meta["num_layers"])


def model_dir(workdir: str, log: Any) -> str:
    """The bundled model, or (if it is not there yet) a random one of a typical size."""
    from worker.settings import DEFAULT_MODEL

    if (Path(DEFAULT_MODEL) / "model.json").exists():
        return DEFAULT_MODEL
    import torch

    from training.export import export_model

    out = os.path.join(workdir, "model")
    torch.manual_seed(0)
    export_model(torch.nn.LSTM(1, 32, 1, batch_first=True), [torch.nn.Linear(32, 1)], out, features=["value"],
                 norm={"mode": "stream"}, meta={"note": "random weights for the benchmark"})
    log(f"{DEFAULT_MODEL} not found: benchmarking a random model of 1 layer x 32 units")
    return out


def _faust_app(app_id: str, broker: str, partitions: int, datadir: str) -> Any:
    import faust

    return faust.App(app_id, broker=broker, web_enabled=False, broker_session_timeout=10.0,
                     broker_heartbeat_interval=1.0, stream_recovery_delay=0.0,
                     consumer_auto_offset_reset="earliest", topic_partitions=partitions,
                     store="memory://", datadir=datadir, key_serializer="raw", value_serializer="raw")


def _patch_fetch_wait(ms: int) -> None:
    """Faust hard-codes aiokafka's ``fetch_max_wait_ms=1500``; Tansu holds a fetch that finds
    no data for that long even when records arrive meanwhile, which is what sets a Faust
    worker's latency on it. This lowers it (only for the latency comparison)."""
    from faust.transport.drivers import aiokafka as driver

    original = driver.AIOKafkaConsumerThread._create_worker_consumer

    def create(self: Any, transport: Any) -> Any:
        consumer = original(self, transport)
        consumer._fetch_max_wait_ms = ms  # read when the consumer starts its fetcher
        return consumer

    driver.AIOKafkaConsumerThread._create_worker_consumer = create


def run_agent(opts: argparse.Namespace) -> int:
    """Run the ``noop`` or ``naive`` Faust app until SIGTERM."""
    import faust

    if opts.fetch_wait_ms is not None:
        _patch_fetch_wait(opts.fetch_wait_ms)
    datadir = tempfile.mkdtemp(prefix="bench-faust-")
    app = _faust_app(opts.app_id, opts.broker, opts.partitions, datadir)
    source = app.topic(opts.input, key_type=bytes, value_type=bytes)

    if opts.agent == "noop":
        state = {"n": 0, "first": 0.0}

        @app.agent(source)
        async def noop(stream: Any) -> None:
            async for _value in stream:
                n = state["n"] = state["n"] + 1
                if state["first"] == 0.0:
                    state["first"] = time.time()
                    state["first_n"] = n
                if n >= opts.expect and "done" not in state:
                    state["done"] = time.time()
                    report = {"first": state["first"], "last": state["done"],
                              "n": (n - state["first_n"]) * opts.per_message}
                    Path(opts.report).write_text(json.dumps(report))
    else:
        import numpy as np
        import orjson
        import redis.asyncio as aioredis
        import torch

        torch.set_num_threads(1)
        f, hid, layers = _model_shape(opts.model)
        torch.manual_seed(0)
        lstm = torch.nn.LSTM(f, hid, layers, batch_first=True).eval()
        head = torch.nn.Linear(hid, f).eval()
        sink = app.topic(opts.output, key_type=bytes, value_type=bytes)
        rds = aioredis.Redis.from_url(opts.redis)
        size = layers * hid

        @app.agent(source)
        async def naive(stream: Any) -> None:
            async for key, value in stream.items():
                ev = orjson.loads(value)
                sid = ev["stream_id"]
                raw = await rds.get("naive:" + sid)
                if raw is None:
                    h = torch.zeros(layers, 1, hid)
                    c = torch.zeros(layers, 1, hid)
                    step = 0
                else:
                    arr = np.frombuffer(raw, dtype=np.float32)
                    h = torch.from_numpy(arr[:size].copy()).view(layers, 1, hid)
                    c = torch.from_numpy(arr[size:2 * size].copy()).view(layers, 1, hid)
                    step = int(arr[-1])
                x = torch.tensor(ev["values"], dtype=torch.float32).view(1, 1, f)
                with torch.no_grad():
                    out, (h, c) = lstm(x, (h, c))
                    y = head(out[:, -1])
                state_bytes = h.numpy().tobytes() + c.numpy().tobytes() + np.float32(step + 1).tobytes()
                await rds.set("naive:" + sid, state_bytes)
                pred = {"stream_id": sid, "ts": ev["ts"], "step": step + 1, "forecast": y.view(-1).tolist()}
                await sink.send(key=key, value=orjson.dumps(pred))

    worker = faust.Worker(app, loglevel="warning", quiet=True)
    try:
        worker.execute_from_commandline()
    finally:
        shutil.rmtree(datadir, ignore_errors=True)
    return 0


# --------------------------------------------------------------------------------------
# Measuring harness
# --------------------------------------------------------------------------------------

def _proc_cpu(pid: int) -> tuple[float, int]:
    """(user + system CPU seconds, parent pid) of one process; (0, 0) if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0, 0
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK, int(fields[1])


def tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            _, ppid = _proc_cpu(int(entry))
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += _proc_cpu(p)[0]
        todo.extend(children.get(p, []))
    return total


def runq_wait(pid: int) -> float:
    """Seconds the process's main thread has spent runnable but waiting for a CPU (0 if unknown)."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


class CpuSampler:
    """Samples a process tree's CPU time and its main thread's run-queue wait every
    ``interval`` seconds: (wall time, cpu seconds, run-queue wait seconds)."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, float, float]] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.samples.append((time.time(), tree_cpu(self.pid), runq_wait(self.pid)))
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def at(self, t: float, column: int = 1) -> float:
        """CPU seconds (column 1) or run-queue wait (column 2) at wall time ``t``, interpolated."""
        s = self.samples
        if not s:
            return 0.0
        if t <= s[0][0]:
            return s[0][column]
        for a, b in itertools.pairwise(s):
            if a[0] <= t <= b[0]:
                return a[column] + (b[column] - a[column]) * ((t - a[0]) / (b[0] - a[0]) if b[0] > a[0] else 0.0)
        return s[-1][column]

    def wake_up(self, before: float, idle: float = 1.0, threshold: float = 0.03) -> float | None:
        """End of the last idle stretch (``idle`` seconds using less than ``threshold`` CPU
        seconds) before wall time ``before``: when the worker started on its input after
        joining the group. None if there was no such stretch."""
        times = [t for t, _, _ in self.samples if t <= before]
        for t in reversed(times):
            if t - idle < self.samples[0][0]:
                return None
            if self.at(t) - self.at(t - idle) < threshold:
                return t
        return None

    def busy(self, seconds: float) -> float:
        """CPU seconds used in the last ``seconds`` of samples."""
        if not self.samples:
            return 0.0
        t_end, c_end = self.samples[-1][:2]
        return c_end - self.at(t_end - seconds)


class OutputReader:
    """Reads a topic from the beginning without a consumer group, on demand."""

    def __init__(self, broker: str, topic: str) -> None:
        self.broker = broker
        self.topic = topic
        self.stamps: list[int] = []  # record timestamps (ms)
        self.latencies: list[float] = []  # seconds, for predictions with ts >= latency_from
        self.latency_from = float("inf")
        self._consumer: Any = None

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer

        from worker.kafka import bootstrap

        self._consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap(self.broker), group_id=None,
                                          enable_auto_commit=False, auto_offset_reset="earliest",
                                          fetch_max_wait_ms=20, max_partition_fetch_bytes=4 * 1024 * 1024)
        await self._consumer.start()
        self._assigned = False

    async def _assign(self) -> bool:
        from aiokafka import TopicPartition

        if not self._assigned:
            await self._consumer._client.force_metadata_update()
            parts = self._consumer.partitions_for_topic(self.topic)
            if not parts:
                return False
            tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
            self._consumer.assign(tps)
            await self._consumer.seek_to_beginning(*tps)
            self._assigned = True
        return True

    async def poll(self, timeout_ms: int = 50) -> int:
        """Read what is available now; returns how many records came."""
        import orjson

        if not await self._assign():
            return 0
        batch = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=50_000)
        now = time.time()
        n = 0
        for msgs in batch.values():
            for m in msgs:
                self.stamps.append(m.timestamp)
                if m.timestamp >= self.latency_from * 1000 - 1:
                    ts = orjson.loads(m.value).get("ts")
                    if isinstance(ts, (int, float)) and ts >= self.latency_from:
                        self.latencies.append(now - ts)
                n += 1
        return n

    async def drain(self) -> int:
        """Read until nothing more comes right away."""
        total = 0
        while (n := await self.poll(100)) > 0:
            total += n
        return total

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()


@dataclass
class Result:
    case: str
    messages: int = 0
    readings: int = 0
    rate: float = float("nan")  # readings per second
    cpu_us: float = float("nan")  # worker CPU microseconds per reading
    cpu_share: float = float("nan")  # worker CPU seconds per second of the window
    runq_share: float = float("nan")  # worker main thread: seconds waiting for a CPU per second
    uncontended: float = float("nan")  # readings/s estimate without that wait
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Config:
    streams: int = 1000
    events: int = 20_000  # single-event messages for noop and lstream
    naive_events: int = 4_000  # the naive worker is slow: fewer, same streams
    batch_messages: int = 2_000  # gateway batches of 100 readings
    latency_seconds: float = 5.0
    latency_rate: float = 2_000.0  # readings/s, at most
    partitions: int = 8
    timeout: float = 180.0  # per case
    cases: tuple[str, ...] = ("noop", "naive", "lstream", "bulk", "noop-batch", "lstream-batch", "bulk-batch")
    fetch_wait_ms: int | None = None  # for the noop/naive Faust apps; None keeps Faust's 1500


QUICK = Config(streams=100, events=2_000, naive_events=400, batch_messages=50, latency_seconds=1.5,
               latency_rate=500.0, timeout=90.0)


class Feed:
    """Readings for ``streams`` streams, one step of every stream at a time, ts = send time."""

    def __init__(self, streams: int, prefix: str = "bench") -> None:
        from series.synthetic import generate

        steps = 64
        self.values = [s.values.tolist() for s in generate(streams, steps, seed=7, anomaly_rate=0.005)]
        self.ids = [f"{prefix}-{i:05d}" for i in range(streams)]
        self.step = [0] * streams
        self.next = 0

    def reading(self) -> dict[str, Any]:
        i = self.next
        self.next = (i + 1) % len(self.ids)
        k = self.step[i]
        self.step[i] = k + 1
        sid = self.ids[i]
        vals = self.values[i]
        return {"stream_id": sid, "ts": time.time(), "values": vals[k % len(vals)], "event_id": f"{sid}:{k}"}


async def _send(broker: str, topic: str, feed: Feed, readings: int, batch: int, gateways: int,
                rate: float = 0.0) -> int:
    """Send ``readings`` readings (as single events or gateway batches); returns messages sent."""
    import orjson

    from lstream.feeds import gateway_of
    from worker.kafka import Sender

    messages = 0
    buffers: dict[str, list[dict[str, Any]]] = {}
    t0 = time.monotonic()
    async with Sender(broker, linger_ms=5) as sender:
        for k in range(readings):
            if rate > 0:
                ahead = t0 + k / rate - time.monotonic()
                if ahead > 0.002:
                    await asyncio.sleep(ahead)
            ev = feed.reading()
            if batch <= 1:
                await sender.send(topic, orjson.dumps(ev), ev["stream_id"].encode())
                messages += 1
                continue
            gw = gateway_of(ev["stream_id"], gateways)
            buf = buffers.setdefault(gw, [])
            buf.append(ev)
            if len(buf) >= batch:
                await sender.send(topic, _stamped(buf), gw.encode())
                messages += 1
                buffers[gw] = []
        for gw, buf in buffers.items():
            if buf:
                await sender.send(topic, _stamped(buf), gw.encode())
                messages += 1
    return messages


def _stamped(batch: list[dict[str, Any]]) -> bytes:
    """A gateway batch stamped with its send time (latency counts from the send, not from
    when a reading joined the batch)."""
    import orjson

    now = time.time()
    for ev in batch:
        ev["ts"] = now
    return orjson.dumps(batch)


def worker_stats(port: int) -> dict[str, Any]:
    """Micro-batch statistics from the lstream worker's /metrics: messages per batch and the
    seconds spent in each stage (empty if the page cannot be read)."""
    import re
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    values: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^([a-z_]+)(\{[^}]*\})? ([0-9.eE+-]+|NaN)$", line)
        if m:
            values[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    out: dict[str, Any] = {}
    batches = values.get("lstream_batches_total", 0.0)
    if batches:
        out["batches"] = int(batches)
        out["messages_per_batch"] = round(values.get("lstream_input_messages_total", 0.0) / batches, 1)
    stages = {k.split('stage="')[1].rstrip('"}'): round(v, 3) for k, v in values.items()
              if k.startswith("lstream_stage_seconds_sum{")}
    if stages:
        out["stage_seconds"] = stages
    return out


def _percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


class Bench:
    def __init__(self, cfg: Config, broker: str, redis_url: str, workdir: str, log: Any) -> None:
        self.cfg = cfg
        self.broker = broker
        self.redis_url = redis_url
        self.workdir = workdir
        self.log = log
        self.model = model_dir(workdir, log)

    def _command(self, case: str, input_topic: str, output_topic: str, expect: int, report: str,
                 run_id: str) -> tuple[list[str], dict[str, str]]:
        # No LSTREAM_* variable of the caller's shell reaches the worker: only the settings below.
        env = {k: v for k, v in os.environ.items() if not k.startswith("LSTREAM_")}
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        kind = case.split("-")[0]
        if kind in ("noop", "naive"):
            cmd = [sys.executable, "-m", "benchmarks.e2e", "--agent", kind, "--broker", self.broker,
                   "--input", input_topic, "--output", output_topic, "--redis", self.redis_url,
                   "--app-id", f"bench-{case}-{run_id}", "--expect", str(expect), "--report", report,
                   "--partitions", str(self.cfg.partitions), "--model", self.model]
            if case.endswith("-batch"):  # count messages (no decoding), report readings
                cmd += ["--per-message", str(GATEWAY_BATCH)]
            if self.cfg.fetch_wait_ms is not None:
                cmd += ["--fetch-wait-ms", str(self.cfg.fetch_wait_ms)]
            return cmd, env
        from lstream.devservices import free_port

        self.web_port = free_port()
        env.update({
            "LSTREAM_BROKER": self.broker, "LSTREAM_REDIS_URL": self.redis_url,
            "LSTREAM_INPUT_TOPIC": input_topic, "LSTREAM_PREDICTIONS_TOPIC": output_topic,
            "LSTREAM_ALERTS_TOPIC": f"alerts-{run_id}", "LSTREAM_DLQ_TOPIC": f"dlq-{run_id}",
            "LSTREAM_APP_ID": f"bench-{case}-{run_id}", "LSTREAM_WEB_PORT": str(self.web_port),
            "LSTREAM_SESSION_TIMEOUT": "10", "LSTREAM_PARTITIONS": str(self.cfg.partitions),
            "LSTREAM_LOG_LEVEL": "warning", "LSTREAM_MODEL": self.model,
        })
        if kind == "bulk":
            env["LSTREAM_BATCHING"] = "bulk"
        elif kind == "lstream":
            env["LSTREAM_BATCHING"] = "smart"
        return [sys.executable, "-m", "lstream.cli", "worker"], env

    async def run_case(self, case: str) -> Result:
        from lstream.devservices import stop_process
        from worker.kafka import ensure_topics

        cfg = self.cfg
        batched = case.endswith("-batch")
        kind = case.split("-")[0]
        run_id = uuid.uuid4().hex[:8]
        input_topic, output_topic = f"in-{case}-{run_id}", f"out-{case}-{run_id}"
        readings = (cfg.batch_messages * GATEWAY_BATCH if batched
                    else cfg.naive_events if kind == "naive" else cfg.events)
        gateways = max(1, cfg.streams // GATEWAY_BATCH)
        result = Result(case)
        await ensure_topics(self.broker, [input_topic, output_topic], cfg.partitions)
        feed = Feed(cfg.streams, prefix=f"b{run_id}")  # fresh streams: no state from earlier cases
        t0 = time.monotonic()
        result.messages = await _send(self.broker, input_topic, feed, readings,
                                      GATEWAY_BATCH if batched else 1, gateways)
        result.readings = readings
        self.log(f"{case}: produced {readings} readings in {result.messages} messages "
                 f"({time.monotonic() - t0:.1f} s); starting the worker")
        report = os.path.join(self.workdir, f"report-{case}-{run_id}.json")
        expect = result.messages if kind == "noop" else readings  # the no-op agent counts messages
        cmd, env = self._command(case, input_topic, output_topic, expect, report, run_id)
        logfile = open(os.path.join(self.workdir, f"{case}.log"), "wb")
        proc = subprocess.Popen(cmd, env=env, cwd=str(ROOT), stdin=subprocess.DEVNULL, stdout=logfile,
                                stderr=subprocess.STDOUT, start_new_session=True)
        sampler = CpuSampler(proc.pid)
        sampler.start()
        reader = OutputReader(self.broker, output_topic)
        await reader.start()
        try:
            first, last, n = await self._wait_drained(kind, proc, reader, sampler, readings, report)
            if kind != "noop":
                # Outputs come in bursts, one per micro-batch, so the first output is late by a
                # whole batch's work; start the window where the worker woke up instead.
                start = sampler.wake_up(before=first)
                if start is not None and start < first:
                    result.extra["first_output_after_s"] = round(first - start, 3)
                    first, n = start, readings
            result.rate = n / (last - first) if last > first else float("nan")
            cpu = sampler.at(last) - sampler.at(first)
            waited = sampler.at(last, 2) - sampler.at(first, 2)
            result.cpu_us = cpu / n * 1e6 if n else float("nan")
            result.cpu_share = cpu / (last - first) if last > first else float("nan")
            result.runq_share = waited / (last - first) if last > first else float("nan")
            # Without other processes competing for the CPU the run-queue wait would vanish.
            result.uncontended = n / (last - first - waited) if last - first - waited > 0 else float("nan")
            result.extra.update(window_s=round(last - first, 3), window_readings=n, worker_cpu_s=round(cpu, 3),
                                runq_wait_s=round(waited, 3), load_avg=os.getloadavg()[0])
            if kind in ("lstream", "bulk"):
                result.extra.update(await asyncio.to_thread(worker_stats, self.web_port))
            if kind != "noop":
                await self._latency(result, feed, input_topic, reader, batched, gateways)
        except Exception as exc:  # one failed case must not hide the others
            result.note = f"failed: {exc}"
            self.log(f"{case}: {result.note}; worker log: {logfile.name}")
        finally:
            await reader.stop()
            await sampler.stop()
            stop_process(proc, 10.0, group=True)  # the worker and anything it started
            logfile.close()
        return result

    async def _wait_drained(self, kind: str, proc: subprocess.Popen[bytes], reader: OutputReader,
                            sampler: CpuSampler, expect: int, report: str) -> tuple[float, float, int]:
        """(first, last, n): wall times of the first and last output and readings processed after the first."""
        deadline = time.monotonic() + self.cfg.timeout
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            if proc.poll() is not None:
                raise RuntimeError(f"the worker exited with code {proc.returncode}")
            if kind == "noop":
                if os.path.exists(report):
                    doc = json.loads(Path(report).read_text())
                    return doc["first"], doc["last"], doc["n"]
                continue
            # Read the outputs only while the worker is idle, so reading does not slow it down.
            if sampler.busy(1.0) > 0.05:
                continue
            await reader.drain()
            if len(reader.stamps) >= expect:
                stamps = sorted(reader.stamps)
                first, last = stamps[0], stamps[-1]
                n = sum(1 for s in stamps if s > first)
                return first / 1000, last / 1000, n
        raise RuntimeError(f"timed out after {self.cfg.timeout:.0f} s with {len(reader.stamps)} of {expect} outputs")

    async def _latency(self, result: Result, feed: Feed, input_topic: str, reader: OutputReader,
                       batched: bool, gateways: int) -> None:
        cfg = self.cfg
        rate = min(cfg.latency_rate * (GATEWAY_BATCH if batched else 1), 0.5 * result.rate)
        count = max(1, int(rate * cfg.latency_seconds))
        reader.latency_from = time.time()
        before = len(reader.stamps)
        producing = asyncio.ensure_future(_send(self.broker, input_topic, feed, count,
                                                GATEWAY_BATCH if batched else 1, gateways, rate))
        deadline = time.monotonic() + cfg.latency_seconds + 15
        while time.monotonic() < deadline:
            await reader.poll(20)
            if producing.done() and len(reader.stamps) - before >= count:
                break
        await producing
        result.p50_ms = _percentile(reader.latencies, 50) * 1000
        result.p99_ms = _percentile(reader.latencies, 99) * 1000
        result.extra.update(latency_rate=round(rate), latency_samples=len(reader.latencies))
        if len(reader.latencies) < count:
            result.note = f"latency: {len(reader.latencies)} of {count} predictions arrived"


def table(results: Sequence[Result]) -> str:
    """The results as a fixed-width text table, with the targets underneath.

    ``CPU %``: the worker's CPU time per second of the window; ``wait %``: its main thread's
    time waiting for a CPU (other processes had it); ``uncontended/s``: readings per second
    with that wait taken out, an estimate of the rate on an otherwise idle machine.
    """
    head = (f"{'case':<14} {'messages':>8} {'readings':>8} {'readings/s':>10} {'uncont./s':>10} "
            f"{'CPU us/rd':>9} {'CPU %':>6} {'wait %':>6} {'p50 ms':>7} {'p99 ms':>7}  note")
    lines = [head, "-" * len(head)]

    def num(x: float, fmt: str) -> str:
        return "-" if x != x else format(x, fmt)

    for r in results:
        lines.append(f"{r.case:<14} {r.messages:>8} {r.readings:>8} {num(r.rate, ',.0f'):>10} "
                     f"{num(r.uncontended, ',.0f'):>10} {num(r.cpu_us, ',.0f'):>9} "
                     f"{num(100 * r.cpu_share, '.0f'):>6} {num(100 * r.runq_share, '.0f'):>6} "
                     f"{num(r.p50_ms, '.1f'):>7} {num(r.p99_ms, '.1f'):>7}  {r.note}")
    by = {r.case: r for r in results}

    def ratio(a: str, b: str) -> str:
        wall = by[a].rate / by[b].rate
        unc = by[a].uncontended / by[b].uncontended
        cpu = by[b].cpu_us / by[a].cpu_us
        return f"{wall:.2f}x wall, {unc:.2f}x uncontended, {cpu:.2f}x by CPU per reading"

    checks = []
    if "lstream" in by and "naive" in by:
        checks.append(f"lstream / naive, single events: {ratio('lstream', 'naive')} (target >= 10x)")
    for case in ("lstream", "bulk"):
        if case in by and "noop" in by:
            checks.append(f"{case} / no-op agent, single events: {ratio(case, 'noop')} (target >= 0.9x)")
    if "bulk" in by and "lstream" in by:
        checks.append(f"bulk / lstream (batching=bulk vs smart), single events: {ratio('bulk', 'lstream')}")
    for case in ("lstream-batch", "bulk-batch"):
        if case in by:
            r = by[case]
            checks.append(f"{case}: gateway batches of {GATEWAY_BATCH}: {r.rate:,.0f} readings/s wall, "
                          f"{r.uncontended:,.0f} uncontended, {1e6 / r.cpu_us:,.0f} per CPU second "
                          f"(target >= 100,000 per worker process)")
    for r in results:
        if "messages_per_batch" in r.extra:
            stages = ", ".join(f"{k} {v:.2f}" for k, v in r.extra.get("stage_seconds", {}).items())
            checks.append(f"{r.case} worker: {r.extra['batches']} micro-batches, {r.extra['messages_per_batch']:g} "
                          f"messages each on average; seconds per stage: {stages or '-'}")
    load = [r.extra.get("load_avg") for r in results if r.extra.get("load_avg") is not None]
    if load:
        checks.append(f"load average during the runs: {min(load):.1f} to {max(load):.1f} on {os.cpu_count()} CPUs")
    return "\n".join(lines + [""] + checks)


def build_parser(prog: str = "python -m benchmarks.e2e") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a small smoke run")
    p.add_argument("--cases", help=f"comma-separated subset of {','.join(Config().cases)}")
    p.add_argument("--events", type=int, help="single-event messages for noop and lstream")
    p.add_argument("--naive-events", type=int, help="messages for the naive worker")
    p.add_argument("--batch-messages", type=int, help="gateway batches of 100 readings")
    p.add_argument("--streams", type=int, help="distinct streams")
    p.add_argument("--faust-fetch-wait", type=int, metavar="MS", dest="faust_fetch_wait",
                   help="fetch_max_wait_ms for the noop/naive Faust apps (default: Faust's 1500)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--keep-logs", action="store_true", help="keep the workers' logs and print where")
    # internal: run one of the Faust apps under test
    p.add_argument("--agent", choices=["noop", "naive"], help=argparse.SUPPRESS)
    for name in ("--broker", "--input", "--output", "--redis", "--app-id", "--report", "--model"):
        p.add_argument(name, help=argparse.SUPPRESS)
    p.add_argument("--expect", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--partitions", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--per-message", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--fetch-wait-ms", type=int, help=argparse.SUPPRESS)
    return p


def config_from(args: argparse.Namespace) -> Config:
    cfg = QUICK if args.quick else Config()
    changes: dict[str, Any] = {}
    for name in ("events", "naive_events", "batch_messages", "streams"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                raise SystemExit(f"bench e2e: --{name.replace('_', '-')}: expected at least 1, got {value}")
            changes[name] = value
    if args.faust_fetch_wait is not None:
        changes["fetch_wait_ms"] = args.faust_fetch_wait
    if args.cases:
        cases = tuple(c.strip() for c in args.cases.split(",") if c.strip())
        unknown = [c for c in cases if c not in Config().cases]
        if unknown:
            raise SystemExit(f"bench e2e: --cases: expected names from {','.join(Config().cases)}, got {unknown}")
        changes["cases"] = cases
    return Config(**{**asdict(cfg), **changes})


async def run_bench(cfg: Config, log: Any = None, keep_logs: bool = False, broker_url: str | None = None,
                    redis_url: str | None = None) -> list[Result]:
    """Run every case in ``cfg.cases`` on the given broker and Redis, or on embedded ones
    started (and stopped) here. Keys and topics are new per case; nothing is deleted."""
    from contextlib import ExitStack

    from lstream.devservices import start_broker, start_redis

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    workdir = tempfile.mkdtemp(prefix="lstream-bench-")
    results = []
    try:
        with ExitStack() as stack:
            broker_url = broker_url or stack.enter_context(start_broker()).url
            redis_url = redis_url or stack.enter_context(start_redis()).url
            bench = Bench(cfg, broker_url, redis_url, workdir, log)
            for case in cfg.cases:
                r = await bench.run_case(case)
                log(f"{case}: {r.rate:,.0f} readings/s, {r.cpu_us:,.0f} us CPU per reading {r.note}".rstrip())
                results.append(r)
    finally:
        if keep_logs:
            log(f"worker logs in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.agent:
        return run_agent(args)
    cfg = config_from(args)
    results = asyncio.run(run_bench(cfg, keep_logs=args.keep_logs))
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=1))
    else:
        print(table(results))
    return 1 if any(r.note.startswith("failed") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
