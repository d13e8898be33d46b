"""The ``metrics_listen`` server: a second asyncio server that answers ``GET /metrics`` only.

It answers exactly one request per connection and closes it: the head is read with the
gateway's own parser and bounds (:class:`~catflap.gateway.httphead.HeadParser`: URL, header and
head sizes, ``REQUEST_HEAD_TIMEOUT_S``), at most ``METRICS_MAX_CONNECTIONS`` connections are
open, and a peer that does not read its answer is cut off after ``SLOW_PEER_TIMEOUT_S``. Who may
read is :func:`catflap.api.metrics.metrics_refusal`'s rule, the same as on the main port. Errors
are the same JSON as everywhere (:func:`~catflap.contract.errors.http_error_response`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, cast

from catflap.api.metrics import METRICS_PATH, PROXY_HEADERS, metrics_refusal
from catflap.contract import limits
from catflap.contract.errors import (
    MethodNotAllowed,
    NotFound,
    RequestRejected,
    RequestTimeout,
    ServiceUnavailable,
    http_error_response,
)
from catflap.gateway.httphead import HeadParser, RequestHead
from catflap.metrics import CONTENT_TYPE

if TYPE_CHECKING:
    from catflap.config import GatewaySettings
    from catflap.metrics import GatewayMetrics

__all__ = ["MetricsListener"]

log = logging.getLogger("catflap.gateway")


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
