"""One Redis connection for the state store, on redis-py: a plain client or, when the server
says ``cluster_enabled:1``, redis-py's own ``RedisCluster`` (slot map, MOVED/ASK, topology
refresh). Every round trip has a timeout; errors come out typed (:mod:`state.errors`).

>>> safe_url("redis://:secret@db:6379/0")
'redis://:***@db:6379/0'
>>> safe_url("redis://localhost:6379/0")
'redis://localhost:6379/0'
>>> classify(ResponseError("BUSY Redis is busy running a script")).__name__
'StateUnavailable'
>>> classify(ResponseError("WRONGTYPE Operation against a key")).__name__
'StateError'
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    ClusterError,
    RedisClusterException,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from state.errors import StateAuthError, StateError, StateUnavailable

try:
    import hiredis
except ImportError:  # redis-py then packs in Python: correct, slower
    hiredis = None  # type: ignore[assignment]

T = TypeVar("T")
# Error replies that mean "not now": the server is loading, busy, failing over, or the cluster
# is reconfiguring. READONLY: a primary turned replica during a failover. OOM: maxmemory reached
# under noeviction (docs/operations.md): retried until memory is freed or raised, never dead-lettered.
TRANSIENT_REPLIES = ("BUSY", "LOADING", "CLUSTERDOWN", "TRYAGAIN", "MASTERDOWN", "READONLY", "MOVED", "ASK ",
                     "OOM")
AUTH_REPLIES = ("NOAUTH", "WRONGPASS", "NOPERM")


def safe_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit((parts.scheme, f"{user}:***@{host}{port}", parts.path, parts.query, parts.fragment))


def classify(exc: BaseException) -> type[StateError]:
    """The state error type an exception of redis-py (or the socket) stands for."""
    if isinstance(exc, (AuthenticationError, AuthenticationWrongNumberOfArgsError)):
        return StateAuthError
    text = str(exc)
    if isinstance(exc, ResponseError):
        if text.startswith(AUTH_REPLIES) or "Authentication required" in text:
            return StateAuthError
        if text.startswith(TRANSIENT_REPLIES) or isinstance(exc, ClusterError):
            return StateUnavailable
        return StateError
    if isinstance(exc, (RedisConnectionError, RedisTimeoutError, ClusterError, RedisClusterException, OSError,
                        asyncio.TimeoutError, ConnectionResetError)):
        return StateUnavailable
    if isinstance(exc, RedisError) and ("NOAUTH" in text or "WRONGPASS" in text):
        return StateAuthError
    return StateError


def translate(exc: BaseException, url: str) -> StateError:
    """A one-line typed error for ``exc`` (the password never appears)."""
    kind = classify(exc)
    if kind is StateAuthError:
        return StateAuthError(f"Redis at {url} refused the credentials: {exc}")
    if kind is StateUnavailable:
        return StateUnavailable(f"Redis at {url} is unreachable or not ready: {type(exc).__name__}: {exc}")
    return StateError(f"Redis at {url}: {exc}")


class PackedConnection(aioredis.Connection):
    """redis-py's asyncio connection, packing each command with hiredis's C ``pack_command``
    instead of redis-py's Python loop (which costs ~5 us per argument and is what the asyncio
    client uses): a fenced save of 256 streams is one command of ~3,400 arguments. Only the
    packing differs (the bytes are the same, tests/state/test_state_connection.py); replies,
    timeouts and errors stay redis-py's. Used for plain ``redis://`` URLs when hiredis is there."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str) and " " in args[0]:  # "SCRIPT LOAD" is two words on the wire
            args = (*args[0].split(), *args[1:])
        return [hiredis.pack_command(args)]


class Connection:
    """A redis-py client (plain or cluster) with a timeout on every call and typed errors."""

    def __init__(self, client: Any, url: str, timeout: float, cluster: bool) -> None:
        self.client = client
        self.url = safe_url(url)
        self.timeout = timeout
        self.cluster = cluster

    @classmethod
    async def open(cls, url: str, *, timeout: float, cluster: bool | None = None) -> Connection:
        """Connect and check the server answers. ``cluster``: None asks it (``INFO cluster``)."""
        shown = safe_url(url)
        if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
            raise StateError(f"redis url {shown!r}: expected redis:// or rediss://")
        opts: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout, "protocol": 2}
        fast = {"connection_class": PackedConnection} if hiredis is not None and url.startswith("redis://") else {}
        try:
            plain = aioredis.from_url(url, retry=Retry(NoBackoff(), 0), **opts, **fast)
        except ValueError as exc:
            raise StateError(f"redis url {shown!r}: {exc}") from None
        conn = cls(plain, url, timeout, False)
        try:
            if cluster is None:
                info = await conn.call(plain.info("cluster"), "INFO cluster")
                cluster = str(info.get("cluster_enabled", "0")) == "1" if isinstance(info, dict) else False
            else:
                await conn.call(plain.ping(), "PING")
        except BaseException:
            await plain.aclose()
            raise
        if not cluster:
            return conn
        await plain.aclose()
        try:
            # Redirects (MOVED, ASK) and topology refresh are RedisCluster's; retries beyond one
            # redirect are the caller's (the store raises StateUnavailable instead).
            client = RedisCluster.from_url(url, retry=Retry(NoBackoff(), 1), **opts)
        except (ValueError, RedisClusterException) as exc:
            raise StateError(f"redis url {shown!r}: {exc}") from None
        conn = cls(client, url, timeout, True)
        try:
            await conn.call(client.initialize(), "cluster slots")
        except BaseException:
            await conn.close()
            raise
        return conn

    async def call(self, aw: Awaitable[T], what: str = "", streams: int = 0) -> T:
        """``await aw`` within the timeout (twice the socket timeout, once more per 2,048
        ``streams`` the call carries); redis-py and socket errors come out typed."""
        try:
            async with asyncio.timeout(self.timeout * (2 + streams // 2048)):
                return await aw
        except StateError:
            raise
        except (TimeoutError, RedisError, RedisClusterException, OSError) as exc:
            raise translate(exc, self.url) from exc

    def check(self, reply: Any) -> Any:
        """A pipeline reply (``raise_on_error=False``): raise it typed if it is an error."""
        if isinstance(reply, BaseException):
            raise translate(reply, self.url) from reply
        return reply

    async def close(self) -> None:
        try:
            await self.client.aclose()
        except (RedisError, OSError):
            pass
