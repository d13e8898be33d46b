"""The warm pool, driven through a real gateway with real agent processes."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

import pytest
import websockets
from websockets.asyncio.client import connect

from catflap.pool.instance import InstanceState

from .conftest import ROOT, RawResponse, raw_request, running_gateway, seconds, upgrade_request

pytestmark = pytest.mark.slow  # end to end: real gateways, agent processes

ECHO_URL = "/ws/generic/echo.my-org"


async def _ended(gw, session_id: str):  # type: ignore[no-untyped-def]
    async with asyncio.timeout(seconds(10)):
        while (record := gw.gateway.sessions.ended.get(session_id)) is None:
            await asyncio.sleep(0.02)
    return record


async def _session_id(ws) -> str:  # type: ignore[no-untyped-def]
    import json

    return str(json.loads(await ws.recv())["session_id"])


async def test_min_agents_are_started_warm_and_serve_warm_sessions() -> None:
    async with running_gateway({"echo": {"scaling": {"min_agents": 2}}}) as gw:
        await gw.wait_ready("echo.my-org", count=2)
        async with connect(gw.ws + ECHO_URL) as ws:
            sid = await _session_id(ws)
        record = await _ended(gw, sid)
        assert record.cold_start is False
        assert len(gw.pool.agents["echo.my-org"].live()) == 2


async def test_no_idle_instance_means_a_cold_start() -> None:
    async with running_gateway({"echo": {"scaling": {"min_agents": 0}}}) as gw:
        assert gw.pool.agents["echo.my-org"].live() == []
        started = time.perf_counter()
        async with connect(gw.ws + ECHO_URL, open_timeout=seconds(30)) as ws:
            sid = await _session_id(ws)
        record = await _ended(gw, sid)
        assert record.cold_start is True
        assert 0 < record.bot_start_seconds < time.perf_counter() - started


async def test_sessions_per_instance_shares_one_instance_up_to_max() -> None:
    agents = {"echo": {"scaling": {"min_agents": 1, "max_agents": 1, "sessions_per_instance": 2}}}
    async with running_gateway(agents) as gw:
        await gw.wait_ready("echo.my-org")
        async with connect(gw.ws + ECHO_URL) as one, connect(gw.ws + ECHO_URL) as two:
            await _session_id(one)
            await _session_id(two)
            third = await raw_request(gw.port, upgrade_request(ECHO_URL))
            assert third.status == 429
        assert len(gw.pool.agents["echo.my-org"].live()) == 1


async def test_concurrent_handshakes_never_share_a_single_slot() -> None:
    async with running_gateway({"echo": {"scaling": {"min_agents": 0, "max_agents": 1}}}) as gw:

        async def attempt() -> object:
            try:
                ws = await connect(gw.ws + ECHO_URL, open_timeout=seconds(30))
            except websockets.InvalidStatus as exc:
                return exc.response.status_code
            return ws

        results = await asyncio.gather(*(attempt() for _ in range(5)))
        winners = [r for r in results if not isinstance(r, int)]
        assert len(winners) == 1
        assert sorted(r for r in results if isinstance(r, int)) == [429] * 4
        await winners[0].close()  # type: ignore[attr-defined]


async def test_instance_is_not_reused_until_bot_returns() -> None:
    async with running_gateway({"echo": {"scaling": {"min_agents": 1, "max_agents": 1}}}) as gw:
        await gw.wait_ready("echo.my-org")
        async with connect(gw.ws + ECHO_URL) as ws:
            sid = await _session_id(ws)
            await ws.send("__sleep_forever__")  # the bot stops listening, even for a close
        # The client is gone but bot() still runs: the only instance stays taken.
        refused = await raw_request(gw.port, upgrade_request(ECHO_URL))
        assert refused.status == 429
        assert sid in gw.gateway.sessions.live
        assert await gw.pool.stop_session(sid)
        record = await _ended(gw, sid)
        assert record.completion_status == "stopped"
        async with connect(gw.ws + ECHO_URL) as ws:
            await _session_id(ws)


async def test_crashed_instance_closes_its_session_with_1011_and_is_replaced() -> None:
    async with running_gateway({"echo": {"scaling": {"min_agents": 1}}}) as gw:
        await gw.wait_ready("echo.my-org")
        pool = gw.pool.agents["echo.my-org"]
        (instance,) = pool.live()
        async with connect(gw.ws + ECHO_URL) as ws:
            sid = await _session_id(ws)
            assert instance.pid is not None
            killed_at = time.perf_counter()
            os.kill(instance.pid, signal.SIGKILL)
            with pytest.raises(websockets.ConnectionClosedError):
                async with asyncio.timeout(seconds(5)):
                    await ws.recv()
            assert time.perf_counter() - killed_at < 1.0
        assert ws.close_code == 1011
        record = await _ended(gw, sid)
        assert record.completion_status == "agent_crashed"
        assert record.gateway_close_code == 1011
        await gw.wait_ready("echo.my-org")
        (replacement,) = pool.live()
        assert replacement is not instance and replacement.pid != instance.pid
        async with connect(gw.ws + ECHO_URL) as ws:
            await _session_id(ws)


async def test_idle_instances_above_min_are_reaped() -> None:
    agents = {"echo": {"scaling": {"min_agents": 0, "idle_timeout": 0.5}}}
    async with running_gateway(agents) as gw:
        async with connect(gw.ws + ECHO_URL, open_timeout=seconds(30)) as ws:
            await _session_id(ws)
        pool = gw.pool.agents["echo.my-org"]
        async with asyncio.timeout(seconds(10)):
            while pool.live():
                await asyncio.sleep(0.05)
        assert all(i.state is InstanceState.DEAD for i in pool.instances.values())


async def test_agent_that_fails_to_start_gets_503_and_backs_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="catflap.pool")
    agents = {"broken": {"path": ROOT / "tests/bots/broken", "scaling": {"min_agents": 0}}}
    async with running_gateway(agents) as gw:
        first: RawResponse = await raw_request(
            gw.port, upgrade_request("/ws/generic/broken.my-org"), timeout=30
        )
        second = await raw_request(gw.port, upgrade_request("/ws/generic/broken.my-org"))
    assert first.status == 503 and second.status == 503
    assert first.json()["code"] == "PCC-1001"
    assert "a_module_that_does_not_exist" in first.json()["error"]
    assert "retrying in" in second.json()["error"]
    assert first.headers["retry-after"] == "2"
    tracebacks = [r for r in caplog.records if "Traceback" in r.getMessage()]
    assert len(tracebacks) == 1
