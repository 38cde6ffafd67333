"""What the worker waits for, and the edge between it and Redis: timeouts, error counts, fatal errors.

- :class:`TimedStore` wraps the state store: every round trip gets a deadline
  (``redis_timeout``), and every failure is counted in ``lstream_redis_errors_total`` by
  operation and kind (``timeout``, ``connection``, ``other``). A round trip that misses its
  deadline raises :class:`state.errors.StateUnavailable`, which the worker's one retry policy
  treats as an outage: ``/healthz`` turns 503 with ``redis: down``, the outage is logged once.
  Why a deadline here as well as the client's socket timeout: a stalled server (SIGSTOP, a
  blocked disk) keeps the socket open, and a pipelined call may wait on several reads.
- :func:`permanent` tells errors that retrying cannot cure (a wrong Redis password, a Redis
  that refuses our commands) from outages; at start-up the worker ends on the first with one
  line on stderr and exit code 2 (:func:`fatal`), and retries the second with backoff.
- :class:`Startup` is what ``/healthz`` shows before the worker is ready: the step it waits for
  and the last error that step met.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from state.errors import StateUnavailable

log = logging.getLogger("lstream.worker")

TIMED_OPS = ("load", "save", "get")
PROBE_OPS = ("ping",)


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and len(out) < 6:
        out.append(seen)
        seen = seen.__cause__ or seen.__context__
    return out


def error_kind(exc: BaseException) -> str:
    """``timeout``, ``connection`` or ``other``, looking through wrapped exceptions.

    >>> error_kind(TimeoutError()), error_kind(ConnectionRefusedError()), error_kind(ValueError())
    ('timeout', 'connection', 'other')
    """
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    for e in _chain(exc):
        if isinstance(e, (TimeoutError, asyncio.TimeoutError, RedisTimeoutError)) or "timed out" in str(e):
            return "timeout"
        if isinstance(e, (RedisConnectionError, ConnectionError, OSError)):
            return "connection"
    return "other"


def permanent(exc: BaseException) -> str | None:
    """Why ``exc`` cannot be cured by retrying (a sentence for the operator), or None.

    >>> from redis.exceptions import AuthenticationError
    >>> permanent(AuthenticationError("invalid username-password pair"))
    'Redis refused the credentials in the Redis URL (invalid username-password pair)'
    >>> permanent(ConnectionRefusedError()) is None
    True
    """
    from redis.exceptions import AuthenticationError, AuthenticationWrongNumberOfArgsError, ResponseError

    from state.errors import StateAuthError

    for e in _chain(exc):
        text = str(e)
        if isinstance(e, StateAuthError):
            return f"Redis refused the credentials in the Redis URL: {text}"
        if isinstance(e, (AuthenticationError, AuthenticationWrongNumberOfArgsError)) or \
                text.startswith(("WRONGPASS", "NOAUTH", "NOPERM")):
            return f"Redis refused the credentials in the Redis URL ({text})"
        if isinstance(e, ResponseError) and "unknown command" in text:
            return f"Redis refuses a command the worker needs ({text})"
    return None


def port_taken(exc: BaseException) -> bool:
    return any(isinstance(e, OSError) and e.errno in (errno.EADDRINUSE, errno.EACCES) for e in _chain(exc))


def fatal(message: str, cleanup: Callable[[], None] | None = None) -> None:
    """End the process: one line on stderr, exit code 2, no traceback.

    Used only before the worker consumed anything (nothing to flush or commit), because
    Faust would report an exception raised from start-up as a crash with several tracebacks.
    """
    logging.shutdown()
    if cleanup is not None:
        cleanup()
    sys.stderr.write(f"lstream worker: {message}\n")
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(2)


def transient_at_start(exc: BaseException) -> bool:
    """Worth waiting for at start-up: the service is unreachable, slow, loading or has no
    leader yet (anything else is a bug or a configuration the operator must fix).

    >>> transient_at_start(ConnectionRefusedError()), transient_at_start(ValueError("x"))
    (True, False)
    """
    from aiokafka.errors import KafkaError

    if permanent(exc) is not None:
        return False
    for e in _chain(exc):
        if isinstance(e, StateUnavailable) or str(e).startswith(("BUSY", "LOADING", "TRYAGAIN", "CLUSTERDOWN")):
            return True
        if isinstance(e, KafkaError):
            return bool(e.retriable) or "connect" in str(e).lower()
    return error_kind(exc) in ("timeout", "connection")


class Startup:
    """The start-up step the worker waits for (``None`` once it consumes) and its last error.

    :meth:`run` waits for one service at start-up: transient errors are retried with backoff
    (logged once, shown on /healthz), a permanent one ends the process (:func:`fatal`)."""

    def __init__(self, metrics: Any = None, cleanup: Callable[[], None] | None = None,
                 first_delay: float = 0.2, max_delay: float = 5.0) -> None:
        self.metrics, self.cleanup = metrics, cleanup
        self.first_delay, self.max_delay = first_delay, max_delay
        self.waiting_for: str | None = "start"
        self.since = time.monotonic()
        self.error: str | None = None
        self.attempts = 0

    def step(self, what: str | None) -> None:
        self.waiting_for, self.since, self.error, self.attempts = what, time.monotonic(), None, 0

    def failed(self, exc: BaseException) -> None:
        self.error = f"{type(exc).__name__}: {exc}"[:300]
        self.attempts += 1

    async def run(self, service: str, step: str, op: Callable[[], Awaitable[Any]]) -> Any:
        self.step(step)
        delay = self.first_delay
        while True:
            try:
                result = await op()
            except Exception as exc:
                self.failed(exc)
                why = permanent(exc)
                if why is not None:
                    fatal(why, self.cleanup)
                if not transient_at_start(exc):
                    fatal(f"{service}: {type(exc).__name__}: {exc}", self.cleanup)
                if self.attempts == 1:
                    log.warning("waiting for %s (%s: %s); retrying with backoff, /healthz shows it",
                                service, type(exc).__name__, exc)
                if self.metrics is not None:
                    self.metrics.up.set(0, service=service)
                    self.metrics.retries.inc(service=service)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_delay)
                continue
            if self.attempts:
                log.warning("%s answers after %.1f s", service, time.monotonic() - self.since)
            if self.metrics is not None:
                self.metrics.up.set(1, service=service)
            return result

    def doc(self) -> dict[str, Any]:
        out: dict[str, Any] = {"waiting_for": self.waiting_for,
                               "waiting_seconds": round(time.monotonic() - self.since, 3)}
        if self.error:
            out["last_error"] = self.error
            out["attempts"] = self.attempts
        return out


class TimedStore:
    """The state store with a deadline on each round trip and its failures counted.

    Everything not listed in ``TIMED_OPS`` passes through unchanged (attributes, ``close``).
    """

    def __init__(self, store: Any, timeout: float, metrics: Any) -> None:
        self._store = store
        self.timeout = timeout
        self.metrics = metrics
        self.last_error: str | None = None
        self.last_error_at: float | None = None

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if name in TIMED_OPS:
            return self._timed(name, attr)
        return attr

    def _timed(self, op: str, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def call(*args: Any, **kwargs: Any) -> Any:
            # A call for many streams gets the deadline once more per 2,048 of them (the store
            # sends them in bounded script calls): a large batch must never time out for good.
            streams = len(args[0]) if args and isinstance(args[0], (list, tuple)) else 0
            try:
                async with asyncio.timeout(self.timeout * (1 + streams // 2048)):
                    return await fn(*args, **kwargs)
            except TimeoutError as exc:
                self._count(op, "timeout", exc)
                raise StateUnavailable(f"redis: {op} took longer than {self.timeout:g} s "
                                       "(redis_timeout)") from exc
            except Exception as exc:
                from state.errors import StateNotFound

                if not isinstance(exc, StateNotFound):
                    self._count(op, error_kind(exc), exc)
                raise

        return call

    def _count(self, op: str, kind: str, exc: BaseException) -> None:
        self.metrics.redis_errors.inc(op=op, kind=kind)
        self.last_error = f"{op}: {kind}: {type(exc).__name__}: {exc}"[:300]
        self.last_error_at = time.time()


class EarlyHealth:
    """``/healthz`` (503, ``{"status": "starting", "waiting_for": "model"}``) from a tiny thread
    server, for the seconds before Faust's web server runs (importing Faust and compiling the
    kernels take a while on a busy machine). Binding it is also how a taken port is found
    before anything else is done. :meth:`stop` frees the port for Faust's server."""

    def __init__(self, host: str, port: int) -> None:
        import http.server
        import json
        import threading

        started = time.monotonic()
        state = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                doc = {"status": "starting", "waiting_for": state.waiting_for,
                       "waiting_seconds": round(time.monotonic() - started, 3)}
                body = json.dumps(doc).encode()
                self.send_response(503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.waiting_for = "model"
        self.server = http.server.ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="lstream-early-health", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class RedisProbe:
    """Ask Redis ``PING`` every ``interval`` seconds, each within ``timeout``, so that a stalled
    or lost Redis shows on ``/healthz`` (503) and in ``lstream_dependency_up`` even while no
    event arrives (the pipeline's round trips notice it only when there is work). Logged once
    when Redis stops answering and once when it is back; every failed probe is counted in
    ``lstream_redis_errors_total{op="ping"}``."""

    def __init__(self, store: Any, metrics: Any, timeout: float, interval: float = 1.0) -> None:
        self.store, self.metrics, self.timeout, self.interval = store, metrics, timeout, interval
        self.down_since: float | None = None
        self.error: str | None = None

    @property
    def down(self) -> bool:
        return self.down_since is not None

    async def ping(self) -> None:
        conn = self.store.conn
        async with asyncio.timeout(self.timeout):
            await conn.call(conn.client.ping(), "PING")

    async def check(self) -> bool:
        try:
            await self.ping()
        except Exception as exc:
            kind = error_kind(exc) if not isinstance(exc, TimeoutError) else "timeout"
            self.metrics.redis_errors.inc(op="ping", kind=kind)
            self.error = f"ping: {kind}: " + (f"no answer within {self.timeout:g} s (redis_timeout)"
                                              if kind == "timeout" else f"{type(exc).__name__}: {exc}")[:300]
            if self.down_since is None:
                self.down_since = time.monotonic()
                log.warning("redis does not answer (%s); /healthz reports 503 until it does", self.error)
            self.metrics.up.set(0, service="redis")
            return False
        if self.down_since is not None:
            log.warning("redis answers again after %.1f s", time.monotonic() - self.down_since)
            self.down_since, self.error = None, None
        self.metrics.up.set(1, service="redis")
        return True

    async def run(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self.interval)
