"""The control API's HTTP protocol: uvicorn's httptools protocol, bounded on every request.

Why this exists: the gateway reads the first request head of a connection itself, within the
``REQUEST_*`` limits (:mod:`catflap.gateway.front`), and hands a control-API connection to
uvicorn. uvicorn bounds nothing after that. On a kept-alive connection a client could send a
second request with megabytes of headers (uvicorn keeps every one, and httptools copies a
half-received header line into a new ``bytes`` on every read), or send one byte of it and wait
(uvicorn's only timer is the keep-alive one, which that byte cancels), or dribble a body for
ever. With many such connections the gateway runs out of memory or file descriptors.

:class:`BoundedHttpToolsProtocol` applies the first request's limits to every request on the
connection, the first one included (front.py passes its raw bytes on, and they are parsed
again here):

- head: 414 ``url_too_long`` past ``REQUEST_URL_MAX_BYTES``; 431 ``headers_too_large`` past
  ``REQUEST_HEAD_MAX_BYTES``, past ``REQUEST_HEADER_LINES_MAX`` header lines, or for a header
  line longer than ``REQUEST_HEADER_LINE_MAX_BYTES``. Chunked trailers are header lines too
  and count against the same limits.
- time: 408 ``request_timeout`` when a head is not complete ``REQUEST_HEAD_TIMEOUT_S`` after
  its first byte, or a body ``REQUEST_BODY_TIMEOUT_S`` after its head (if the app has already
  begun its answer, the connection is just closed). An idle kept-alive connection is closed
  after uvicorn's ``timeout_keep_alive`` (``KEEPALIVE_IDLE_TIMEOUT_S``, set by
  :class:`catflap.gateway.apiconnections.ApiConnections`).
- malformed bytes: 400 ``malformed_request`` as JSON, instead of uvicorn's text/plain 400.

Every refusal is :func:`~catflap.contract.errors.http_error_response` and a lingering close
(``LINGERING_CLOSE_S``, as in front.py). When the answer to an earlier (pipelined) request is
still owed or under way, there is only the close: the client would read the refusal as that
answer. A clock does not run out while the wait is the server's: uvicorn paused reading, or an
earlier answer is still owed.

It stays cheap: the checks run in httptools' callbacks (once per target piece, header line or
message) and once per chunk read; nothing loops over bytes in Python, and a timer is armed only
when a request is still incomplete at the end of a read.

Head sizes are measured two ways. The parts httptools hands over (target pieces, complete
header lines) are counted exactly. A header line httptools has not finished yet stays inside
httptools, so while a head is incomplete after a read, the whole read counts as head bytes (it
cannot be anything else); that bounds what httptools buffers to one read past the limit. In
the rare read where an earlier pipelined message ended and a new head began, only the handed
over parts count, so the measure never exceeds the true size (front.py's exact check on the
first head is never contradicted here). Whitespace that httptools drops is not counted; it is
not kept either.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from catflap.contract import limits
from catflap.contract.errors import (
    HeadersTooLarge,
    MalformedRequest,
    RequestRejected,
    RequestTimeout,
    UrlTooLong,
    http_error_response,
)

__all__ = ["BoundedHttpToolsProtocol"]

# Where the connection's current request is. IDLE: between requests (uvicorn's keep-alive timer
# may run); HEAD: a byte of a request arrived, its head is not complete; BODY: head complete,
# body not complete.
_IDLE = 0
_HEAD = 1
_BODY = 2


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's :class:`HttpToolsProtocol` with catflap's head, time and size bounds.

    Args:
        config: uvicorn's loaded config (its ``timeout_keep_alive`` bounds idle connections).
        server_state: shared uvicorn server state (connections, tasks).
        app_state: the ASGI ``state`` copied into each request scope.
        on_refusal: called with each refusal this protocol answers (for metrics).
        _loop: the event loop (uvicorn's own parameter).
    """

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        *,
        on_refusal: Callable[[RequestRejected], None] | None = None,
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._on_refusal = on_refusal
        self._phase = _IDLE
        #: loop.time() by which the current head or body must be complete.
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._refused = False
        self._dropped = 0
        #: Head bytes httptools handed over (target + complete header lines), and header lines.
        self._visible = 0
        self._lines = 0
        #: Head bytes counted from whole reads that ended with the head incomplete.
        self._head_bytes = 0
        #: Bytes of whole reads, in a body, that carried no body byte (trailers, chunk framing).
        self._bodyless = 0
        # Per read: body bytes seen, and whether a message boundary fell inside it.
        self._read_body = 0
        self._crossed = False

    # --- asyncio.Protocol ----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        """Parse ``data`` (uvicorn), then bound the request it leaves incomplete.

        Refusals are written to the transport, which is then closed (lingering, see
        :meth:`_stop`); nothing is raised. Refusals: 414 :class:`UrlTooLong`, 431
        :class:`HeadersTooLarge`, 400 :class:`MalformedRequest` (from the callbacks); 408
        :class:`RequestTimeout` later, from the deadline timer armed here.
        """
        if self._refused:
            # Lingering: dropped, up to a bound past which the peer is flooding, not reading.
            self._dropped += len(data)
            if self._dropped > limits.LINGERING_CLOSE_MAX_BYTES:
                self.transport.abort()
            return
        started = self._phase
        if started == _IDLE:
            # The first byte of the next request starts its head clock, even a stray CRLF that
            # httptools skips without beginning a message: super() cancels uvicorn's keep-alive
            # timer on any byte, so without this a lone byte would hold the connection for ever.
            self._begin_head()
        self._read_body = 0
        self._crossed = False
        super().data_received(data)
        if self._refused or self.transport.is_closing():
            return
        if self._phase == _HEAD:
            if self._crossed:
                # An earlier message ended in this read: only the handed-over parts are known
                # to be this head's.
                self._head_bytes = self._visible
            else:
                self._head_bytes += len(data)
            if self._head_bytes > limits.REQUEST_HEAD_MAX_BYTES:
                self._refuse(
                    HeadersTooLarge(
                        f"request head larger than {limits.REQUEST_HEAD_MAX_BYTES} bytes"
                    )
                )
                return
        elif self._phase == _BODY and started == _BODY and not self._crossed:
            # Bytes of a body that are not body are chunk framing or trailers; httptools keeps
            # a half-received trailer line itself, so bound them like a head.
            if self._read_body:
                self._bodyless = 0
            else:
                self._bodyless += len(data)
                if self._bodyless > limits.REQUEST_HEAD_MAX_BYTES:
                    self._refuse(
                        HeadersTooLarge(
                            f"chunked trailers larger than {limits.REQUEST_HEAD_MAX_BYTES} bytes"
                        )
                    )
                    return
        if self._phase != _IDLE and self._timer is None:
            self._timer = self.loop.call_at(self._deadline, self._deadline_passed)

    def connection_lost(self, exc: Exception | None) -> None:
        # The timer holds a reference to this protocol: cancel it, so a closed connection is
        # freed now rather than at its deadline.
        self._cancel_timer()
        super().connection_lost(exc)

    # --- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._refused:
            return
        if self._phase != _HEAD:
            # A pipelined request right after the end of the previous one, in the same read.
            self._begin_head()
            self._crossed = True
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        if self._refused:
            return
        if len(self.url) + len(url) > limits.REQUEST_URL_MAX_BYTES:
            self._refuse(
                UrlTooLong(f"request target longer than {limits.REQUEST_URL_MAX_BYTES} bytes")
            )
            return
        self._visible += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._refused:
            return
        # ``name: value``, measured as front.py measures the first head (so it passes here too).
        line = len(name) + len(value) + 2
        self._lines += 1
        self._visible += line + 2  # and its CRLF
        if line + 2 > limits.REQUEST_HEADER_LINE_MAX_BYTES:  # CRLF included, as in front.py
            message = f"header line longer than {limits.REQUEST_HEADER_LINE_MAX_BYTES} bytes"
        elif self._lines > limits.REQUEST_HEADER_LINES_MAX:
            message = f"more than {limits.REQUEST_HEADER_LINES_MAX} header lines"
        elif self._visible > limits.REQUEST_HEAD_MAX_BYTES:
            message = f"request head larger than {limits.REQUEST_HEAD_MAX_BYTES} bytes"
        else:
            super().on_header(name, value)
            return
        self._refuse(HeadersTooLarge(message))

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._phase = _BODY
        self._deadline = self.loop.time() + limits.REQUEST_BODY_TIMEOUT_S
        self._bodyless = 0
        self._crossed = True
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self._refused:
            return
        self._read_body += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._phase = _IDLE
        self._crossed = True
        self._cancel_timer()
        super().on_message_complete()

    # --- uvicorn hooks -------------------------------------------------------------------------

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes httptools cannot parse, in catflap's JSON shape."""
        self._refuse(MalformedRequest("malformed HTTP request"))

    # --- bounds --------------------------------------------------------------------------------

    def _begin_head(self) -> None:
        self._phase = _HEAD
        self._deadline = self.loop.time() + limits.REQUEST_HEAD_TIMEOUT_S
        self._visible = 0
        self._lines = 0
        self._head_bytes = 0

    def _deadline_passed(self) -> None:
        self._timer = None
        if self._refused or self._phase == _IDLE or self.transport.is_closing():
            return
        now = self.loop.time()
        if now < self._deadline:
            # A later request's clock: the timer was armed for an earlier one.
            self._timer = self.loop.call_at(self._deadline, self._deadline_passed)
            return
        if self.flow.read_paused or (self._phase == _HEAD and self._earlier_answer_owed()):
            # The wait is the server's, not the client's: uvicorn stopped reading (a pipelined
            # request waits for the one before it, or the app has not taken the body so far),
            # or the client may be waiting for the answer to its previous request. The clock
            # starts again; the app's own work bounds how often.
            timeout = (
                limits.REQUEST_HEAD_TIMEOUT_S
                if self._phase == _HEAD
                else limits.REQUEST_BODY_TIMEOUT_S
            )
            self._deadline = now + timeout
            self._timer = self.loop.call_at(self._deadline, self._deadline_passed)
            return
        if self._phase == _HEAD:
            message = f"the request head did not arrive within {limits.REQUEST_HEAD_TIMEOUT_S:g} s"
        else:
            message = (
                f"the request body did not arrive within {limits.REQUEST_BODY_TIMEOUT_S:g} s "
                "of its head"
            )
        self._refuse(RequestTimeout(message))

    def _earlier_answer_owed(self) -> bool:
        """Whether the answer to a request before the current head is not complete yet."""
        cycle: RequestResponseCycle | None = self.cycle
        return bool(self.pipeline) or (cycle is not None and not cycle.response_complete)

    def _may_answer(self) -> bool:
        """Whether a refusal of the current request may be written now.

        Not when an earlier request's answer is still owed or under way (the client would read
        the refusal as that answer), nor when the app has begun this request's answer. Then
        the connection is only closed.
        """
        if self.pipeline:
            return False
        cycle: RequestResponseCycle | None = self.cycle
        if cycle is None:
            return True
        if self._phase == _BODY:
            return not cycle.response_started
        return cycle.response_complete

    def _refuse(self, error: RequestRejected) -> None:
        """Answer ``error`` as JSON (when an answer may go out now) and close the connection.

        Once only: httptools goes on parsing the rest of a read after a callback refused, and
        a second refusal would write after ``write_eof()``.
        """
        if self._refused:
            return
        if self._on_refusal is not None:
            self._on_refusal(error)
        self._stop(http_error_response(error) if self._may_answer() else None)

    def _stop(self, response: bytes | None) -> None:
        """Write ``response`` (if any), close, and parse nothing more on this connection.

        The close lingers, as front.py's does: closing a socket with unread input makes the
        kernel send a reset, which may destroy the answer before the peer reads it, and a peer
        still sending (a huge head, a dribbled body) is exactly the one refused here. So the
        write side is shut, and what still comes is read and dropped (``data_received`` ignores
        it from now on) until the peer closes or ``LINGERING_CLOSE_S`` passes.
        """
        self._refused = True
        self._phase = _IDLE
        self._cancel_timer()
        cycle: RequestResponseCycle | None = self.cycle
        if cycle is not None and not cycle.response_complete:
            # The app may still answer; its bytes must not follow ours (asyncio's transports
            # still send what is written after close() while their buffer drains).
            cycle.disconnected = True
            cycle.message_event.set()
        transport = self.transport
        if transport.is_closing():
            return
        if response is not None:
            transport.write(response)
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self.flow.resume_reading()  # uvicorn may have paused it; the input must drain
        self._timer = self.loop.call_later(limits.LINGERING_CLOSE_S, transport.abort)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
