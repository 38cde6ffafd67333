"""One micro-batch of input messages, from raw bytes to predictions, alerts and saved state.

Plain async code over a :class:`state.store.StateStore` and an ``emit`` coroutine (no Faust
here, so it runs and is tested on its own). :meth:`Pipeline.process` does, for one batch:

1. decode and check every message (worker/events.py); rejected ones become dead letters;
2. group the events by stream, keeping each stream's order;
3. load the states of all those streams in one Redis round trip;
4. per stream, in order: skip events the stored state already reflects (position not newer:
   the partition is being replayed after a crash), reject ``duplicate`` (same ``event_id`` as
   the stream's last applied event) and ``late`` (event time older than the last applied
   one), with ``model_mismatch`` for a state of another model under policy ``refuse``;
5. step j = 0, 1, ...: one batched :meth:`kernels.engine.Engine.advance` over the streams
   that have a j-th event (a stream with k events in the batch advances k times, in order);
6. emit every prediction, alert and dead letter, and wait until the broker has them all;
7. save the states with their positions, fenced, in one round trip.

Only after ``process`` returns does the caller acknowledge the batch (Faust commits the
offsets). Why this order, and why nothing is lost or applied twice:

- A crash before step 7 leaves Redis as it was and the offsets uncommitted: the batch is
  read again and computed again from the same states, so it yields the same outputs.
  Outputs are at least once: a crash between 6 and 7 sends them twice, with the same
  stream, source position and step (the numbers agree to float32 rounding: the kernel's
  last bits depend on how many streams it steps at once), and consumers can drop repeats
  by (stream_id, source).
- A crash after step 7 but before the commit replays events the states already reflect;
  step 4 skips them (and the fence in ``state/fence.lua`` would refuse such a save anyway),
  so each event changes a stream's state exactly once.
- Saving before emitting would make the state exactly once as well but could lose outputs
  (a crash between the save and the emit never sends them again); we prefer duplicates to
  gaps.

Redis and broker errors never drop a batch: every round trip is retried with backoff until
it succeeds (logged once per outage), so the batch is neither committed nor skipped.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from kernels.engine import Engine, StreamStates
from state.errors import StateUnavailable
from worker import events as ev
from worker.events import Event, RawMessage, Rejection
from worker.metrics import WorkerMetrics

log = logging.getLogger("lstream.worker")

OutRecord = tuple[str, bytes | None, bytes]  # (topic, key, value)
Emit = Callable[[list[OutRecord]], Awaitable[None]]


@dataclass(frozen=True)
class Topics:
    input: str = "sensor-events"
    predictions: str = "predictions"
    alerts: str = "anomaly-alerts"
    dlq: str = "sensor-events-dlq"


@dataclass
class BatchResult:
    """What one batch did (counts), for logs, metrics and tests."""

    messages: int = 0
    applied: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    replayed: int = 0
    predictions: int = 0
    alerts: int = 0
    streams: int = 0
    fenced: int = 0
    steps: int = 0  # kernel calls (the most events of one stream in this batch)


def severity(score: float, threshold: float) -> str:
    """``critical`` when the score is ten times less likely than the threshold allows.

    >>> severity(0.9995, 0.999), severity(0.99995, 0.999)
    ('warning', 'critical')
    """
    return "critical" if 1.0 - score <= (1.0 - threshold) / 10.0 else "warning"


class Outage:
    """Retry a round trip until it works, logging once when a service goes away and once
    when it comes back (not once per event or per attempt)."""

    def __init__(self, service: str, metrics: WorkerMetrics | None = None, *, first_delay: float = 0.05,
                 max_delay: float = 5.0, sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> None:
        self.service, self.metrics = service, metrics
        self.first_delay, self.max_delay, self.sleep = first_delay, max_delay, sleep
        self.since: float | None = None  # monotonic time the current outage started
        self.outages = 0

    @property
    def down(self) -> bool:
        return self.since is not None

    async def run(self, op: Callable[[], Awaitable[Any]], retryable: Callable[[BaseException], bool]) -> Any:
        delay = self.first_delay
        while True:
            try:
                result = await op()
            except Exception as exc:  # noqa: BLE001 - decided by ``retryable`` below
                if not retryable(exc):
                    raise
                if self.since is None:
                    self.since = time.monotonic()
                    self.outages += 1
                    log.warning("%s unavailable (%s: %s); waiting and retrying, nothing is committed "
                                "or skipped meanwhile", self.service, type(exc).__name__, exc)
                    if self.metrics:
                        self.metrics.up.set(0, service=self.service)
                if self.metrics:
                    self.metrics.retries.inc(service=self.service)
                await self.sleep(delay)
                delay = min(delay * 2, self.max_delay)
                continue
            if self.since is not None:
                log.warning("%s is back after %.1f s; resuming", self.service, time.monotonic() - self.since)
                self.since = None
            if self.metrics:
                self.metrics.up.set(1, service=self.service)
            return result


def redis_retryable(exc: BaseException) -> bool:
    """Connection-level Redis failures (the store wraps them in StateError; look underneath)."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    net = (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError)
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            return False
        if isinstance(seen, net):
            return True
        if isinstance(seen, StateUnavailable) or "BUSY" in str(seen) or "LOADING" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def broker_retryable(exc: BaseException) -> bool:
    """Any failure to deliver outputs is worth another try: nothing is acknowledged meanwhile."""
    return not isinstance(exc, (TypeError, AttributeError, NameError))


class Pipeline:
    """Processes micro-batches for one model (see the module docstring for the order)."""

    def __init__(self, engine: Engine, store: Any, emit: Emit, *, topics: Topics = Topics(),
                 metrics: WorkerMetrics | None = None, max_bytes: int = 1_000_000, policy: str = "reset",
                 redis_outage: Outage | None = None, broker_outage: Outage | None = None) -> None:
        self.engine = engine
        self.model = engine.model
        self.store = store
        self.emit = emit
        self.topics = topics
        self.metrics = metrics or WorkerMetrics()
        self.max_bytes = max_bytes
        self.policy = policy
        self.redis = redis_outage or Outage("redis", self.metrics)
        self.broker = broker_outage or Outage("broker", self.metrics)
        self.version = self.model.version
        self.num_features = self.model.input_size
        # Last input offset handled per partition (for the lag gauge).
        self.positions: dict[int, int] = {}
        self.last_batch_at: float | None = None

    # ------------------------------------------------------------------ batch

    async def process(self, messages: Sequence[RawMessage]) -> BatchResult:
        m = self.metrics
        t0 = time.perf_counter()
        res = BatchResult(messages=len(messages))
        events, rejected = ev.decode_batch(messages, self.topics.input, self.num_features, self.max_bytes)
        groups: dict[str, list[Event]] = {}
        for e in events:
            groups.setdefault(e.stream_id, []).append(e)
        ids = list(groups)
        t1 = time.perf_counter()

        loaded = await self._load(ids) if ids else None
        t2 = time.perf_counter()

        plans = self._plan(ids, groups, loaded, rejected, res) if loaded is not None else []
        records: list[OutRecord] = []
        save: tuple[list[str], StreamStates, list[Event]] | None = None
        if loaded is not None:
            save = self._compute(ids, plans, loaded.states, records, res)
        t3 = time.perf_counter()

        for r in rejected:
            records.append((self.topics.dlq, r.key, orjson.dumps(ev.dead_letter(r))))
            res.rejected[r.code] = res.rejected.get(r.code, 0) + 1
        if records:
            await self.broker.run(lambda: self.emit(records), broker_retryable)
        t4 = time.perf_counter()

        if save is not None and save[0]:
            sids, states, last = save
            applied = await self._save(sids, states, last)
            res.fenced = int(len(sids) - applied.sum())
        t5 = time.perf_counter()

        for msg in messages:
            self.positions[msg.partition] = max(msg.offset, self.positions.get(msg.partition, -1))
        self.last_batch_at = time.time()
        m.batches.inc()
        m.events_in.inc(len(messages))
        m.batch_size.observe(len(messages))
        m.applied.inc(res.applied)
        m.predictions.inc(res.predictions)
        m.alerts.inc(res.alerts)
        m.replayed.inc(res.replayed)
        m.fenced.inc(res.fenced)
        m.duplicates.inc(res.rejected.get(ev.DUPLICATE, 0))
        for code, k in res.rejected.items():
            m.rejected.inc(k, code=code)
        for stage, dt in (("decode", t1 - t0), ("load", t2 - t1), ("kernel", t3 - t2), ("emit", t4 - t3),
                          ("save", t5 - t4), ("total", t5 - t0)):
            m.stage.observe(dt, stage=stage)
        if res.fenced:
            log.warning("%d stream state(s) not saved: a newer position is already stored (another worker "
                        "processed these events; the outputs just sent repeat its own)", res.fenced)
        return res

    # ------------------------------------------------------------ the stages

    async def _load(self, ids: list[str]) -> Any:
        async def op() -> Any:
            t = time.perf_counter()
            loaded = await self.store.load(ids)
            self.metrics.redis_rtt.observe(time.perf_counter() - t, op="load")
            return loaded

        return await self.redis.run(op, redis_retryable)

    async def _save(self, ids: list[str], states: StreamStates, last: list[Event]) -> np.ndarray:
        parts = np.array([e.partition for e in last], np.int64)
        offs = np.array([e.offset for e in last], np.int64)
        idxs = np.array([e.index or 0 for e in last], np.int64)
        ts = np.array([e.ts for e in last], np.float64)
        eids = [e.event_id for e in last]

        async def op() -> np.ndarray:
            t = time.perf_counter()
            applied = await self.store.save(ids, states, parts, offs, idxs, ts, eids)
            self.metrics.redis_rtt.observe(time.perf_counter() - t, op="save")
            return applied

        return await self.redis.run(op, redis_retryable)

    def _plan(self, ids: list[str], groups: dict[str, list[Event]], loaded: Any, rejected: list[Rejection],
              res: BatchResult) -> list[list[Event]]:
        """Per stream, the events to apply, in order; the others are skipped or rejected."""
        plans: list[list[Event]] = []
        for i, sid in enumerate(ids):
            todo: list[Event] = []
            plans.append(todo)
            found = bool(loaded.found[i])
            part, off, idx = int(loaded.partition[i]), int(loaded.offset[i]), int(loaded.index[i])
            last_ts = float(loaded.ts[i]) if found else math.nan
            last_eid = loaded.event_id[i] if found else None
            refuse = self.policy == "refuse" and bool(loaded.reset[i])
            for e in groups[sid]:
                if found and e.partition == part and (e.offset, e.index or 0) <= (off, idx):
                    res.replayed += 1  # already in the stored state: this is a replay
                    continue
                if refuse:
                    self._reject(rejected, e, ev.MODEL_MISMATCH,
                                 f"expected a state of model {self.version}, got one of another model "
                                 "(policy refuse; 'lstream state reset' starts the stream fresh)")
                    continue
                if e.event_id is not None and e.event_id == last_eid:
                    self._reject(rejected, e, ev.DUPLICATE,
                                 f"expected a new event_id, got {e.event_id!r} again (already applied)")
                    continue
                if not math.isnan(last_ts) and e.ts < last_ts:
                    self._reject(rejected, e, ev.LATE,
                                 f"expected ts >= {last_ts!r} (the stream's last applied event), got {e.ts!r}")
                    continue
                todo.append(e)
                last_ts, last_eid = e.ts, e.event_id
        return plans

    def _reject(self, rejected: list[Rejection], e: Event, code: str, detail: str) -> None:
        rejected.append(Rejection(code, detail, self.topics.input, e.partition, e.offset, e.key, e.raw_bytes(),
                                  e.index, e.stream_id))

    def _compute(self, ids: list[str], plans: list[list[Event]], states: StreamStates, records: list[OutRecord],
                 res: BatchResult) -> tuple[list[str], StreamStates, list[Event]]:
        """Advance every stream through its events; append the outputs to ``records``."""
        rows = [i for i, p in enumerate(plans) if p]
        if not rows:
            return [], states, []
        st = states if len(rows) == len(ids) else states.take(np.asarray(rows))
        plans = [plans[i] for i in rows]
        sids = [ids[i] for i in rows]
        counts = np.array([len(p) for p in plans])
        res.streams = len(rows)
        res.steps = int(counts.max())
        topics, version, thr = self.topics, self.version, self.engine.threshold
        dumps = orjson.dumps
        for j in range(res.steps):
            active = np.flatnonzero(counts > j)
            whole = len(active) == len(st)
            sub = st if whole else st.take(active)
            x = np.stack([plans[r][j].values for r in active])
            out = self.engine.advance(sub, x)
            if not whole:
                st.put(active, sub)
            steps = sub.steps.tolist()
            forecast = out.forecast.tolist()
            expected = out.expected.tolist()
            score = out.score.tolist()
            anomaly = out.anomaly.tolist()
            alerts = np.flatnonzero(out.alert).tolist()
            for k, r in enumerate(active.tolist()):
                e = plans[r][j]
                source: dict[str, Any] = {"topic": topics.input, "partition": e.partition, "offset": e.offset}
                if e.index is not None:
                    source["index"] = e.index
                exp = None if steps[k] == 1 else expected[k]
                key = sids[r].encode()
                actual = e.values.tolist()
                records.append((topics.predictions, key, dumps({
                    "stream_id": sids[r], "ts": e.ts, "source": source, "step": steps[k], "model": version,
                    "actual": actual, "expected": exp, "forecast": forecast[k], "score": score[k],
                    "anomaly": anomaly[k]})))
            for k in alerts:
                r = int(active[k])
                e = plans[r][j]
                source = {"topic": topics.input, "partition": e.partition, "offset": e.offset}
                if e.index is not None:
                    source["index"] = e.index
                records.append((topics.alerts, sids[r].encode(), dumps({
                    "stream_id": sids[r], "ts": e.ts, "source": source, "score": score[k], "threshold": thr,
                    "severity": severity(score[k], thr), "expected": None if steps[k] == 1 else expected[k],
                    "actual": e.values.tolist(), "model": version})))
            res.alerts += len(alerts)
            res.predictions += len(active)
        res.applied = int(counts.sum())
        return sids, st, [p[-1] for p in plans]
