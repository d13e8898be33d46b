"""The gateway -> agent hop without sockets: the forwarded upgrade, byte for byte, and the
agent's answer read by the response-head protocol."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from catflap.auth.tokens import TokenClaims, mint_token
from catflap.config import AgentConfig, AgentSpec
from catflap.contract import limits
from catflap.contract.errors import HeadersTooLarge
from catflap.contract.names import AgentName, OrgName, ServiceHost
from catflap.gateway.httphead import RequestHead
from catflap.gateway.upgrade import UpgradeAccepted
from catflap.gateway.upstream import (
    ResponseHeadReader,
    build_upstream_request,
    check_forwardable,
    response_status,
)

from .conftest import ECHO, TEST_KEYRING

AGENT = AgentSpec(ServiceHost(AgentName("echo"), OrgName("org")), AgentConfig(path=ECHO))
SECONDS = AGENT.config.max_session_duration


def client_head(*extra: tuple[str, str]) -> RequestHead:
    headers = [
        ("host", "gateway.example"),
        ("upgrade", "websocket"),
        ("connection", "Upgrade"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("sec-websocket-version", "13"),
        *extra,
    ]
    return RequestHead("GET", "/ws/generic/echo.org", "1.1", headers, upgrade=True)


def accepted(*, claims: TokenClaims | None = None) -> UpgradeAccepted:
    return UpgradeAccepted(agent=AGENT, session_id="sid-1", provider=None, claims=claims, body=None)


def test_the_forwarded_head_is_exactly_the_agent_hop_request() -> None:
    request = build_upstream_request(
        client_head(("user-agent", "probe/1")),
        accepted(),
        client_host="10.0.0.7",
        transport_type="websocket",
    )
    assert (
        request
        == (
            "GET /ws HTTP/1.1\r\n"
            "host: catflap-agent\r\n"
            "upgrade: websocket\r\n"
            "connection: Upgrade\r\n"
            "x-daily-session-id: sid-1\r\n"
            f"x-pcc-max-session-seconds: {SECONDS}\r\n"
            "x-catflap-transport-type: websocket\r\n"
            "x-forwarded-for: 10.0.0.7\r\n"
            "sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "sec-websocket-version: 13\r\n"
            "user-agent: probe/1\r\n"
            "\r\n"
        ).encode()
    )


@pytest.mark.parametrize(
    "spoofed",
    [
        ("x-daily-session-id", "someone-else"),
        ("x-daily-room-url", "https://evil.example"),
        ("x-pcc-max-session-seconds", "999999"),
        ("x-catflap-transport-type", "twilio"),
    ],
)
def test_client_sent_reserved_headers_are_stripped(spoofed: tuple[str, str]) -> None:
    request = build_upstream_request(
        client_head(spoofed), accepted(), client_host=None, transport_type=None
    )
    lines = request.decode().split("\r\n")
    assert f"{spoofed[0]}: {spoofed[1]}" not in lines
    assert "x-daily-session-id: sid-1" in lines  # the gateway's own value only


def test_connection_level_headers_are_not_forwarded() -> None:
    request = build_upstream_request(
        client_head(("keep-alive", "5"), ("te", "trailers"), ("content-length", "0")),
        accepted(),
        client_host=None,
        transport_type=None,
    )
    names = [line.partition(":")[0] for line in request.decode().split("\r\n")[1:] if line]
    assert names.count("host") == names.count("upgrade") == names.count("connection") == 1
    assert not {"keep-alive", "te", "content-length"} & set(names)


def test_forwarded_for_values_are_merged_with_the_client_address_last() -> None:
    request = build_upstream_request(
        client_head(("x-forwarded-for", "1.1.1.1"), ("x-forwarded-for", "2.2.2.2")),
        accepted(),
        client_host="3.3.3.3",
        transport_type=None,
    )
    lines = request.decode().split("\r\n")
    assert [line for line in lines if line.startswith("x-forwarded-for")] == [
        "x-forwarded-for: 1.1.1.1, 2.2.2.2, 3.3.3.3"
    ]


def test_the_token_carrying_authorization_stays_behind_for_token_agents() -> None:
    _, claims = mint_token(TEST_KEYRING, "echo.org", now=1_800_000_000)
    head = client_head(("authorization", "Bearer tok"))
    with_token = build_upstream_request(
        head, accepted(claims=claims), client_host=None, transport_type=None
    )
    without = build_upstream_request(head, accepted(), client_host=None, transport_type=None)
    assert b"authorization:" not in with_token
    assert b"authorization: Bearer tok\r\n" in without


def test_a_key_of_its_own_replaces_the_clients_negotiation_headers() -> None:
    request = build_upstream_request(
        client_head(("sec-websocket-protocol", "chat")),
        accepted(),
        client_host=None,
        transport_type=None,
        websocket_key="b3duLWtleS0xMjM0NTY3OA==",
    )
    lines = request.decode().split("\r\n")
    assert [line for line in lines if line.startswith("sec-websocket-")] == [
        "sec-websocket-key: b3duLWtleS0xMjM0NTY3OA==",
        "sec-websocket-version: 13",
    ]
    assert not any(line.startswith("x-catflap-transport-type") for line in lines)


def test_a_head_the_agent_would_refuse_is_refused_before_any_slot() -> None:
    many = [(f"x-h{i}", "v") for i in range(limits.REQUEST_HEADER_LINES_MAX)]
    with pytest.raises(HeadersTooLarge):
        check_forwardable(client_head(*many), own_key=False)
    long_line = ("x-forwarded-for", "9" * limits.REQUEST_HEADER_LINE_MAX_BYTES)
    with pytest.raises(HeadersTooLarge):
        check_forwardable(client_head(long_line), own_key=False)
    check_forwardable(client_head(("user-agent", "probe/1")), own_key=False)


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n", 101),
        (b"HTTP/1.1 503 Service Unavailable\r\n\r\n", 503),
        (b"HTTP/1.1 403\r\n\r\n", 403),
        (b"garbage\r\n\r\n", 0),
        (b"HTTP/1.1 abc Nope\r\n\r\n", 0),
    ],
)
def test_the_agents_status_line_is_parsed(head: bytes, status: int) -> None:
    assert response_status(head) == status


class _Transport:
    """What the response-head protocol calls on its transport."""

    def __init__(self) -> None:
        self.paused = False

    def pause_reading(self) -> None:
        self.paused = True


async def _protocol() -> tuple[ResponseHeadReader, _Transport]:
    protocol = ResponseHeadReader(asyncio.get_running_loop())
    transport = _Transport()
    fake: Any = transport
    protocol.connection_made(fake)
    return protocol, transport


async def test_the_101_is_split_from_the_agents_first_frames_and_reading_pauses() -> None:
    protocol, transport = await _protocol()
    protocol.data_received(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: web")
    assert not protocol.done.done()
    protocol.data_received(b"socket\r\n\r\n\x81\x05hello")
    head, trailing = await protocol.done
    assert head == b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n"
    assert trailing == b"\x81\x05hello"  # the relay sends these to the client first
    assert transport.paused


async def test_a_response_head_past_its_bound_is_an_error_and_nothing_more_is_kept() -> None:
    protocol, transport = await _protocol()
    protocol.data_received(b"HTTP/1.1 101 OK\r\n" + b"x" * limits.UPSTREAM_RESPONSE_HEAD_MAX_BYTES)
    with pytest.raises(ConnectionError, match="too large"):
        await protocol.done
    # A caller may hold the connection before closing it (a held POST /bot): reading stops,
    # and bytes already in flight are dropped, not buffered.
    assert transport.paused and len(protocol.buffer) == 0
    protocol.data_received(b"y" * 65536)
    assert len(protocol.buffer) == 0


async def test_bytes_after_the_head_wait_for_the_relay_and_are_not_buffered_here() -> None:
    protocol, transport = await _protocol()
    protocol.data_received(b"HTTP/1.1 200 OK\r\n\r\n{}")
    assert transport.paused and (await protocol.done)[1] == b"{}"
    protocol.data_received(b"z" * 65536)  # would be a transport that ignored the pause
    assert len(protocol.buffer) == len(b"HTTP/1.1 200 OK\r\n\r\n{}")


async def test_an_agent_that_closes_during_the_upgrade_is_an_error() -> None:
    protocol, _ = await _protocol()
    protocol.data_received(b"HTTP/1.1 1")
    protocol.connection_lost(None)
    with pytest.raises(ConnectionError, match="closed the connection"):
        await protocol.done
