"""The gateway -> agent hop: forward the client's upgrade to the instance's ``/ws``.

The agent's uvicorn answers the client's own ``Sec-WebSocket-Key``, so its 101 response is
valid for the client as it stands and is forwarded verbatim. Subprotocol and extension
negotiation therefore happen end to end between the client and the agent; the gateway takes
no part in them and never sees a decoded frame.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from catflap.contract import headers as hdrs
from catflap.contract import limits
from catflap.contract.errors import CatflapMisuse, HeadersTooLarge, ServiceUnavailable
from catflap.gateway.httphead import RequestHead
from catflap.gateway.upgrade import UpgradeAccepted

__all__ = [
    "AgentSilent",
    "ResponseHeadReader",
    "UpstreamReply",
    "build_upstream_request",
    "check_forwardable",
    "connect_instance",
    "open_upstream",
    "response_status",
]


class AgentSilent(ServiceUnavailable):
    """The instance accepted the connection but did not answer the upgrade in time.

    Unlike a refused connection this is not retried on another instance: the request itself
    may be what stalls it, and each retry would hold the client and a slot for another bound.
    """


#: Client headers that are not passed on: connection-level ones, the ones the gateway sets
#: itself, and (for token agents) the Authorization that carried catflap's token.
_NOT_FORWARDED = frozenset(
    {
        "host",
        "connection",
        "upgrade",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "content-length",
        "x-forwarded-for",
    }
)


def build_upstream_request(
    head: RequestHead,
    accepted: UpgradeAccepted,
    *,
    client_host: str | None,
    transport_type: str | None,
    websocket_key: str | None = None,
) -> bytes:
    """The upgrade request the agent's ``/ws`` receives.

    Args:
        head: the client's request head.
        accepted: the result of the upgrade check.
        client_host: the client's address, appended to ``X-Forwarded-For``.
        transport_type: value for the transport-type header, or None to leave it out
            (pipecat then auto-detects a telephony provider).
        websocket_key: when the gateway itself accepted the client's WebSocket (provider
            endpoints), its own key for this hop; the client's negotiation headers then stay
            behind, since the agent's answer never reaches the client.
    """
    if accepted.agent is None:
        raise CatflapMisuse("the upstream request needs the agent to be known")
    target = hdrs.AGENT_PATH
    if accepted.body is not None:
        target += f"?{hdrs.QUERY_BODY}={accepted.body.forward}"
    lines = [
        f"GET {target} HTTP/1.1",
        "host: catflap-agent",
        "upgrade: websocket",
        "connection: Upgrade",
        f"{hdrs.SESSION_ID_HEADER}: {accepted.session_id}",
        f"{hdrs.MAX_SESSION_SECONDS_HEADER}: {accepted.agent.config.max_session_duration}",
    ]
    if transport_type is not None:
        lines.append(f"{hdrs.TRANSPORT_TYPE_HEADER}: {transport_type}")
    if websocket_key is not None:
        lines += [f"sec-websocket-key: {websocket_key}", "sec-websocket-version: 13"]
    lines += _client_lines(
        head,
        client_host=client_host,
        drop_authorization=accepted.claims is not None,
        own_key=websocket_key is not None,
    )
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


#: Header lines the gateway itself may put in a forwarded upgrade: host, upgrade, connection,
#: the session id, its time budget, the transport type, and (provider endpoints) a WebSocket
#: key and version of its own.
_OWN_HEADER_LINES = 8
#: The longest client address appended to ``X-Forwarded-For`` (an IPv6 address, text form).
_CLIENT_HOST_MAX_CHARS = 45


def check_forwardable(head: RequestHead, *, own_key: bool) -> None:
    """Refuse a head whose forwarded upgrade the agent runtime's parser would refuse.

    The runtime (websockets) reads at most ``REQUEST_HEADER_LINES_MAX`` header lines of at
    most ``REQUEST_HEADER_LINE_MAX_BYTES`` each, CRLF included; the gateway adds lines of its
    own and merges every ``X-Forwarded-For`` into one. Checked before any slot is reserved:
    a head the agent would refuse must not cost an instance (or three, with retries).

    Raises:
        HeadersTooLarge: 431.
    """
    lines = _client_lines(
        head, client_host="x" * _CLIENT_HOST_MAX_CHARS, drop_authorization=False, own_key=own_key
    )
    if len(lines) + _OWN_HEADER_LINES > limits.REQUEST_HEADER_LINES_MAX:
        raise HeadersTooLarge(
            f"too many header lines to forward: at most "
            f"{limits.REQUEST_HEADER_LINES_MAX - _OWN_HEADER_LINES}"
        )
    if any(len(line) + 2 > limits.REQUEST_HEADER_LINE_MAX_BYTES for line in lines):
        raise HeadersTooLarge(
            f"a header line (X-Forwarded-For values are merged into one) would be longer "
            f"than {limits.REQUEST_HEADER_LINE_MAX_BYTES} bytes"
        )


def _client_lines(
    head: RequestHead, *, client_host: str | None, drop_authorization: bool, own_key: bool
) -> list[str]:
    """The forwarded upgrade's header lines that come from the client."""
    lines = []
    forwarded_for = [v for k, v in head.headers if k == "x-forwarded-for"]
    if client_host:
        forwarded_for.append(client_host)
    if forwarded_for:
        lines.append("x-forwarded-for: " + ", ".join(forwarded_for))
    for name, value in head.headers:
        if name in _NOT_FORWARDED or name.startswith(hdrs.AGENT_HOP_PREFIXES):
            continue
        if name == "authorization" and drop_authorization:
            continue
        if own_key and name.startswith("sec-websocket-"):
            continue
        lines.append(f"{name}: {value}")
    return lines


@dataclass(frozen=True, slots=True)
class UpstreamReply:
    transport: asyncio.Transport
    status: int
    head: bytes
    trailing: bytes


class ResponseHeadReader(asyncio.Protocol):
    """Reads the agent's response head; the relay takes the transport over afterwards."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.buffer = bytearray()
        self.done: asyncio.Future[tuple[bytes, bytes]] = loop.create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            return  # decided: reading is paused, and nothing more is kept here
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end >= 0:
            self._stop_reading()  # the relay resumes it
            self.done.set_result((bytes(self.buffer[: end + 4]), bytes(self.buffer[end + 4 :])))
        elif len(self.buffer) > limits.UPSTREAM_RESPONSE_HEAD_MAX_BYTES:
            # Stop reading too: a caller may hold the connection a while before closing it
            # (a held POST /bot), and the buffer must not grow meanwhile.
            self._stop_reading()
            self.buffer.clear()
            self.done.set_exception(ConnectionError("agent response head too large"))

    def _stop_reading(self) -> None:
        assert self.transport is not None
        self.transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(
                ConnectionError("agent closed the connection during the upgrade")
            )


async def connect_instance(address: str, protocol: asyncio.Protocol) -> asyncio.Transport:
    """Open a connection to an instance, served by ``protocol`` (the caller bounds the wait).

    Args:
        address: ``unix:/path`` or ``tcp:host:port``, as the runtime reported it.

    Raises:
        OSError: the instance could not be reached.
    """
    loop = asyncio.get_running_loop()
    kind, _, where = address.partition(":")
    if kind == "unix":
        transport, _ = await loop.create_unix_connection(lambda: protocol, where)
    else:
        host, _, port = where.rpartition(":")
        transport, _ = await loop.create_connection(lambda: protocol, host, int(port))
    sock = transport.get_extra_info("socket")
    if kind == "tcp" and sock is not None:
        # Agent hosts on other machines: notice a dead path even when no byte flows.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    return transport


# One bound covers connect and response head, so the caller passes it in.
async def open_upstream(
    address: str,
    request: bytes,
    *,
    timeout: float,  # noqa: ASYNC109
    on_sent: Callable[[], None] | None = None,
) -> UpstreamReply:
    """Connect to an instance, send the upgrade, and wait for its response head.

    Args:
        address: ``unix:/path`` or ``tcp:host:port``, as the runtime reported it.
        on_sent: called once the request is written (from then on a bot may start).

    Raises:
        AgentSilent: 503, connected, but no answer to the upgrade in time.
        ServiceUnavailable: 503, the instance could not be reached.
    """
    protocol = ResponseHeadReader(asyncio.get_running_loop())
    connected = False
    try:
        async with asyncio.timeout(timeout):
            transport = await connect_instance(address, protocol)
            transport.write(request)
            connected = True
            if on_sent is not None:
                on_sent()
            try:
                head, trailing = await protocol.done
            except BaseException:
                transport.abort()
                raise
    except TimeoutError:
        if connected:
            raise AgentSilent(
                f"the agent instance did not answer the upgrade within {timeout:g} s; retry shortly"
            ) from None
        raise ServiceUnavailable(
            f"could not reach the agent instance within {timeout:g} s; retry shortly"
        ) from None
    except OSError as exc:
        raise ServiceUnavailable(
            f"could not reach the agent instance ({type(exc).__name__}); retry shortly"
        ) from None
    return UpstreamReply(
        transport=transport, status=response_status(head), head=head, trailing=trailing
    )


def response_status(head: bytes) -> int:
    """The status code of a response head; 0 when its status line is not one."""
    status_line = head.split(b"\r\n", 1)[0].split(b" ", 2)
    return int(status_line[1]) if len(status_line) > 1 and status_line[1].isdigit() else 0
