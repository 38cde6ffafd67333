"""Session fixtures: a real redis-server and a real Kafka-protocol broker (Tansu) on free ports."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lstream.devservices import Service, start_broker, start_redis


@pytest.fixture(scope="session")
def redis_service() -> Iterator[Service]:
    with start_redis() as service:
        yield service


@pytest.fixture(scope="session")
def redis_url(redis_service: Service) -> str:
    return redis_service.url


@pytest.fixture(scope="session")
def broker_service() -> Iterator[Service]:
    with start_broker() as service:
        yield service


@pytest.fixture(scope="session")
def broker_url(broker_service: Service) -> str:
    return broker_service.url
