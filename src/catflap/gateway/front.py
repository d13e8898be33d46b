"""The gateway's per-connection front: read one request head, then pick who handles it.

- ``/ws`` and below: catflap's own upgrade path (:func:`~catflap.gateway.session.run_session`),
  which answers every refusal itself with a JSON error before any upgrade.
- anything else: the control API. The connection is handed, with every byte read so far, to
  uvicorn's HTTP protocol running the FastAPI app (uvicorn's own ``set_protocol`` hand-off,
  used the other way round).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from catflap.contract import limits
from catflap.contract.closecodes import CloseCode
from catflap.contract.errors import (
    RequestRejected,
    RequestTimeout,
    TooManyConnections,
    http_error_response,
)
from catflap.gateway.frames import close_frame
from catflap.gateway.httphead import HeadParser
from catflap.gateway.session import count_refusal, run_session
from catflap.gateway.upgrade import is_websocket_path
from catflap.logs import LogBudget, not_logged

if TYPE_CHECKING:
    from catflap.gateway.server import Gateway

__all__ = ["GatewayConnection"]

log = logging.getLogger("catflap.gateway")


def _enable_keepalive(sock: socket.socket) -> None:
    """Detect half-open client connections even when no byte is in flight."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):  # Linux; macOS only has the on/off switch
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, limits.TCP_KEEPALIVE_IDLE_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, limits.TCP_KEEPALIVE_INTERVAL_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, limits.TCP_KEEPALIVE_COUNT)


#: The connection budget being full is logged once a second at most: a flood would flood it.
_capacity_warnings = LogBudget(1)


def _warn_at_capacity(message: str) -> None:
    skipped = _capacity_warnings.take()
    if skipped is not None:
        log.warning("! %s%s", message, not_logged(skipped))


class GatewayConnection(asyncio.Protocol):
    """Owns a client connection until its first request head has been read."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.transport: asyncio.Transport
        self.client_host: str | None = None
        self._parser: HeadParser | None = HeadParser()
        self._timer: asyncio.TimerHandle | None = None
        self.lost = False
        #: True once a 101 went out: from then on a failure is a close frame, not an HTTP error.
        self.upgraded = False
        #: While a provider's opening messages are read, bytes go here instead.
        self.sink: Callable[[bytes | None], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.client_host = str(peer[0])
        sock = transport.get_extra_info("socket")
        if sock is not None:
            _enable_keepalive(sock)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(limits.REQUEST_HEAD_TIMEOUT_S, self._head_timeout)
        if not self._admit_connection():
            return
        self.gateway.connections[self] = None

    def _admit_connection(self) -> bool:
        """Keep the open connections within ``max_connections``: the oldest connection that
        has not sent a complete head yet goes first; with none, this one is refused."""
        gateway = self.gateway
        if gateway.open_connections() < gateway.config.gateway.max_connections:
            return True
        idle = next((c for c in gateway.connections if c._parser is not None), None)
        refusal = TooManyConnections(
            f"the gateway holds its maximum of {gateway.config.gateway.max_connections} "
            "connections; retry shortly"
        )
        _warn_at_capacity(
            refusal.message
            + ("; refusing new ones" if idle is None else "; dropping the oldest idle one")
        )
        if idle is None:
            # Not lingering: a newcomer has sent nothing yet, so closing cannot reset its
            # answer, and a connect flood must not hold uncounted sockets for seconds.
            count_refusal(gateway, str(refusal.status), refusal)
            self._parser = None
            self._cancel_timer()
            self.transport.write(http_error_response(refusal))
            self.transport.close()
            return False
        idle.reject(refusal)
        return True

    def handed_off(self) -> None:
        """Another protocol owns the connection now (the API, or a relay leg)."""
        self.gateway.connections.pop(self, None)

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:
            if self.sink is not None:
                self.sink(data)
            return
        try:
            result = parser.feed(data)
        except RequestRejected as rejected:
            self.reject(rejected)
            return
        if result is None:
            return
        self._cancel_timer()
        head, trailing = result
        self._parser = None
        if is_websocket_path(head.path):
            self.transport.pause_reading()
            self.gateway.spawn(run_session(self.gateway, self, head, trailing))
        else:
            self._hand_to_api(bytes(parser.raw))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.gateway.connections.pop(self, None)
        self._cancel_timer()
        if self.sink is not None:
            self.sink(None)

    def close_websocket(self, code: CloseCode, reason: str) -> None:
        """Close a WebSocket the gateway accepted itself (provider endpoints)."""
        self._linger(close_frame(code, reason, masked=False))

    def reject(self, rejected: RequestRejected) -> None:
        """Answer with the JSON error and close; nothing was upgraded."""
        self._parser = None
        self._cancel_timer()
        count_refusal(self.gateway, str(rejected.status), rejected)
        self._linger(http_error_response(rejected))

    def _linger(self, last_words: bytes) -> None:
        """Send ``last_words``, then close without losing them.

        Closing a socket with unread input makes the kernel send a reset, which may discard
        the answer before the peer reads it; a peer still sending (a huge head, a flood) is
        exactly the one being refused. So, as nginx's ``lingering_close``: send, shut the write
        side, and read and drop what still comes until the peer closes, ``LINGERING_CLOSE_S``
        passes or ``LINGERING_CLOSE_MAX_BYTES`` came.
        """
        transport = self.transport
        if transport.is_closing():
            return
        transport.write(last_words)
        dropped = 0

        def discard(data: bytes | None) -> None:
            nonlocal dropped
            dropped += len(data or b"")
            if dropped > limits.LINGERING_CLOSE_MAX_BYTES:
                transport.abort()  # a flood, not a peer about to read the answer

        self.sink = discard
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        transport.resume_reading()
        self._cancel_timer()
        self._timer = asyncio.get_running_loop().call_later(
            limits.LINGERING_CLOSE_S, transport.abort
        )

    def _hand_to_api(self, raw: bytes) -> None:
        protocol = self.gateway.make_http_protocol()
        self.handed_off()
        self.transport.set_protocol(protocol)
        protocol.connection_made(self.transport)
        protocol.data_received(raw)

    def _head_timeout(self) -> None:
        self.reject(
            RequestTimeout(
                f"the request head did not arrive within {limits.REQUEST_HEAD_TIMEOUT_S:g} s"
            )
        )

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
