"""Parse one HTTP/1.1 request head with httptools, within catflap's size bounds.

The gateway reads only the head of the first request on a connection: that is enough to decide
whether the connection is a WebSocket upgrade (catflap relays it) or a control-API call (handed
to uvicorn with every byte read so far). Bytes after the head belong to the next protocol
(h11's ``trailing_data``) and are returned untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import httptools

from catflap.contract import limits
from catflap.contract.errors import HeadersTooLarge, MalformedRequest, UrlTooLong

__all__ = ["HeadParser", "RequestHead"]


@dataclass(slots=True)
class RequestHead:
    """A parsed request head. Header names are lower-case; values are latin-1 text."""

    method: str
    target: str
    http_version: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    upgrade: bool = False

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (lower-case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def header_count(self, name: str) -> int:
        return sum(1 for key, _ in self.headers if key == name)


class HeadParser:
    """Feed bytes until a request head is complete.

    ``feed()`` returns ``None`` while more bytes are needed, then ``(head, trailing)`` once the
    head is complete. ``raw`` keeps every byte fed so far, so a connection can be handed to
    another HTTP implementation that parses it again from the start.
    """

    __slots__ = (
        "_complete",
        "_head",
        "_headers",
        "_hname",
        "_parser",
        "_url",
        "_upgrade_offset",
        "raw",
    )

    def __init__(self) -> None:
        self.raw = bytearray()
        self._url = bytearray()
        self._headers: list[tuple[str, str]] = []
        self._hname: bytes | None = None
        self._complete = False
        self._upgrade_offset: int | None = None
        self._parser = httptools.HttpRequestParser(self)

    # httptools callbacks -------------------------------------------------------------------

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > limits.REQUEST_URL_MAX_BYTES:
            raise UrlTooLong(
                f"request target longer than {limits.REQUEST_URL_MAX_BYTES} bytes; "
                f"a ?body= may hold at most {limits.BODY_MAX_BYTES} bytes of JSON"
            )

    def on_header(self, name: bytes, value: bytes) -> None:
        # The agent runtime's handshake parser (websockets) allows 128 lines of 8 KiB, CRLF
        # included: refuse here what it would refuse there, before any slot is reserved
        # (upstream.check_forwardable then checks the head as it will be forwarded).
        if len(name) + len(value) + 4 > limits.REQUEST_HEADER_LINE_MAX_BYTES:
            raise HeadersTooLarge(
                f"header line longer than {limits.REQUEST_HEADER_LINE_MAX_BYTES} bytes"
            )
        if len(self._headers) >= limits.REQUEST_HEADER_LINES_MAX:
            raise HeadersTooLarge(f"more than {limits.REQUEST_HEADER_LINES_MAX} header lines")
        self._headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self._complete = True

    # public ------------------------------------------------------------------------------

    def feed(self, data: bytes) -> tuple[RequestHead, bytes] | None:
        """Feed received bytes.

        Returns:
            ``None`` until the head is complete, then the head and the bytes that followed it.

        Raises:
            UrlTooLong: 414, the request target exceeds the bound.
            HeadersTooLarge: 431, the head exceeds ``REQUEST_HEAD_MAX_BYTES``.
            MalformedRequest: 400, the bytes are not a valid HTTP/1.x request.
        """
        start = len(self.raw)
        self.raw += data
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._upgrade_offset = start + int(upgrade.args[0])
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, UrlTooLong | HeadersTooLarge):
                raise exc.__context__ from None
            raise MalformedRequest(f"malformed HTTP request: {exc}") from None
        if not self._complete:
            if len(self.raw) > limits.REQUEST_HEAD_MAX_BYTES:
                raise HeadersTooLarge(
                    f"request head larger than {limits.REQUEST_HEAD_MAX_BYTES} bytes"
                )
            return None
        head = RequestHead(
            method=self._parser.get_method().decode("latin-1"),
            target=self._url.decode("latin-1"),
            http_version=self._parser.get_http_version(),
            headers=self._headers,
            upgrade=self._upgrade_offset is not None,
        )
        end = self._upgrade_offset if self._upgrade_offset is not None else _head_end(self.raw)
        if end > limits.REQUEST_HEAD_MAX_BYTES:
            raise HeadersTooLarge(f"request head larger than {limits.REQUEST_HEAD_MAX_BYTES} bytes")
        return head, bytes(self.raw[end:])


def _head_end(raw: bytearray) -> int:
    index = raw.find(b"\r\n\r\n")
    return len(raw) if index < 0 else index + 4
