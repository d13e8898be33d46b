"""The ``metrics_listen`` server in the test process, over real loopback sockets: one request per
connection, the gateway's head bounds, its own connection cap and deadlines."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from catflap.config import GatewaySettings
from catflap.contract import limits
from catflap.gateway.metricslistener import MetricsListener
from catflap.metrics import CONTENT_TYPE, GatewayMetrics

from .conftest import seconds

KEY = "k" * 32


@asynccontextmanager
async def listening(**settings: str) -> AsyncIterator[MetricsListener]:
    listener = MetricsListener(
        settings=GatewaySettings.model_validate({"metrics_listen": "127.0.0.1:0", **settings}),
        metrics=GatewayMetrics(),
    )
    await listener.start("127.0.0.1", 0)
    try:
        yield listener
    finally:
        listener.close()


async def exchange(port: int, request: bytes) -> tuple[int, bytes, bytes]:
    """Send ``request``, read until the listener closes: (status, head, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        async with asyncio.timeout(seconds(10)):
            data = await reader.read()
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head, body


def error(body: bytes) -> dict[str, str]:
    parsed: dict[str, str] = json.loads(body)
    return parsed


async def test_get_metrics_is_answered_once_and_the_connection_closed() -> None:
    async with listening() as listener:
        status, head, body = await exchange(
            listener.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
        )
    assert status == 200
    assert f"content-type: {CONTENT_TYPE}".encode() in head
    assert b"connection: close" in head
    assert f"content-length: {len(body)}".encode() in head
    assert b"catflap_sessions_started_total" in body


async def test_other_paths_and_methods_are_refused_with_json() -> None:
    async with listening() as listener:
        status, _, body = await exchange(listener.port, b"GET /v1/x HTTP/1.1\r\n\r\n")
        assert (status, error(body)["code"]) == (404, "not_found")
        status, head, body = await exchange(listener.port, b"POST /metrics HTTP/1.1\r\n\r\n")
        assert (status, error(body)["code"]) == (405, "method_not_allowed")
        assert b"\r\nallow: GET\r\n" in head + b"\r\n"


async def test_a_key_is_required_when_set_and_never_echoed() -> None:
    async with listening(metrics_key=KEY) as listener:
        status, _, body = await exchange(listener.port, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert status == 401 and KEY.encode() not in body
        status, _, body = await exchange(
            listener.port, b"GET /metrics HTTP/1.1\r\nAuthorization: Bearer wrong\r\n\r\n"
        )
        assert status == 401 and b"wrong" not in body
        status, _, _ = await exchange(
            listener.port, f"GET /metrics HTTP/1.1\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode()
        )
        assert status == 200


async def test_a_head_over_the_gateway_bound_gets_431() -> None:
    big = b"x-filler: " + b"a" * (limits.REQUEST_HEAD_MAX_BYTES + 1) + b"\r\n"
    async with listening() as listener:
        status, _, body = await exchange(listener.port, b"GET /metrics HTTP/1.1\r\n" + big)
    assert (status, error(body)["code"]) == (431, "headers_too_large")


async def test_a_stalled_head_gets_408_at_the_head_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(limits, "REQUEST_HEAD_TIMEOUT_S", 0.2)
    async with listening() as listener:
        loop = asyncio.get_running_loop()
        started = loop.time()
        status, _, body = await exchange(listener.port, b"GET /metr")
        waited = loop.time() - started
    assert (status, error(body)["code"]) == (408, "request_timeout")
    assert 0.2 <= waited < seconds(5)


async def test_connections_past_the_cap_get_503_and_the_rest_are_served(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(limits, "METRICS_MAX_CONNECTIONS", 2)
    async with listening() as listener:
        held = [await asyncio.open_connection("127.0.0.1", listener.port) for _ in range(2)]
        async with asyncio.timeout(seconds(5)):
            while len(listener.connections) < 2:
                await asyncio.sleep(0.01)  # bounded: the accepts land on this loop
        status, _, body = await exchange(listener.port, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert (status, error(body)["code"]) == (503, "service_unavailable")
        for _, writer in held:
            writer.close()
        async with asyncio.timeout(seconds(5)):
            while listener.connections:
                await asyncio.sleep(0.01)
        status, _, _ = await exchange(listener.port, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert status == 200


async def test_close_drops_open_connections() -> None:
    async with listening() as listener:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        async with asyncio.timeout(seconds(5)):
            while not listener.connections:
                await asyncio.sleep(0.01)
        listener.close()
        async with asyncio.timeout(seconds(5)):
            assert await reader.read() == b""
        writer.close()
