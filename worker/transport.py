"""Faust's aiokafka transport with a configurable fetch wait (the worker's latency floor).

Faust builds its consumer with ``fetch_max_wait_ms=1500`` written into the call
(faust/transport/drivers/aiokafka.py, ``AIOKafkaConsumerThread._create_worker_consumer``), and
no setting reaches it. A broker may hold a fetch that finds no new records for that long; the
embedded broker (Tansu) always does, even when records arrive meanwhile. A record produced
just after such a fetch started therefore waits up to 1.5 s before the worker sees it:
measured p50 411 ms / p99 805 ms event -> prediction at a moderate rate.

The clean seam Faust offers is the transport class: :func:`transport_for` returns a
``Transport`` whose ``Consumer`` builds a consumer thread whose consumer is Faust's own, with
only the fetch wait changed before it starts (aiokafka reads it when its fetcher is created, in
``start()``). Group management, rebalance callbacks and offset commits stay Faust's.
"""

from __future__ import annotations

from typing import Any


def transport_for(fetch_wait: float) -> Any:
    """A Faust transport class for ``kafka://`` whose consumer waits at most ``fetch_wait``
    seconds for new records per fetch."""
    from faust.transport.drivers import aiokafka as driver

    wait_ms = max(1, round(fetch_wait * 1000))

    class ConsumerThread(driver.AIOKafkaConsumerThread):
        def _create_worker_consumer(self, transport: Any) -> Any:
            consumer = super()._create_worker_consumer(transport)
            if not hasattr(consumer, "_fetch_max_wait_ms"):  # an aiokafka that renamed it: fail loudly
                raise RuntimeError("aiokafka's consumer has no _fetch_max_wait_ms: the fetch wait cannot be set")
            consumer._fetch_max_wait_ms = wait_ms
            return consumer

    class Consumer(driver.Consumer):
        def _new_consumer_thread(self) -> Any:
            return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    class Transport(driver.Transport):
        fetch_max_wait_ms = wait_ms  # for /healthz and tests

    Transport.Consumer = Consumer
    return Transport
