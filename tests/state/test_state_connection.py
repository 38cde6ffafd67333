"""The one place the store departs from redis-py's defaults: commands packed by hiredis (C).
It must really be active (else a save of 256 streams costs ~3x the client CPU) and produce
exactly the bytes redis-py's own packing produces."""

from __future__ import annotations

import asyncio

import pytest
import redis.exceptions as rx
from redis.asyncio.connection import Connection as RedisPyConnection

from state.connection import Connection, PackedConnection, classify
from state.errors import StateAuthError, StateError, StateUnavailable


def test_hiredis_packing_is_byte_for_byte_redis_py() -> None:
    mine, theirs = PackedConnection(), RedisPyConnection()
    for args in (("SCRIPT LOAD", "return 1"), ("EVALSHA", "ab" * 20, 2, "k1", b"k\x002", 3.25, -7, b"\xff" * 300),
                 ("HSET", "lstream:state:{p\u00e9}", "h", b"")):
        assert b"".join(mine.pack_command(*args)) == b"".join(theirs.pack_command(*args)), args


def test_the_fast_path_is_active_on_a_plain_url(redis_url: str) -> None:
    async def go() -> type:
        conn = await Connection.open(redis_url, timeout=2.0)
        try:
            return conn.client.connection_pool.connection_class  # type: ignore[no-any-return]
        finally:
            await conn.close()

    assert asyncio.run(go()) is PackedConnection


@pytest.mark.parametrize(("exc", "kind"), [
    (rx.ResponseError("LOADING Redis is loading the dataset in memory"), StateUnavailable),
    (rx.ResponseError("TRYAGAIN Multiple keys request during rehashing"), StateUnavailable),
    (rx.ClusterDownError("CLUSTERDOWN The cluster is down"), StateUnavailable),
    (rx.BusyLoadingError("loading"), StateUnavailable),
    (rx.TimeoutError("Timeout reading from socket"), StateUnavailable),
    (TimeoutError(), StateUnavailable),
    (rx.AuthenticationError("invalid username-password pair"), StateAuthError),
    (rx.ResponseError("NOAUTH Authentication required."), StateAuthError),
    (rx.ResponseError("ERR wrong number of arguments"), StateError),
])
def test_errors_are_classified(exc: BaseException, kind: type) -> None:
    assert classify(exc) is kind
