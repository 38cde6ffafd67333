"""The worker's Prometheus metrics, on prometheus-client (reference: docs/metrics.md).

One :class:`WorkerMetrics` per worker, with its own ``CollectorRegistry`` (so tests can run
several in one process) holding:

- counters and histograms the pipeline updates as it goes (:class:`Family` wraps each so that
  callers pass labels as keywords: ``m.rejected.inc(2, code="late")``);
- :class:`BulkHistogram` for per-record latencies: one numpy ``searchsorted`` per batch instead
  of one ``observe`` (about 1 us) per record;
- :class:`Scrape`, a custom collector for what is computed when ``/metrics`` is read (consumer
  lag, assigned partitions, held streams, state resets, last event age): the worker registers
  plain functions, and a function that fails never breaks the scrape;
- prometheus-client's process, platform and GC collectors (``process_*``, ``python_*``).

>>> m = WorkerMetrics()
>>> m.rejected.inc(2, code="late"); m.stage.observe(0.004, stage="kernel")
>>> m.e2e.observe_many([0.002, 0.03], path="consume", kind="prediction")
>>> text = m.render().decode()
>>> 'lstream_dead_letters_total{code="late"} 2.0' in text, "# TYPE lstream_stage_seconds histogram" in text
(True, True)
>>> 'lstream_end_to_end_latency_seconds_count{kind="prediction",path="consume"} 2.0' in text
True
"""

from __future__ import annotations

import logging
import platform
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from worker.events import CODES as DEAD_LETTER_CODES

log = logging.getLogger("lstream.worker")

CONTENT_TYPE = "text/plain; version=0.0.4"  # prometheus_client.CONTENT_TYPE_LATEST without the charset
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0)
# Event time to emit: sensors' clocks and replayed history make this one much wider.
E2E_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
               300.0, 3600.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

Samples = dict[tuple[str, ...], float]


class Family:
    """A labelled prometheus-client metric with labels given as keywords at each update."""

    def __init__(self, metric: Any, labels: Sequence[str]) -> None:
        self.metric = metric
        self.label_names = tuple(labels)

    def _child(self, labels: dict[str, str]) -> Any:
        if not self.label_names:
            if labels:
                raise ValueError(f"{self.metric._name}: expected no labels, got {sorted(labels)}")
            return self.metric
        return self.metric.labels(**labels)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount:
            self._child(labels).inc(amount)

    def set(self, value: float, **labels: str) -> None:
        self._child(labels).set(value)

    def observe(self, value: float, **labels: str) -> None:
        self._child(labels).observe(value)


class CountedAtDelivery:
    """Stands for a count kept elsewhere: alerts are counted where they are delivered
    (``Runtime.emit``), by severity and reason, so the pipeline's unlabelled count is not kept."""

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        return None


class BulkHistogram(Collector):
    """A histogram observed many values at a time (numpy), exported as a Prometheus histogram.

    >>> h = BulkHistogram("x_seconds", "X.", ("path",), buckets=(0.01, 0.1))
    >>> h.observe_many([0.005, 0.05, 5.0], path="a")
    >>> [(s.name, s.labels.get("le"), s.value) for s in next(iter(h.collect())).samples][:3]
    [('x_seconds_bucket', '0.01', 1.0), ('x_seconds_bucket', '0.1', 2.0), ('x_seconds_bucket', '+Inf', 3.0)]
    """

    def __init__(self, name: str, documentation: str, labels: Sequence[str] = (),
                 buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.name, self.documentation = name, documentation
        self.label_names = tuple(labels)
        self.bounds = np.asarray(sorted(buckets), np.float64)
        self.series: dict[tuple[str, ...], tuple[np.ndarray, list[float]]] = {}  # counts per bucket, [sum]
        self.lock = threading.Lock()

    def observe_many(self, values: Sequence[float] | np.ndarray, **labels: str) -> None:
        v = np.asarray(values, np.float64)
        if v.size == 0:
            return
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name}: expected labels {self.label_names}, got {tuple(labels)}")
        key = tuple(labels[n] for n in self.label_names)
        idx = np.searchsorted(self.bounds, v, side="left")  # le: a value equal to a bound counts in it
        counts = np.bincount(idx, minlength=len(self.bounds) + 1)
        with self.lock:
            s = self.series.get(key)
            if s is None:
                s = self.series[key] = (np.zeros(len(self.bounds) + 1, np.int64), [0.0])
            s[0][:] += counts
            s[1][0] += float(v.sum())

    def describe(self) -> Iterable[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.label_names)]

    def collect(self) -> Iterable[Metric]:
        fam = HistogramMetricFamily(self.name, self.documentation, labels=self.label_names)
        with self.lock:
            items = [(k, c.copy(), s[0]) for k, (c, s) in self.series.items()]
        for key, counts, total in sorted(items):
            cum = np.cumsum(counts)
            buckets = [(_le(b), float(n)) for b, n in zip(self.bounds, cum[:-1])] + [("+Inf", float(cum[-1]))]
            fam.add_metric(list(key), buckets, total)
        return [fam]


def _le(bound: float) -> str:
    return repr(float(bound))


class Scrape(Collector):
    """Metrics computed when ``/metrics`` is read. ``add`` a gauge or a counter with a function
    returning ``{label values: value}``; a function that raises is logged once and skipped."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, str, str, tuple[str, ...], Callable[[], Samples]]] = []
        self.failed: set[str] = set()

    def add(self, kind: str, name: str, documentation: str, labels: Sequence[str],
            fn: Callable[[], Samples]) -> None:
        assert kind in ("gauge", "counter"), kind
        self.entries.append((kind, name, documentation, tuple(labels), fn))

    def describe(self) -> Iterable[Metric]:
        return list(self._families(lambda: {}))

    def collect(self) -> Iterable[Metric]:
        return list(self._families(None))

    def _families(self, override: Callable[[], Samples] | None) -> Iterator[Metric]:
        for kind, name, doc, labels, fn in self.entries:
            fam: Any = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(name, doc, labels=labels)
            try:
                samples = (override or fn)()
            except Exception as exc:  # a metric must never break the scrape
                if name not in self.failed:
                    self.failed.add(name)
                    log.warning("metric %s: %s: %s", name, type(exc).__name__, exc)
                samples = {}
            for key, value in sorted(samples.items()):
                fam.add_metric(list(key), value)
            yield fam


class WorkerMetrics:
    """Every metric the worker exports (docs/metrics.md lists them; dashboards rely on the names)."""

    def __init__(self) -> None:
        disable_created_metrics()  # no *_created series: they double the page for nothing we use
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)

        def counter(name: str, doc: str, labels: Sequence[str] = ()) -> Family:
            return Family(Counter(name, doc, labels, registry=r), labels)

        def histogram(name: str, doc: str, labels: Sequence[str] = (),
                      buckets: Sequence[float] = LATENCY_BUCKETS) -> Family:
            return Family(Histogram(name, doc, labels, registry=r, buckets=buckets), labels)

        # prometheus-client adds _total to a counter's name.
        self.events_in = counter("lstream_input_messages", "Input messages processed (a gateway batch is one "
                                                           "message; its elements are events).")
        self.applied = counter("lstream_events_applied", "Events applied to a stream's state.")
        self.rejected = counter("lstream_dead_letters", "Messages or gateway elements sent to the dead-letter "
                                                        "topic, by code (docs/metrics.md).", ("code",))
        self.duplicates = counter("lstream_duplicates_skipped", "Events skipped as duplicates (repeated event_id).")
        self.replayed = counter("lstream_replayed_skipped", "Events skipped because the stored state already "
                                                            "reflects them (a partition read again after a crash "
                                                            "or rebalance).")
        self.fenced = counter("lstream_saves_fenced", "State saves refused by the fence (a newer position was "
                                                      "stored).")
        self.saved = counter("lstream_states_saved", "Stream states written by fenced saves (one per stream "
                                                     "and batch).")
        self.predictions = counter("lstream_predictions", "Predictions emitted.")
        self.alerts = CountedAtDelivery()
        self.alert_reasons = counter("lstream_alerts", "Alerts delivered (one per anomalous episode), by "
                                                       "severity and reason.", ("severity", "reason"))
        self.batches = counter("lstream_batches", "Micro-batches processed.")
        self.retries = counter("lstream_retries", "Retries after a Redis or broker error, by service.", ("service",))
        self.redis_errors = counter("lstream_redis_errors", "Redis round trips that failed, by operation and kind "
                                                            "(timeout, connection, other).", ("op", "kind"))
        self.rebalances = counter("lstream_rebalances", "Consumer group rebalances seen, by event (assigned, "
                                                        "revoked).", ("event",))
        self.cache = counter("lstream_state_cache_lookups", "Stream states looked up in the worker's memory before "
                                                            "a batch: hit (no Redis read) or miss.", ("result",))
        self.batch_size = histogram("lstream_batch_size_messages", "Input messages per micro-batch.",
                                    buckets=SIZE_BUCKETS)
        self.stage = histogram("lstream_stage_seconds", "Latency of each stage of a micro-batch (decode, load, "
                                                        "kernel, emit, save, total).", ("stage",))
        self.redis_rtt = histogram("lstream_redis_roundtrip_seconds", "Redis round-trip time, by operation.",
                                   ("op",))
        self.up = Family(Gauge("lstream_dependency_up", "1 while a service the worker depends on answers, 0 "
                                                        "during an outage, by service (redis, broker).",
                               ("service",), registry=r), ("service",))
        self.e2e = BulkHistogram("lstream_end_to_end_latency_seconds",
                                 "Per output record: consume (input record received by the worker, its batch "
                                 "started) to emit (outputs acknowledged by the broker), and event (the event's ts) "
                                 "to emit; by path (consume, event) and output kind (prediction, alert).",
                                 ("path", "kind"), buckets=E2E_BUCKETS)
        r.register(self.e2e)
        self.scrape = Scrape()
        r.register(self.scrape)
        self.build = Info("lstream_build", "The worker's version and the versions of its main libraries.",
                          registry=r)
        self.model = Info("lstream_model", "The loaded model.", registry=r)
        self.build.info(_build_labels())
        # Known label values are exported from the start (at 0), so rates and alerts on them work
        # before the first event of their kind.
        for service in ("redis", "broker"):
            self.retries.metric.labels(service=service)
        for op in ("load", "save", "get", "ping"):
            self.redis_rtt.metric.labels(op=op)
            for kind in ("timeout", "connection", "other"):
                self.redis_errors.metric.labels(op=op, kind=kind)
        for result in ("hit", "miss"):
            self.cache.metric.labels(result=result)
        for event in ("assigned", "revoked"):
            self.rebalances.metric.labels(event=event)
        for stage in ("decode", "load", "kernel", "emit", "save", "total"):
            self.stage.metric.labels(stage=stage)
        for code in DEAD_LETTER_CODES:
            self.rejected.metric.labels(code=code)

    def set_model(self, model: Any) -> None:
        norm = getattr(model, "norm", None)
        mode = norm.get("mode", "") if isinstance(norm, dict) else getattr(norm, "mode", "")
        self.model.info({"version": str(model.version), "input_size": str(model.input_size),
                         "hidden_size": str(model.hidden_size), "num_layers": str(model.num_layers),
                         "norm": str(mode)})

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _build_labels() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist, label in (("lstream", "version"), ("faust-streaming", "faust"), ("aiokafka", "aiokafka"),
                        ("redis", "redis"), ("numpy", "numpy")):
        try:
            out[label] = version(dist)
        except PackageNotFoundError:
            out[label] = "unknown"
    return out
