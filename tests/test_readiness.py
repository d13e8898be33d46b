"""A cluster gateway's readiness checks (``catflap.cluster.readiness``) on the real Redis and
PostgreSQL, on ports where nothing listens, and on a server that accepts and never answers."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from catflap.cluster.readiness import Dependencies, cluster_dependencies
from catflap.contract import limits
from catflap.sessions.postgres import PostgresSessionStore

from .conftest import seconds
from .sessionstores import StoreFactory, store_factory

REDIS_URL = os.environ.get("CATFLAP_TEST_REDIS", "redis://127.0.0.1:6379/0")


@contextmanager
def silent_server() -> Iterator[int]:
    """A port that accepts connections and never sends a byte (a hung server)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield int(server.getsockname()[1])


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_at(port: int, *, timeout: float) -> aioredis.Redis:
    """A client as ``catflap gateway`` makes one (``from_url``: no retries of a refused
    connection, unlike the constructor's defaults)."""
    return aioredis.Redis.from_url(
        f"redis://127.0.0.1:{port}/0", socket_timeout=timeout, socket_connect_timeout=timeout
    )


@pytest.fixture
async def live_redis() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
    try:
        await client.ping()
    except (OSError, aioredis.ConnectionError):
        pytest.skip(f"no Redis at {REDIS_URL}")
    yield client
    await client.aclose()


@pytest.fixture
async def postgres(tmp_path: Path) -> AsyncIterator[StoreFactory]:
    async with store_factory("postgres", tmp_path) as factory:
        yield factory


async def test_ready_when_redis_and_the_database_answer(
    live_redis: aioredis.Redis, postgres: StoreFactory
) -> None:
    assert await cluster_dependencies(live_redis, postgres.open())() == []
    assert await cluster_dependencies(live_redis, None)() == []


async def test_names_what_does_not_answer_and_logs_each_change_once(
    live_redis: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    dead = redis_at(closed_port(), timeout=2)
    database = PostgresSessionStore(f"postgresql://postgres@127.0.0.1:{closed_port()}/postgres")
    try:
        caplog.set_level(logging.INFO, logger="catflap.cluster")
        check = cluster_dependencies(dead, database)
        assert await check() == ["database", "redis"]
        assert await check() == ["database", "redis"]
        down = [r.getMessage() for r in caplog.records if "unreachable (" in r.getMessage()]
        assert len(down) == 2  # once per dependency, not once per probe
        assert any(m.startswith("! redis unreachable (ConnectionError: ") for m in down)
        assert not [r for r in caplog.records if "sk_" in r.getMessage()]
        assert await cluster_dependencies(live_redis, database)() == ["database"]
    finally:
        await dead.aclose()
        await database.close()


async def test_a_hung_redis_or_database_is_unready_within_the_bound() -> None:
    with silent_server() as redis_port, silent_server() as db_port:
        hung = redis_at(redis_port, timeout=30)
        database = PostgresSessionStore(f"postgresql://postgres@127.0.0.1:{db_port}/postgres")
        try:
            started = time.perf_counter()
            assert await cluster_dependencies(hung, database)() == ["database", "redis"]
            took = time.perf_counter() - started
        finally:
            await hung.aclose()
            await database.close()
    # Both at once: one bound in all, not one per check.
    bound = limits.READINESS_CHECK_TIMEOUT_S
    assert bound <= took < bound + seconds(1)


async def test_recovers_and_says_so() -> None:
    up = asyncio.Event()

    async def flaky() -> None:
        if not up.is_set():
            raise OSError("connection refused")

    check = Dependencies({"redis": flaky}, timeout=0.5)
    assert await check() == ["redis"]
    up.set()
    assert await check() == []
