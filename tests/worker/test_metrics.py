"""worker/metrics.py and worker/transport.py without services: families, bulk histograms, the
scrape-time collector (a failing function never breaks the page), the fetch-wait transport."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from worker.metrics import BulkHistogram, WorkerMetrics


def _families(m: WorkerMetrics) -> dict:
    return {f.name: f for f in text_string_to_metric_families(m.render().decode())}


def test_family_updates_take_labels_as_keywords_and_refuse_wrong_ones():
    m = WorkerMetrics()
    m.rejected.inc(3, code="late")
    m.applied.inc(5)
    m.up.set(0, service="redis")
    m.stage.observe(0.002, stage="kernel")
    fams = _families(m)
    late = [s for s in fams["lstream_dead_letters"].samples if s.labels == {"code": "late"}]
    assert late[0].name == "lstream_dead_letters_total" and late[0].value == 3
    assert fams["lstream_events_applied"].samples[0].value == 5
    with pytest.raises(ValueError):
        m.applied.inc(1, code="late")
    with pytest.raises(ValueError):
        m.rejected.inc(1, wrong="x")


def test_known_label_values_are_exported_at_zero_before_anything_happens():
    fams = _families(WorkerMetrics())
    codes = {s.labels["code"] for s in fams["lstream_dead_letters"].samples}
    assert {"bad_json", "late", "bad_state", "failed"} <= codes
    kinds = {(s.labels["op"], s.labels["kind"]) for s in fams["lstream_redis_errors"].samples}
    assert ("ping", "timeout") in kinds and ("save", "connection") in kinds
    assert not any(name.endswith("_created") for f in fams.values() for name in [s.name for s in f.samples])


def test_bulk_histogram_matches_prometheus_client_histogram():
    from prometheus_client import CollectorRegistry, Histogram

    rng = np.random.default_rng(0)
    values = np.concatenate([rng.exponential(0.05, 500), [0.01, 0.1, 0.0]])  # incl. values on a bound
    bounds = (0.001, 0.01, 0.05, 0.1, 1.0)
    reg = CollectorRegistry()
    ref = Histogram("ref_seconds", "x", registry=reg, buckets=bounds)
    for v in values:
        ref.observe(float(v))
    bulk = BulkHistogram("bulk_seconds", "x", (), buckets=bounds)
    bulk.observe_many(values[:200])
    bulk.observe_many(values[200:])
    got = {(s.name.replace("bulk", ""), s.labels.get("le")): s.value for s in next(iter(bulk.collect())).samples}
    want = {(s.name.replace("ref", ""), s.labels.get("le")): s.value for s in next(iter(reg.collect())).samples
            if not s.name.endswith("_created")}
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k]), k


def test_a_failing_scrape_function_is_logged_once_and_skipped(caplog):
    m = WorkerMetrics()
    calls = []

    def broken() -> dict:
        calls.append(1)
        raise RuntimeError("consumer not started")

    m.scrape.add("gauge", "lstream_test_broken", "x", ("topic",), broken)
    m.scrape.add("gauge", "lstream_test_fine", "x", ("topic",), lambda: {("t",): 2.0})
    with caplog.at_level(logging.WARNING, logger="lstream.worker"):
        for _ in range(3):
            fams = _families(m)
    assert fams["lstream_test_fine"].samples[0].value == 2.0
    assert fams["lstream_test_broken"].samples == []
    assert len(calls) == 3 and caplog.text.count("consumer not started") == 1


def test_fetch_wait_transport_sets_the_consumer_wait_before_it_starts():
    """The transport's consumer is Faust's own, built the same way, with only the fetch wait
    changed (checked on the aiokafka consumer object, without a broker: nothing is started)."""
    import asyncio

    asyncio.run(_fetch_wait_transport())


async def _fetch_wait_transport() -> None:
    import faust

    from worker.transport import transport_for

    Transport = transport_for(0.01)

    class App(faust.App):
        def _new_transport(self):
            return Transport(self.conf.broker_consumer, self)

    app = App("h3-transport-test", broker="kafka://127.0.0.1:1", autodiscover=False, store="memory://")
    thread = app.consumer._new_consumer_thread()
    consumer = thread._create_worker_consumer(app.transport)
    assert consumer._fetch_max_wait_ms == 10 and Transport.fetch_max_wait_ms == 10
    assert consumer._group_id == "h3-transport-test"  # everything else as Faust sets it
    await consumer._client.close()
