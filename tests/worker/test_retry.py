"""worker/retry.py: one policy; transient errors wait, deterministic ones get bounded attempts."""

from __future__ import annotations

import asyncio
import logging

import pytest
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError, NodeNotReadyError, RequestTimedOutError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from state.errors import StateError, StateUnavailable
from worker.retry import Outage, transient


def test_transient_or_deterministic():
    wrapped = StateError("load failed")
    wrapped.__cause__ = RedisTimeoutError("slow")
    for exc in (StateUnavailable("down"), RedisConnectionError("refused"), RedisTimeoutError("t"), wrapped,
                KafkaConnectionError(), NodeNotReadyError(), RequestTimedOutError(), ConnectionRefusedError(),
                TimeoutError(), ResponseError("LOADING Redis is loading the dataset in memory")):
        assert transient(exc), exc
    for exc in (ValueError("a record of 2000000 bytes does not fit"), StateError("bad field"), TypeError("bug"),
                MessageSizeTooLargeError(), ResponseError("ERR unknown command")):
        assert not transient(exc), exc


def test_outage_waits_for_transient_errors_and_logs_once_each_way(caplog):
    sleeps: list[float] = []

    async def sleep(d: float) -> None:
        sleeps.append(d)

    outage = Outage("redis", first_delay=0.01, max_delay=0.04, sleep=sleep)
    calls = {"n": 0}

    async def op() -> str:
        calls["n"] += 1
        if calls["n"] <= 6:
            raise RedisConnectionError("refused")
        return "ok"

    with caplog.at_level(logging.WARNING, logger="lstream.worker"):
        assert asyncio.run(outage.run(op)) == "ok"
    msgs = [r.getMessage() for r in caplog.records]
    assert len([m for m in msgs if "unavailable" in m]) == 1 and len([m for m in msgs if "is back" in m]) == 1
    assert sleeps == [0.01, 0.02, 0.04, 0.04, 0.04, 0.04] and outage.outages == 1 and not outage.down


def test_outage_gives_a_deterministic_error_bounded_attempts():
    async def sleep(d: float) -> None:
        pass

    outage = Outage("broker", attempts=3, sleep=sleep)
    calls = {"n": 0}

    async def op() -> None:
        calls["n"] += 1
        raise ValueError("always")

    with pytest.raises(ValueError):
        asyncio.run(outage.run(op))
    assert calls["n"] == 3 and not outage.down
