"""The Faust application: :func:`create_app` builds it from :class:`worker.settings.Settings`.

Nothing happens at import time. The app has one agent on the input topic (raw bytes keys
and values) that takes micro-batches with ``stream.noack_take(batch_size, batch_wait)`` and
hands each to :meth:`worker.pipeline.Pipeline.submit`, which computes it while the previous
batch is still being delivered and saved; a batch's messages are acknowledged (so Faust may
commit their offsets) only after its own outputs are delivered and its states saved. Every
rebalance drops the states the pipeline holds in memory (see worker/pipeline.py). The web
server (Faust's) serves ``/streams/{id}``, ``/healthz`` and ``/metrics`` (worker/web.py).

Why ``noack_take`` and manual acks rather than ``take``: ``take`` acknowledges a batch in a
``finally`` clause, also when the agent is cancelled or fails half way through it, which
would let Faust commit offsets of events whose state was never saved.

Startup: the HTTP server answers first (503 with ``{"waiting_for": ...}`` until the worker
consumes); then, before the consumer joins its group, the worker creates the topics that are
missing and connects to Redis, waiting for each with backoff (an unreachable service is an
outage, shown on ``/healthz``), and warms the kernels. Errors that retrying cannot cure (a
taken web port, a wrong Redis password; a bad model fails earlier, in the command line) end
the process with one line on stderr and exit code 2 (worker/health.py).

Latency: the consumer's fetch wait (``fetch_wait``, worker/transport.py), the micro-batch
wait (``batch_wait``) and the output producer (no linger) set the floor; see
docs/operations-latency.md.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from typing import Any

from worker.health import RedisProbe, Startup, TimedStore, fatal, port_taken
from worker.settings import Settings, broker_hosts

log = logging.getLogger("lstream.worker")


# Kafka client loggers that repeat one error per reconnect attempt during an outage.
CLIENT_LOGGERS = ("aiokafka", "aiokafka.client", "aiokafka.conn", "aiokafka.cluster", "aiokafka.consumer.fetcher",
                  "aiokafka.consumer.group_coordinator", "aiokafka.producer.sender")


class RepeatFilter(logging.Filter):
    """Let a given message (by logger and format string) through at most once per ``window``
    seconds, so an outage is logged once rather than once per retry.

    >>> f = RepeatFilter(window=60.0)
    >>> rec = logging.LogRecord("aiokafka.client", logging.ERROR, "", 0, "Unable connect to %s", ("x",), None)
    >>> f.filter(rec), f.filter(rec)
    (True, False)
    """

    def __init__(self, window: float = 60.0) -> None:
        super().__init__()
        self.window = window
        self.last: dict[tuple[str, str], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = time.monotonic()
        if now - self.last.get(key, -1e18) < self.window:
            return False
        if len(self.last) > 1000:
            self.last.clear()
        self.last[key] = now
        return True


def quiet_client_logs(window: float = 60.0) -> None:
    """Install :class:`RepeatFilter` on the Kafka client's loggers (once per process)."""
    for name in CLIENT_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RepeatFilter) for f in logger.filters):
            logger.addFilter(RepeatFilter(window))


class Runtime:
    """Everything the agent and the web views share: model, engine, store, pipeline, metrics."""

    def __init__(self, settings: Settings, model: Any = None) -> None:
        from kernels import load_model
        from kernels.blas import limit_blas_threads
        from kernels.engine import Engine
        from worker.metrics import WorkerMetrics
        from worker.pipeline import Outage, Topics

        self.settings = settings
        self.model = model if model is not None else load_model(settings.model, exact=settings.exact_kernels)
        self.engine = Engine(self.model, threshold=settings.threshold, calm_steps=settings.calm_steps)
        self.metrics = WorkerMetrics()
        self.metrics.set_model(self.model)
        self.topics = Topics(settings.input_topic, settings.predictions_topic, settings.alerts_topic,
                             settings.dlq_topic)
        self.redis_outage = Outage("redis", self.metrics)
        self.broker_outage = Outage("broker", self.metrics)
        self.startup = Startup(self.metrics, cleanup=self.cleanup)
        self.early_health: Any = None  # worker.health.EarlyHealth, handed over by the command line
        self.probe: RedisProbe | None = None
        self._probe_task: asyncio.Future[Any] | None = None
        self.store: Any = None
        self.sender: Any = None
        self.temp_dir: str | None = None
        self.pipeline: Any = None
        self.app: Any = None
        self.started_at = time.time()
        self.ready = False
        self.stopping = False
        self.emitted_at = 0.0  # wall clock when the last outputs were acknowledged by the broker
        self.last_event_ts: dict[int, float] = {}  # input partition -> newest event time emitted
        self._active: tuple[set[bytes], set[bytes], float] = (set(), set(), time.monotonic())
        self._register_scrape()
        if not limit_blas_threads(1):
            log.info("could not limit BLAS to one thread; set OPENBLAS_NUM_THREADS=1 if the kernel is slow")
        # Run the whole per-event pipeline once so the first real batch pays no JIT cost.
        import numpy as np

        self.engine.advance(self.engine.new_states(2), np.zeros((2, self.model.input_size)))

    # ------------------------------------------------------------ start-up

    async def start_web(self) -> None:
        """Start Faust's web server now, before any service is reached, so ``/healthz`` answers
        from the first second; a taken port ends the process (one line, exit code 2)."""
        self.startup.step("web server")
        if self.early_health is not None:  # the command line's stand-in until now
            self.early_health.stop()
            self.early_health = None
        try:
            await self.app.web.start()
        except OSError as exc:
            if port_taken(exc):
                self.fail(f"cannot listen on {self.settings.web_host}:{self.settings.web_port}: {exc.strerror} "
                          "(another process has the port: choose another with --web-port / LSTREAM_WEB_PORT)")
            raise

    def fail(self, message: str) -> None:
        fatal(message, cleanup=self.cleanup)

    async def prepare(self) -> None:
        """Create missing topics and connect to Redis, waiting for each with backoff."""
        from state.store import StateStore
        from worker.emit import BatchSender
        from worker.events import Limits
        from worker.kafka import ensure_topics
        from worker.pipeline import Pipeline

        s = self.settings
        topics = [s.input_topic, s.predictions_topic, s.alerts_topic, s.dlq_topic]
        run = self.startup.run
        await run("broker", "broker", lambda: ensure_topics(s.broker, topics, s.partitions))
        self.sender = await run("broker", "broker", lambda: BatchSender.start(s.broker))
        m = self.model
        store = await run("redis", "redis", lambda: StateStore.connect(
            s.redis_url, model_version=m.version, num_layers=m.num_layers, hidden_size=m.hidden_size,
            input_size=m.input_size, ttl=s.state_ttl, policy="reset", retries=0, timeout=s.redis_timeout))
        self.store = TimedStore(store, s.redis_timeout, self.metrics)
        self.probe = RedisProbe(store, self.metrics, s.redis_timeout)
        self._probe_task = asyncio.ensure_future(self.probe.run())
        self.pipeline = Pipeline(self.engine, self.store, self.emit, topics=self.topics, metrics=self.metrics,
                                 max_bytes=s.max_message_bytes, policy=s.model_policy,
                                 redis_outage=self.redis_outage, broker_outage=self.broker_outage,
                                 cache=s.state_cache_entries, offset_regression=s.offset_regression,
                                 max_record=s.max_record_bytes,
                                 limits=Limits.for_model(dict(m.norm), m.input_size, max_value=s.max_value,
                                                         max_skew=s.max_ts_skew))
        self.ready = True
        self.startup.step("partition assignment")
        log.info("lstream worker ready: model %s (%d feature(s), %d x %d LSTM), input %r, redis %s",
                 m.version, m.input_size, m.num_layers, m.hidden_size, s.input_topic, store.url)

    # ------------------------------------------------------------ outputs

    async def emit(self, records: list[tuple[str, bytes | None, bytes]]) -> None:
        """Send all records, one record batch per (topic, partition), and wait until the broker
        has acknowledged every one (see :class:`worker.emit.BatchSender`); longer than
        ``broker_timeout`` raises TimeoutError (an outage: retried, nothing acknowledged)."""
        # shield: a send that outlives its deadline still completes (a retry repeats it: outputs
        # are at least once) rather than being cut in the middle of a record batch.
        await asyncio.wait_for(asyncio.shield(self.sender.send(records)), self.settings.broker_timeout)
        self.emitted_at = now = time.time()
        self._observe_outputs(records, now)

    def _observe_outputs(self, records: list[tuple[str, bytes | None, bytes]], now: float) -> None:
        """Event time -> emit latency per output, newest event time per partition, alerts by
        severity and reason, active streams: read from the records just delivered (their
        positions in the prediction JSON are fixed by worker/pipeline.py's template)."""
        import orjson

        t = self.topics
        pred_ts: list[float] = []
        latest = self.last_event_ts
        keys: list[bytes] = []
        for topic, key, value in records:
            if topic == t.predictions:
                i = value.find(b'"ts":')
                j = value.find(b',', i)
                k = value.find(b'"partition":', j)
                if i < 0 or k < 0:
                    continue
                ts = float(value[i + 5:j])
                part = int(value[k + 12:value.find(b',', k)])
                pred_ts.append(ts)
                if ts > latest.get(part, -1e300):
                    latest[part] = ts
                if key is not None:
                    keys.append(key)
            elif topic == t.alerts:
                doc = orjson.loads(value)
                self.metrics.alert_reasons.inc(severity=str(doc.get("severity", "unknown")),
                                               reason=str(doc.get("reason") or "unknown"))
                ts_a = doc.get("ts")
                if isinstance(ts_a, (int, float)):
                    self.metrics.e2e.observe_many([now - ts_a], path="event", kind="alert")
        if pred_ts:
            import numpy as np

            self.metrics.e2e.observe_many(now - np.asarray(pred_ts), path="event", kind="prediction")
        self._count_active(keys)

    def _count_active(self, keys: list[bytes]) -> None:
        """Streams with a prediction in the current or the previous minute (at most ACTIVE_CAP
        of each, so memory stays bounded with a million streams)."""
        cur, prev, since = self._active
        if time.monotonic() - since >= ACTIVE_WINDOW:
            cur, prev, since = set(), cur, time.monotonic()
            self._active = (cur, prev, since)
        if len(cur) < ACTIVE_CAP:
            cur.update(keys)

    def observe_batch(self, arrived: list[float], record_ts: list[float]) -> None:
        """A batch is finished: consume -> emit for each of its messages, from when the worker
        received it and from its record's Kafka timestamp (when it was produced)."""
        import numpy as np

        got = np.asarray(arrived)
        emitted = self.emitted_at if got.size and self.emitted_at >= got.max() else time.time()
        m = self.metrics
        m.e2e.observe_many(emitted - got, path="consume", kind="message")
        ts = np.asarray(record_ts)
        ts = ts[ts > 0]
        if ts.size:
            m.e2e.observe_many(emitted - ts, path="record", kind="message")

    # ------------------------------------------------------------ scrape-time metrics

    def _register_scrape(self) -> None:
        sc = self.metrics.scrape
        tp = ("topic", "partition")
        sc.add("gauge", "lstream_consumer_lag_records", "Records behind the partition's high watermark (as "
               "the broker reports it), per assigned input partition.", tp, self.lag)
        sc.add("gauge", "lstream_last_event_age_seconds", "Wall clock minus the event time of the newest event "
               "emitted, per input partition (event-time lag; needs sensor clocks near the worker's).", tp,
               self.event_age)
        sc.add("gauge", "lstream_assigned_partitions", "Partitions of each topic assigned to this worker.",
               ("topic",), self.assigned)
        sc.add("gauge", "lstream_streams_held", "Stream states held in the worker's memory (state cache).", (),
               self.held)
        sc.add("gauge", "lstream_state_cache_hit_ratio", "Share of state lookups answered from the worker's memory "
               "since start (the rate over a window: lstream_state_cache_lookups_total).", (), self.hit_ratio)
        sc.add("gauge", "lstream_streams_active", f"Streams with a prediction in the last {ACTIVE_WINDOW:.0f}-"
               f"{2 * ACTIVE_WINDOW:.0f} s (at most {ACTIVE_CAP} counted per window).", (), self.active)
        sc.add("counter", "lstream_state_resets", "Stored states found unusable since start: kind=model (another "
               "model version) or detector (another detector layout: its statistics restart).", ("kind",),
               self.resets)
        sc.add("counter", "lstream_faults", "Deterministic failures lived through (worker/pipeline.py Faults): "
               "failed and bad_state events dead-lettered, streams restarted after a non-finite step, offset "
               "regressions, records or saves given up.", ("kind",), self.faults)
        sc.add("counter", "lstream_state_cache_evictions", "Held stream states evicted to stay within "
               "state_cache_entries (least recently used first).", (), self.evictions)
        sc.add("gauge", "lstream_starting", "1 while the worker waits for a start-up step (waiting_for), else 0.",
               ("waiting_for",), self.starting)

    def _assignment(self) -> list[Any]:
        app = self.app
        if app is None or not self.ready:
            return []
        return list(app.consumer.assignment())

    def lag(self) -> dict[tuple[str, ...], float]:
        """Per assigned input partition: high watermark minus the next offset to process."""
        out: dict[tuple[str, ...], float] = {}
        if self.pipeline is None:
            return out
        consumer = self.app.consumer
        for tp in self._assignment():
            if tp.topic != self.settings.input_topic:
                continue
            hw = consumer.highwater(tp)
            if hw is None:
                continue
            done = self.pipeline.positions.get(tp.partition)
            out[(tp.topic, str(tp.partition))] = float(max(0, hw - (done + 1 if done is not None else 0)))
        return out

    def event_age(self) -> dict[tuple[str, ...], float]:
        now = time.time()
        topic = self.settings.input_topic
        return {(topic, str(p)): max(0.0, now - ts) for p, ts in sorted(self.last_event_ts.items())}

    def assigned(self) -> dict[tuple[str, ...], float]:
        out: dict[tuple[str, ...], float] = {(self.settings.input_topic,): 0.0}
        for tp in self._assignment():
            out[(tp.topic,)] = out.get((tp.topic,), 0.0) + 1
        return out

    def held(self) -> dict[tuple[str, ...], float]:
        cache = getattr(self.pipeline, "cache", None)
        return {(): float(len(cache) if cache is not None else 0)}

    def hit_ratio(self) -> dict[tuple[str, ...], float]:
        cache = getattr(self.pipeline, "cache", None)
        return {(): float(cache.hit_rate) if cache is not None else 0.0}

    def faults(self) -> dict[tuple[str, ...], float]:
        f = getattr(self.pipeline, "faults", None)
        if f is None:
            return {}
        return {(k,): float(getattr(f, k)) for k in ("failed", "bad_state", "restarted", "regressed", "unsent",
                                                     "unsaved")}

    def evictions(self) -> dict[tuple[str, ...], float]:
        cache = getattr(self.pipeline, "cache", None)
        return {(): float(cache.evictions if cache is not None else 0)}

    def active(self) -> dict[tuple[str, ...], float]:
        cur, prev, since = self._active
        if time.monotonic() - since >= 2 * ACTIVE_WINDOW:
            return {(): 0.0}
        return {(): float(len(cur | prev) if len(cur) + len(prev) < 4 * ACTIVE_CAP else len(cur))}

    def resets(self) -> dict[tuple[str, ...], float]:
        store = self.store
        if store is None:
            return {("model",): 0.0, ("detector",): 0.0}
        counts = store.counters() if hasattr(store, "counters") else {}
        return {("model",): float(counts.get("resets", getattr(store, "resets", 0))),
                ("detector",): float(counts.get("detector_resets", getattr(store, "detector_resets", 0)))}

    def starting(self) -> dict[tuple[str, ...], float]:
        w = self.startup.waiting_for
        return {(w,): 1.0} if w is not None else {}

    # ------------------------------------------------------------ shutdown

    def cleanup(self) -> None:
        """Remove the temporary Faust data directory (call after the worker has exited)."""
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    async def close(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
        if self.sender is not None:
            await self.sender.stop()
        if self.store is not None:
            await self.store.close()


ACTIVE_WINDOW = 60.0
ACTIVE_CAP = 1_000_000


class Batcher:
    """Micro-batches from the agent's events, without a fixed wait ("smart batching").

    The agent only appends each event to a buffer; :meth:`run` takes everything buffered (at
    most ``size`` messages) as soon as the pipeline can take a batch, so a batch is what
    arrived while the previous one was computed: one event at a time when the input is quiet
    (no wait), bigger batches under load. ``linger`` (``batch_wait``) optionally waits that long
    after the first event of a batch. Why not Faust's ``stream.noack_take(size, within)``: it
    collects events only between batches, never while one is processed, so a short ``within``
    caps the batch (and the throughput) at what arrives in ``within`` and a long one adds
    ``within`` to every event's latency (docs/operations-latency.md).

    The buffer holds at most two batches; the agent waits beyond that (backpressure). Each
    batch is acknowledged only after its outputs are delivered and its states saved
    (``Pipeline.submit``'s ``done``), as before.
    """

    def __init__(self, runtime: Runtime, stream: Any, size: int, linger: float) -> None:
        self.runtime, self.stream, self.size, self.linger = runtime, stream, size, linger
        self.buffer: list[Any] = []
        self.arrived: list[float] = []
        self.ready = asyncio.Event()
        self.room = asyncio.Event()
        self.room.set()

    async def add(self, event: Any) -> None:
        self.buffer.append(event)
        self.arrived.append(time.time())
        self.ready.set()
        if len(self.buffer) >= 2 * self.size:
            self.room.clear()
            await self.room.wait()

    async def run(self) -> None:

        runtime, stream = self.runtime, self.stream
        while True:
            await self.ready.wait()
            if self.linger:
                await asyncio.sleep(self.linger)
            batch, self.buffer = self.buffer[:self.size], self.buffer[self.size:]
            arrived, self.arrived = self.arrived[:self.size], self.arrived[self.size:]
            if not self.buffer:
                self.ready.clear()
            if len(self.buffer) < 2 * self.size:
                self.room.set()
            await submit_events(runtime, stream, batch, arrived)


async def submit_events(runtime: Runtime, stream: Any, batch: list[Any], arrived: list[float]) -> None:
    """Hand a batch of Faust events to the pipeline. It computes this batch while the previous
    one is delivered and saved; each batch is acknowledged only after its own outputs are
    delivered and its states saved."""
    from worker.events import RawMessage

    msgs = [RawMessage(e.message.key, e.message.value, e.message.partition, e.message.offset) for e in batch]
    record_ts = [float(e.message.timestamp or 0.0) for e in batch]

    async def ack() -> None:
        runtime.observe_batch(arrived, record_ts)
        for e in batch:
            await stream.ack(e)

    await runtime.pipeline.submit(msgs, ack)


def create_app(settings: Settings, model: Any = None) -> Any:
    """Build the Faust app (with ``app.lstream``, its :class:`Runtime`); nothing starts yet."""
    import faust

    from worker.transport import transport_for
    from worker.web import add_views

    s = settings
    runtime = Runtime(s, model)
    quiet_client_logs()
    Transport = transport_for(s.fetch_wait)
    if s.batching == "bulk":  # fetches go to the pipeline whole; the agent below then gets nothing (worker/bulk.py)
        from worker.bulk import bulk_transport

        Transport = bulk_transport(Transport)

    class LstreamApp(faust.App):
        def _new_transport(self) -> Any:
            # Faust's own aiokafka transport with the fetch wait set (worker/transport.py).
            return Transport(self.conf.broker_consumer, self)

        async def on_first_start(self) -> None:
            await super().on_first_start()
            await runtime.start_web()
            await runtime.prepare()

        async def on_stop(self) -> None:
            runtime.stopping = True
            await super().on_stop()  # waits for the batch in hand, flushes, commits
            if runtime.pipeline is not None:  # the agent's own flush normally finished it already
                try:
                    await asyncio.wait_for(runtime.pipeline.flush(), 5.0)
                except TimeoutError:
                    log.warning("stopping with a batch not yet delivered and saved; it is not acknowledged, "
                                "so it is read again at the next start")
                    runtime.pipeline.abandon()
            await runtime.close()

    data_dir = s.data_dir or tempfile.mkdtemp(prefix="lstream-faust-")
    runtime.temp_dir = None if s.data_dir else data_dir  # removed by cleanup() after the worker exits
    app = LstreamApp(
        s.app_id,
        broker=";".join(f"kafka://{h}" for h in broker_hosts(s.broker)),
        autodiscover=False,
        datadir=data_dir,
        store="memory://",
        key_serializer="raw",
        value_serializer="raw",
        web_port=s.web_port,
        web_bind=s.web_host,
        web_host=s.web_host,
        broker_session_timeout=s.session_timeout,
        broker_heartbeat_interval=max(0.5, min(3.0, s.session_timeout / 4)),
        # Every consumer and producer request gets this deadline (Faust requires it to be at
        # least the session timeout).
        broker_request_timeout=max(s.session_timeout, s.broker_timeout) + 5.0,
        broker_commit_interval=1.0,
        consumer_auto_offset_reset="earliest",
        producer_linger=0.0,
        topic_disable_leader=True,
        topic_partitions=s.partitions,
        topic_replication_factor=1,
    )
    app.lstream = runtime  # type: ignore[attr-defined]
    runtime.app = app
    topic = app.topic(s.input_topic, key_type=bytes, value_type=bytes, key_serializer="raw",
                      value_serializer="raw", partitions=s.partitions)

    async def lstream_events(stream: Any) -> None:
        if s.batching == "take":
            return await take_batches(stream)
        noack = stream.noack()
        batcher = Batcher(runtime, noack, s.batch_size, s.batch_wait)
        task = asyncio.ensure_future(batcher.run())
        try:
            async for event in noack.events():
                await batcher.add(event)
                if task.done():  # the batcher failed: fail the agent with its error
                    task.result()
        finally:
            task.cancel()
            # The batch in flight: deliver, save, ack (bounded: during an outage it would
            # wait for ever; an unacknowledged batch is simply read again at the next start).
            if runtime.pipeline is not None:
                try:
                    await asyncio.wait_for(runtime.pipeline.flush(), 5.0)
                except TimeoutError:
                    pass

    async def take_batches(stream: Any) -> None:
        """``batching=take``: Faust's ``noack_take`` (the worker's batching before; kept to
        measure against, see benchmarks/latency.py)."""

        try:
            async for batch in stream.noack_take(s.batch_size, within=s.batch_wait or 0.05):
                await submit_events(runtime, stream, batch, [time.time()] * len(batch))
        finally:
            if runtime.pipeline is not None:
                try:
                    await asyncio.wait_for(runtime.pipeline.flush(), 5.0)
                except TimeoutError:
                    pass

    async def on_assigned(*args: Any, **kwargs: Any) -> None:
        runtime.metrics.rebalances.inc(event="assigned")
        if runtime.startup.waiting_for == "partition assignment":
            runtime.startup.step(None)
        forget()

    async def on_revoked(*args: Any, **kwargs: Any) -> None:
        runtime.metrics.rebalances.inc(event="revoked")
        forget()

    def forget() -> None:
        # Partitions may have been processed elsewhere meanwhile: read every state from Redis.
        if runtime.pipeline is not None:
            runtime.pipeline.forget()

    app.on_partitions_revoked.connect(on_revoked)
    app.on_partitions_assigned.connect(on_assigned)

    app.agent(topic, name="lstream-events")(lstream_events)
    add_views(app, runtime)
    # A worker stuck in its consumer group (no assignment, or idle while input waits) says so on
    # /healthz and /metrics and rejoins (issue 12.12, worker/group_health.py).
    from worker.group_health import attach as attach_group_health

    attach_group_health(app, runtime)
    return app
