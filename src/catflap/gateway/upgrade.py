"""The upgrade check: a pure function from a parsed request to Accept or a typed rejection.

No sockets, no clock reads, no I/O: the caller passes the directory of agents, the token key
ring and the current time. Everything that can be refused without I/O is refused here, before
the WebSocket upgrade and before any bot is touched. What needs I/O (spending the token's
``jti``, reserving a pool slot) happens afterwards in :mod:`catflap.gateway.admission`.

Order of checks, and the status each failure gets:

1. method is GET ........................................ 405
2. it is a WebSocket upgrade (Upgrade/Connection) ........ 426
3. ``Sec-WebSocket-Version: 13`` ......................... 426; ``Sec-WebSocket-Key`` ... 400
4. route ``/ws/generic[/{agent}.{org}[/{token}]]`` or ``/ws/{provider}[/{token}]`` 404
5. query: no duplicate ``body``/``token``/``serviceHost`` . 400
6. service host: well formed, path and query agree ...... 400; known agent .......... 404
7. token (``websocket_auth = "token"`` agents) ........... 403
8. ``?body=`` decodes to at most 4096 bytes of JSON ...... 400 / 413
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote

from catflap.auth.tokens import KeyRing, TokenClaims, TokenFailure, rejection, verify_token
from catflap.config import AgentSpec
from catflap.contract import headers as hdrs
from catflap.contract.body import DecodedBody, decode_body
from catflap.contract.errors import (
    AgentNotFound,
    BadRequest,
    CatflapMisuse,
    InvalidHandshake,
    InvalidServiceHost,
    MethodNotAllowed,
    NotFound,
    UpgradeRequired,
)
from catflap.contract.names import ServiceHost, parse_service_host
from catflap.contract.query import QueryParams, parse_query
from catflap.gateway.httphead import RequestHead
from catflap.gateway.providers import PROVIDERS, Provider

__all__ = ["Directory", "UpgradeAccepted", "check_upgrade", "is_websocket_path", "resolve_agent"]

#: Looks an agent up by service host; None when no such agent or organisation exists.
Directory = Callable[[ServiceHost], AgentSpec | None]

_GENERIC = "generic"
_PATH_TOKEN_HINT = "on a provider endpoint, put the token in the path: /ws/<provider>/<token>"


@dataclass(frozen=True, slots=True)
class UpgradeAccepted:
    """Everything the gateway needs to start the session.

    ``agent`` is None only on ``/ws/twilio`` without ``?serviceHost=``: the agent is then named
    by the stream's ``start`` message, and ``path_token`` waits to be checked against it.
    """

    agent: AgentSpec | None
    session_id: str
    #: ``None`` for the generic endpoint, else the telephony provider.
    provider: Provider | None
    claims: TokenClaims | None
    body: DecodedBody | None
    path_token: str | None = None

    def known_agent(self) -> AgentSpec:
        """The agent, for a step that runs only once it is known (admission, the relay).

        Raises:
            CatflapMisuse: the agent is not known yet (a gateway bug, not the client's).
        """
        if self.agent is None:
            raise CatflapMisuse("a session reached the pool before its agent was known")
        return self.agent


def is_websocket_path(path: str) -> bool:
    """True for ``/ws`` and everything below it: the paths the gateway itself answers."""
    return path == "/ws" or path.startswith("/ws/")


def _tokens(value: str | None) -> set[str]:
    return {part.strip().lower() for part in (value or "").split(",")}


def _check_handshake_headers(head: RequestHead) -> None:
    if head.http_version != "1.1":
        # RFC 6455 4.1: "the method of the request MUST be GET, and the HTTP version MUST be at
        # least 1.1"; HTTP/2 upgrades do not reach an HTTP/1 parser.
        raise InvalidHandshake(
            f"HTTP/{head.http_version} cannot upgrade to a WebSocket: send HTTP/1.1"
        )
    if head.header_count("host") != 1:
        # RFC 7230 5.4: a request with no Host, or more than one, gets 400.
        raise InvalidHandshake("a request needs exactly one Host header")
    if "websocket" not in _tokens(head.header("upgrade")) or "upgrade" not in _tokens(
        head.header("connection")
    ):
        raise UpgradeRequired(
            "this is a WebSocket endpoint: connect with a WebSocket client "
            "(Upgrade: websocket, Connection: Upgrade)",
            headers=(("upgrade", "websocket"),),
        )
    if (
        head.header("sec-websocket-version") != "13"
        or head.header_count("sec-websocket-version") != 1
    ):
        raise UpgradeRequired(
            "unsupported or missing Sec-WebSocket-Version: only version 13 is supported",
            headers=(("sec-websocket-version", "13"),),
        )
    key = head.header("sec-websocket-key")
    if key is None or head.header_count("sec-websocket-key") != 1:
        raise InvalidHandshake("missing or repeated Sec-WebSocket-Key header")
    try:
        raw = base64.b64decode(key.strip(), validate=True)
    except binascii.Error:
        raw = b""
    if len(raw) != 16:
        raise InvalidHandshake("Sec-WebSocket-Key must be 16 random bytes, base64-encoded")


def _segments(path: str) -> list[str]:
    try:
        return [unquote(part, errors="strict") for part in path.split("/")[2:]]
    except UnicodeDecodeError:
        raise BadRequest("the URL path has percent-escapes that are not UTF-8") from None


def _generic_route(segments: list[str], query: QueryParams) -> tuple[str, str | None]:
    """The service host text and path token of a ``/ws/generic`` URL."""
    from_path = segments[1] if len(segments) > 1 else None
    path_token = segments[2] if len(segments) > 2 else None
    from_query = query.get_one_decoded(hdrs.QUERY_SERVICE_HOST)
    if from_path is not None and from_query is not None and from_path != from_query:
        raise InvalidServiceHost(
            f"?serviceHost={from_query!r} disagrees with the path's {from_path!r}: give one"
        )
    text = from_path if from_path is not None else from_query
    if not text:
        raise InvalidServiceHost(
            "no service host: connect to /ws/generic/{agent}.{org} or add ?serviceHost="
        )
    return text, path_token


def _find_token(head: RequestHead, query: QueryParams, path_token: str | None) -> str | None:
    """Header, then ``?token=``, then the path segment (PCC's documented order)."""
    authorization = head.header("authorization")
    if authorization is not None:
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    from_query = query.get_one_decoded(hdrs.QUERY_TOKEN)
    if from_query:
        return from_query
    return path_token or None


def resolve_agent(
    service_host_text: str,
    token: str | None,
    directory: Directory,
    keyring: KeyRing,
    *,
    now: float,
    token_hint: str = "",
) -> tuple[AgentSpec, TokenClaims | None]:
    """Find the agent a service host names and check the token its ``websocket_auth`` needs.

    Raises:
        InvalidServiceHost: 400, the service host is malformed.
        AgentNotFound: 404, no such agent or organization.
        TokenRejected: 403, a token agent without a valid token.
    """
    service_host = parse_service_host(service_host_text)
    agent = directory(service_host)
    if agent is None:
        raise AgentNotFound(f"no agent {service_host.agent!r} in organization {service_host.org!r}")
    if agent.config.websocket_auth != "token":
        return agent, None
    if token is None:
        raise rejection(TokenFailure.MISSING, token_hint)
    return agent, verify_token(token, keyring, service_host=str(service_host), now=now)


def check_upgrade(
    head: RequestHead, directory: Directory, keyring: KeyRing, *, now: float
) -> UpgradeAccepted:
    """Decide whether a WebSocket upgrade request may start a session.

    Raises:
        RequestRejected: a subclass carrying the status to send (400, 403, 404, 405, 413 or
            426) and the JSON error code; nothing has been started.
    """
    if head.method != "GET":
        raise MethodNotAllowed(
            f"{head.method} is not allowed here: WebSocket upgrades use GET",
            headers=(("allow", "GET"),),
        )
    _check_handshake_headers(head)
    query = parse_query(head.query)
    segments = _segments(head.path)
    for name in (hdrs.QUERY_BODY, hdrs.QUERY_TOKEN, hdrs.QUERY_SERVICE_HOST):
        query.get_one(name)  # refuses duplicates even where the value is not used
    kind = segments[0] if segments else ""
    provider = PROVIDERS.get(kind)
    agent: AgentSpec | None
    claims: TokenClaims | None
    path_token: str | None
    if kind == _GENERIC and len(segments) <= 3:
        text, path_token = _generic_route(segments, query)
        token = _find_token(head, query, path_token)
        agent, claims = resolve_agent(text, token, directory, keyring, now=now)
    elif provider is not None and len(segments) <= 2:
        # Providers cannot send headers; a token agent needs /ws/<provider>/<token>.
        path_token = segments[1] if len(segments) > 1 else None
        named = query.get_one_decoded(hdrs.QUERY_SERVICE_HOST)
        if named is None and not provider.routes_from_start:
            raise InvalidServiceHost(
                f"no service host: configure {provider.title} with "
                f"/ws/{provider.name}?serviceHost={{agent}}.{{org}}"
            )
        agent, claims = None, None
        if named is not None:
            agent, claims = resolve_agent(
                named, path_token, directory, keyring, now=now, token_hint=_PATH_TOKEN_HINT
            )
    else:
        raise NotFound(
            f"no WebSocket endpoint at {head.path!r}: use /ws/generic/{{agent}}.{{org}}, "
            "/ws/generic?serviceHost={agent}.{org} or /ws/{twilio,telnyx,plivo,exotel}"
        )
    raw_body = query.get_one(hdrs.QUERY_BODY)
    body = decode_body(raw_body) if raw_body is not None else None
    session_id = claims.jti if claims is not None else str(uuid.uuid4())
    return UpgradeAccepted(
        agent=agent,
        session_id=session_id,
        provider=provider,
        claims=claims,
        body=body,
        path_token=path_token if provider is not None else None,
    )
