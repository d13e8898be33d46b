"""Session lifecycle events on Redis Streams: records stay right across a Redis restart, a
gateway or host cut off from Redis, and a host restart.

Real gateways and agent hosts (``catflap gateway``, ``catflap agent-host``) on a real Redis. A
process "cut off from Redis" talks to it through ``tests/rediscut.py``, a TCP proxy in the test
that can drop every connection and refuse new ones; the Redis-restart test runs a private
``redis-server`` without persistence, so the restart loses every stream and key, the hardest
case.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import pytest
import redis
import redis.asyncio
import websockets

from catflap.cluster.keys import HEARTBEAT_TTL_S

from .conftest import ROOT, seconds
from .rediscut import redis_cut
from .test_cluster import (
    REDIS_URL,
    Cluster,
    _free_port,
    _open,
    _spawn,
    _stop,
    cluster,
    private_redis,
)

pytestmark = pytest.mark.slow  # end to end: real gateways, agent hosts and Redis

LIFECYCLE = ROOT / "tests" / "bots" / "lifecycle"
SECRET = {"Authorization": "Bearer sk_test"}


def _common(cl: Cluster, redis_url: str) -> list[str]:
    return ["--config", str(cl.config), "--redis", redis_url, "--prefix", cl.prefix]


def _add_gateway(cl: Cluster, redis_url: str) -> int:
    """One more gateway on ``redis_url``; the cluster stops it with the others."""
    port = _free_port()
    proc = _spawn(
        ["gateway", *_common(cl, redis_url), "--listen", f"127.0.0.1:{port}"],
        "gateway listening on",
    )
    cl.gateways.append((proc, port))
    return len(cl.gateways) - 1


def _add_host(cl: Cluster, redis_url: str, slots: int) -> None:
    cl.hosts.append(
        _spawn(
            [
                "agent-host",
                *_common(cl, redis_url),
                "--agent",
                "echo.my-org",
                "--slots",
                str(slots),
                "--warm",
                str(slots),
            ],
            None,
        )
    )


async def _registered(cl: Cluster, count: int) -> None:
    async with asyncio.timeout(seconds(60)):
        while cl.registered() < count:
            await asyncio.sleep(0.1)


async def _record(cl: Cluster, gateway: int, session_id: str) -> dict[str, object] | None:
    """The session's record as ``gateway`` shows it; None while it cannot be read."""
    async with httpx.AsyncClient(timeout=seconds(5)) as client:
        try:
            shown = await client.get(
                f"{cl.http(gateway)}/v1/agents/echo/sessions/{session_id}", headers=SECRET
            )
        except httpx.HTTPError:
            return None
    if shown.status_code != 200:
        return None
    record: dict[str, object] = shown.json()
    return record


async def _final_status(cl: Cluster, gateway: int, session_id: str, within: float) -> object:
    """The record's ``completionStatus`` once it has one, as ``gateway`` shows it."""
    async with asyncio.timeout(seconds(within)):
        while True:
            record = await _record(cl, gateway, session_id)
            if record is not None and record.get("completionStatus") is not None:
                return record["completionStatus"]
            await asyncio.sleep(0.1)


def _ended_in_stream(url: str, prefix: str, session_id: str) -> bool:
    client = redis.Redis.from_url(url)
    try:
        entries = client.xrange(f"{prefix}:ended")
    finally:
        client.close()
    return any(json.loads(fields[b"data"])["session_id"] == session_id for _, fields in entries)


async def test_an_end_appended_while_a_gateway_is_cut_off_from_redis_is_applied_after() -> None:
    """Pub/sub lost this event: the gateway was not subscribed while the host published it,
    and the record stayed active until the session's time limit."""
    cut = redis_cut(REDIS_URL)
    async with cut as proxy, cluster(gateways=0, hosts=1, slots=1, bot=LIFECYCLE) as cl:
        gateway = _add_gateway(cl, proxy.url)
        ws, hello = await _open(cl, gateway)
        sid = hello["session_id"]
        proxy.cut()
        await ws.send("return")  # bot() returns: the host appends "completed"
        async with asyncio.timeout(seconds(10)):
            while not _ended_in_stream(REDIS_URL, cl.prefix, sid):
                await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # the gateway's reader fails meanwhile and backs off
        shown = await _record(cl, gateway, sid)  # from its memory: still running
        assert shown is not None and shown["completionStatus"] is None
        proxy.heal()
        assert await _final_status(cl, gateway, sid, within=15) == "completed"
        lines = "".join(cl.gateways[gateway][0].lines)
        assert "lost Redis while reading ended events" in lines
        await ws.close()


async def test_a_stop_appended_while_the_host_is_cut_off_from_redis_reaches_it() -> None:
    """The cut lasts the DELETE's STOP_WAIT_S (3 s), shorter than the heartbeat TTL (5 s), so
    the instance mostly stays registered: the stop request itself has to survive the cut
    (pub/sub dropped it). Should its hash lapse, the instance still answers /livez."""
    async with redis_cut(REDIS_URL) as proxy, cluster(gateways=2, hosts=0, bot=LIFECYCLE) as cl:
        _add_host(cl, proxy.url, slots=1)
        await _registered(cl, 1)
        ws, hello = await _open(cl, 0)
        sid = hello["session_id"]
        proxy.cut()
        cut_at = time.monotonic()
        async with httpx.AsyncClient(timeout=seconds(10)) as client:
            stopped = await client.delete(
                f"{cl.http(1)}/v1/agents/echo/sessions/{sid}", headers=SECRET
            )
        # The host cannot end the session while it is cut off, so the gateway stops waiting
        # after STOP_WAIT_S and says the stop is under way.
        assert stopped.status_code == 202, stopped.text
        assert stopped.json() == {"status": "stopping", "session_id": sid}
        await asyncio.sleep(max(0.0, HEARTBEAT_TTL_S / 3 - (time.monotonic() - cut_at)))
        proxy.heal()
        async with asyncio.timeout(seconds(15)):
            with pytest.raises(websockets.ConnectionClosedOK) as closed:
                while True:
                    await ws.recv()
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1000, "session stopped")
        assert await _final_status(cl, 0, sid, within=15) == "stopped"
        assert await _final_status(cl, 1, sid, within=15) == "stopped"
        assert "lost Redis while reading stop requests" in "".join(cl.hosts[0].lines)


async def test_records_end_right_when_sessions_end_across_a_redis_restart() -> None:
    """A restart without persistence: Redis comes back empty, without the streams, the
    instances or the records' first saves. Three sessions end while it is down, one just
    before it goes; every record still gets what its bot did."""
    with private_redis() as (url, restart):
        async with cluster(gateways=2, hosts=1, slots=4, redis_url=url, bot=LIFECYCLE) as cl:
            opened = [await _open(cl, i % 2) for i in range(4)]
            sessions = [(ws, hello["session_id"], i % 2) for i, (ws, hello) in enumerate(opened)]
            (early, _, _), (raising, _, _), (returning, _, _), (leaving, _, _) = sessions
            await early.send("return")  # just before the restart: its event may die with it
            loop = asyncio.get_running_loop()
            restarting = loop.run_in_executor(None, restart, 1.5)
            async with asyncio.timeout(seconds(10)):
                while True:
                    try:
                        redis.Redis.from_url(url, socket_timeout=0.2).ping()
                    except redis.ConnectionError:
                        break
                    await asyncio.sleep(0.02)
            await raising.send("raise")
            await returning.send("return")
            await leaving.close()
            await restarting
            expected = ["completed", "bot_error", "completed", "client_closed"]
            for n, ((_, sid, relayed_by), status) in enumerate(
                zip(sessions, expected, strict=True)
            ):
                # The relaying gateway finishes the record with what its event says.
                assert await _final_status(cl, relayed_by, sid, within=30) == status, sid
                if n == 0:
                    continue  # its final save may have gone with the old server's memory
                # Ended while Redis was down, so saved after the restart: the save lands
                # although every pooled connection died with the old server
                # (catflap.cluster.client sends it again), and the other gateway reads it.
                assert await _final_status(cl, 1 - relayed_by, sid, within=10) == status, sid
            for ws, _, _ in sessions:
                await ws.close()


async def test_a_host_that_restarts_leaves_right_records_and_its_successor_takes_stops() -> None:
    async with cluster(gateways=2, hosts=1, slots=1, bot=LIFECYCLE) as cl:
        ws, hello = await _open(cl, 0)
        lost = hello["session_id"]
        os.kill(cl.hosts[0].pid, signal.SIGKILL)  # its runtime exits with it (control EOF)
        with pytest.raises(websockets.ConnectionClosed) as closed:
            async with asyncio.timeout(seconds(10)):
                while True:
                    await ws.recv()
        # The runtime saw its control channel close, so it cancelled the bot and closed.
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1000, "session stopped")
        # The gateways' watcher writes it off once its instance is gone from Redis.
        within = 3 * HEARTBEAT_TTL_S + 10
        assert await _final_status(cl, 0, lost, within=within) == "agent_crashed"
        assert await _final_status(cl, 1, lost, within=10) == "agent_crashed"
        _stop(cl.hosts.pop())
        _add_host(cl, cl.redis_url, slots=1)  # the restarted host: a new host id
        async with asyncio.timeout(seconds(60)):
            while True:
                try:
                    ws, hello = await _open(cl, 1)
                    break
                except (websockets.InvalidStatus, AssertionError, httpx.HTTPError):
                    await asyncio.sleep(0.2)
        stopped_sid = hello["session_id"]
        async with httpx.AsyncClient(timeout=seconds(10)) as client:
            stopped = await client.delete(
                f"{cl.http(0)}/v1/agents/echo/sessions/{stopped_sid}", headers=SECRET
            )
        assert stopped.status_code == 200, stopped.text
        assert await _final_status(cl, 1, stopped_sid, within=15) == "stopped"
        assert await _final_status(cl, 0, stopped_sid, within=10) == "stopped"
        await ws.close()
        # The lost session's record was not touched by the new host's events.
        assert await _final_status(cl, 0, lost, within=1) == "agent_crashed"
