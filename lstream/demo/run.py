"""``lstream demo`` end to end: services, worker, feed, live view, summary, plot, clean stop.

1. Start the embedded Tansu broker and a ``redis-server`` on free ports (unless
   ``LSTREAM_BROKER`` / ``LSTREAM_REDIS_URL`` point elsewhere), check the model artifact.
2. Create the four topics, start ``lstream worker`` as a child process (own process group,
   short session timeout so the consumer group forms quickly, output in ``<out>/worker.log``).
3. Send the first reading of every stream, wait until the worker applies one (it has joined
   its group), then replay the rest of the feed paced over ``--seconds``.
4. Read predictions, alerts and dead letters back (no consumer group) and count them, until
   every produced event is applied or rejected.
5. Stop the worker and the services (also on Ctrl-C or SIGTERM), print the summary, write
   ``demo.png`` and ``summary.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen
from typing import Any

import orjson
from rich.console import Console

from lstream.demo.main import Scenario, Tally, make_scenario
from lstream.demo.procs import Interrupts, spawn, stop_group
from lstream.demo.view import View, print_summary, summary_rows
from lstream.devservices import Service, ServiceError, free_port, start_broker, start_redis
from worker.settings import Settings, from_env

ROOT = Path(__file__).resolve().parents[2]


class DemoError(RuntimeError):
    """The demo could not finish (the worker died or fell behind)."""


@dataclass
class DemoOptions:
    streams: int = 40
    steps: int | None = None  # None: the model's detector warm-up + 110
    seconds: float = 30.0  # replay duration after the worker is up
    seed: int = 0
    anomaly_rate: float = 0.006
    tolerance: int = 10  # readings after an injected anomaly in which an alert still counts
    out: str = "demo-out"
    live: bool = True
    keep: bool = False
    start_timeout: float = 90.0  # worker start-up + group join
    drain_timeout: float = 60.0  # after the last event is sent


@dataclass
class Children:
    """Everything the demo started, so that it can stop all of it."""

    services: list[Service] = field(default_factory=list)
    worker: Popen[bytes] | None = None
    data_dir: str | None = None

    def pids(self) -> dict[str, int]:
        out = {s.name: s.proc.pid for s in self.services}
        if self.worker is not None:
            out["worker"] = self.worker.pid
        return out

    def stop(self, hurry: bool = False) -> None:
        if self.worker is not None:
            # After Ctrl-C the services are going too (a terminal signals the whole foreground
            # process group): without a broker the worker cannot commit, so do not wait long.
            broken = hurry or any(s.proc.poll() is not None for s in self.services)
            stop_group(self.worker, timeout=3.0 if broken else 15.0)
        for s in reversed(self.services):
            s.stop()
        if self.data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)


def _worker_env(env: Mapping[str, str], settings: Settings, broker: str, redis_url: str, web_port: int,
                data_dir: str, app_id: str) -> dict[str, str]:
    child = dict(env)
    child.update({
        "LSTREAM_BROKER": broker,
        "LSTREAM_REDIS_URL": redis_url,
        "LSTREAM_MODEL": settings.model,
        "LSTREAM_INPUT_TOPIC": settings.input_topic,
        "LSTREAM_PREDICTIONS_TOPIC": settings.predictions_topic,
        "LSTREAM_ALERTS_TOPIC": settings.alerts_topic,
        "LSTREAM_DLQ_TOPIC": settings.dlq_topic,
        "LSTREAM_PARTITIONS": str(settings.partitions),
        "LSTREAM_WEB_PORT": str(web_port),
        "LSTREAM_WEB_HOST": "127.0.0.1",
        # Tansu completes a group join only after about half the session timeout.
        "LSTREAM_SESSION_TIMEOUT": "10",
        "LSTREAM_DATA_DIR": data_dir,
        "LSTREAM_APP_ID": app_id,
        "PYTHONUNBUFFERED": "1",
    })
    # The worker must import this checkout even when lstream is not installed.
    child["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return child


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _rows(scenario: Scenario, counter: list[int]) -> Iterator[tuple[str, int, float, list[float]]]:
    """The feed in event-time order (all streams' row 0, then row 1, ...); counts what was taken."""
    for i in range(max(len(s.ts) for s in scenario.streams)):
        for s in scenario.streams:
            if i < len(s.ts):
                counter[0] += 1
                yield s.stream_id, i, float(s.ts[i]), s.values[i].tolist()


async def _wait_for(cond: Callable[[], bool], timeout: float, children: Children, view: View,
                    what: Callable[[], str], log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        w = children.worker
        if w is not None and w.poll() is not None:
            raise DemoError(f"the worker exited with code {w.returncode} while waiting for {what()}; "
                            f"the end of {log}:\n{_log_tail(log)}")
        if time.monotonic() > deadline:
            raise DemoError(f"gave up after {timeout:.0f} s waiting for {what()}; see {log}")
        view.update()
        await asyncio.sleep(0.1)


async def _send(coro: Coroutine[Any, Any, Any], children: Children, view: View, counter: list[int],
                log: Path) -> None:
    """Run a ``send_readings`` coroutine, refreshing the view and watching the worker."""
    sender = asyncio.ensure_future(coro)
    try:
        while not sender.done():
            view.produced = counter[0]
            w = children.worker
            if w is not None and w.poll() is not None:
                raise DemoError(f"the worker exited with code {w.returncode}; the end of {log}:\n"
                                f"{_log_tail(log)}")
            view.update()
            await asyncio.wait([sender], timeout=0.2)
        await sender
    finally:
        sender.cancel()
    view.produced = counter[0]


async def _read(broker: str, topic: str, handle: Callable[[bytes | None], Any]) -> None:
    from worker.kafka import follow

    async for rec in follow(broker, topic, from_beginning=True):
        handle(rec.value)


async def _session(opts: DemoOptions, settings: Settings, scenario: Scenario, tally: Tally, view: View,
                   children: Children, broker: str, redis_url: str, env: Mapping[str, str],
                   app_id: str, out: Path) -> int:
    """Run the worker and the feed; return the number of events produced."""
    from lstream.feeds import send_readings
    from worker.kafka import ensure_topics

    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)

    topics = [settings.input_topic, settings.predictions_topic, settings.alerts_topic, settings.dlq_topic]
    await ensure_topics(broker, topics, settings.partitions)
    log = out / "worker.log"
    children.data_dir = tempfile.mkdtemp(prefix="lstream-demo-")
    web_port = free_port()
    child_env = _worker_env(env, settings, broker, redis_url, web_port, children.data_dir, app_id)
    view.set_phase("starting the worker (loading the model, joining the consumer group)")
    children.worker = spawn([sys.executable, "-m", "lstream.cli", "worker"], child_env, log)
    if not view.live:
        print(f"worker pid {children.worker.pid}, log {log}", flush=True)

    readers = [asyncio.create_task(_read(broker, settings.predictions_topic, tally.on_prediction)),
               asyncio.create_task(_read(broker, settings.alerts_topic, tally.on_alert)),
               asyncio.create_task(_read(broker, settings.dlq_topic, tally.on_dead_letter))]
    counter = [0]
    rows = _rows(scenario, counter)
    n = len(scenario.streams)
    try:
        # One reading per stream first: the first prediction back means the worker is up.
        first = [next(rows) for _ in range(n)]
        await send_readings(broker, settings.input_topic, first, partitions=settings.partitions)
        view.produced = counter[0]
        await _wait_for(lambda: tally.handled > 0, opts.start_timeout, children, view,
                        lambda: "the worker's first prediction", log)
        # The detector's warm-up at full speed (nothing to see yet), then the rest paced.
        warm = n * (scenario.clean_steps - 1)
        view.set_phase(f"warm-up: {scenario.clean_steps} readings per stream at full speed")
        await _send(send_readings(broker, settings.input_topic, itertools.islice(rows, warm),
                                  partitions=settings.partitions), children, view, counter, log)
        rest = scenario.events - counter[0]
        view.set_phase(f"replaying the last {rest:,} events over {opts.seconds:g} s")
        await _send(send_readings(broker, settings.input_topic, rows,
                                  rate=rest / opts.seconds if opts.seconds > 0 else 0.0,
                                  partitions=settings.partitions), children, view, counter, log)
        view.produced = counter[0]
        view.set_phase("waiting for the worker to finish the feed")
        await _wait_for(lambda: tally.handled >= counter[0], opts.drain_timeout, children, view,
                        lambda: f"the worker to apply all {counter[0]} events (it has {tally.handled})", log)
        await asyncio.sleep(1.0)  # alerts of the last events
        view.update()
        view.set_phase("done")
        return counter[0]
    except asyncio.CancelledError:
        # Interrupted: the producer's and consumers' internal tasks are torn down with the loop;
        # their "Task was destroyed but it is pending" notes are noise here.
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        raise
    finally:
        for r in readers:
            r.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        view.produced = counter[0]


def _write_summary(path: Path, data: dict[str, Any]) -> None:
    path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2))


def run_demo(opts: DemoOptions, env: Mapping[str, str]) -> int:
    from kernels.artifact import read_artifact
    from kernels.detector import config as detector_config
    from lstream.demo.plot import pick_streams, plot_streams

    t0 = time.monotonic()
    console = Console()
    live = opts.live and console.is_terminal
    settings = from_env(env)
    # Read and check the artifact here; the worker loads it (and compiles the kernels) itself.
    meta = read_artifact(settings.model).meta
    version, input_size = str(meta["version"]), int(meta["input_size"])
    warmup = int(detector_config(meta.get("detector")).get("warmup", 0))
    external_broker, external_redis = bool(env.get("LSTREAM_BROKER")), bool(env.get("LSTREAM_REDIS_URL"))
    run_id = uuid.uuid4().hex[:8]
    prefix = f"demo-{run_id}-" if external_redis else ""  # never collide with states already there
    if external_broker:  # fresh topics: a shared broker may hold earlier runs' records
        settings = from_env(env, **{k: f"{getattr(settings, k)}-demo-{run_id}" for k in
                                    ("input_topic", "predictions_topic", "alerts_topic", "dlq_topic")})
    clean_steps = warmup + 10  # anomalies start after the detector scores (and the stream scaling settled)
    steps = opts.steps or clean_steps + 100
    if steps < clean_steps + 20:
        from lstream.cli import CliError

        raise CliError(f"--steps: expected at least {clean_steps + 20} (the model's detector scores nothing "
                        f"during its first {warmup} readings), got {steps}")
    scenario = make_scenario(opts.streams, steps, seed=opts.seed, num_features=input_size,
                             anomaly_rate=opts.anomaly_rate, clean_steps=clean_steps, prefix=prefix,
                             warmup=warmup)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    tally = Tally(scenario, opts.tolerance)
    children = Children()
    produced = 0
    complete = False
    error: str | None = None
    interrupted = False
    with Interrupts() as interrupts:
        try:
            interrupts.defer()  # a signal while a service starts is acted on once it can be stopped
            broker = settings.broker if external_broker else None
            redis_url = settings.redis_url if external_redis else None
            try:
                if redis_url is None:
                    children.services.append(start_redis())
                    redis_url = children.services[-1].url
                if broker is None:
                    children.services.append(start_broker())
                    broker = children.services[-1].url
            except ServiceError:
                if interrupts.requested:  # a terminal's Ctrl-C also reached the starting child
                    raise KeyboardInterrupt from None
                raise
            interrupts.resume()
            header = (f"lstream demo: model {version}, {len(scenario.streams)} streams, "
                      f"{scenario.events:,} events, {len(scenario.episodes)} injected anomalies")
            if not live:
                print(f"broker {broker}, redis {redis_url.split('@')[-1]}, pids {children.pids()}", flush=True)
            view = View(tally, scenario.events, header, live, console)
            try:
                with view:
                    try:
                        produced = asyncio.run(_session(opts, settings, scenario, tally, view, children, broker,
                                                        redis_url, env, f"lstream-demo-{run_id}", out))
                    finally:
                        interrupts.install()  # asyncio.run put the default handlers back
                complete = tally.handled >= produced
            except DemoError as exc:
                error = str(exc)
            if opts.keep and error is None:
                _report(console, live, opts, scenario, tally, produced, t0, out, children, version,
                        complete, pick_streams, plot_streams)
                _keep(console, broker, redis_url, settings, scenario)
        except (KeyboardInterrupt, asyncio.CancelledError):
            interrupts.ignore()
            interrupted = True
            console.print("interrupted: stopping the worker, the broker and redis-server", soft_wrap=True)
            return 130
        finally:
            interrupts.ignore()  # a second Ctrl-C must not leave children behind
            t_stop = time.monotonic()
            children.stop(hurry=interrupted)
            if not live:
                print(f"stopped the worker and the services in {time.monotonic() - t_stop:.1f} s", flush=True)
            if external_redis and redis_url:
                _forget_states(redis_url, [s.stream_id for s in scenario.streams])
    if error is not None:
        console.print(f"lstream demo: {error}", style="red" if live else None, markup=False, highlight=False,
                      soft_wrap=True)
        _write_summary(out / "summary.json", {"error": error, "pids": children.pids()})
        return 1
    if not opts.keep:
        _report(console, live, opts, scenario, tally, produced, t0, out, children, version, complete,
                pick_streams, plot_streams)
        _hints(console, scenario, tally)
    return 0 if complete else 1


def _report(console: Console, live: bool, opts: DemoOptions, scenario: Scenario, tally: Tally, produced: int,
            t0: float, out: Path, children: Children, model_version: str, complete: bool,
            pick_streams: Callable[..., list[str]], plot_streams: Callable[..., Path]) -> None:
    score = tally.result()
    png = plot_streams(scenario, tally, score, out / "demo.png", pick_streams(scenario, tally, score),
                       title=f"lstream demo: model {model_version}, forecasts and alerts on "
                             f"{len(scenario.streams)} synthetic streams")
    seconds = time.monotonic() - t0
    print_summary(console, summary_rows(tally, score, produced, seconds), live)
    if not complete:
        console.print(f"incomplete: the worker handled {tally.handled} of {produced} events", soft_wrap=True)
    _write_summary(out / "summary.json", {
        "model": model_version, "streams": len(scenario.streams), "produced": produced,
        "applied": tally.predictions, "rejected": tally.dead_letters, "rejected_by_code": tally.dead_codes,
        "alerts": len(tally.alerts), "alerts_by_reason": _by_reason(tally),
        "injected_anomalies": len(scenario.episodes), "caught": len(score.caught),
        "missed": len(score.missed), "false_alerts": len(score.false_alerts), "tolerance": opts.tolerance,
        "foreign_records": tally.foreign, "complete": complete, "wall_seconds": round(seconds, 2),
        "plot": str(png), "pids": children.pids(),
    })
    console.print(f"plot: {png}   numbers: {out / 'summary.json'}   worker log: {out / 'worker.log'}",
                  soft_wrap=True, highlight=False)


def _by_reason(tally: Tally) -> dict[str, int]:
    out: dict[str, int] = {}
    for a in tally.alerts:
        out[a.reason or "unstated"] = out.get(a.reason or "unstated", 0) + 1
    return out


def _hints(console: Console, scenario: Scenario, tally: Tally) -> None:
    sid = tally.alerts[0].stream_id if tally.alerts else scenario.streams[0].stream_id
    console.print("\n".join([
        "",
        "Everything the demo started is stopped. Try next:",
        "  lstream demo --keep                 # the same, but keep broker, Redis and worker running",
        f"  lstream state show {sid:<16} # (with --keep) the stream's LSTM state in Redis",
        "  lstream tail alerts --from-beginning  # (with --keep) the alerts topic",
        "  lstream dev                         # just the broker and Redis; then lstream worker, produce, tail",
    ]), highlight=False, markup=False, soft_wrap=True)


def _keep(console: Console, broker: str, redis_url: str, settings: Settings, scenario: Scenario) -> None:
    from lstream.commands.dev import env_lines

    extra = [f"export LSTREAM_{k.upper()}={getattr(settings, k)}" for k in
             ("input_topic", "predictions_topic", "alerts_topic", "dlq_topic")
             if getattr(settings, k) != getattr(Settings(), k)]
    sid = scenario.streams[0].stream_id
    console.print("\n".join([
        "", "The broker, Redis and the worker keep running. In another shell:",
        *env_lines(broker, redis_url), *extra,
        f"lstream state show {sid}", "lstream tail alerts --from-beginning",
        "lstream produce --synthetic 48 --steps 200 --rate 100 --ts-now",
        "Ctrl-C here stops everything.",
    ]), highlight=False, markup=False, soft_wrap=True)
    while True:
        time.sleep(1.0)


def _forget_states(redis_url: str, stream_ids: list[str]) -> None:
    """Delete this run's stream states (and index entries) from a Redis the demo did not start."""
    from state.store import StateStore

    async def forget() -> None:
        async with await StateStore.connect(redis_url, retries=2, timeout=5.0) as store:
            for sid in stream_ids:
                await store.reset(sid)

    with contextlib.suppress(Exception):  # best effort: the demo's own result is already in hand
        asyncio.run(forget())
