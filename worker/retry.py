"""The worker's one retry policy, applied at one edge: every Redis and broker round trip.

:func:`transient` tells errors that waiting cures (a service unreachable, a timeout, a broker
without a leader yet) from deterministic ones (a bug, a bad record, an unreadable hash).
:meth:`Outage.run` retries transient errors for as long as they last, with backoff, logging
once when a service goes away and once when it is back; a deterministic error gets a bounded
number of attempts and is then raised, so the caller can isolate the events behind it
(worker/pipeline.py dead-letters only those). No layer below this one retries.

>>> from redis.exceptions import ConnectionError as RedisConnectionError
>>> transient(RedisConnectionError("refused")), transient(ValueError("no"))
(True, False)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from worker.metrics import WorkerMetrics

log = logging.getLogger("lstream.worker")

T = TypeVar("T")


def transient(exc: BaseException) -> bool:
    """True for errors worth waiting for: connection, timeout, service busy or without leader.

    Looks through ``__cause__`` / ``__context__`` (the store wraps redis-py's errors)."""
    from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError
    from redis.exceptions import BusyLoadingError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    from state.errors import StateUnavailable

    net = (RedisConnectionError, RedisTimeoutError, BusyLoadingError, StateUnavailable, KafkaConnectionError,
           KafkaTimeoutError, OSError, TimeoutError, asyncio.TimeoutError)
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            return False
        if isinstance(seen, net):
            return True
        if isinstance(seen, KafkaError):
            return bool(seen.retriable)
        text = str(seen)
        if text.startswith(("BUSY", "LOADING", "TRYAGAIN", "CLUSTERDOWN")):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class Outage:
    """Runs one service's round trips (``redis`` or ``broker``) under the retry policy.

    ``down`` is True from the first transient failure until the next success (for /healthz);
    ``outages`` counts them. ``attempts``: tries for a deterministic error before raising it."""

    def __init__(self, service: str, metrics: WorkerMetrics | None = None, *, first_delay: float = 0.05,
                 max_delay: float = 5.0, attempts: int = 2,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> None:
        if attempts < 1:
            raise ValueError(f"attempts: expected at least 1, got {attempts}")
        self.service, self.metrics = service, metrics
        self.first_delay, self.max_delay, self.attempts, self.sleep = first_delay, max_delay, attempts, sleep
        self.since: float | None = None  # monotonic time the current outage started
        self.outages = 0

    @property
    def down(self) -> bool:
        return self.since is not None

    async def run(self, op: Callable[[], Awaitable[T]]) -> T:
        delay = self.first_delay
        failures = 0
        while True:
            try:
                result = await op()
            except Exception as exc:
                if not transient(exc):
                    failures += 1
                    if failures >= self.attempts:
                        raise
                    log.warning("%s: %s: %s; trying once more", self.service, type(exc).__name__, exc)
                else:
                    self._went_down(exc)
                if self.metrics:
                    self.metrics.retries.inc(service=self.service)
                await self.sleep(delay)
                delay = min(delay * 2, self.max_delay)
                continue
            self._came_back()
            return result

    def _went_down(self, exc: BaseException) -> None:
        if self.since is not None:
            return
        self.since = time.monotonic()
        self.outages += 1
        log.warning("%s unavailable (%s: %s); waiting and retrying, nothing is committed or skipped meanwhile",
                    self.service, type(exc).__name__, exc)
        if self.metrics:
            self.metrics.up.set(0, service=self.service)

    def _came_back(self) -> None:
        if self.since is not None:
            log.warning("%s is back after %.1f s; resuming", self.service, time.monotonic() - self.since)
            self.since = None
        if self.metrics:
            self.metrics.up.set(1, service=self.service)
