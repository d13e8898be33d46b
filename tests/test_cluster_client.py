"""The cluster's Redis client (catflap.cluster.client.connect) on a real Redis.

After a Redis restart every pooled connection is dead; a session record's save on one used to
fail once and be lost. The client sends such a command again on a new connection, and never
repeats one that timed out (it may still run).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator

import pytest
import redis
import redis.asyncio as aioredis

from catflap.cluster.client import connect
from catflap.cluster.keys import Keys
from catflap.cluster.store import RedisSessionStore
from catflap.contract import limits
from catflap.sessions.record import SessionRecord

from .conftest import seconds
from .test_cluster import private_redis

REDIS_URL = os.environ.get("CATFLAP_TEST_REDIS", "redis://127.0.0.1:6379/0")


@pytest.fixture
async def admin() -> AsyncIterator[aioredis.Redis]:
    """A plain client, to kill the tested client's connections with."""
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await client.ping()
    except (redis.ConnectionError, OSError):
        await client.aclose()
        pytest.skip(f"no Redis at {REDIS_URL}")
    try:
        yield client
    finally:
        await client.aclose()


def _record(session_id: str) -> SessionRecord:
    return SessionRecord(
        session_id=session_id,
        agent="echo",
        organization="my-org",
        created_at=time.time(),
    )


async def test_a_save_on_a_connection_redis_dropped_is_sent_again_and_lands(
    admin: aioredis.Redis,
) -> None:
    client = connect(REDIS_URL)
    keys = Keys(f"cfclient-{uuid.uuid4().hex[:8]}")
    store = RedisSessionStore(client, keys)
    try:
        own_id = await client.client_id()  # the one pooled connection, now idle
        killed = await admin.execute_command("CLIENT", "KILL", "ID", own_id)
        assert killed == 1
        record = _record("after-restart")
        await store.save(record)  # meets the dead connection first, then a new one
        assert await store.get("after-restart") == record
        assert await client.client_id() != own_id
    finally:
        leftovers = [k async for k in admin.scan_iter(f"{keys.prefix}:*")]
        if leftovers:
            await admin.delete(*leftovers)
        await client.aclose()


async def test_a_plain_client_loses_that_save(admin: aioredis.Redis) -> None:
    """The failure the retry removes, shown on redis-py's default client."""
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        own_id = await client.client_id()
        await admin.execute_command("CLIENT", "KILL", "ID", own_id)
        with pytest.raises(redis.ConnectionError):
            await client.set(f"cfclient-{uuid.uuid4().hex[:8]}", "x", px=1000)
    finally:
        await client.aclose()


async def test_a_save_after_a_real_redis_restart_lands() -> None:
    with private_redis() as (url, restart):
        client = connect(url)
        store = RedisSessionStore(client, Keys("cfclient"))
        try:
            await store.save(_record("before"))  # the pool now holds a connection
            await asyncio.get_running_loop().run_in_executor(None, restart, 0.2)
            async with asyncio.timeout(seconds(10)):  # until the new server accepts
                while True:
                    try:
                        redis.Redis.from_url(url, socket_timeout=0.2).ping()
                        break
                    except redis.ConnectionError:
                        await asyncio.sleep(0.02)
            record = _record("after")
            await store.save(record)
            assert await store.get("after") == record
            assert await store.get("before") is None  # that server kept nothing
        finally:
            await client.aclose()


async def test_a_command_that_times_out_is_not_sent_again() -> None:
    """Redis holds every command (``CLIENT PAUSE``, on a private server: it would stall
    other tests). The INCR times out after the socket timeout, and the client does not send
    it again: Redis sees no new connection (a retry needs one; the timed-out one is closed).
    """
    with private_redis() as (url, _):
        client = connect(url)
        admin = aioredis.Redis.from_url(url)
        try:
            await client.ping()
            before = (await admin.info("stats"))["total_connections_received"]
            pause_ms = int((limits.REDIS_SOCKET_TIMEOUT_S + 1) * 1000)
            await admin.execute_command("CLIENT", "PAUSE", pause_ms, "ALL")
            started = time.monotonic()
            with pytest.raises(redis.TimeoutError):
                await client.incr("counter")
            took = time.monotonic() - started
            assert limits.REDIS_SOCKET_TIMEOUT_S - 0.1 < took < limits.REDIS_SOCKET_TIMEOUT_S + 0.9
            # Answered once the pause ends (admin's commands wait too).
            after = (await admin.info("stats"))["total_connections_received"]
            assert after == before
            assert await admin.get("counter") is None  # Redis dropped the closed client's INCR
        finally:
            await client.aclose()
            await admin.aclose()
