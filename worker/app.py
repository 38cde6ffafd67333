"""The Faust application: :func:`create_app` builds it from :class:`worker.settings.Settings`.

Nothing happens at import time. The app has one agent on the input topic (raw bytes keys
and values) that takes micro-batches with ``stream.noack_take(batch_size, batch_wait)`` and
hands each to :meth:`worker.pipeline.Pipeline.submit`, which computes it while the previous
batch is still being delivered and saved; a batch's messages are acknowledged (so Faust may
commit their offsets) only after its own outputs are delivered and its states saved. Every
rebalance drops the states the pipeline holds in memory (see worker/pipeline.py). The web server (Faust's) serves ``/streams/{id}``, ``/healthz`` and
``/metrics`` (worker/web.py).

Why ``noack_take`` and manual acks rather than ``take``: ``take`` acknowledges a batch in a
``finally`` clause, also when the agent is cancelled or fails half way through it, which
would let Faust commit offsets of events whose state was never saved.

Startup (before the consumer joins its group): create the topics that are missing, connect
to Redis and warm the kernels; both services are waited for with backoff, so the worker
can start before them.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from typing import Any

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


def limit_blas_threads(n: int = 1) -> bool:
    """Run numpy's OpenBLAS on ``n`` threads; False if its library or setter is not found.

    The kernels' batch matmuls are small (a few hundred streams x 64 x 128); OpenBLAS splits
    them over every core, and with the broker, Redis and Faust's consumer thread on the same
    cores its threads wait for each other: measured on a busy 2-core machine, 47 us per stream
    step at 170 streams with the default threads against 0.9 us with one. Called when the
    worker starts (environment variables cannot do it: numpy is loaded before the CLI runs).

    >>> isinstance(limit_blas_threads(1), bool)
    True
    """
    import ctypes
    import glob
    import os

    import numpy

    libs = os.path.join(os.path.dirname(numpy.__file__), os.pardir, "numpy.libs")
    names = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads", "openblas_set_num_threads64_",
             "openblas_set_num_threads")
    for path in sorted(glob.glob(os.path.join(libs, "*openblas*"))):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in names:
            fn = getattr(lib, name, None)
            if fn is not None:
                fn(ctypes.c_int(n))
                return True
    return False


class Runtime:
    """Everything the agent and the web views share: model, engine, store, pipeline, metrics."""

    def __init__(self, settings: Settings, model: Any = None) -> None:
        from kernels import load_model
        from kernels.engine import Engine
        from worker.metrics import WorkerMetrics
        from worker.pipeline import Outage, Topics

        self.settings = settings
        self.model = model if model is not None else load_model(settings.model)
        self.engine = Engine(self.model, threshold=settings.threshold, calm_steps=settings.calm_steps)
        self.metrics = WorkerMetrics()
        self.metrics.lag.fn = self.lag
        self.topics = Topics(settings.input_topic, settings.predictions_topic, settings.alerts_topic,
                             settings.dlq_topic)
        self.redis_outage = Outage("redis", self.metrics)
        self.broker_outage = Outage("broker", self.metrics)
        self.store: Any = None
        self.sender: Any = None
        self.temp_dir: str | None = None
        self.pipeline: Any = None
        self.app: Any = None
        self.started_at = time.time()
        self.ready = False
        self.stopping = False
        if not limit_blas_threads(1):
            log.info("could not limit OpenBLAS to one thread; set OPENBLAS_NUM_THREADS=1 if the kernel is slow")
        # Run the whole per-event pipeline once so the first real batch pays no JIT cost.
        import numpy as np

        self.engine.advance(self.engine.new_states(2), np.zeros((2, self.model.input_size)))

    async def prepare(self) -> None:
        """Create missing topics and connect to Redis, waiting for each with backoff."""
        from state.store import StateStore
        from worker.emit import BatchSender
        from worker.kafka import ensure_topics
        from worker.pipeline import Pipeline, broker_retryable, redis_retryable

        s = self.settings
        topics = [s.input_topic, s.predictions_topic, s.alerts_topic, s.dlq_topic]
        await self.broker_outage.run(lambda: ensure_topics(s.broker, topics, s.partitions), broker_retryable)
        self.sender = await self.broker_outage.run(lambda: BatchSender.start(s.broker), broker_retryable)
        m = self.model
        self.store = await self.redis_outage.run(
            lambda: StateStore.connect(s.redis_url, model_version=m.version, num_layers=m.num_layers,
                                       hidden_size=m.hidden_size, input_size=m.input_size, ttl=s.state_ttl,
                                       policy="reset", retries=3),
            redis_retryable)
        store = self.store
        self.metrics.state_resets.fn = lambda: {("model",): float(store.resets),
                                                ("detector",): float(store.detector_resets)}
        self.pipeline = Pipeline(self.engine, self.store, self.emit, topics=self.topics, metrics=self.metrics,
                                 max_bytes=s.max_message_bytes, policy=s.model_policy,
                                 redis_outage=self.redis_outage, broker_outage=self.broker_outage)
        self.ready = True
        log.info("lstream worker ready: model %s (%d feature(s), %d x %d LSTM), input %r, redis %s",
                 m.version, m.input_size, m.num_layers, m.hidden_size, s.input_topic, self.store.url)

    async def emit(self, records: list[tuple[str, bytes | None, bytes]]) -> None:
        """Send all records, one record batch per (topic, partition), and wait until the broker
        has acknowledged every one (see :class:`worker.emit.BatchSender`)."""
        if self.sender is None:
            from worker.emit import BatchSender

            self.sender = await BatchSender.start(self.settings.broker)
        await self.sender.send(records)

    async def handle(self, messages: list[Any]) -> None:
        """Process one batch to the end (delivered and saved); errors are retried, never skipped."""
        await self.pipeline.submit(messages)
        await self.pipeline.flush()

    def lag(self) -> dict[tuple[str, ...], float]:
        """Per assigned input partition: high watermark minus the next offset to process."""
        out: dict[tuple[str, ...], float] = {}
        app = self.app
        if app is None or self.pipeline is None:
            return out
        consumer = app.consumer
        for tp in consumer.assignment():
            if tp.topic != self.settings.input_topic:
                continue
            hw = consumer.highwater(tp)
            if hw is None:
                continue
            done = self.pipeline.positions.get(tp.partition)
            out[(str(tp.partition),)] = float(max(0, hw - (done + 1 if done is not None else 0)))
        return out

    def cleanup(self) -> None:
        """Remove the temporary Faust data directory (call after the worker has exited)."""
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    async def close(self) -> None:
        if self.sender is not None:
            await self.sender.stop()
        if self.store is not None:
            await self.store.close()


def create_app(settings: Settings, model: Any = None) -> Any:
    """Build the Faust app (with ``app.lstream``, its :class:`Runtime`); nothing starts yet."""
    import faust

    from worker.events import RawMessage
    from worker.web import add_views

    s = settings
    runtime = Runtime(s, model)
    quiet_client_logs()

    class LstreamApp(faust.App):
        async def on_first_start(self) -> None:
            await super().on_first_start()
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
        broker_commit_interval=1.0,
        consumer_auto_offset_reset="earliest",
        topic_disable_leader=True,
        topic_partitions=s.partitions,
        topic_replication_factor=1,
    )
    app.lstream = runtime
    runtime.app = app
    topic = app.topic(s.input_topic, key_type=bytes, value_type=bytes, key_serializer="raw",
                      value_serializer="raw", partitions=s.partitions)

    async def lstream_events(stream: Any) -> None:
        try:
            async for batch in stream.noack_take(s.batch_size, within=s.batch_wait):
                msgs = [RawMessage(e.message.key, e.message.value, e.message.partition, e.message.offset)
                        for e in batch]

                async def ack(batch: list[Any] = batch) -> None:
                    for e in batch:
                        await stream.ack(e)

                # Computes this batch while the previous one is delivered and saved; each batch
                # is acknowledged only after its own outputs are delivered and states saved.
                await runtime.pipeline.submit(msgs, ack)
        finally:
            # The batch in flight: deliver, save, ack (bounded: during an outage it would
            # wait for ever; an unacknowledged batch is simply read again at the next start).
            if runtime.pipeline is not None:
                try:
                    await asyncio.wait_for(runtime.pipeline.flush(), 5.0)
                except TimeoutError:
                    pass

    async def on_rebalance(*args: Any, **kwargs: Any) -> None:
        # Partitions may have been processed elsewhere meanwhile: read every state from Redis.
        if runtime.pipeline is not None:
            runtime.pipeline.forget()

    app.on_partitions_revoked.connect(on_rebalance)
    app.on_partitions_assigned.connect(on_rebalance)

    app.agent(topic, name="lstream-events")(lstream_events)
    add_views(app, runtime)
    return app
