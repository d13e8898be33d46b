"""The gateway liveness reaper on the real Redis, in process: the claim on a dead gateway is
taken by one survivor at a time, a session its host still runs waits for the host's report,
and a gateway that comes back is left alone.

Each test uses its own key prefix and deletes its keys afterwards.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from catflap.cluster.keys import Keys
from catflap.cluster.liveness import GatewayLiveness
from catflap.cluster.store import RedisSessionStore
from catflap.pool.instance import SessionEnd
from catflap.sessions.record import SessionRecord

REDIS_URL = os.environ.get("CATFLAP_TEST_REDIS", "redis://127.0.0.1:6379/0")
TTL = 0.5


@pytest.fixture
async def redis_keys() -> AsyncIterator[tuple[aioredis.Redis, Keys]]:
    client = aioredis.Redis.from_url(REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
    keys = Keys(f"cftest-{uuid.uuid4().hex[:8]}")
    yield client, keys
    found = [key async for key in client.scan_iter(f"{keys.prefix}:*")]
    if found:
        await client.delete(*found)
    await client.aclose()


async def _dead_gateway(
    client: aioredis.Redis, keys: Keys, store: RedisSessionStore, sessions: dict[str, str]
) -> tuple[str, float]:
    """A gateway that relayed ``sessions`` (id -> instance id), saved their records and died;
    returns its id and the time of its last heartbeat."""
    doomed = GatewayLiveness(client, keys, store, ttl=TTL)
    for sid, iid in sessions.items():
        await store.save(SessionRecord(sid, "echo", "my-org", created_at=time.time() - 60))
        doomed.opened(sid, iid)
    doomed.start()
    async with asyncio.timeout(5):
        while await client.hlen(keys.gateway_sessions(doomed.gateway_id)) < len(sessions):
            await asyncio.sleep(0.01)
    await doomed._tasks.aclose()  # dies: no close(), so its keys stay and the heartbeat lapses
    beat = await client.zscore(keys.gateways, doomed.gateway_id)
    assert beat is not None
    await asyncio.sleep(TTL + 0.1)
    return doomed.gateway_id, beat / 1000


async def test_one_survivor_finishes_a_dead_gateways_records_at_its_last_heartbeat(
    redis_keys: tuple[aioredis.Redis, Keys],
) -> None:
    client, keys = redis_keys
    store = RedisSessionStore(client, keys)
    sessions = {f"s{n}": "h-1" for n in range(30)}
    dead, last_beat = await _dead_gateway(client, keys, store, sessions)
    a = GatewayLiveness(client, keys, store, ttl=TTL)
    b = GatewayLiveness(client, keys, store, ttl=TTL)
    await asyncio.gather(a.reap_once(), b.reap_once(), a.reap_once(), b.reap_once())
    for sid in sessions:
        record = await store.get(sid)
        assert record is not None
        assert record.completion_status == "gateway_lost"
        assert record.ended_at == last_beat
        assert record.error == f"the gateway relaying this session ({dead}) died"
    assert await client.exists(keys.gateway_sessions(dead), keys.gateway_claim(dead)) == 0
    assert await client.zscore(keys.gateways, dead) is None


async def test_a_session_its_host_still_runs_waits_for_the_hosts_report(
    redis_keys: tuple[aioredis.Redis, Keys],
) -> None:
    client, keys = redis_keys
    store = RedisSessionStore(client, keys)
    await client.sadd(keys.active("h-1"), "running")
    dead, _ = await _dead_gateway(client, keys, store, {"running": "h-1", "gone": "h-1"})
    a = GatewayLiveness(client, keys, store, ttl=TTL)
    b = GatewayLiveness(client, keys, store, ttl=TTL)
    await a.reap_once()
    await b.reap_once()  # a holds the claim while it waits for the host
    gone, running = await store.get("gone"), await store.get("running")
    assert gone is not None and gone.completion_status == "gateway_lost"
    assert running is not None and running.completion_status is None
    assert await client.get(keys.gateway_claim(dead)) == a.gateway_id.encode()
    b.foreign_end("running", SessionEnd(status="stopped"))  # b is not watching it
    await asyncio.sleep(0.1)
    running = await store.get("running")
    assert running is not None and running.completion_status is None
    # The host ends the bot: it leaves :active first and appends its report a round trip
    # later; a round in between waits one more round for it.
    await client.srem(keys.active("h-1"), "running")
    await a.reap_once()
    running = await store.get("running")
    assert running is not None and running.completion_status is None
    a.foreign_end(
        "running", SessionEnd(status="completed", client_disconnected=True, bot_seconds=3.0)
    )
    async with asyncio.timeout(5):
        while (record := await store.get("running")) is None or not record.completion_status:
            await asyncio.sleep(0.01)
    assert record.completion_status == "client_closed"
    await a.reap_once()  # nothing left: the dead gateway is forgotten
    assert await client.zscore(keys.gateways, dead) is None
    await a.close()
    await b.close()


async def test_a_gateway_whose_heartbeat_is_back_is_not_reaped(
    redis_keys: tuple[aioredis.Redis, Keys],
) -> None:
    client, keys = redis_keys
    store = RedisSessionStore(client, keys)
    dead, _ = await _dead_gateway(client, keys, store, {"s1": "h-1"})
    await client.set(keys.gateway(dead), 1, px=5000)  # it was only cut off from Redis
    survivor = GatewayLiveness(client, keys, store, ttl=TTL)
    await survivor.reap_once()
    record = await store.get("s1")
    assert record is not None and record.completion_status is None
    assert await client.exists(keys.gateway_claim(dead)) == 0


async def test_a_session_retried_on_another_instance_keeps_its_entry(
    redis_keys: tuple[aioredis.Redis, Keys],
) -> None:
    """Dispatch cancels a lease whose instance failed and acquires again with the same id:
    the first lease's delayed removal must not delete the second one's entry."""
    client, keys = redis_keys
    liveness = GatewayLiveness(client, keys, RedisSessionStore(client, keys), ttl=TTL)
    liveness.start()
    entry = keys.gateway_sessions(liveness.gateway_id)
    try:
        liveness.opened("retried", "h-1")
        liveness.closed("retried")  # the connect to h-1 failed
        liveness.opened("retried", "h-2")  # the retry
        await asyncio.sleep(TTL + 0.3)  # past the first lease's delayed removal
        assert await client.hget(entry, "retried") == b"h-2"
        liveness.closed("retried")  # the session ends: its entry goes a TTL later
        async with asyncio.timeout(5):
            while await client.hexists(entry, "retried"):
                await asyncio.sleep(0.02)
    finally:
        await liveness.close()


async def test_an_adopted_session_whose_report_never_comes_is_lost_after_two_rounds(
    redis_keys: tuple[aioredis.Redis, Keys],
) -> None:
    client, keys = redis_keys
    store = RedisSessionStore(client, keys)
    await client.sadd(keys.active("h-1"), "orphan")
    await _dead_gateway(client, keys, store, {"orphan": "h-1"})
    survivor = GatewayLiveness(client, keys, store, ttl=TTL)
    await survivor.reap_once()  # adopted: its host runs it
    await client.srem(keys.active("h-1"), "orphan")  # it ends; the report is lost
    await survivor.reap_once()  # one round of grace
    record = await store.get("orphan")
    assert record is not None and record.completion_status is None
    await survivor.reap_once()
    record = await store.get("orphan")
    assert record is not None and record.completion_status == "gateway_lost"
    await survivor.close()
