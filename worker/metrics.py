"""A small Prometheus text exposition: counters, gauges and histograms, no dependency.

>>> reg = Registry()
>>> events = reg.counter("lstream_events_in_total", "Input messages consumed.")
>>> rejected = reg.counter("lstream_rejected_total", "Dead letters by code.", labels=("code",))
>>> lat = reg.histogram("lstream_stage_seconds", "Stage latency.", labels=("stage",), buckets=(0.01, 0.1))
>>> events.inc(3); rejected.inc(1, code="bad_json"); lat.observe(0.05, stage="kernel")
>>> print(reg.render())
# HELP lstream_events_in_total Input messages consumed.
# TYPE lstream_events_in_total counter
lstream_events_in_total 3
# HELP lstream_rejected_total Dead letters by code.
# TYPE lstream_rejected_total counter
lstream_rejected_total{code="bad_json"} 1
# HELP lstream_stage_seconds Stage latency.
# TYPE lstream_stage_seconds histogram
lstream_stage_seconds_bucket{stage="kernel",le="0.01"} 0
lstream_stage_seconds_bucket{stage="kernel",le="0.1"} 1
lstream_stage_seconds_bucket{stage="kernel",le="+Inf"} 1
lstream_stage_seconds_sum{stage="kernel"} 0.05
lstream_stage_seconds_count{stage="kernel"} 1
<BLANKLINE>
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Callable, Sequence

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def _fmt(v: float) -> str:
    if v == math.inf:
        return "+Inf"
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        self.name, self.help, self.label_names = name, help, tuple(labels)

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name}: expected labels {self.label_names}, got {tuple(labels)}")
        return tuple(str(labels[n]) for n in self.label_names)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help, labels)
        self.values: dict[tuple[str, ...], float] = {} if labels else {(): 0.0}

    def inc(self, amount: float = 1, **labels: str) -> None:
        key = self._key(labels)
        self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, **labels: str) -> float:
        return self.values.get(self._key(labels), 0.0)

    def lines(self) -> list[str]:
        return [f"{self.name}{_labels(self.label_names, k)} {_fmt(v)}" for k, v in sorted(self.values.items())]


class Gauge(Counter):
    kind = "gauge"

    def __init__(self, name: str, help: str, labels: Sequence[str] = (),
                 fn: Callable[[], dict[tuple[str, ...], float]] | None = None) -> None:
        super().__init__(name, help, labels)
        self.fn = fn  # computed at render time (e.g. consumer lag)
        self.failed = False

    def set(self, value: float, **labels: str) -> None:
        self.values[self._key(labels)] = value

    def lines(self) -> list[str]:
        if self.fn is not None:
            try:
                self.values = dict(self.fn())
            except Exception as exc:  # a metric must never break the scrape
                if not self.failed:
                    self.failed = True
                    logging.getLogger("lstream.worker").warning("metric %s: %s: %s", self.name,
                                                                type(exc).__name__, exc)
        return super().lines()


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, labels: Sequence[str] = (),
                 buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        super().__init__(name, help, labels)
        self.buckets = tuple(sorted(buckets))
        self.series: dict[tuple[str, ...], list[float]] = {}  # counts per bucket + [+Inf, sum]

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        s = self.series.get(key)
        if s is None:
            s = self.series[key] = [0.0] * (len(self.buckets) + 2)
        s[bisect.bisect_left(self.buckets, value)] += 1
        s[-1] += value

    def count(self, **labels: str) -> int:
        s = self.series.get(self._key(labels))
        return 0 if s is None else int(sum(s[:-1]))

    def lines(self) -> list[str]:
        out = []
        for key, s in sorted(self.series.items()):
            cum = 0.0
            for bound, n in zip((*self.buckets, math.inf), s[:-1]):
                cum += n
                le = 'le="' + _fmt(bound) + '"'
                out.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {_fmt(cum)}")
            out.append(f"{self.name}_sum{_labels(self.label_names, key)} {_fmt(s[-1])}")
            out.append(f"{self.name}_count{_labels(self.label_names, key)} {_fmt(cum)}")
        return out


class Registry:
    """The worker's metrics, rendered in Prometheus text format 0.0.4."""

    def __init__(self) -> None:
        self.metrics: list[_Metric] = []

    def _add(self, m: _Metric) -> _Metric:
        self.metrics.append(m)
        return m

    def counter(self, name: str, help: str, labels: Sequence[str] = ()) -> Counter:
        return self._add(Counter(name, help, labels))  # type: ignore[return-value]

    def gauge(self, name: str, help: str, labels: Sequence[str] = (),
              fn: Callable[[], dict[tuple[str, ...], float]] | None = None) -> Gauge:
        return self._add(Gauge(name, help, labels, fn))  # type: ignore[return-value]

    def histogram(self, name: str, help: str, labels: Sequence[str] = (),
                  buckets: Sequence[float] = LATENCY_BUCKETS) -> Histogram:
        return self._add(Histogram(name, help, labels, buckets))  # type: ignore[return-value]

    def render(self) -> str:
        lines: list[str] = []
        for m in self.metrics:
            lines += m.header() + m.lines()
        return "\n".join(lines) + "\n"


class WorkerMetrics:
    """The metrics the worker exports (names are part of what dashboards rely on)."""

    def __init__(self) -> None:
        r = self.registry = Registry()
        self.events_in = r.counter("lstream_events_in_total", "Input messages consumed.")
        self.applied = r.counter("lstream_events_applied_total", "Events applied to a stream's state.")
        self.rejected = r.counter("lstream_events_rejected_total",
                                  "Messages or batch elements sent to the dead-letter topic, by code.",
                                  labels=("code",))
        self.duplicates = r.counter("lstream_duplicates_skipped_total",
                                    "Events skipped as duplicates (repeated event_id).")
        self.replayed = r.counter("lstream_replayed_skipped_total",
                                  "Events skipped because the stored state already reflects them "
                                  "(partition replayed after a crash or rebalance).")
        self.fenced = r.counter("lstream_saves_fenced_total",
                                "State saves refused by the fence (a newer position was stored).")
        self.predictions = r.counter("lstream_predictions_total", "Predictions emitted.")
        self.alerts = r.counter("lstream_alerts_total", "Alerts emitted (one per anomalous episode).")
        self.batches = r.counter("lstream_batches_total", "Micro-batches processed.")
        self.retries = r.counter("lstream_retries_total", "Retries after a Redis or broker error, by service.",
                                 labels=("service",))
        self.batch_size = r.histogram("lstream_batch_size", "Input messages per micro-batch.",
                                      buckets=SIZE_BUCKETS)
        self.stage = r.histogram("lstream_stage_seconds",
                                 "Latency of each stage of a micro-batch "
                                 "(decode, load, kernel, emit, save, total).", labels=("stage",))
        self.redis_rtt = r.histogram("lstream_redis_roundtrip_seconds", "Redis round-trip time, by operation.",
                                     labels=("op",))
        self.cache = r.counter("lstream_state_cache_lookups_total",
                               "Stream states looked up in the worker's memory before a batch: hit (no Redis "
                               "read needed) or miss (read from Redis).", labels=("result",))
        self.lag = r.gauge("lstream_consumer_lag", "Messages behind the partition's high watermark, "
                                                   "where the broker reports it.", labels=("partition",))
        self.state_resets = r.gauge("lstream_state_resets",
                                    "Stored states found unusable since start: kind=model (another model "
                                    "version: started fresh under policy reset, dead-lettered under refuse) "
                                    "or detector (another detector layout: its statistics restart).",
                                    labels=("kind",))
        self.up = r.gauge("lstream_up", "1 while the worker is consuming, 0 during an outage.",
                          labels=("service",))

    def render(self) -> str:
        return self.registry.render()
