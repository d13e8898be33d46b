"""``GET /metrics``: who may read the gateway's metrics, on the main port or a listener of its own.

The metrics name every organization and agent, and count their sessions and refusals, so they
are not for anyone who can reach the gateway. ``[gateway]`` settings decide (one rule,
:func:`metrics_refusal`, for both places):

=======================  ===================================================================
neither set (default)    main port; loopback clients only (127.0.0.0/8, ::1), else 403
                         ``metrics_forbidden``. A request with a proxy's forwarding header
                         (``Forwarded``, ``X-Forwarded-For``, ``X-Real-IP``) is not loopback:
                         a proxy on this host relays someone else's request.
``metrics_key``          wherever /metrics is served: ``Authorization: Bearer <key>``, else
                         401 (compared in constant time; the key is never logged or echoed)
``metrics_listen``       only on that ``host:port`` (the main port answers 404
                         ``not_found``); anyone who reaches it may read, unless a key is set
=======================  ===================================================================

The separate listener (:class:`MetricsListener`) is a second asyncio server that answers
exactly one request per connection and closes it: the head is read with the gateway's own
parser and bounds (:class:`~catflap.gateway.httphead.HeadParser`: URL, header and head sizes,
``REQUEST_HEAD_TIMEOUT_S``), at most ``METRICS_MAX_CONNECTIONS`` connections are open, and a
peer that does not read its answer is cut off after ``SLOW_PEER_TIMEOUT_S``. Errors are the
same JSON as everywhere (:func:`~catflap.contract.errors.http_error_response`).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
from typing import TYPE_CHECKING, cast

from fastapi import APIRouter, Request
from fastapi.responses import Response

from catflap.api.auth import bearer_credentials
from catflap.contract import limits
from catflap.contract.errors import (
    MethodNotAllowed,
    MetricsForbidden,
    NotFound,
    RequestRejected,
    RequestTimeout,
    ServiceUnavailable,
    Unauthorized,
    http_error_response,
)
from catflap.gateway.httphead import HeadParser, RequestHead
from catflap.metrics import CONTENT_TYPE

if TYPE_CHECKING:
    from catflap.config import GatewaySettings
    from catflap.metrics import GatewayMetrics

__all__ = [
    "METRICS_PATH",
    "PROXY_HEADERS",
    "MetricsListener",
    "is_loopback",
    "metrics_refusal",
    "metrics_router",
]

log = logging.getLogger("catflap.gateway")

METRICS_PATH = "/metrics"
#: Headers a reverse proxy adds for the client it relays; their presence means the TCP peer
#: (perhaps 127.0.0.1) is not the client.
PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")
_LOOPBACK_V4 = ipaddress.ip_network("127.0.0.0/8")


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (a peer address as text) is on loopback: 127.0.0.0/8, ``::1``, or an
    IPv4-mapped 127.x address (a dual-stack socket's view of an IPv4 loopback peer).

    Anything else is not: names, Unix sockets (``None``), unparsable text.
    """
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host.partition("%")[0])  # drop an IPv6 zone id
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        if mapped is None:
            return address == ipaddress.IPv6Address("::1")
        address = mapped
    return address in _LOOPBACK_V4


def metrics_refusal(
    settings: GatewaySettings,
    *,
    on_listener: bool,
    authorization: str | None,
    client_host: str | None,
    proxied: bool,
) -> RequestRejected | None:
    """Why this ``GET /metrics`` may not be answered, or None when it may.

    Args:
        settings: the gateway's ``[gateway]`` settings.
        on_listener: the request came to the ``metrics_listen`` listener, not the main port.
        authorization: the ``Authorization`` header, if any.
        client_host: the client's address as the HTTP server saw it.
        proxied: the request carries one of :data:`PROXY_HEADERS`.
    """
    if settings.metrics_listen is not None and not on_listener:
        # Not "served elsewhere": the main port does not say where the metrics are.
        return NotFound("not found")
    if settings.metrics_key is not None:
        presented = bearer_credentials(authorization)
        expected = settings.metrics_key.get_secret_value().encode()
        # compare_digest on bytes: constant time for equal lengths, and no TypeError for a
        # header with non-ASCII characters.
        if presented is None or not hmac.compare_digest(presented.encode(), expected):
            return Unauthorized(
                "GET /metrics needs Authorization: Bearer <[gateway] metrics_key>",
                headers=[("www-authenticate", 'Bearer realm="catflap metrics"')],
            )
        return None
    if on_listener:
        return None  # the operator chose who can reach metrics_listen
    if proxied or not is_loopback(client_host):
        return MetricsForbidden(
            "GET /metrics is served to loopback clients only: set [gateway] metrics_key, or "
            "metrics_listen for a separate metrics port"
        )
    return None


def metrics_router(*, settings: GatewaySettings, metrics: GatewayMetrics) -> APIRouter:
    """``GET /metrics`` on the main port (the control API's FastAPI app).

    Args:
        settings: ``[gateway]``: who may read (``metrics_key``, ``metrics_listen``).
        metrics: what is rendered.
    """
    router = APIRouter()

    @router.get(METRICS_PATH, include_in_schema=False)
    async def render(request: Request) -> Response:
        refusal = metrics_refusal(
            settings,
            on_listener=False,
            authorization=request.headers.get("authorization"),
            client_host=request.client.host if request.client else None,
            proxied=any(name in request.headers for name in PROXY_HEADERS),
        )
        if refusal is not None:
            raise refusal
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return router


class MetricsListener:
    """The ``metrics_listen`` server: ``GET /metrics`` and nothing else.

    Args:
        settings: ``[gateway]``; a ``metrics_key`` there is required of every request.
        metrics: what a request reads.
    """

    def __init__(self, *, settings: GatewaySettings, metrics: GatewayMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.connections: set[_MetricsConnection] = set()
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _MetricsConnection(self), host, port, reuse_address=True
        )
        log.info(
            "= metrics listening on %s:%d%s",
            host,
            self.port,
            " (bearer key required)" if self.settings.metrics_key else "",
        )

    @property
    def port(self) -> int:
        assert self._server is not None and self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    def close(self) -> None:
        """Stop listening and drop open connections (each holds one short request at most)."""
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.transport.abort()

    def answer(self, head: RequestHead, client_host: str | None) -> bytes:
        """The complete response to one request on this listener."""
        if head.path != METRICS_PATH:
            return http_error_response(NotFound(f"not found: this port serves only {METRICS_PATH}"))
        if head.method != "GET":
            return http_error_response(
                MethodNotAllowed(f"{METRICS_PATH} answers GET only", headers=[("allow", "GET")])
            )
        refusal = metrics_refusal(
            self.settings,
            on_listener=True,
            authorization=head.header("authorization"),
            client_host=client_host,
            proxied=any(head.header(name) is not None for name in PROXY_HEADERS),
        )
        if refusal is not None:
            return http_error_response(refusal)
        payload = self.metrics.render()
        head_lines = (
            "HTTP/1.1 200 OK\r\n"
            f"content-type: {CONTENT_TYPE}\r\n"
            f"content-length: {len(payload)}\r\n"
            "connection: close\r\n\r\n"
        )
        return head_lines.encode("latin-1") + payload


class _MetricsConnection(asyncio.Protocol):
    """One connection to the metrics listener: one request head, one answer, close."""

    def __init__(self, listener: MetricsListener) -> None:
        self.listener = listener
        self.transport: asyncio.Transport
        self._client_host: str | None = None
        self._parser: HeadParser | None = HeadParser()
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self._client_host = str(peer[0])
        self.listener.connections.add(self)
        if len(self.listener.connections) > limits.METRICS_MAX_CONNECTIONS:
            self._finish(
                http_error_response(
                    ServiceUnavailable(
                        f"the metrics listener holds its maximum of "
                        f"{limits.METRICS_MAX_CONNECTIONS} connections; retry shortly"
                    )
                )
            )
            return
        self._timer = asyncio.get_running_loop().call_later(
            limits.REQUEST_HEAD_TIMEOUT_S, self._head_timeout
        )

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:
            return  # answered already: a body or a pipelined request is not read
        try:
            result = parser.feed(data)
        except RequestRejected as rejected:
            self._finish(http_error_response(rejected))
            return
        if result is not None:
            self._finish(self.listener.answer(result[0], self._client_host))

    def connection_lost(self, exc: Exception | None) -> None:
        self._parser = None
        self._cancel_timer()
        self.listener.connections.discard(self)

    def _head_timeout(self) -> None:
        self._timer = None
        self._finish(
            http_error_response(
                RequestTimeout(
                    f"the request head did not arrive within {limits.REQUEST_HEAD_TIMEOUT_S:g} s"
                )
            )
        )

    def _finish(self, response: bytes) -> None:
        """Write the one answer and close; a peer that does not read it is cut off."""
        self._parser = None
        self._cancel_timer()
        if self.transport.is_closing():
            return
        self.transport.write(response)
        self.transport.close()
        self._timer = asyncio.get_running_loop().call_later(
            limits.SLOW_PEER_TIMEOUT_S, self.transport.abort
        )

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
