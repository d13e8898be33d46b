"""The gateway's cluster dispatch (``RedisPool`` and ``DISPATCH_LUA``) on the real Redis.

Instances and hosts' room entries are written in Redis's layout (``catflap.cluster.keys``) by
the test, standing in for agent hosts; everything the gateway does runs for real. The agent
hosts' side runs as real processes in ``tests/test_cluster_coldstart.py``.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from catflap.cluster.dispatch import ClusterLease, RedisPool
from catflap.cluster.host import CLAIM_LUA
from catflap.cluster.keys import WAIT_POLL_S, Keys
from catflap.config import AgentSpec
from catflap.config.models import AgentConfig, ScalingConfig
from catflap.contract.errors import AgentNotReady, AtCapacity, ServiceUnavailable
from catflap.contract.names import parse_service_host

from .conftest import seconds

REDIS_URL = os.environ.get("CATFLAP_TEST_REDIS", "redis://127.0.0.1:6379/0")
AGENT = "echo.my-org"


def agent_spec(max_agents: int = 50, per_instance: int = 1) -> AgentSpec:
    scaling = ScalingConfig(max_agents=max_agents, sessions_per_instance=per_instance)
    config = AgentConfig(path=Path("/nonexistent"), scaling=scaling)
    return AgentSpec(parse_service_host(AGENT), config)


class Fixture:
    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    async def instance(self, iid: str, capacity: int = 1, *, used: int = 0) -> None:
        await self.client.hset(
            self.keys.instance(iid),
            mapping={
                "agent": AGENT,
                "address": f"tcp:127.0.0.1:{40000 + len(iid)}",
                "capacity": capacity,
                "state": "ready",
            },
        )
        await self.client.pexpire(self.keys.instance(iid), 60_000)
        for n in range(used):
            await self.client.sadd(self.keys.active(iid), f"busy-{iid}-{n}")
        await self.client.sadd(self.keys.agent_instances(AGENT), iid)

    async def host_room(self, host: str, free: int, starting: int = 0) -> None:
        expiry = int(time.time() * 1000) + 60_000
        await self.client.hset(self.keys.agent_hosts(AGENT), host, f"{free} {starting} {expiry}")

    async def waiting(self) -> dict[str, float]:
        raw = await self.client.zrange(self.keys.waiting(AGENT), 0, -1, withscores=True)
        return {member.decode(): score for member, score in raw}

    async def reserved(self) -> int:
        total = 0
        async for key in self.client.scan_iter(f"{self.keys.prefix}:inst:*:resv"):
            total += int(await self.client.zcard(key))
        return total


@pytest.fixture
async def redis_fixture() -> AsyncIterator[Fixture]:
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await client.ping()
    except (redis.ConnectionError, OSError):
        await client.aclose()
        pytest.skip(f"no Redis at {REDIS_URL}")
    keys = Keys(f"cfdisp-{uuid.uuid4().hex[:8]}")
    try:
        yield Fixture(client, keys)
    finally:
        leftovers = [k async for k in client.scan_iter(f"{keys.prefix}:*")]
        if leftovers:
            await client.delete(*leftovers)
        await client.aclose()


def _pool(
    fx: Fixture, *, ready_timeout: float = 30.0, max_agents: int = 50, per_instance: int = 1
) -> RedisPool:
    return RedisPool(
        fx.client,
        fx.keys,
        [agent_spec(max_agents, per_instance)],
        ready_timeout=ready_timeout,
        rng=random.Random(1234),
    )


async def test_the_choice_is_weighted_by_free_slots(redis_fixture: Fixture) -> None:
    fx = redis_fixture
    # Free slots 1, 3 and 6 (one instance half used): expected shares 1/10, 3/10, 6/10.
    await fx.instance("a-1", capacity=1)
    await fx.instance("b-1", capacity=3)
    await fx.instance("c-1", capacity=8, used=2)
    pool = _pool(fx)
    picks: Counter[str] = Counter()
    n = 3000
    for i in range(n):
        lease = await pool.acquire(AGENT, f"s{i}")
        assert isinstance(lease, ClusterLease)
        picks[lease.instance_id] += 1
        pool.cancel(lease)
        # Gone before the next draw, so the free slots stay 1, 3 and 6.
        await fx.client.zrem(fx.keys.reserved(lease.instance_id), lease.session_id)
    await pool.close()
    assert sum(picks.values()) == n
    for iid, share in (("a-1", 0.1), ("b-1", 0.3), ("c-1", 0.6)):
        # Within 5 standard deviations of the binomial (the seed fixes the draws anyway).
        margin = 5 * math.sqrt(n * share * (1 - share))
        assert abs(picks[iid] - n * share) < margin, (iid, picks)
    assert await fx.reserved() == 0


async def test_a_full_instance_is_never_chosen(redis_fixture: Fixture) -> None:
    fx = redis_fixture
    await fx.instance("full-1", capacity=2, used=2)
    await fx.instance("free-1", capacity=1)
    pool = _pool(fx)
    for i in range(20):
        lease = await pool.acquire(AGENT, f"s{i}")
        assert isinstance(lease, ClusterLease) and lease.instance_id == "free-1"
        assert not lease.cold_start
        pool.cancel(lease)
        await asyncio.sleep(0)
    await pool.close()


async def test_no_free_slot_waits_for_a_start_and_an_instance_that_registers_serves_it(
    redis_fixture: Fixture,
) -> None:
    fx = redis_fixture
    await fx.instance("busy-1", capacity=1, used=1)
    await fx.host_room("h1", free=1)
    pool = _pool(fx)
    pool.start()
    waiting = asyncio.ensure_future(pool.acquire(AGENT, "cold"))
    async with asyncio.timeout(seconds(5)):
        while not await fx.waiting():
            await asyncio.sleep(0.01)
    ((session_id, expiry),) = (await fx.waiting()).items()
    assert session_id == "cold"
    assert expiry > (time.time() + 25) * 1000  # ready_timeout ahead
    assert await fx.client.pttl(fx.keys.waiting(AGENT)) > 25_000  # the set expires with it
    assert not waiting.done()
    # A host starts the instance: it registers and announces it on the ready channel.
    await asyncio.sleep(0.2)  # the subscription is up
    await fx.instance("new-1", capacity=1)
    announced = time.monotonic()
    await fx.client.publish(fx.keys.ready_channel, json.dumps({"agent": AGENT, "capacity": 1}))
    lease = await asyncio.wait_for(waiting, seconds(5))
    assert time.monotonic() - announced < WAIT_POLL_S / 2  # woken, not polled
    assert isinstance(lease, ClusterLease)
    assert lease.instance_id == "new-1" and lease.cold_start
    await asyncio.sleep(0.1)
    assert await fx.waiting() == {}  # it left the set as it got the slot
    await pool.close()


async def test_a_waiting_session_that_leaves_stops_waiting_and_holds_nothing(
    redis_fixture: Fixture,
) -> None:
    fx = redis_fixture
    await fx.instance("busy-1", capacity=1, used=1)
    await fx.host_room("h1", free=2)
    pool = _pool(fx)
    pool.start()
    waiting = asyncio.ensure_future(pool.acquire(AGENT, "leaver"))
    async with asyncio.timeout(seconds(5)):
        while not await fx.waiting():
            await asyncio.sleep(0.01)
    waiting.cancel()  # what admission does when the client goes
    with pytest.raises(asyncio.CancelledError):
        await waiting
    async with asyncio.timeout(seconds(5)):
        while await fx.waiting():
            await asyncio.sleep(0.01)
    assert await fx.reserved() == 0
    await pool.close()


async def test_a_start_that_never_comes_gives_503_at_the_ready_timeout(
    redis_fixture: Fixture,
) -> None:
    fx = redis_fixture
    await fx.host_room("h1", free=1)
    pool = _pool(fx, ready_timeout=0.6)
    started = time.monotonic()
    with pytest.raises(AgentNotReady) as refused:
        await pool.acquire(AGENT, "late")
    waited = time.monotonic() - started
    assert 0.6 <= waited < 0.6 + seconds(1)
    assert refused.value.status == 503
    assert "within 0.6 s (agent_ready_timeout)" in refused.value.message
    await asyncio.sleep(0.1)
    assert await fx.waiting() == {}
    await pool.close()


async def test_sessions_wait_only_within_the_hosts_room_then_503(redis_fixture: Fixture) -> None:
    fx = redis_fixture
    await fx.instance("busy-1", capacity=1, used=1)
    await fx.host_room("h1", free=1, starting=1)
    pool = _pool(fx, max_agents=10)
    first = asyncio.ensure_future(pool.acquire(AGENT, "one"))
    second = asyncio.ensure_future(pool.acquire(AGENT, "two"))
    async with asyncio.timeout(seconds(5)):
        while len(await fx.waiting()) < 2:
            await asyncio.sleep(0.01)
    # Room for two (one instance starting, one slot): a third finds no host with room.
    with pytest.raises(ServiceUnavailable) as no_host:
        await pool.acquire(AGENT, "three")
    assert type(no_host.value) is ServiceUnavailable
    assert "no agent host with a free slot" in no_host.value.message
    first.cancel()
    second.cancel()
    await asyncio.gather(first, second, return_exceptions=True)
    await pool.close()


async def test_live_and_starting_instances_at_max_agents_give_429(redis_fixture: Fixture) -> None:
    fx = redis_fixture
    await fx.instance("busy-1", capacity=1, used=1)
    await fx.host_room("h1", free=5, starting=1)
    pool = _pool(fx, max_agents=3)
    # One live, one starting, room for one more: two sessions wait, the third is refused.
    waiters = [asyncio.ensure_future(pool.acquire(AGENT, f"fits{i}")) for i in range(2)]
    async with asyncio.timeout(seconds(5)):
        while len(await fx.waiting()) < 2:
            await asyncio.sleep(0.01)
    with pytest.raises(AtCapacity) as refused:
        await pool.acquire(AGENT, "past-max")
    assert refused.value.status == 429
    for waiter in waiters:
        waiter.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    await pool.close()


async def test_one_starting_instance_takes_as_many_waiters_as_it_has_slots(
    redis_fixture: Fixture,
) -> None:
    """``sessions_per_instance = 4`` at ``max_agents = 2``: one live instance is full and one
    is starting, so four sessions wait for its four slots, and only the fifth gets 429 (it
    used to be the second: starts were counted against sessions one for one)."""
    fx = redis_fixture
    await fx.instance("busy-1", capacity=4, used=4)
    await fx.host_room("h1", free=3, starting=1)
    pool = _pool(fx, max_agents=2, per_instance=4)
    waiters = [asyncio.ensure_future(pool.acquire(AGENT, f"fits{i}")) for i in range(4)]
    async with asyncio.timeout(seconds(5)):
        while len(await fx.waiting()) < 4:
            await asyncio.sleep(0.01)
    with pytest.raises(AtCapacity) as refused:
        await pool.acquire(AGENT, "past-max")
    assert refused.value.status == 429
    assert len(await fx.waiting()) == 4
    for waiter in waiters:
        waiter.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    await pool.close()


async def test_an_expired_host_entry_offers_no_room(redis_fixture: Fixture) -> None:
    fx = redis_fixture
    await fx.instance("busy-1", capacity=1, used=1)
    gone = int(time.time() * 1000) - 1
    await fx.client.hset(fx.keys.agent_hosts(AGENT), "dead", f"4 0 {gone}")
    pool = _pool(fx)
    with pytest.raises(ServiceUnavailable):
        await pool.acquire(AGENT, "nobody")
    assert not await fx.client.hexists(fx.keys.agent_hosts(AGENT), "dead")  # pruned
    assert await fx.waiting() == {}
    await pool.close()


async def test_hosts_start_one_instance_per_waiting_session_across_the_cluster(
    redis_fixture: Fixture,
) -> None:
    fx = redis_fixture
    claim = fx.client.register_script(CLAIM_LUA)
    await fx.instance("busy-1", capacity=1, used=1)
    later = int(time.time() * 1000) + 60_000
    await fx.client.zadd(fx.keys.waiting(AGENT), {"w1": later, "w2": later, "w3": later})

    async def offer(
        host: str, free: int, starting: int, max_agents: int = 50, per_instance: int = 1
    ) -> int:
        now_ms = int(time.time() * 1000)
        keys = [fx.keys.agent_hosts(AGENT), fx.keys.waiting(AGENT), fx.keys.agent_instances(AGENT)]
        args = [
            host,
            now_ms,
            free,
            starting,
            now_ms + 1000,
            max_agents,
            fx.keys.prefix,
            per_instance,
        ]
        return int(await claim(keys=keys, args=args))

    async def entry(host: str) -> str:
        raw = await fx.client.hget(fx.keys.agent_hosts(AGENT), host)
        assert raw is not None
        return " ".join(raw.decode().split(" ")[:2])  # free and starting, not the expiry

    # Host a has two free slots: it starts two, counting each in its entry at once.
    assert await offer("a", free=2, starting=0) == 1
    assert await entry("a") == "1 1"
    assert await offer("a", free=1, starting=1) == 1
    assert await offer("a", free=0, starting=2) == 0  # no slot left
    # Host b sees a's two starts: it starts only the third, then nothing more.
    assert await offer("b", free=4, starting=0) == 1
    assert await offer("b", free=3, starting=1) == 0
    assert await entry("b") == "3 1"
    # A waiting session that leaves makes the starts outnumber the waiters: no more starts.
    await fx.client.zrem(fx.keys.waiting(AGENT), "w3")
    assert await offer("b", free=3, starting=1) == 0
    # max_agents counts live and starting instances: 1 live + 3 starting at max_agents 4.
    await fx.client.zadd(fx.keys.waiting(AGENT), {"w4": later, "w5": later})
    assert await offer("c", free=4, starting=0, max_agents=4) == 0
    assert await offer("c", free=4, starting=0, max_agents=5) == 1
    # With 4 sessions an instance, one start serves 4 waiters: 5 waiting need exactly 2.
    await fx.client.delete(fx.keys.agent_hosts(AGENT))
    await fx.client.zadd(fx.keys.waiting(AGENT), {"w6": later, "w7": later})  # w1 w2 w4-w7
    await fx.client.zrem(fx.keys.waiting(AGENT), "w1")  # 5 wait
    assert await offer("d", free=4, starting=0, per_instance=4) == 1
    assert await offer("d", free=3, starting=1, per_instance=4) == 1
    assert await offer("d", free=2, starting=2, per_instance=4) == 0
    assert await entry("d") == "2 2"
    # A ready instance's free slot serves a waiter that has not dispatched yet: no start.
    await fx.client.delete(fx.keys.agent_hosts(AGENT), fx.keys.waiting(AGENT))
    await fx.client.zadd(fx.keys.waiting(AGENT), {"w8": later})
    await fx.instance("fresh-1", capacity=1)
    assert await offer("e", free=4, starting=0) == 0
    await fx.client.zadd(fx.keys.waiting(AGENT), {"w9": later})  # one more than it holds
    assert await offer("e", free=4, starting=0) == 1


async def test_dispatch_run_again_for_the_same_session_returns_its_reservation(
    redis_fixture: Fixture,
) -> None:
    """The client sends the script again when its connection died (catflap.cluster.client):
    one that ran before its answer was lost must not reserve a second slot."""
    fx = redis_fixture
    for n in range(3):
        await fx.instance(f"i-{n}", capacity=4)
    pool = _pool(fx)
    first = await pool._run_dispatch(agent_spec(), "same", frozenset())
    again = [await pool._run_dispatch(agent_spec(), "same", frozenset()) for _ in range(5)]
    assert first[3] == "ok"
    assert all(a[:2] == first[:2] for a in again)
    assert await fx.reserved() == 1
    await pool.close()
