"""Liveness in cluster mode, with real processes on the real Redis: a dead gateway's records are
finished by a survivor, and an agent host cut off from Redis is not taken for a dead one.

The partition runs the host's Redis traffic through a TCP proxy in this process
(tests/rediscut.py), which the test cuts (every connection closed, new ones refused) and heals.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from typing import Any

import httpx
import pytest
import redis
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosedOK

from catflap.cluster.keys import GATEWAY_TTL_S, HEARTBEAT_TTL_S

from .conftest import seconds
from .rediscut import redis_cut
from .test_cluster import REDIS_URL, Cluster, _open, cluster

pytestmark = pytest.mark.slow  # end to end: real gateways, agent hosts and instances

SK = {"Authorization": "Bearer sk_test"}


async def _record(client: httpx.AsyncClient, cl: Cluster, gateway: int, sid: str) -> Any:
    answer = await client.get(f"{cl.http(gateway)}/v1/agents/echo/sessions/{sid}", headers=SK)
    assert answer.status_code == 200, answer.text
    return answer.json()


async def _wait_for_status(
    cl: Cluster, gateway: int, sids: list[str], status: str | None, *, within: float
) -> list[Any]:
    """Every record of ``sids`` as read through ``gateway``, once all are stored with
    ``status`` (None: active)."""
    async with httpx.AsyncClient(timeout=seconds(10)) as client:
        async with asyncio.timeout(seconds(within)):
            while True:
                answers = [
                    await client.get(
                        f"{cl.http(gateway)}/v1/agents/echo/sessions/{sid}", headers=SK
                    )
                    for sid in sids
                ]
                records = [a.json() for a in answers if a.status_code == 200]
                if len(records) == len(sids) and all(
                    r.get("completionStatus") == status for r in records
                ):
                    return records
                await asyncio.sleep(0.1)


def _redis() -> redis.Redis:
    return redis.Redis.from_url(REDIS_URL)


def _active_sessions(cl: Cluster) -> set[str]:
    """Every session id in an instance's ``:active`` set."""
    client = _redis()
    try:
        return {
            sid.decode()
            for key in client.scan_iter(f"{cl.prefix}:inst:*:active")
            for sid in client.smembers(key)
        }
    finally:
        client.close()


def _gateway_ids(cl: Cluster) -> list[str]:
    client = _redis()
    try:
        return [g.decode() for g in client.zrange(f"{cl.prefix}:gateways", 0, -1)]
    finally:
        client.close()


def _listed(cl: Cluster) -> dict[str, set[str]]:
    """gateway id -> the session ids it lists in Redis."""
    client = _redis()
    try:
        return {
            gid: {s.decode() for s in client.hkeys(f"{cl.prefix}:gw:{gid}:sessions")}
            for gid in _gateway_ids(cl)
        }
    finally:
        client.close()


async def _wait_listed(cl: Cluster, sids: set[str]) -> str:
    """The id of the gateway that lists exactly ``sids``, once it does."""
    async with asyncio.timeout(seconds(10)):
        while True:
            for gid, listed in _listed(cl).items():
                if listed == sids:
                    return gid
            await asyncio.sleep(0.05)


async def test_a_killed_gateways_records_are_finished_by_another_within_two_ttls() -> None:
    async with cluster(gateways=2, hosts=2, slots=2, sessions_per_instance=5) as cl:
        sessions: list[tuple[ClientConnection, dict[str, Any]]] = [
            await _open(cl, 0) for _ in range(20)
        ]
        sids = [hello["session_id"] for _, hello in sessions]
        doomed = await _wait_listed(cl, set(sids))
        await _wait_for_status(cl, 1, sids, None, within=10)  # the first saves landed
        os.kill(cl.gateways[0][0].pid, signal.SIGKILL)
        killed_at, killed = time.time(), time.perf_counter()
        records = await _wait_for_status(cl, 1, sids, "gateway_lost", within=4 * GATEWAY_TTL_S)
        assert time.perf_counter() - killed < 2 * GATEWAY_TTL_S
        for record in records:
            assert record["endState"] == "unknown"
            assert record["error"] == f"the gateway relaying this session ({doomed}) died"
            # endedAt is the dead gateway's last heartbeat: at most a third of a TTL before
            # the kill (plus a margin for a slow heartbeat).
            assert killed_at - GATEWAY_TTL_S / 3 - 1.0 <= record["endedAt"] <= killed_at
        # The agent-side bots ended: their client connections (from the dead gateway) dropped.
        async with asyncio.timeout(seconds(10)):
            while _active_sessions(cl):
                await asyncio.sleep(0.1)
        # The dead gateway is forgotten; the survivor still lists itself.
        assert doomed not in _gateway_ids(cl)
        assert len(_gateway_ids(cl)) == 1
        for ws, _ in sessions:
            await ws.close()


async def test_a_dead_gateways_session_its_host_still_runs_gets_the_hosts_report() -> None:
    async with cluster(gateways=2, hosts=1, slots=1) as cl:
        ws, hello = await _open(cl, 0)
        sid = hello["session_id"]
        await _wait_listed(cl, {sid})
        frozen = cl.gateways[0][0].pid
        # A stopped gateway's heartbeat lapses, but its TCP connections stay open: the bot runs on.
        os.kill(frozen, signal.SIGSTOP)
        try:
            await asyncio.sleep(2 * GATEWAY_TTL_S + 1)
            async with httpx.AsyncClient(timeout=seconds(10)) as client:
                record = await _record(client, cl, 1, sid)
            assert record["endState"] == "active"  # its host still runs it: left alone
            assert _active_sessions(cl) == {sid}
            # The instance dies: its host reports agent_crashed, and that report wins.
            os.kill(hello["pid"], signal.SIGKILL)
            (record,) = await _wait_for_status(cl, 1, [sid], "agent_crashed", within=10)
            assert record["endState"] == "agent_error"
        finally:
            os.kill(frozen, signal.SIGKILL)
        with contextlib.suppress(Exception):
            await ws.close()


async def test_a_killed_agent_hosts_sessions_are_recorded_agent_crashed() -> None:
    async with cluster(gateways=2, hosts=1, slots=1) as cl:
        ws, hello = await _open(cl, 0)
        sid = hello["session_id"]
        os.kill(cl.hosts[0].pid, signal.SIGKILL)
        killed = time.perf_counter()
        # Its instance stops with it (the control channel closed), so it neither stays in
        # Redis nor answers /livez: the watcher ends the session after three checks.
        (record,) = await _wait_for_status(cl, 1, [sid], "agent_crashed", within=20)
        assert record["error"] == "agent host lost"
        assert time.perf_counter() - killed < HEARTBEAT_TTL_S + 3 * HEARTBEAT_TTL_S / 2 + 3
        with contextlib.suppress(Exception):
            await ws.close()


async def _echo(ws: ClientConnection, text: str) -> None:
    await ws.send(text)
    assert await asyncio.wait_for(ws.recv(), seconds(5)) == text


async def test_a_host_cut_off_from_redis_for_three_ttls_keeps_its_records_right() -> None:
    async with (
        redis_cut(REDIS_URL) as proxy,
        cluster(gateways=2, hosts=1, slots=2, host_redis_url=proxy.url) as cl,
    ):
        early, early_hello = await _open(cl, 0)
        late, late_hello = await _open(cl, 0)
        sids = [early_hello["session_id"], late_hello["session_id"]]
        async with asyncio.timeout(seconds(10)):
            while _active_sessions(cl) != set(sids):
                await asyncio.sleep(0.05)
        proxy.cut()
        cut = time.perf_counter()
        await asyncio.sleep(HEARTBEAT_TTL_S)
        assert cl.registered() == 0  # the host's instances expired from Redis
        await _echo(early, "during")
        await early.close()  # its bot ends while the host cannot tell Redis
        await asyncio.sleep(3 * HEARTBEAT_TTL_S - (time.perf_counter() - cut))
        await _echo(late, "still here")
        async with httpx.AsyncClient(timeout=seconds(10)) as client:
            for gateway in (0, 1):  # the relaying gateway's memory, and the store
                for sid in sids:
                    record = await _record(client, cl, gateway, sid)
                    assert record["endState"] == "active", (gateway, record)
            # The relaying gateway still knows where the session is, so a stop goes into the
            # stream; the host cannot see it yet, so after STOP_WAIT_S: 202. (Through the
            # other gateway nothing in Redis names the session's instance now: 404.)
            stopping = await client.delete(
                f"{cl.http(0)}/v1/agents/echo/sessions/{sids[1]}", headers=SK
            )
            assert stopping.status_code == 202, stopping.text
            assert stopping.json() == {"status": "stopping", "session_id": sids[1]}
            elsewhere = await client.delete(
                f"{cl.http(1)}/v1/agents/echo/sessions/{sids[1]}", headers=SK
            )
            assert elsewhere.status_code == 404, elsewhere.text
        await _echo(late, "still here after the stop request")
        proxy.heal()
        # The host registers again, publishes the end it queued meanwhile, and reads the
        # stop from the stream: the late session is stopped.
        with pytest.raises(ConnectionClosedOK) as closed:
            async with asyncio.timeout(seconds(20)):
                while True:
                    await late.recv()
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1000, "session stopped")
        await _wait_for_status(cl, 1, sids[:1], "client_closed", within=15)
        (record,) = await _wait_for_status(cl, 1, sids[1:], "stopped", within=10)
        assert record["endState"] == "terminated"
