"""The gateway's per-connection front: read one request head, then pick who handles it.

- ``/ws`` and below: catflap's own upgrade path (``FrontRoutes.upgrade``, which runs
  :func:`~catflap.gateway.session.run_session`), which answers every refusal itself with a
  JSON error before any upgrade.
- anything else: the control API. The connection is handed, with every byte read so far, to
  uvicorn's HTTP protocol running the FastAPI app (uvicorn's own ``set_protocol`` hand-off,
  used the other way round).

:class:`Front` is the protocol factory the listening socket calls: it holds the connections
that have not been handed off yet and keeps all of them within ``[gateway] max_connections``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

from catflap.contract import limits
from catflap.contract.closecodes import CloseCode
from catflap.contract.errors import (
    RequestRejected,
    RequestTimeout,
    TooManyConnections,
    http_error_response,
)
from catflap.gateway.frames import close_frame
from catflap.gateway.httphead import HeadParser, RequestHead
from catflap.gateway.refusal import Refusals
from catflap.gateway.upgrade import is_websocket_path
from catflap.logs import LogBudget, not_logged

__all__ = ["Front", "FrontRoutes", "GatewayConnection", "Pending"]

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


@dataclass(frozen=True, slots=True)
class FrontRoutes:
    """Where a connection goes once its first head is read, and who answers refusals."""

    #: Takes an upgrade request on ``/ws...`` (reading is paused) and the bytes after its head.
    upgrade: Callable[[GatewayConnection, RequestHead, bytes], object]
    #: A new protocol for a control-API connection.
    api_protocol: Callable[[], asyncio.Protocol]
    refusals: Refusals


class Pending(Protocol):
    """A connection counted in the budget before a :class:`GatewayConnection` owns it: a TLS
    connection during its handshake (:mod:`catflap.gateway.tls`)."""

    def drop(self) -> None:
        """Close it now: the budget needs its place (it has sent no request yet)."""


class Front:
    """The connections not handed off yet, and the budget every open connection counts in."""

    def __init__(
        self,
        routes: FrontRoutes,
        *,
        max_connections: int,
        handed_off: Callable[[], int],
        head_timeout: float = limits.REQUEST_HEAD_TIMEOUT_S,
    ) -> None:
        """
        Args:
            max_connections: ``[gateway] max_connections``.
            handed_off: the connections open elsewhere now (in the API, or relayed).
            head_timeout: seconds a connection may take to send its first head.
        """
        self.routes = routes
        self.max_connections = max_connections
        self.head_timeout = head_timeout
        self._handed_off = handed_off
        #: In opening order, so the oldest idle one is found first.
        self.connections: dict[GatewayConnection, None] = {}
        #: TLS connections still in their handshake, oldest first: counted, not yet connections.
        self.pending: dict[Pending, None] = {}

    def __call__(self) -> GatewayConnection:
        """A protocol for a new client connection (``loop.create_server``'s factory)."""
        return GatewayConnection(self)

    def open_connections(self) -> int:
        """Client connections open now: in a TLS handshake, not yet handed off, in the API, or
        relayed."""
        return len(self.connections) + len(self.pending) + self._handed_off()

    def make_room(self) -> TooManyConnections | None:
        """Keep the open connections within ``max_connections`` for one more: when full, the
        oldest connection that has not sent a complete head yet goes (a plain one first, else
        the oldest TLS handshake).

        Returns:
            None when the newcomer fits; else the refusal to count and send it.
        """
        if self.open_connections() < self.max_connections:
            return None
        idle = next((c for c in self.connections if c.idle), None)
        pending = next(iter(self.pending), None) if idle is None else None
        refusal = TooManyConnections(
            f"the gateway holds its maximum of {self.max_connections} connections; retry shortly"
        )
        if idle is None and pending is None:
            _warn_at_capacity(refusal.message + "; refusing new ones")
            return refusal
        _warn_at_capacity(refusal.message + "; dropping the oldest idle one")
        if idle is not None:
            self.routes.refusals.reject(idle, refusal)
        else:
            assert pending is not None
            self.routes.refusals.count(str(refusal.status), refusal)
            self.pending.pop(pending, None)
            pending.drop()
        return None


class GatewayConnection(asyncio.Protocol):
    """Owns a client connection until its first request head has been read."""

    def __init__(self, front: Front, *, pending: Pending | None = None) -> None:
        """
        Args:
            pending: the TLS handshake this connection was counted as until now; it leaves
                :attr:`Front.pending` when the connection is made, so it counts once.
        """
        self.front = front
        self._pending = pending
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
        if self._pending is not None:
            self.front.pending.pop(self._pending, None)
            self._pending = None
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.front.head_timeout, self._head_timeout)
        if not self._admit_connection():
            return
        self.front.connections[self] = None

    @property
    def idle(self) -> bool:
        """True until a complete request head has been read."""
        return self._parser is not None

    def _admit_connection(self) -> bool:
        """Keep the open connections within ``max_connections`` (:meth:`Front.make_room`);
        with no room, this one is refused."""
        refusal = self.front.make_room()
        if refusal is None:
            return True
        # Not lingering: a newcomer has sent nothing yet, so closing cannot reset its answer,
        # and a connect flood must not hold uncounted sockets for seconds.
        self.front.routes.refusals.count(str(refusal.status), refusal)
        self._parser = None
        self._cancel_timer()
        self.transport.write(http_error_response(refusal))
        self.transport.close()
        return False

    def handed_off(self) -> None:
        """Another protocol owns the connection now (the API, or a relay leg)."""
        self.front.connections.pop(self, None)

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:
            if self.sink is not None:
                self.sink(data)
            return
        try:
            result = parser.feed(data)
        except RequestRejected as rejected:
            self.front.routes.refusals.reject(self, rejected)
            return
        if result is None:
            return
        self._cancel_timer()
        head, trailing = result
        self._parser = None
        if is_websocket_path(head.path):
            self.transport.pause_reading()
            self.front.routes.upgrade(self, head, trailing)
        else:
            self._hand_to_api(bytes(parser.raw))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.front.connections.pop(self, None)
        self._cancel_timer()
        if self.sink is not None:
            self.sink(None)

    def close_websocket(self, code: CloseCode, reason: str) -> None:
        """Close a WebSocket the gateway accepted itself (provider endpoints)."""
        self._linger(close_frame(code, reason, masked=False))

    def answer(self, rejected: RequestRejected) -> None:
        """Answer with the JSON error and close; nothing was upgraded. Not counted here:
        :class:`~catflap.gateway.refusal.Refusals` counts and calls this."""
        self._parser = None
        self._cancel_timer()
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
        protocol = self.front.routes.api_protocol()
        self.handed_off()
        self.transport.set_protocol(protocol)
        protocol.connection_made(self.transport)
        protocol.data_received(raw)

    def _head_timeout(self) -> None:
        self.front.routes.refusals.reject(
            self,
            RequestTimeout(f"the request head did not arrive within {self.front.head_timeout:g} s"),
        )

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
