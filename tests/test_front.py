"""The per-connection front without sockets: head limits, the hand-off decided on bytes, and
the connection budget, over a transport that records what the gateway does to it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest

from catflap.contract import limits
from catflap.gateway.front import Front, FrontRoutes, GatewayConnection
from catflap.gateway.httphead import RequestHead
from catflap.gateway.refusal import Refusals
from catflap.metrics import GatewayMetrics

from .conftest import upgrade_request


class RecordingTransport:
    """The asyncio.Transport calls front.py makes, recorded."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = self.aborted = self.eof = False
        self.paused = False
        self.protocol: asyncio.BaseProtocol | None = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("10.0.0.7", 40000) if name == "peername" else default

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol | None:
        return self.protocol

    def status(self) -> int:
        return int(self.written.split(b" ", 2)[1])

    def body(self) -> dict[str, str]:
        body: dict[str, str] = json.loads(self.written.partition(b"\r\n\r\n")[2])
        return body


class RecordingApi(asyncio.Protocol):
    def __init__(self) -> None:
        self.received = bytearray()
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received += data


class Harness:
    def __init__(self, *, max_connections: int = 10, handed_off: int = 0, **front: Any) -> None:
        self.upgrades: list[tuple[GatewayConnection, RequestHead, bytes]] = []
        self.api: list[RecordingApi] = []
        self.metrics = GatewayMetrics()
        self.others = handed_off
        self.front = Front(
            FrontRoutes(
                upgrade=lambda conn, head, trailing: self.upgrades.append((conn, head, trailing)),
                api_protocol=self._api,
                refusals=Refusals(self.metrics),
            ),
            max_connections=max_connections,
            handed_off=lambda: self.others,
            **front,
        )

    def _api(self) -> asyncio.Protocol:
        self.api.append(RecordingApi())
        return self.api[-1]

    def connect(self) -> tuple[GatewayConnection, RecordingTransport]:
        conn = self.front()
        transport = RecordingTransport()
        fake: Any = transport
        conn.connection_made(fake)
        return conn, transport

    def refused(self, status: int, reason: str) -> float:
        labels = {"status": str(status), "reason": reason}
        value = self.metrics.registry.get_sample_value("catflap_handshake_refusals_total", labels)
        return value or 0.0


def feed_in_pieces(conn: GatewayConnection, data: bytes, size: int = 7) -> None:
    """Deliver ``data`` in reads of ``size`` bytes to whichever protocol owns the transport."""
    transport: RecordingTransport = conn.transport  # type: ignore[assignment]
    for start in range(0, len(data), size):
        protocol = transport.protocol or conn
        assert isinstance(protocol, asyncio.Protocol)
        protocol.data_received(data[start : start + size])


async def test_an_upgrade_head_in_pieces_goes_to_the_upgrade_path_with_what_followed() -> None:
    harness = Harness()
    conn, transport = harness.connect()
    request = upgrade_request("/ws/generic/echo.my-org")
    feed_in_pieces(conn, request[:-3])
    conn.data_received(request[-3:] + b"\x81\x00early")  # the head ends inside this read
    ((routed, head, trailing),) = harness.upgrades
    assert routed is conn and head.path == "/ws/generic/echo.my-org"
    assert trailing == b"\x81\x00early"
    assert transport.paused  # the upgrade path decides when to read again
    assert conn.client_host == "10.0.0.7"
    assert harness.front.connections == {conn: None}  # counted until a relay takes it


async def test_any_other_path_is_handed_to_the_api_with_every_byte_read() -> None:
    harness = Harness()
    conn, transport = harness.connect()
    request = b"GET /v1/public/echo/start HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\n"
    feed_in_pieces(conn, request + b'{"a": 1}\n')
    assert harness.upgrades == []
    (api,) = harness.api
    assert transport.protocol is api and api.transport is transport
    # Every byte, head included, reaches uvicorn, which parses the head again.
    assert bytes(api.received) == request + b'{"a": 1}\n'
    assert harness.front.connections == {}


@pytest.mark.parametrize(
    ("request_bytes", "status", "reason"),
    [
        (b"GET /" + b"a" * limits.REQUEST_URL_MAX_BYTES + b" HTTP/1.1\r\n", 414, "url_too_long"),
        (
            b"GET /ws HTTP/1.1\r\nx: " + b"v" * limits.REQUEST_HEADER_LINE_MAX_BYTES + b"\r\n\r\n",
            431,
            "headers_too_large",
        ),
        (
            b"GET /ws HTTP/1.1\r\n" + b"x: v\r\n" * (limits.REQUEST_HEADER_LINES_MAX + 1) + b"\r\n",
            431,
            "headers_too_large",
        ),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400, "malformed_request"),
    ],
    ids=["url", "header-line", "header-count", "tls-hello"],
)
async def test_a_head_past_a_limit_is_refused_counted_and_lingered_on(
    request_bytes: bytes, status: int, reason: str
) -> None:
    harness = Harness()
    conn, transport = harness.connect()
    feed_in_pieces(conn, request_bytes, size=512)
    assert (transport.status(), transport.body()["code"]) == (status, reason)
    assert harness.refused(status, reason) == 1
    assert transport.eof and not transport.closed  # the answer is not lost to a reset
    assert harness.upgrades == [] and harness.api == []
    conn.data_received(b"more of the flood")  # read and dropped while lingering
    assert transport.written.count(b"HTTP/1.1") == 1


async def test_a_head_that_does_not_arrive_in_time_is_a_408() -> None:
    harness = Harness(head_timeout=0)  # the bound itself is limits.REQUEST_HEAD_TIMEOUT_S
    conn, transport = harness.connect()
    conn.data_received(b"GET /ws HT")
    await _until(lambda: bool(transport.written))
    assert (transport.status(), transport.body()["code"]) == (408, "request_timeout")


async def test_at_the_budget_the_oldest_idle_connection_makes_room() -> None:
    harness = Harness(max_connections=2)
    oldest, oldest_transport = harness.connect()
    busy, busy_transport = harness.connect()
    busy.data_received(upgrade_request("/ws/generic/echo.my-org"))  # a head arrived: not idle
    newcomer, newcomer_transport = harness.connect()
    assert oldest_transport.status() == 503
    assert oldest_transport.body()["code"] == "too_many_connections"
    assert not busy_transport.written and not newcomer_transport.written
    # The refused one still counts until it has closed: its answer is still being read.
    assert list(harness.front.connections) == [oldest, busy, newcomer]
    assert harness.refused(503, "too_many_connections") == 1


async def test_with_no_idle_connection_to_drop_a_newcomer_is_refused_at_once() -> None:
    harness = Harness(max_connections=2, handed_off=2)  # two relayed sessions hold the budget
    conn, transport = harness.connect()
    assert transport.status() == 503
    assert transport.closed and not transport.eof  # no lingering: it sent nothing yet
    assert harness.front.connections == {}
    conn.data_received(upgrade_request("/ws/generic/echo.my-org"))
    assert harness.upgrades == []  # never parsed


async def test_a_lost_connection_leaves_the_budget_and_tells_its_sink() -> None:
    harness = Harness()
    conn, _ = harness.connect()
    conn.data_received(upgrade_request("/ws/generic/echo.my-org"))
    seen: list[bytes | None] = []
    conn.sink = seen.append
    conn.data_received(b"while admitted")
    conn.connection_lost(None)
    assert seen == [b"while admitted", None]
    assert conn.lost and harness.front.connections == {}


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(100):  # loop turns, not seconds: the timer is due at once
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")
