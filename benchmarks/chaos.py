"""Chaos run: two workers in one group, SIGKILLs at random moments, one Redis crash, a feed running.

Run ``python -m benchmarks.chaos`` (24 kills, 60 streams x 300 events; ``--quick`` for 5 kills).
``tests/worker/test_chaos.py`` runs a short version in ``make test``.

Set-up: a Tansu broker, a redis-server of our own with ``appendonly yes`` and
``appendfsync always`` (its data in a temporary dir), an input topic of 4 partitions, two
``lstream worker`` processes in one consumer group, and a feed that sends the events of every
stream (in order, each with an ``event_id``) over the whole run. Meanwhile a random live worker
is SIGKILLed every few seconds and restarted at once; half way, Redis is SIGKILLed and restarted
on the same dir (its AOF is the only copy of the states). Then the feed ends and the run waits
until every stream is at its last step (or the bound passes).

What :func:`check` asserts:

- every stream's final state has ``steps`` equal to its number of events (none applied twice,
  none missing) and every other field (h, c, pred, norm, detector statistics, episode,
  adaptation) bit-equal to an offline replay of its events: the workers run with
  ``--exact-kernels 1`` and the replay loads the model the same way, so how the kills regrouped
  streams into batches cannot change a bit; the figures give the largest difference per field;
- every (stream, step) has a prediction; a repeated one repeats the same event (ts, actual);
  repeats are counted; every prediction's ``forecast``, ``expected``, ``score`` and ``anomaly``
  are bit-equal to the replay's at that step (repeats included);
- replays really happened after kills: repeated predictions plus the workers'
  ``lstream_replayed_skipped_total`` (events found already applied) is > 0;
- both workers are alive at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.fuzz import WorkerProc, _load, produce_positions, topics_for  # noqa: E402

PARTITIONS = 4
# exact kernels: a stream's numbers do not depend on the batches it was stepped in, so the final
# states can be compared with the offline replay bit for bit (docs/resilience.md, "Bit-equality")
# Batches of up to 40: a worker holding half the partitions of 40 streams steps ~20 at once, past
# the default model's small_n (14), so without exact kernels its batches would take the BLAS path
# (figure ``batches_over_16``) and the comparison below would fail.
WORKER_ARGS = ("--batch-size", "40", "--batch-wait", "0.01", "--exact-kernels", "1")
# every stored field, compared bit for bit with the replay's (NaN equal to NaN)
FIELDS = ("h", "c", "pred", "norm", "anomaly", "episode", "adapt")


class RedisProc:
    """A redis-server with persistence on (AOF, fsync on every write), restartable on its dir."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        from lstream.devservices import free_port

        self.dir = data_dir
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self, timeout: float = 30.0) -> None:
        import redis

        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not installed")
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "always", "--dir", str(self.dir), "--appendfilename", "chaos.aof"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if redis.Redis(port=self.port).ping():
                    return
            except (redis.exceptions.ConnectionError, redis.exceptions.BusyLoadingError):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                time.sleep(0.05)

    def crash(self) -> None:
        """SIGKILL: no shutdown save; what survives is what the AOF had fsynced."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def stream_data(n_streams: int, n_steps: int, seed: int, prefix: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from tests.workerutil import series_data

    return {f"{prefix}-{sid}": (ts, vals) for sid, ts, vals in series_data(n_streams, n_steps, seed=seed)}


class Feed(threading.Thread):
    """Sends every stream's events in time order, spread evenly over ``seconds``."""

    def __init__(self, broker_url: str, topic: str, data: dict[str, tuple[np.ndarray, np.ndarray]],
                 seconds: float, chunks: int = 60) -> None:
        super().__init__(daemon=True)
        n_steps = len(next(iter(data.values()))[0])
        self.messages = [(sid.encode(), orjson.dumps({"stream_id": sid, "ts": float(ts[j]),
                                                      "values": [float(v) for v in vals[j]],
                                                      "event_id": f"{sid}:{j}"}))
                         for j in range(n_steps) for sid, (ts, vals) in data.items()]
        self.broker_url, self.topic, self.seconds, self.chunks = broker_url, topic, seconds, chunks
        self.sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            size = -(-len(self.messages) // self.chunks)
            t0 = time.monotonic()
            for k in range(self.chunks):
                part = self.messages[k * size:(k + 1) * size]
                if part:
                    asyncio.run(produce_positions(self.broker_url, self.topic, part))
                    self.sent += len(part)
                wait = t0 + self.seconds * (k + 1) / self.chunks - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
        except BaseException as exc:  # reported by check()
            self.error = exc


@dataclass
class ChaosRun:
    data: dict[str, tuple[np.ndarray, np.ndarray]]
    loaded: Any
    preds: list[Any]
    kills: int
    kills_holding: int  # kills of a worker that held partitions at that moment
    sigterms: int
    redis_restarts: int
    replayed_skipped: float  # sum over all worker processes of lstream_replayed_skipped_total
    batches_over_16: float  # micro-batches of more than 16 messages, all worker processes
    alive: list[bool]
    converged_s: float | None
    elapsed_s: float
    feed_error: BaseException | None
    logs: list[Path] = field(default_factory=list)


def _holds(w: WorkerProc) -> bool:
    try:
        return bool(orjson.loads(w.get("/healthz", timeout=2)[1]).get("assigned_partitions"))
    except (OSError, orjson.JSONDecodeError, AttributeError):
        return False


def run(broker_url: str, model_dir: str, workdir: Path, *, n_streams: int = 20, n_steps: int = 200,
        kills: int = 5, feed_seconds: float = 40.0, gap: tuple[float, float] = (3.0, 7.0), sigterm: bool = False,
        redis_restart: bool = True, bound: float = 120.0, seed: int = 0,
        hold_wait: float = 20.0) -> ChaosRun:
    from tests import kafkautil as ku

    rnd = random.Random(seed)
    uid = uuid.uuid4().hex[:6]
    data = stream_data(n_streams, n_steps, seed, f"ch{uid}")
    topics = topics_for(f"chaos{uid}")
    ku.create_topics(broker_url, list(topics.values()), PARTITIONS)
    redis = RedisProc(Path(tempfile.mkdtemp(prefix="redis-", dir=workdir)))
    logs = [workdir / "chaos-worker-0.log", workdir / "chaos-worker-1.log"]
    app_id = f"chaos-{uid}"

    def start(k: int) -> WorkerProc:
        return WorkerProc(broker_url, redis.url, model_dir, topics, app_id, logs[k], *WORKER_ARGS)

    workers = [start(0), start(1)]
    last_metrics: dict[int, dict[str, float]] = {}  # pid -> last /metrics seen

    def sample() -> None:
        for w in workers:
            m = w.metrics()
            if m:
                last_metrics[w.proc.pid] = m

    feed = Feed(broker_url, topics["input"], data, feed_seconds)
    t0 = time.monotonic()
    feed.start()
    done_kills = holding = terms = restarts = 0
    converged: float | None = None
    try:
        schedule = [rnd.uniform(*gap) for _ in range(kills)]
        redis_at = kills // 2 if redis_restart else -1
        for i, pause in enumerate(schedule):
            end = time.monotonic() + pause
            while time.monotonic() < end:
                sample()
                time.sleep(0.25)
            # The victim: a random worker among those holding partitions (a kill of a worker still
            # joining its group tests little); wait a while for one if none holds any yet.
            holders: list[int] = []
            wait_until = time.monotonic() + hold_wait
            while True:
                holders = [k for k, w in enumerate(workers) if _holds(w)]
                if holders or time.monotonic() > wait_until:
                    break
                sample()
                time.sleep(0.25)
            k = rnd.choice(holders) if holders else rnd.randrange(2)
            w = workers[k]
            held = bool(holders)
            if sigterm and i == kills - 1:  # the scenario: one SIGTERM as well
                w.stop()
                terms += 1
            else:
                w.kill()
                done_kills += 1
            holding += held
            workers[k] = start(k)
            if i == redis_at:
                redis.crash()
                time.sleep(rnd.uniform(0.5, 2.0))
                redis.start()
                restarts += 1
        feed.join()
        deadline = time.monotonic() + bound
        ids = list(data)
        while time.monotonic() < deadline:
            sample()
            loaded = asyncio.run(_load(redis.url, model_dir, ids))
            if (loaded.states.steps == n_steps).all():
                converged = time.monotonic() - t0
                break
            time.sleep(1.0)
        sample()
        time.sleep(1.5)  # let the last commits and outputs land
        sample()
        alive = [w.alive() for w in workers]
    finally:
        for w in workers:
            w.stop()
    loaded = asyncio.run(_load(redis.url, model_dir, list(data)))
    redis.stop()
    preds = ku.read_all(broker_url, topics["predictions"], timeout=120, idle=3)
    replayed = sum(m.get("lstream_replayed_skipped_total", 0.0) for m in last_metrics.values())
    up_to_16 = 'lstream_batch_size_messages_bucket{le="16.0"}'
    large = sum(m.get("lstream_batch_size_messages_count", 0.0) - m.get(up_to_16, 0.0) for m in last_metrics.values())
    return ChaosRun(data, loaded, preds, done_kills, holding, terms, restarts, replayed, large, alive, converged,
                    time.monotonic() - t0, feed.error, logs)


def check(r: ChaosRun, model_dir: str) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """Failures per check, and the figures."""
    from evaluation.replay import replay_streams
    from kernels import load_model
    from kernels.engine import Engine
    from series.csvdata import Series

    fails: dict[str, list[str]] = defaultdict(list)
    ids = list(r.data)
    n_steps = len(next(iter(r.data.values()))[0])
    engine = Engine(load_model(model_dir, exact=True))
    series = [Series(s, ts, v, ["value"]) for s, (ts, v) in r.data.items()]
    offline = {x.name: x for x in replay_streams(engine, series)}
    st = r.loaded.states
    bit_equal = 0
    max_diff = dict.fromkeys(FIELDS, 0.0)
    for i, sid in enumerate(ids):
        if not r.loaded.found[i] or st.steps[i] != n_steps:
            fails["steps"].append(f"{sid}: stored steps {st.steps[i] if r.loaded.found[i] else None}, "
                                  f"expected {n_steps}")
            continue
        fin = offline[sid].state
        differ = []
        for name in FIELDS:
            got, want = getattr(st, name)[i], getattr(fin, name)[0]
            if not np.array_equal(got, want, equal_nan=got.dtype.kind == "f"):
                both = np.asarray(got, np.float64) - np.asarray(want, np.float64)
                d = float(np.nanmax(np.abs(both))) if np.isfinite(both).any() else float("nan")
                max_diff[name] = max(max_diff[name], d) if d == d else d
                differ.append(f"{name} (by up to {d:.3g})")
        bit_equal += not differ
        if differ:
            fails["state"].append(f"{sid}: not bit-equal to the offline replay: {', '.join(differ)}")
    seen: dict[tuple[str, int], tuple[float, list[float]]] = {}
    repeats = outputs_differ = 0
    for rec in r.preds:
        p = orjson.loads(rec.value)
        k = (p["stream_id"], p["step"])
        v = (p["ts"], p["actual"])
        # the numbers too (orjson's shortest round-trip text: the float64 itself), repeats included
        off, j = offline.get(p["stream_id"]), p["step"] - 1
        if off is not None and 0 <= j < n_steps and not (
                np.array_equal(np.asarray(p["forecast"], np.float64), off.forecast[j])
                and p["score"] == off.score[j] and p["anomaly"] == bool(off.anomaly[j])
                and (j == 0 or np.array_equal(np.asarray(p["expected"], np.float64), off.expected[j]))):
            outputs_differ += 1
            if outputs_differ <= 5:
                fails["outputs"].append(f"{k}: forecast {p['forecast']}, score {p['score']}: the replay says "
                                        f"{off.forecast[j].tolist()}, {off.score[j]}")
        if k in seen:
            repeats += 1
            if seen[k] != v:
                fails["repeats"].append(f"{k}: repeated with another event {v} != {seen[k]}")
        seen[k] = v
    missing = [(sid, j) for sid in ids for j in range(1, n_steps + 1) if (sid, j) not in seen]
    if missing:
        fails["predictions"].append(f"{len(missing)} (stream, step) without a prediction, e.g. {missing[:5]}")
    for sid, (ts, _) in r.data.items():
        got = [seen[(sid, j + 1)][0] for j in range(n_steps) if (sid, j + 1) in seen]
        if got != [float(t) for t in ts][:len(got)]:
            fails["predictions"].append(f"{sid}: step numbers do not follow the events in order")
    if repeats + r.replayed_skipped <= 0:
        fails["replays"].append("no repeated prediction and no replayed-skipped event: the kills proved nothing")
    if not all(r.alive):
        fails["alive"].append(f"workers alive at the end: {r.alive}")
    if r.converged_s is None:
        fails["converged"].append("not every stream reached its last step within the bound")
    if r.feed_error is not None:
        fails["feed"].append(repr(r.feed_error))
    figures = {"streams": len(ids), "events": len(ids) * n_steps, "kills": r.kills, "kills_holding": r.kills_holding,
               "sigterms": r.sigterms, "redis_restarts": r.redis_restarts, "predictions": len(r.preds),
               "repeated_predictions": repeats, "replayed_skipped": r.replayed_skipped,
               "batches_over_16": r.batches_over_16, "predictions_not_bit_equal": outputs_differ,
               "bit_equal_states": bit_equal, "max_state_diff": max_diff,
               "converged_s": r.converged_s, "elapsed_s": round(r.elapsed_s, 1)}
    return {k: v for k, v in fails.items() if v}, figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chaos", description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=24)
    parser.add_argument("--streams", type=int, default=60)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--gap", type=float, nargs=2, default=(3.0, 9.0), help="seconds between kills (min max)")
    parser.add_argument("--sigterm", action="store_true", help="make the last stop a SIGTERM (the issue's scenario)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="5 kills, 40 streams x 100 events")
    args = parser.parse_args(argv)
    if args.quick:
        args.kills, args.streams, args.steps, args.gap = 5, 40, 100, (3.0, 7.0)
    from benchmarks.fuzz import default_model
    from lstream.devservices import start_broker

    with tempfile.TemporaryDirectory(prefix="lstream-chaos-") as tmp, start_broker() as broker:
        model = default_model(Path(tmp))
        feed_seconds = sum(args.gap) / 2 * args.kills + 5
        r = run(broker.url, model, Path(tmp), n_streams=args.streams, n_steps=args.steps, kills=args.kills,
                feed_seconds=feed_seconds, gap=tuple(args.gap), sigterm=args.sigterm, bound=300.0, seed=args.seed)
        fails, figures = check(r, model)
        for k, v in figures.items():
            print(f"{k:22s} {v}")
        for name, items in fails.items():
            print(f"FAIL {name} ({len(items)})")
            for line in items[:8]:
                print("   ", line[:400])
        if fails:
            for log in r.logs:
                print(f"--- {log.name} (last lines)")
                print("\n".join(log.read_text(errors="replace").splitlines()[-15:]))
        return int(bool(fails))


if __name__ == "__main__":
    sys.exit(main())

