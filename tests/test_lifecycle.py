"""Faults with a defined outcome: resets, bot errors, slow readers, stuck bots, shutdown."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import socket
import struct
import time
from pathlib import Path

import pytest
import websockets
from websockets.asyncio.client import connect

from catflap.config import CatflapConfig
from catflap.contract import limits

from .conftest import (
    ECHO,
    RELAY_MODES,
    ROOT,
    RunningGateway,
    catflap_serve,
    running_gateway,
    seconds,
    upgrade_request,
)

pytestmark = pytest.mark.slow  # end to end: real gateways, agent processes

BOTS = ROOT / "tests" / "bots"


async def _ended(gw: RunningGateway, session_id: str, timeout: float = 10):  # type: ignore[no-untyped-def]
    async with asyncio.timeout(seconds(timeout)):
        while (record := gw.gateway.sessions.ended.get(session_id)) is None:
            await asyncio.sleep(0.01)
    return record


async def _raw_upgrade(port: int, target: str) -> tuple[socket.socket, bytes]:
    """A WebSocket client at the socket level, so a test can reset or stall it."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, upgrade_request(target))
    data = b""
    while b"\r\n\r\n" not in data:
        data += await loop.sock_recv(sock, 65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock, rest


@RELAY_MODES
async def test_client_reset_reaches_the_bot_within_a_second(
    tmp_path: Path, native_relay: bool
) -> None:
    report = tmp_path / "close.json"
    agents = {"closecode": {"path": BOTS / "closecode", "scaling": {"min_agents": 1}}}
    async with running_gateway(agents, native_relay=native_relay) as gw:
        await gw.wait_ready("closecode.my-org")
        body = json.dumps({"report": str(report)}).encode()
        target = f"/ws/generic/closecode.my-org?body={base64.b64encode(body).decode()}"
        sock, first = await _raw_upgrade(gw.port, target)
        while b"ready" not in first:  # the bot is past its greeting and waiting to receive
            first += await asyncio.get_running_loop().sock_recv(sock, 4096)
        (session_id,) = gw.gateway.sessions.live
        # SO_LINGER 0: close() sends a TCP RST, as a crashed client or a dropped call would.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        reset_at = time.perf_counter()
        sock.close()
        record = await _ended(gw, session_id)
        assert time.perf_counter() - reset_at < 1.0
        assert record.completion_status == "client_closed"
        assert json.loads(report.read_text()) == {"code": 1001, "reason": "client went away"}
        # The instance is free again.
        async with connect(
            f"{gw.ws}/ws/generic/closecode.my-org?body={base64.b64encode(body).decode()}"
        ) as ws:
            assert await ws.recv() == "ready"


@RELAY_MODES
async def test_bot_error_closes_the_client_with_1011_and_records_it(native_relay: bool) -> None:
    agents = {"echo": {"scaling": {"min_agents": 1}}}
    async with running_gateway(agents, native_relay=native_relay) as gw:
        await gw.wait_ready("echo.my-org")
        async with connect(f"{gw.ws}/ws/generic/echo.my-org") as ws:
            session_id = json.loads(await ws.recv())["session_id"]
            await ws.send("__raise__")
            with pytest.raises(websockets.ConnectionClosedError):
                async with asyncio.timeout(seconds(5)):
                    await ws.recv()
        assert ws.close_code == 1011
        assert ws.close_reason == "RuntimeError"
        record = await _ended(gw, session_id)
        assert record.completion_status == "bot_error"
        assert record.error == "RuntimeError: echo bot asked to raise"
        assert record.agent_close_code == 1011


@RELAY_MODES
async def test_a_client_that_stops_reading_is_paused_then_closed_with_1013(
    native_relay: bool,
) -> None:
    agents = {"flood": {"path": BOTS / "flood", "scaling": {"min_agents": 1}}}
    # A short bound for the test, through the composition as a deployment would set it.
    timings = {"slow_peer": 1.0}
    async with running_gateway(agents, native_relay=native_relay, timings=timings) as gw:
        await gw.wait_ready("flood.my-org")
        sock, _ = await _raw_upgrade(gw.port, "/ws/generic/flood.my-org")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        (session_id,) = gw.gateway.sessions.live
        relay = gw.gateway.relays[session_id]
        peak = 0
        started = time.perf_counter()
        while session_id in gw.gateway.relays and time.perf_counter() - started < seconds(10):
            peak = max(peak, relay.client.transport.get_write_buffer_size())
            await asyncio.sleep(0.01)
        record = await _ended(gw, session_id)
        sock.close()
    # The gateway buffered at most the high-water mark plus what one read can bring.
    assert peak <= limits.RELAY_HIGH_WATER_BYTES + 256 * 1024
    assert record.gateway_close_code == 1013
    assert record.bytes_agent_to_client < 16 * 1024 * 1024  # the bot was throttled, not drained


async def test_a_bot_that_ignores_cancellation_gets_its_process_replaced() -> None:
    agents = {"stubborn": {"path": BOTS / "stubborn", "scaling": {"min_agents": 1}}}
    async with running_gateway(agents) as gw:
        await gw.wait_ready("stubborn.my-org")
        pool = gw.pool.agents["stubborn.my-org"]
        (first,) = pool.live()
        async with connect(f"{gw.ws}/ws/generic/stubborn.my-org") as ws:
            assert await ws.recv() == "ready"
            (session_id,) = gw.gateway.sessions.live
            assert await gw.pool.stop_session(session_id)
            record = await _ended(gw, session_id, timeout=limits.BOT_CANCEL_GRACE_S + 10)
        assert record.completion_status == "stopped"
        assert record.error == "bot ignored cancellation"
        await gw.wait_ready("stubborn.my-org")
        (replacement,) = pool.live()
        assert replacement.pid != first.pid


def _drain_config(tmp_path: Path, drain_timeout: float, *, native_relay: bool) -> Path:
    config = tmp_path / "catflap.toml"
    config.write_text(
        f'listen = "127.0.0.1:0"\nstate_dir = "{tmp_path}"\n'
        f"[gateway]\ndrain_timeout = {drain_timeout}\n"
        f"native_relay = {'true' if native_relay else 'false'}\n"
        f'[organizations.my-org.agents.echo]\npath = "{ECHO}"\n'
        "[organizations.my-org.agents.echo.scaling]\nmin_agents = 1\n"
    )
    return config


_ANY_PORT = ("--listen", "127.0.0.1:0")


async def _logged(lines: list[str], text: str) -> None:
    """Wait (bounded) until ``catflap serve`` has logged ``text``: it logs the drain as it
    begins, so from then on new upgrades are refused."""
    async with asyncio.timeout(seconds(10)):
        while not any(text in line for line in lines):
            await asyncio.sleep(0.01)


@RELAY_MODES
async def test_sigterm_drains_then_closes_with_1012_and_exits_0(
    tmp_path: Path, native_relay: bool
) -> None:
    config = _drain_config(tmp_path, drain_timeout=1.5, native_relay=native_relay)
    with catflap_serve(["--config", str(config), *_ANY_PORT]) as (proc, port, lines):
        async with connect(
            f"ws://127.0.0.1:{port}/ws/generic/echo.my-org", open_timeout=seconds(30)
        ) as ws:
            await ws.recv()
            proc.send_signal(signal.SIGTERM)
            await _logged(lines, "draining 1 live session")
            # New upgrades are refused while draining...
            with pytest.raises(websockets.InvalidStatus) as refused:
                await connect(f"ws://127.0.0.1:{port}/ws/generic/echo.my-org")
            assert refused.value.response.status_code == 503
            # ...while the live session keeps working until the deadline.
            await ws.send("still here")
            assert await ws.recv() == "still here"
            with pytest.raises(websockets.ConnectionClosed):
                async with asyncio.timeout(seconds(10)):
                    await ws.recv()
            assert ws.close_code == 1012
        assert proc.wait(timeout=seconds(20)) == 0


@RELAY_MODES
async def test_second_sigterm_closes_everything_at_once(tmp_path: Path, native_relay: bool) -> None:
    config = _drain_config(tmp_path, drain_timeout=3600, native_relay=native_relay)
    with catflap_serve(["--config", str(config), *_ANY_PORT]) as (proc, port, lines):
        async with connect(
            f"ws://127.0.0.1:{port}/ws/generic/echo.my-org", open_timeout=seconds(30)
        ) as ws:
            await ws.recv()
            proc.send_signal(signal.SIGTERM)
            await _logged(lines, "draining 1 live session")  # the first one was handled
            proc.send_signal(signal.SIGTERM)
            second = time.perf_counter()
            with pytest.raises(websockets.ConnectionClosed):
                async with asyncio.timeout(seconds(10)):
                    await ws.recv()
            assert ws.close_code == 1012
            assert time.perf_counter() - second < 2.0
        assert proc.wait(timeout=seconds(20)) == 0


def _shorter_sessions(config: CatflapConfig) -> CatflapConfig:
    """max_session_duration = 1 s, below the 60 s the config accepts, for a quick test."""
    org = config.organizations["my-org"]
    agent = org.agents["echo"].model_copy(update={"max_session_duration": 1})
    org = org.model_copy(update={"agents": {**org.agents, "echo": agent}})
    return config.model_copy(update={"organizations": {"my-org": org}})


async def test_max_session_duration_cancels_the_bot_and_closes_the_client() -> None:
    agents = {"echo": {"scaling": {"min_agents": 1}}}
    async with running_gateway(agents, adjust=_shorter_sessions) as gw:
        await gw.wait_ready("echo.my-org")
        async with connect(f"{gw.ws}/ws/generic/echo.my-org") as ws:
            session_id = json.loads(await ws.recv())["session_id"]
            opened = time.perf_counter()
            with pytest.raises(websockets.ConnectionClosedOK):
                async with asyncio.timeout(seconds(5)):
                    await ws.recv()
        assert 0.9 < time.perf_counter() - opened < 2.5
        assert (ws.close_code, ws.close_reason) == (1000, "session time limit reached")
        record = await _ended(gw, session_id)
        assert record.completion_status == "time_limit"


@RELAY_MODES
async def test_a_hung_runtime_is_killed_and_replaced(native_relay: bool) -> None:
    agents = {"hang": {"path": BOTS / "hang", "scaling": {"min_agents": 1}}}
    options = {"ping_interval": 0.2, "ping_timeout": 1.0}
    async with running_gateway(agents, pool_options=options, native_relay=native_relay) as gw:
        await gw.wait_ready("hang.my-org")
        pool = gw.pool.agents["hang.my-org"]
        (hung,) = pool.live()
        async with connect(f"{gw.ws}/ws/generic/hang.my-org") as ws:
            assert await ws.recv() == "ready"
            (session_id,) = gw.gateway.sessions.live
            await ws.send("__hang__")
            with pytest.raises(websockets.ConnectionClosedError):
                async with asyncio.timeout(seconds(10)):
                    await ws.recv()
        assert ws.close_code == 1011
        record = await _ended(gw, session_id)
        assert record.completion_status == "agent_crashed"
        await gw.wait_ready("hang.my-org")
        assert pool.live()[0].pid != hung.pid


async def test_client_sockets_have_tcp_keepalive() -> None:
    async with running_gateway({"echo": {"scaling": {"min_agents": 1}}}) as gw:
        await gw.wait_ready("echo.my-org")
        async with connect(f"{gw.ws}/ws/generic/echo.my-org") as ws:
            await ws.recv()
            (relay,) = gw.gateway.relays.values()
            sock = relay.client.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == (
                limits.TCP_KEEPALIVE_IDLE_S
            )
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == (
                limits.TCP_KEEPALIVE_COUNT
            )


@RELAY_MODES
async def test_gateway_close_is_recorded_even_when_it_has_to_abort_mid_frame(
    native_relay: bool,
) -> None:
    # The flood bot keeps the agent -> client stream mid-frame most of the time, so the close
    # toward the client is an abort; the record must still say the gateway closed with 1013,
    # never that the agent vanished.
    agents = {"flood": {"path": BOTS / "flood", "scaling": {"min_agents": 1}}}
    async with running_gateway(agents, native_relay=native_relay) as gw:
        await gw.wait_ready("flood.my-org")
        sock, _ = await _raw_upgrade(gw.port, "/ws/generic/flood.my-org")
        (session_id,) = gw.gateway.sessions.live
        relay = gw.gateway.relays[session_id]
        relay._too_slow(relay.client)  # what the slow-peer timer does
        record = await _ended(gw, session_id)
        sock.close()
    assert record.gateway_close_code == 1013
