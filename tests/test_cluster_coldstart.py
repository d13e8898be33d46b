"""Cold starts across hosts: real gateways and agent hosts on the real Redis.

A session that finds no idle instance asks the agent hosts for a start and waits for it, up
to ``agent_ready_timeout``, instead of an immediate 503 (issue 17's case: one host with
``--slots 4`` and 2 warm instances took 2 of 4 simultaneous sessions and refused 2).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
import redis
import websockets
from websockets.asyncio.client import ClientConnection, connect

from catflap.cluster.keys import Keys
from catflap.contract.limits import AGENT_READY_TIMEOUT_S

from .conftest import ROOT, seconds
from .test_cluster import Cluster, _token, cluster

pytestmark = pytest.mark.slow  # end to end: real gateways, agent processes

SLOW_START = ROOT / "tests" / "bots" / "slow_start"


async def _connect(cl: Cluster, gateway: int, token: dict[str, Any]) -> ClientConnection:
    ws = await connect(
        f"{cl.url(gateway)}/ws/generic/echo.my-org/{token['token']}",
        open_timeout=AGENT_READY_TIMEOUT_S + seconds(10),
    )
    hello = json.loads(await asyncio.wait_for(ws.recv(), seconds(10)))
    assert hello["session_id"] == token["sessionId"]
    assert hello["concurrent"] == 1  # never two sessions on one instance
    return ws


async def _burst(cl: Cluster, count: int) -> tuple[list[ClientConnection | int], float]:
    """Open ``count`` sessions at once over the gateways (tokens minted first); each result is
    a connection or the refusal's HTTP status; and the seconds the slowest took."""
    tokens = [await _token(cl, i % len(cl.gateways)) for i in range(count)]

    async def one(i: int) -> ClientConnection | int:
        try:
            return await _connect(cl, i % len(cl.gateways), tokens[i])
        except websockets.InvalidStatus as refused:
            return refused.response.status_code

    started = time.monotonic()
    results = await asyncio.gather(*(one(i) for i in range(count)))
    return list(results), time.monotonic() - started


async def test_four_sessions_at_once_on_a_host_with_two_warm_of_four_slots_all_start() -> None:
    async with cluster(gateways=1, hosts=1, slots=4, warm=2) as cl:
        assert cl.registered() == 2
        results, took = await _burst(cl, 4)
        statuses = [r if isinstance(r, int) else 101 for r in results]
        assert statuses == [101] * 4
        assert took < AGENT_READY_TIMEOUT_S
        assert cl.registered() == 4
        for ws in results:
            assert not isinstance(ws, int)
            await ws.send("ping")
            assert await ws.recv() == "ping"
            await ws.close()


async def test_a_burst_past_the_warm_pool_starts_on_every_host_then_429_past_max_agents() -> None:
    # Two gateways, two hosts with 1 warm of 3 slots each; max_agents 5 across the cluster.
    async with cluster(gateways=2, hosts=2, slots=3, warm=1, max_agents=5) as cl:
        assert cl.registered() == 2
        results, took = await _burst(cl, 7)
        opened = [r for r in results if not isinstance(r, int)]
        refused = sorted(r for r in results if isinstance(r, int))
        assert len(opened) == 5  # every one while there is room: 2 warm + 3 cold starts
        assert refused == [429, 429]  # past max_agents, not 503
        assert took < AGENT_READY_TIMEOUT_S
        async with asyncio.timeout(seconds(10)):
            while cl.registered() < 5:
                await asyncio.sleep(0.05)
        for ws in opened:
            await ws.close()


async def test_a_client_that_leaves_while_waiting_for_a_cold_start_holds_nothing() -> None:
    # slow_start's import takes 2 s: the second session waits for the host's next instance.
    async with cluster(gateways=1, hosts=1, slots=2, warm=1, bot=SLOW_START) as cl:
        first = await _token(cl, 0)
        async with connect(f"{cl.url(0)}/ws/generic/echo.my-org/{first['token']}") as live:
            assert await asyncio.wait_for(live.recv(), seconds(10)) == "ready"
            second = await _token(cl, 0)
            url = f"{cl.url(0)}/ws/generic/echo.my-org/{second['token']}"
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(connect(url), 0.5)  # leaves mid-handshake
            client = redis.Redis.from_url(cl.redis_url)
            try:
                waiting = Keys(cl.prefix).waiting("echo.my-org")
                async with asyncio.timeout(seconds(5)):
                    while client.zcard(waiting):
                        await asyncio.sleep(0.05)  # the departed client left the waiting set
                for key in client.scan_iter(f"{cl.prefix}:inst:*:resv"):
                    assert client.zcard(key) == 0  # no slot reserved for the departed client
            finally:
                client.close()
            # The token was given back: the same one starts the session once it can.
            async with connect(url, open_timeout=AGENT_READY_TIMEOUT_S + seconds(5)) as again:
                assert await asyncio.wait_for(again.recv(), seconds(10)) == "ready"
