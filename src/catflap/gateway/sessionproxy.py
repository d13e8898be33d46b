"""The session proxy's hop to the agent: find the instance that runs a session, forward one HTTP
request to a route of its runtime, and hand back the answer as it streams.

``/v1/public/{agent}/sessions/{session_id}/{path}`` (:mod:`catflap.api.proxy`) is how PCC's
clients reach the routes a bot adds with ``from pipecatcloud_system import app`` (and, for
SmallWebRTC, ``/api/offer``). This module is its upstream half, in three steps:

1. :func:`proxied_target`: the path the runtime receives is ``/{path}`` exactly as the client
   wrote it (percent-encoding kept) plus the query string. A path that is, or is below, one of
   the runtime's own paths (``RUNTIME_PATHS``: ``/ws``, ``/bot``, ...) is refused with 404
   ``reserved_path`` in every spelling: percent-encoded (``%62ot``, ``%2Fbot``, decoded up to
   :data:`_DECODE_ROUNDS` times), with doubled slashes or backslashes, or a trailing slash. A
   ``.`` or ``..`` segment is refused outright (400 ``invalid_proxy_path``): no bot route needs
   one, and HTTP libraries and servers disagree on resolving them.
2. :meth:`SessionProxy.place`: the pool says where the session is (``SessionPool.locate``: a
   local pool's leases, or Redis in cluster mode, whichever gateway admitted the session). Not
   live: 404 ``session_not_found``. Admitted but ``bot()`` not running yet (a cold start, an
   upgrade on its way): wait up to ``SESSION_PROXY_START_WAIT_S``, then 503
   ``session_starting``.
3. :meth:`SessionProxy.forward`: one request over a new connection (the instance's Unix socket,
   or its TCP address on an agent host), through httpx's transport, with the client's headers
   except ``host``, ``content-length``, ``authorization``, ``expect``, the hop-by-hop ones and
   those under ``AGENT_HOP_PREFIXES``; the gateway adds ``host: catflap-agent`` and
   ``x-daily-session-id``. The bot has ``SESSION_PROXY_TIMEOUT_S`` to send its response head
   (504 ``session_proxy_timeout``); an instance that cannot be reached is 502
   ``session_unreachable``. The answer's status and headers (less the hop-by-hop ones) and its
   body, read chunk by chunk as the client takes them, come back in a :class:`ProxiedAnswer`.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from urllib.parse import unquote

import httpx

from catflap.contract import headers as hdrs
from catflap.contract import limits
from catflap.contract.errors import (
    InvalidProxyPath,
    ReservedPath,
    SessionNotFound,
    SessionProxyTimeout,
    SessionStarting,
    SessionUnreachable,
)
from catflap.pool.interface import SessionPool

__all__ = [
    "AGENT_HOST",
    "AnswerBrokeOff",
    "ProxiedAnswer",
    "SessionProxy",
    "forwarded_headers",
    "proxied_target",
    "raw_rest",
    "returned_headers",
]

log = logging.getLogger("catflap.gateway.proxy")

#: The ``host`` every proxied request carries, in local and cluster mode alike (the runtime
#: serves one app whatever the name; ``POST /bot`` sends the same).
AGENT_HOST = "catflap-agent"
#: How many times a path is percent-decoded in the search for a reserved path: a server or
#: framework in front of a bot's route might decode twice; three rounds cover ``%25252F``.
_DECODE_ROUNDS = 3
#: How often the wait for a starting session asks the pool again (a dictionary look-up locally,
#: one Redis round trip in cluster mode).
_START_POLL_S = 0.02
#: RFC 9110 section 7.6.1's hop-by-hop fields, plus the legacy ones proxies drop; the names a
#: ``Connection`` header lists are dropped too.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
#: Request headers that stay behind besides the hop-by-hop ones: the gateway's own host, the
#: body's length (recomputed for the body as read), the organisation's key (PCC's rule), and
#: ``expect`` (the gateway has read the whole body already; a 100 Continue means nothing now).
_NOT_FORWARDED = _HOP_BY_HOP | {"host", "content-length", "authorization", "expect"}
#: No TLS on the hop to an instance; a context made once spares each request httpx's default
#: one, which loads the system's certificates.
_NO_TLS = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


class AnswerBrokeOff(ConnectionError):
    """The bot's answer stopped after its head was sent (a lost connection, or no bytes for
    ``SESSION_PROXY_TIMEOUT_S``): the client's response can only be cut off."""


def raw_rest(raw_path: bytes, agent: str, session_id: str) -> str | None:
    """The ``{path}`` part of a proxy request's target as the client wrote it, percent-encoding
    kept; None when the raw target does not split into the decoded parameters the router
    matched (a ``%2F`` in the agent or session id segment moved the split).

    Args:
        raw_path: the request target's path, undecoded (ASGI ``raw_path``).
        agent, session_id: the router's decoded path parameters.
    """
    # '', 'v1', 'public', agent, 'sessions', session id, rest
    parts = raw_path.decode("latin-1").split("/", 6)
    if len(parts) != 7 or unquote(parts[3]) != agent or unquote(parts[5]) != session_id:
        return None
    return parts[6]


def _spellings(path: str) -> set[str]:
    """``path`` and each of its percent-decodings, backslashes read as slashes."""
    spellings = {path}
    for _ in range(_DECODE_ROUNDS):
        path = unquote(path)
        spellings.add(path)
    return {spelling.replace("\\", "/") for spelling in spellings}


def proxied_target(rest: str, query: bytes) -> bytes:
    """The request target the runtime receives for the proxy's ``{path}`` and query string.

    Raises:
        InvalidProxyPath: 400, a ``.`` or ``..`` segment in any spelling of the path.
        ReservedPath: 404, the path is, or is below, one of ``RUNTIME_PATHS``.
    """
    path = "/" + rest
    for spelling in _spellings(path):
        segments = spelling.split("/")
        if any(segment in (".", "..") for segment in segments):
            raise InvalidProxyPath(
                "the proxied path has a '.' or '..' segment; name the bot's route directly"
            )
        canonical = "/" + "/".join(segment for segment in segments if segment)
        for reserved in hdrs.RUNTIME_PATHS:
            if canonical == reserved or canonical.startswith(reserved + "/"):
                raise ReservedPath(
                    f"{reserved} is the agent runtime's own path, not a bot route; the session "
                    f"proxy does not reach {', '.join(hdrs.RUNTIME_PATHS)}"
                )
    target = path.encode("latin-1")
    return target + b"?" + query if query else target


def forwarded_headers(
    client: Sequence[tuple[bytes, bytes]], session_id: str
) -> list[tuple[bytes, bytes]]:
    """The request headers the bot receives: the client's, less what stays behind (see the
    module docstring), then ``host`` and ``x-daily-session-id``. Order and repeats are kept."""
    listed = _connection_listed(client)
    forwarded = [(b"host", AGENT_HOST.encode())]
    for name, value in client:
        lowered = name.lower().decode("latin-1")
        if (
            lowered in _NOT_FORWARDED
            or lowered in listed
            or lowered.startswith(hdrs.AGENT_HOP_PREFIXES)
        ):
            continue
        forwarded.append((name, value))
    forwarded.append((hdrs.SESSION_ID_HEADER.encode(), session_id.encode()))
    return forwarded


def returned_headers(upstream: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The bot's response headers as the client receives them: all, in order (its ``date`` and
    ``server`` too: the API writes none of its own), less the hop-by-hop ones; names
    lower-cased, as ASGI wants them."""
    listed = _connection_listed(upstream)
    returned = []
    for name, value in upstream:
        lowered = name.lower()
        text = lowered.decode("latin-1")
        if text not in _HOP_BY_HOP and text not in listed:
            returned.append((lowered, value))
    return returned


def _connection_listed(headers: Sequence[tuple[bytes, bytes]]) -> set[str]:
    """The header names the ``Connection`` headers list (hop-by-hop by RFC 9110 7.6.1)."""
    return {
        token.strip().lower()
        for name, value in headers
        if name.lower() == b"connection"
        for token in value.decode("latin-1").split(",")
        if token.strip()
    }


def _url_and_transport(address: str) -> tuple[str, httpx.AsyncHTTPTransport]:
    """The base URL and a one-connection transport for an instance's address."""
    kind, _, where = address.partition(":")
    if kind == "unix":
        transport = httpx.AsyncHTTPTransport(uds=where, verify=_NO_TLS, retries=0)
        return f"http://{AGENT_HOST}", transport
    host, _, port = where.rpartition(":")
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}", httpx.AsyncHTTPTransport(verify=_NO_TLS, retries=0)


@dataclass(eq=False)
class ProxiedAnswer:
    """The bot's answer to one proxied request: its head now, its body as it is read.

    Whoever gets one must :meth:`aclose` it (the connection to the instance stays open until
    then).
    """

    status: int
    #: The response headers for the client (:func:`returned_headers`).
    headers: list[tuple[bytes, bytes]]
    response: httpx.Response
    transport: httpx.AsyncHTTPTransport
    session_id: str

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as the bot sends it, one read at a time (never held whole).

        Raises:
            AnswerBrokeOff: the connection was lost, or no byte came for the read timeout.
        """
        stream = self.response.stream
        assert isinstance(stream, httpx.AsyncByteStream)
        try:
            async for chunk in stream:
                yield chunk
        except httpx.HTTPError as exc:
            raise AnswerBrokeOff(
                f"the bot's answer broke off ({type(exc).__name__}) for session {self.session_id}"
            ) from None

    async def aclose(self) -> None:
        try:
            await self.response.aclose()
        finally:
            await self.transport.aclose()


@dataclass(frozen=True, slots=True)
class SessionProxy:
    """Finds a session's instance and forwards proxied requests to it."""

    pool: SessionPool
    #: The longest wait for a session that is admitted but whose ``bot()`` does not run yet.
    start_wait: float = limits.SESSION_PROXY_START_WAIT_S
    #: Seconds to reach the instance and get the response head; and between two body reads.
    timeout: float = limits.SESSION_PROXY_TIMEOUT_S
    #: A client that takes no chunk of the answer for this long is cut off (a slow peer).
    send_timeout: float = limits.SLOW_PEER_TIMEOUT_S

    async def place(self, agent_key: str, session_id: str) -> str:
        """The address of the instance whose ``bot()`` runs session ``session_id``.

        Raises:
            SessionNotFound: 404, no such live session of this agent.
            SessionStarting: 503, admitted, but ``bot()`` did not start within ``start_wait``.
            ServiceUnavailable: 503, Redis is unreachable (cluster mode).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_wait
        while True:
            place = await self.pool.locate(agent_key, session_id)
            if place is None:
                raise SessionNotFound(
                    f"no live session {session_id} of agent {agent_key}: it never started or "
                    "has ended; start a new one with POST /v1/public/{agent}/start"
                )
            if place.running and place.address is not None:
                return place.address
            if loop.time() >= deadline:
                raise SessionStarting(
                    f"session {session_id} has not started its bot within {self.start_wait:g} s "
                    "(its instance is still starting); retry shortly"
                )
            await asyncio.sleep(_START_POLL_S)

    async def forward(
        self,
        address: str,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        *,
        session_id: str,
    ) -> ProxiedAnswer:
        """Send one request to the instance at ``address``; return once its head arrived.

        Args:
            target: from :func:`proxied_target`; headers: from :func:`forwarded_headers`.

        Raises:
            SessionProxyTimeout: 504, no response head within ``timeout``.
            SessionUnreachable: 502, the instance could not be reached or broke the exchange.
        """
        base, transport = _url_and_transport(address)
        url = httpx.URL(base).copy_with(raw_path=target)
        request = httpx.Request(
            method,
            url,
            headers=headers,
            content=body,
            extensions={"timeout": httpx.Timeout(self.timeout).as_dict()},
        )
        try:
            async with asyncio.timeout(self.timeout):
                response = await transport.handle_async_request(request)
        except BaseException as exc:
            await transport.aclose()
            if isinstance(exc, TimeoutError | httpx.TimeoutException):
                raise SessionProxyTimeout(
                    f"the bot of session {session_id} did not answer within {self.timeout:g} s"
                ) from None
            if isinstance(exc, httpx.HTTPError):
                log.warning("! session %s: proxied request failed: %r", session_id, exc)
                raise SessionUnreachable(
                    f"could not reach the bot of session {session_id} "
                    f"({type(exc).__name__}); retry, or start a new session"
                ) from None
            raise
        return ProxiedAnswer(
            status=response.status_code,
            headers=returned_headers(response.headers.raw),
            response=response,
            transport=transport,
            session_id=session_id,
        )
