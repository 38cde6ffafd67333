"""One micro-batch, raw messages in, outputs sent and states saved; overlapped batches and acks.

:class:`Pipeline` runs the pure stages (worker/events.py decode, worker/plan.py, worker/compute.py)
between the I/O: states loaded (or held, worker/cache.py), outputs emitted, states saved
(fenced). Every round trip goes through :class:`worker.retry.Outage`, the one retry policy. A
deterministic failure is narrowed down to the streams that cause it (bisecting), whose events
are dead-lettered (``bad_state``, ``failed``); the rest of the batch completes. Why the order
load, compute, emit, save, ack gives exactly-once state and at-least-once outputs:
docs/exactly-once.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kernels.engine import Engine
from kernels.states import Positions, StreamStates
from state.loaded import Loaded
from worker import events as ev
from worker.cache import StateCache
from worker.compute import Computed, compute
from worker.encode import MAX_RECORD, Encoder, Output, Topics, severity
from worker.events import Event, Limits, RawMessage, Rejection
from worker.metrics import WorkerMetrics
from worker.plan import SKIP, Plan, Start, plan
from worker.retry import Outage

__all__ = ["BatchResult", "Faults", "Outage", "Pipeline", "Topics", "severity"]

log = logging.getLogger("lstream.worker")

Emit = Callable[[list[Output]], Awaitable[None]]


@dataclass
class BatchResult:
    """What one batch did (counts), for logs, metrics and tests."""

    messages: int = 0
    applied: int = 0  # events whose state change was saved (or held by this worker's saved chain)
    rejected: dict[str, int] = field(default_factory=dict)
    replayed: int = 0
    regressed: int = 0
    predictions: int = 0
    alerts: int = 0
    streams: int = 0
    fenced: int = 0  # saves refused because another worker stored a newer position
    saved: int = 0  # stream states written by the fenced save
    steps: int = 0  # kernel calls (the most events of one stream in this batch)


@dataclass
class Faults:
    """Deterministic failures the worker lived through (for /healthz and /metrics)."""

    failed: int = 0  # events dead-lettered as failed (processing error, non-finite step)
    bad_state: int = 0  # events dead-lettered because their stream's stored state is unreadable
    restarted: int = 0  # streams restarted from a fresh state after a non-finite step
    regressed: int = 0  # events behind their stream's stored position, never applied (offset regression)
    unsent: int = 0  # output records the broker refused for good (logged)
    unsaved: int = 0  # stream saves that failed for good (logged)
    last: str | None = None  # the last failure, one line
    last_at: float | None = None  # its wall-clock time

    def note(self, what: str) -> None:
        self.last, self.last_at = what, time.time()

    def health(self) -> dict[str, Any]:
        """The /healthz detail."""
        return {"failed_events": self.failed, "bad_state_events": self.bad_state, "restarted_streams": self.restarted,
                "offset_regressions": self.regressed, "unsent_records": self.unsent, "unsaved_streams": self.unsaved,
                "last_failure": self.last, "last_failure_at": self.last_at}


@dataclass
class Prepared:
    """A batch computed by :meth:`Pipeline.prepare`, waiting for :meth:`Pipeline.finish`."""

    messages: Sequence[RawMessage]
    res: BatchResult
    records: list[Output]
    done: Computed
    rewound: list[str]  # streams whose stored position is dropped before the save (offset regression, apply)
    ids: frozenset[str]  # every stream the batch touched
    seconds: dict[str, float]


def _start_of(loaded: Loaded) -> Start:
    """The positions a store load returned, as :class:`worker.plan.Start`."""
    pos = loaded.positions
    return Start(pos.partition, pos.offset, pos.index, pos.ts, list(pos.event_id), loaded.found,
                 loaded.other_model, list(loaded.unreadable))


def _landed(result: Any) -> tuple[np.ndarray, np.ndarray]:
    """(landed, ours) masks from a store save result (:class:`state.saved.Saved`): landed =
    applied now or already ours (a retry whose first attempt had landed), ours = the latter."""
    from state.saved import ALREADY

    landed = np.asarray(result.applied, bool).copy()
    return landed, np.asarray(result.code) == ALREADY


class Pipeline:
    """Processes micro-batches for one model.

    ``cache``: hold at most this many stream states in memory (:class:`worker.cache.StateCache`)
    and skip their Redis load; 0 turns it off. ``cache_age``: read a held state from Redis again
    after this many seconds at the latest. ``limits``: sanity limits at the door (default: the
    model's, :meth:`worker.events.Limits.for_model`). ``offset_regression``: ``skip`` or
    ``apply`` (worker/plan.py). ``max_record``: bytes a dead letter may take.
    """

    def __init__(self, engine: Engine, store: Any, emit: Emit, *, topics: Topics = Topics(),
                 metrics: WorkerMetrics | None = None, max_bytes: int = 1_000_000, policy: str = "reset",
                 redis_outage: Outage | None = None, broker_outage: Outage | None = None,
                 cache: int = 50_000, cache_age: float = 30.0, limits: Limits | None = None,
                 offset_regression: str = SKIP, max_record: int = MAX_RECORD) -> None:
        self.engine = engine
        self.model = engine.model
        self.store = store
        self.emit = emit
        self.topics = topics
        self.metrics = metrics or WorkerMetrics()
        self.max_bytes = max_bytes
        self.policy = policy
        self.offset_regression = offset_regression
        self.redis = redis_outage or Outage("redis", self.metrics)
        self.broker = broker_outage or Outage("broker", self.metrics)
        self.version = self.model.version
        self.num_features = self.model.input_size
        self.limits = limits or Limits.for_model(dict(self.model.norm), self.num_features)
        self.encoder = Encoder(topics, self.version, engine.threshold, max_record)
        self.cache = StateCache(engine.new_states, max_entries=cache, max_age=cache_age) if cache > 0 else None
        self.faults = Faults()
        # Last input offset handled per partition (for the lag gauge).
        self.positions: dict[int, int] = {}
        self.last_batch_at: float | None = None
        # The batch being finished in the background (see submit) and the streams it touched.
        self._tail: asyncio.Future[Any] | None = None
        self._tail_ids: frozenset[str] = frozenset()

    # ------------------------------------------------------------ scheduling

    async def process(self, messages: Sequence[RawMessage]) -> BatchResult:
        """One batch, start to end: when this returns, outputs are delivered and states saved."""
        prepared = await self.prepare(messages)
        await self.flush()
        return await self.finish(prepared)

    async def submit(self, messages: Sequence[RawMessage], done: Callable[[], Awaitable[Any]] | None = None) -> None:
        """Overlap batches: compute this one now, while the previous one is still being
        delivered and saved; then finish it in the background (emit, save, then ``done()``,
        which acknowledges it). Returns when this batch is computed and the previous one is
        finished, so at most one batch is ever in flight and they finish in order."""
        prepared = await _until_done(lambda: self.prepare(messages), "computing", len(messages), self.forget)
        await self.flush()

        async def finish() -> None:
            await _until_done(lambda: self.finish(prepared), "finishing", len(messages))
            if done is not None:
                await done()

        self._tail_ids = prepared.ids
        self._tail = asyncio.ensure_future(finish())
        # Let the producer write this batch's outputs to the socket before the caller computes
        # the next batch (a long stretch without awaits), or they would wait for that too.
        for _ in range(3):
            await asyncio.sleep(0)

    async def flush(self) -> None:
        """Wait until the batch in flight (if any) is delivered, saved and acknowledged."""
        tail = self._tail
        if tail is not None:
            await asyncio.shield(tail)
            if self._tail is tail:
                self._tail, self._tail_ids = None, frozenset()

    def abandon(self) -> None:
        """Stop finishing the batch in flight (when stopping during an outage): it is not
        acknowledged, so it is read and computed again at the next start."""
        if self._tail is not None:
            self._tail.cancel()
            self._tail, self._tail_ids = None, frozenset()
        self.forget()

    def forget(self) -> None:
        """Drop every held state (after a rebalance or an error): the next batches read Redis."""
        if self.cache is not None:
            self.cache.clear()

    def health(self) -> dict[str, Any]:
        """Detail for /healthz: deterministic failures so far and the held-state cache."""
        out = self.faults.health()
        if self.cache is not None:
            c = self.cache
            out["cache"] = {"entries": len(c), "max_entries": c.max_entries, "bytes": c.nbytes, "hits": c.hits,
                            "misses": c.misses, "evictions": c.evictions, "hit_rate": round(c.hit_rate, 4)}
        return out

    # ------------------------------------------------------------ one batch

    async def prepare(self, messages: Sequence[RawMessage]) -> Prepared:
        """Decode, load, plan and compute a batch; nothing is sent or saved yet."""
        t0 = time.perf_counter()
        res = BatchResult(messages=len(messages))
        events, rejected = self._decode(messages)
        groups: dict[str, list[Event]] = {}
        for e in events:
            g = groups.get(e.stream_id)
            if g is None:
                groups[e.stream_id] = [e]
            else:
                g.append(e)
        t1 = time.perf_counter()

        generation = self.cache.generation if self.cache is not None else 0
        ids, start, states, born = await self._states(list(groups))
        t2 = time.perf_counter()

        p = plan(ids, groups, start, topic=self.topics.input, version=self.version,
                 refuse_other_model=self.policy == "refuse", offset_regression=self.offset_regression)
        done = self._compute(p, states)
        res.replayed, res.regressed = p.replayed, p.regressed
        res.streams, res.steps, res.predictions, res.alerts = len(done.ids), done.steps, done.predictions, done.alerts
        if p.regressed:
            self.faults.regressed += p.regressed
            log.warning("%d event(s) lie behind their stream's stored position but are newer than its last applied "
                        "event: the input topic went back (recreated or truncated?); offset_regression=%s",
                        p.regressed, self.offset_regression)
        if done.restarted:
            self.faults.restarted += len(done.restarted)
            self.faults.note(f"non-finite step: restarted stream(s) {done.restarted[:5]}")
            log.warning("a step produced a non-finite number for %d stream(s) (%s); they restart from a fresh "
                        "state and their event goes to the dead-letter topic", len(done.restarted),
                        ", ".join(repr(s) for s in done.restarted[:5]))
        records = done.outputs
        for r in (*rejected, *p.rejected, *done.failed):
            records.append(self.encoder.dead_letter(r))
            res.rejected[r.code] = res.rejected.get(r.code, 0) + 1
        self.faults.failed += res.rejected.get(ev.FAILED, 0)
        self.faults.bad_state += res.rejected.get(ev.BAD_STATE, 0)
        if self.cache is not None and done.ids and done.states is not None:
            if self.cache.generation == generation:
                last = done.last
                self.cache.put(done.ids, done.states, [e.partition for e in last], [e.offset for e in last],
                               [e.index or 0 for e in last], [e.ts for e in last], [e.event_id for e in last],
                               born[np.asarray(p.rows)] if done.ids == p.ids else born[_rows_of(p, done.ids)])
            else:  # dropped or cleared meanwhile: what we read may be stale, read Redis next time
                self.cache.drop(done.ids)
        t3 = time.perf_counter()
        return Prepared(messages, res, records, done, [s for s in p.rewound if s in set(done.ids)], frozenset(ids),
                        {"decode": t1 - t0, "load": t2 - t1, "kernel": t3 - t2})

    async def finish(self, p: Prepared) -> BatchResult:
        """Deliver the outputs, then save the states (fenced); the caller acknowledges after."""
        m = self.metrics
        res, records, done = p.res, p.records, p.done
        t3 = time.perf_counter()
        if records:
            await self._emit(records)
        t4 = time.perf_counter()
        if done.ids and done.states is not None:
            if p.rewound:
                await self._rewind(p.rewound)
            landed = await self._save(done.ids, done.states, done.last)
            res.fenced = int(len(landed) - landed.sum())
            res.saved = int(landed.sum())
            res.applied = int(np.asarray(done.counts)[landed].sum())
            if res.fenced and self.cache is not None:
                # Someone else saved a newer position: our copies are not the truth, reload them.
                self.cache.drop([s for s, ok in zip(done.ids, landed.tolist()) if not ok])
        t5 = time.perf_counter()

        positions = self.positions
        for msg in p.messages:
            if msg.offset > positions.get(msg.partition, -1):
                positions[msg.partition] = msg.offset
        self.last_batch_at = time.time()
        m.batches.inc()
        m.events_in.inc(len(p.messages))
        m.batch_size.observe(len(p.messages))
        m.applied.inc(res.applied)
        m.predictions.inc(res.predictions)
        m.alerts.inc(res.alerts)
        m.replayed.inc(res.replayed)
        m.fenced.inc(res.fenced)
        m.saved.inc(res.saved)
        m.duplicates.inc(res.rejected.get(ev.DUPLICATE, 0))
        for code, k in res.rejected.items():
            m.rejected.inc(k, code=code)
        sec = p.seconds
        for stage, dt in (("decode", sec["decode"]), ("load", sec["load"]), ("kernel", sec["kernel"]),
                          ("emit", t4 - t3), ("save", t5 - t4), ("total", sum(sec.values()) + t5 - t3)):
            m.stage.observe(dt, stage=stage)
        if res.fenced:
            log.warning("%d stream state(s) not saved: another worker stored a newer position (it processed these "
                        "events too; the outputs just sent repeat its own)", res.fenced)
        return res

    # ------------------------------------------------------------ stages with isolation

    def _decode(self, messages: Sequence[RawMessage]) -> tuple[list[Event], list[Rejection]]:
        args = (self.topics.input, self.num_features, self.max_bytes, self.limits)
        try:
            return ev.decode_batch(messages, *args)
        except Exception:
            pass
        events: list[Event] = []
        rejected: list[Rejection] = []
        for m in messages:  # a decoder bug: find the message(s) behind it
            try:
                got, bad = ev.decode_batch([m], *args)
            except Exception as exc:
                what = f"{type(exc).__name__}: {exc}"
                self.faults.note(f"decoding: {what}")
                log.exception("decoding message %d:%d failed; dead-lettered", m.partition, m.offset)
                rejected.append(Rejection(ev.FAILED, f"decoding failed: {what}", self.topics.input, m.partition,
                                          m.offset, m.key, m.value))
                continue
            events += got
            rejected += bad
        return events, rejected

    def _compute(self, p: Plan, states: StreamStates) -> Computed:
        """:func:`worker.compute.compute`; if it raises, the streams behind it (bisecting) have
        their events dead-lettered as ``failed`` and the others are computed."""
        try:
            return compute(self.engine, self.encoder, p, states)
        except Exception as exc:
            if len(p.ids) == 1:
                what = f"{type(exc).__name__}: {exc}"
                self.faults.note(f"stream {p.ids[0]!r}: {what}")
                log.error("processing stream %r failed (%s); its %d event(s) go to the dead-letter topic",
                          p.ids[0], what, len(p.events[0]))
                out = Computed()
                out.failed = [Rejection(ev.FAILED, f"processing failed: {what}", self.topics.input, e.partition,
                                        e.offset, e.key, e.raw_bytes(), e.index, e.stream_id) for e in p.events[0]]
                return out
            half = len(p.ids) // 2
            parts = [Plan(p.ids[a:b], p.rows[a:b], p.events[a:b]) for a, b in ((0, half), (half, len(p.ids)))]
            return _merge([self._compute(q, states) for q in parts])

    async def _states(self, ids: list[str]) -> tuple[list[str], Start, StreamStates, np.ndarray]:
        """The states of ``ids``: held ones from the cache, the others from Redis. Returns the
        ids reordered (held first), their positions and states, and when each chain was read
        from Redis."""
        now = time.monotonic()
        cache = self.cache
        if not ids:
            return ids, Start.fresh(0), self.engine.new_states(0), np.zeros(0)
        if cache is None:
            start, states = await self._load(ids)
            return ids, start, states, np.full(len(ids), now)
        hit, miss = cache.split(ids, now)
        self.metrics.cache.inc(len(hit), result="hit")
        self.metrics.cache.inc(len(miss), result="miss")
        held = [ids[i] for i in hit]
        if not miss:
            states, start = cache.get(held)
            return held, start, states, cache.born(held)
        missing = [ids[i] for i in miss]
        # A stream of the batch in flight must not be read from Redis before that batch saved it.
        if self._tail is not None and not self._tail_ids.isdisjoint(missing):
            await self.flush()
        start, states = await self._load(missing)
        if not hit:
            return missing, start, states, np.full(len(missing), now)
        hstates, hstart = cache.get(held)
        return (held + missing, Start.concat([hstart, start]), StreamStates.concat([hstates, states]),
                np.concatenate([cache.born(held), np.full(len(missing), now)]))

    async def _load(self, ids: list[str]) -> tuple[Start, StreamStates]:
        """Load from Redis; a load that fails for good is bisected down to the streams whose
        stored state cannot be read (those start fresh, marked unreadable: ``bad_state``). If
        every stream fails, the store is at fault, not a stream: the error is raised."""
        try:
            return await self._load_parts(ids)
        except _Failed as failed:
            start, states = failed.start, failed.states
            if _systemic(failed.exc) or (len(ids) > 1 and all(u is not None for u in start.unreadable)):
                self.faults.note(f"loading: {type(failed.exc).__name__}: {failed.exc}")
                raise failed.exc from None
            for sid, why in zip(ids, start.unreadable):
                if why is not None:
                    self.faults.note(f"loading stream {sid!r}: {why}")
            return start, states

    async def _load_parts(self, ids: list[str]) -> tuple[Start, StreamStates]:
        async def op() -> Any:
            t = time.perf_counter()
            loaded = await self.store.load(ids)
            self.metrics.redis_rtt.observe(time.perf_counter() - t, op="load")
            return loaded

        try:
            loaded = await self.redis.run(op)
        except Exception as exc:
            if len(ids) == 1 or _systemic(exc):
                start = Start.fresh(len(ids))
                start.unreadable = [f"{type(exc).__name__}: {exc}"] * len(ids)
                raise _Failed(exc, start, self.engine.new_states(len(ids))) from exc
            half = len(ids) // 2
            parts, first = [], None
            for part in (ids[:half], ids[half:]):
                try:
                    parts.append(await self._load_parts(part))
                except _Failed as failed:
                    first = first or failed.exc
                    parts.append((failed.start, failed.states))
            start = Start.concat([p[0] for p in parts])
            states = StreamStates.concat([p[1] for p in parts])
            if first is not None:
                raise _Failed(first, start, states) from None
            return start, states
        return _start_of(loaded), loaded.states

    async def _emit(self, records: list[Output]) -> None:
        try:
            await self.broker.run(lambda: self.emit(records))
            return
        except Exception as exc:
            if len(records) == 1:
                self.faults.unsent += 1
                self.faults.note(f"sending a record to {records[0][0]}: {type(exc).__name__}: {exc}")
                log.error("the broker refused a record for %s for good (%s: %s); it is dropped", records[0][0],
                          type(exc).__name__, exc)
                return
        half = len(records) // 2
        await self._emit(records[:half])
        await self._emit(records[half:])

    async def _rewind(self, ids: list[str]) -> None:
        """Drop the stored positions of ``ids`` (offset regression, policy apply) so that the
        save at the topic's new, lower offsets applies."""
        for sid in ids:
            def op(sid: str = sid) -> Awaitable[Any]:
                return self.store.reset(sid)

            await self.redis.run(op)
        log.warning("offset regression: %d stream(s) start a fresh position history (offset_regression=apply)",
                    len(ids))

    async def _save(self, ids: list[str], states: StreamStates, last: list[Event]) -> np.ndarray:
        """Save fenced; True where the state landed (now, or by a first attempt whose reply was
        lost). A save that fails for good is bisected: the streams behind it are logged."""
        parts = [e.partition for e in last]
        offs = [e.offset for e in last]
        idxs = [e.index or 0 for e in last]
        ts = [e.ts for e in last]
        eids = [e.event_id for e in last]

        async def op() -> Any:
            t = time.perf_counter()
            got = await self.store.save(ids, states, Positions.build(parts, offs, idxs, ts, eids))
            self.metrics.redis_rtt.observe(time.perf_counter() - t, op="save")
            return got

        try:
            result = await self.redis.run(op)
        except Exception as exc:
            if _systemic(exc):
                raise
            if len(ids) == 1:
                self.faults.unsaved += 1
                self.faults.note(f"saving stream {ids[0]!r}: {type(exc).__name__}: {exc}")
                log.error("saving stream %r failed for good (%s: %s); its state stays as stored", ids[0],
                          type(exc).__name__, exc)
                if self.cache is not None:
                    self.cache.drop(ids)
                return np.zeros(1, bool)
            half = len(ids) // 2
            rows = np.arange(len(ids))
            return np.concatenate([await self._save(ids[:half], states.take(rows[:half]), last[:half]),
                                   await self._save(ids[half:], states.take(rows[half:]), last[half:])])
        landed, ours = _landed(result)
        if not landed.all():
            # A refusal is another worker's newer position, unless the stored position is
            # exactly ours: then a first attempt whose reply was lost had landed (issue 12.8).
            refused = np.flatnonzero(~landed).tolist()
            start, _ = await self._load([ids[i] for i in refused])
            for j, i in enumerate(refused):
                e = last[i]
                if (start.found[j] and start.unreadable[j] is None and int(start.partition[j]) == e.partition
                        and int(start.offset[j]) == e.offset and int(start.index[j]) == (e.index or 0)
                        and start.event_id[j] == e.event_id and float(start.ts[j]) == e.ts):
                    landed[i] = ours[i] = True
        if ours.any():
            log.info("%d save(s) had landed on a first attempt whose reply was lost", int(ours.sum()))
        return landed


class _Failed(Exception):
    """A load that failed for some streams: what could be loaded, the others marked unreadable."""

    def __init__(self, exc: Exception, start: Start, states: StreamStates) -> None:
        super().__init__(str(exc))
        self.exc, self.start, self.states = exc, start, states


def _systemic(exc: BaseException) -> bool:
    """Errors of the store itself, never of one stream's state (a wrong password after a
    restart): no stream is dead-lettered for them; the batch waits and is retried."""
    from state.errors import StateAuthError

    return isinstance(exc, StateAuthError)


def _rows_of(p: Plan, ids: list[str]) -> np.ndarray:
    where = {s: r for s, r in zip(p.ids, p.rows)}
    return np.array([where[s] for s in ids], np.int64)


def _merge(parts: list[Computed]) -> Computed:
    out = Computed()
    with_states = [c for c in parts if c.ids and c.states is not None]
    for c in parts:
        out.ids += c.ids
        out.last += c.last
        out.outputs += c.outputs
        out.failed += c.failed
        out.restarted += c.restarted
        out.counts += c.counts
        out.applied += c.applied
        out.predictions += c.predictions
        out.alerts += c.alerts
        out.steps = max(out.steps, c.steps)
    if with_states:
        out.states = StreamStates.concat([c.states for c in with_states if c.states is not None])
    return out


async def _until_done(op: Callable[[], Awaitable[Any]], what: str, n: int,
                      on_error: Callable[[], None] | None = None) -> Any:
    """Last resort around a whole stage: the stages isolate failures themselves, so an error
    here is a bug in this module; the batch is retried (never skipped: it is not acknowledged)."""
    delay = 0.1
    while True:
        try:
            return await op()
        except Exception as exc:
            log.exception("%s a batch of %d message(s) failed (%s: %s); retrying in %.1f s", what, n,
                          type(exc).__name__, exc, delay)
            if on_error is not None:
                on_error()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
