"""Cluster mode: stops that wait for ``bot()``, and readiness that follows Redis.

Real gateways and agent hosts as processes (the helpers of tests/test_cluster.py), the real
Redis, and for the outage a private ``redis-server`` this test starts and stops.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import redis
import websockets
from websockets.asyncio.client import ClientConnection, connect

from catflap.contract import limits

from .conftest import BOTS, die_with_test_process, seconds
from .sessionstores import DATABASE_URL
from .test_cluster import Cluster, _free_port, cluster

pytestmark = pytest.mark.slow

PRIVATE = {"Authorization": "Bearer sk_test"}
SLOWSTOP = BOTS / "slowstop"
#: The slowstop bot's unwinding after cancellation (tests/bots/slowstop/bot.py).
UNWIND_S = 1.0


async def _start(cl: Cluster, gateway: int, body: Any = None) -> dict[str, Any]:
    payload: dict[str, Any] = {"transport": "websocket"}
    if body is not None:
        payload["body"] = body
    async with httpx.AsyncClient(timeout=seconds(10)) as client:
        response = await client.post(
            f"{cl.http(gateway)}/v1/public/echo/start",
            json=payload,
            headers={"Authorization": "Bearer pk_test"},
        )
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def _ws_url(cl: Cluster, gateway: int, started: dict[str, Any]) -> str:
    url = f"{cl.url(gateway)}/ws/generic/echo.my-org/{started['token']}"
    return url + (f"?body={quote(started['body'])}" if "body" in started else "")


async def _connect(cl: Cluster, gateway: int, started: dict[str, Any]) -> ClientConnection:
    ws = await connect(_ws_url(cl, gateway, started), open_timeout=seconds(20))
    hello = json.loads(await asyncio.wait_for(ws.recv(), seconds(10)))
    assert hello["session_id"] == started["sessionId"]
    return ws


@pytest.mark.parametrize("records", ["redis", "postgres"])
async def test_delete_through_another_gateway_answers_once_bot_has_ended(
    tmp_path: Path, records: str
) -> None:
    """Gateway A relays the session, gateway B gets the DELETE: B sees the end in the shared
    records, Redis or PostgreSQL."""
    settings = f'database_url = "{DATABASE_URL}"\n' if records == "postgres" else ""
    async with cluster(gateways=2, hosts=1, slots=1, bot=SLOWSTOP, settings=settings) as cl:
        started = await _start(cl, 0, body={"marker_dir": str(tmp_path)})
        sid = started["sessionId"]
        ws = await _connect(cl, 0, started)  # relayed by gateway A
        async with httpx.AsyncClient(
            base_url=cl.http(1), headers=PRIVATE, timeout=seconds(10)
        ) as other:
            path = f"/v1/agents/echo/sessions/{sid}"
            async with asyncio.timeout(seconds(10)):  # the first save is asynchronous
                while (await other.get(path)).status_code != 200:
                    await asyncio.sleep(0.05)
            began = time.perf_counter()
            response = await other.delete(path)  # through gateway B
            took = time.perf_counter() - began
            # bot() had returned, and the shared record was final, when B answered.
            assert (tmp_path / f"{sid}.ended").read_text() == "ended"
            record = (await other.get(path)).json()
        assert response.status_code == 200, response.text
        assert response.json() == {
            "status": "terminated",
            "session_id": sid,
            "completionStatus": "stopped",
            "endState": "terminated",
        }
        assert record["completionStatus"] == "stopped" and record["endedAt"] is not None
        assert UNWIND_S <= took < limits.STOP_WAIT_S
        with pytest.raises(websockets.ConnectionClosedOK):
            await asyncio.wait_for(ws.recv(), seconds(5))
        assert (ws.close_code, ws.close_reason) == (1000, "session stopped")
        client = redis.Redis.from_url(cl.redis_url)
        try:  # the records really live where the parameter says
            in_redis = bool(client.exists(f"{cl.prefix}:session:{sid}"))
        finally:
            client.close()
        assert in_redis == (records == "redis")


async def test_delete_of_a_session_no_host_holds_is_404() -> None:
    """A record still active with no slot behind it anywhere (here: made by hand, as a
    gateway that died leaves one) has nothing to stop: 404 at once, not a 202 later."""
    async with cluster(gateways=1, hosts=1, slots=1) as cl:
        started = await _start(cl, 0)
        ws = await _connect(cl, 0, started)
        client = redis.Redis.from_url(cl.redis_url)
        try:
            raw = client.get(f"{cl.prefix}:session:{started['sessionId']}")
            assert raw is not None
            orphan = {**json.loads(raw), "session_id": "5f0c8a52-8a7e-4c1e-9a55-0e6f3c1d2b7a"}
            client.set(f"{cl.prefix}:session:{orphan['session_id']}", json.dumps(orphan))
        finally:
            client.close()
        async with httpx.AsyncClient(
            base_url=cl.http(0), headers=PRIVATE, timeout=seconds(10)
        ) as api:
            began = time.perf_counter()
            response = await api.delete(f"/v1/agents/echo/sessions/{orphan['session_id']}")
        assert time.perf_counter() - began < limits.STOP_WAIT_S
        assert response.status_code == 404, response.text
        assert response.json()["code"] == "404"
        assert "is not running" in response.json()["error"]
        await ws.close()


class PrivateRedis:
    """A ``redis-server`` on a free port that a test stops and starts again."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.mkdtemp(prefix="cfredis")
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
            + ["--save", "", "--appendonly", "no", "--dir", self._dir],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_test_process,
        )
        deadline = time.monotonic() + seconds(10)
        while True:
            try:
                redis.Redis(port=self.port).ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=seconds(10))
            self._proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)


@contextmanager
def private_redis() -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = PrivateRedis()
    try:
        server.start()
        yield server
    finally:
        server.close()


async def _readyz(client: httpx.AsyncClient) -> tuple[int, Any]:
    response = await client.get("/readyz")
    return response.status_code, response.json()


async def test_a_gateway_without_redis_is_not_ready_refuses_new_sessions_and_keeps_relaying() -> (
    None
):
    with private_redis() as server:
        async with cluster(gateways=1, hosts=1, slots=2, redis_url=server.url) as cl:
            live = await _connect(cl, 0, await _start(cl, 0))
            spare = await _start(cl, 0)  # a token minted while Redis is there
            async with httpx.AsyncClient(base_url=cl.http(0), timeout=seconds(10)) as client:
                assert await _readyz(client) == (200, {"status": "ok"})
                server.stop()
                stopped = time.perf_counter()
                # Not ready within the ping's bound (a refused connection fails at once).
                async with asyncio.timeout(seconds(limits.READINESS_CHECK_TIMEOUT_S + 2)):
                    while (answer := await _readyz(client))[0] != 503:
                        await asyncio.sleep(0.05)
                assert answer == (503, {"status": "unavailable", "unreachable": ["redis"]})
                assert time.perf_counter() - stopped < seconds(limits.READINESS_CHECK_TIMEOUT_S + 2)
                # A new session: the upgrade, and /start, get 503 redis_unreachable.
                with pytest.raises(websockets.InvalidStatus) as refused:
                    await connect(_ws_url(cl, 0, spare), open_timeout=seconds(10))
                assert refused.value.response.status_code == 503
                assert refused.value.response.headers["retry-after"] == "2"
                assert json.loads(refused.value.response.body) == {
                    "error": "the session broker (Redis) is unreachable; retry shortly",
                    "code": "redis_unreachable",
                }
                start = await client.post(
                    "/v1/public/echo/start",
                    json={"transport": "websocket"},
                    headers={"Authorization": "Bearer pk_test"},
                )
                assert (start.status_code, start.json()["code"]) == (503, "redis_unreachable")
                # The live session goes on, byte for byte.
                frame = bytes(range(256)) * 8
                await live.send(frame)
                assert await asyncio.wait_for(live.recv(), seconds(5)) == frame
                await live.send("still here")
                assert await asyncio.wait_for(live.recv(), seconds(5)) == "still here"
                # Redis back: ready again, and new sessions start.
                server.start()
                async with asyncio.timeout(seconds(10)):
                    while await _readyz(client) != (200, {"status": "ok"}):
                        await asyncio.sleep(0.05)
                async with asyncio.timeout(seconds(30)):  # hosts register their instances again
                    while True:
                        try:
                            again = await _connect(cl, 0, await _start(cl, 0))
                            break
                        except (websockets.InvalidStatus, AssertionError):
                            await asyncio.sleep(0.2)
                await again.close()
            await live.close()
        gateway_log = "".join(cl.gateways[0][0].lines)
        assert gateway_log.count("redis unreachable (") == 1  # logged once, not per probe
        assert "redis reachable again" in gateway_log
