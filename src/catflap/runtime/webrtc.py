"""SmallWebRTC sessions in the agent runtime, as PCC's base image serves them.

1. ``POST /bot`` with ``x-daily-transport-type: webrtc`` (:mod:`~catflap.runtime.botroute`)
   opens a :class:`WebRTCPeer` for its session id: the body is kept, ``bot()`` does not run
   yet. The session is reported started (so ``/start`` answers ``{sessionId}``) and waits up to
   ``WEBRTC_OFFER_TIMEOUT_S`` for the client's offer; without one it ends as
   ``agent_start_timeout`` (:class:`OfferTimeout`).
2. ``POST /api/offer`` reaches the runtime through the gateway's session proxy, which adds
   ``x-daily-session-id``. Each session has its own pipecat ``SmallWebRTCRequestHandler`` in
   ``ConnectionMode.SINGLE``: the first offer opens the peer connection and starts
   ``bot(SmallWebRTCSessionArguments)``; an offer with that ``pc_id`` renegotiates; an offer
   without it (or with another) is refused, as pipecat refuses it.
3. ``PATCH /api/offer`` adds the client's trickled ICE candidates.
4. When the session ends the handler closes its peer connection and the peer is forgotten:
   later offers for the session are 404.

=================================================  =========================================
request                                            answer
=================================================  =========================================
no ``x-daily-session-id``                          400 ``missing_session_id``
no WebRTC session of that id on this instance      404 ``session_not_found``
body over ``WEBRTC_OFFER_MAX_BYTES`` (POST) or     413 ``request_too_large``
``WEBRTC_PATCH_MAX_BYTES`` (PATCH), or over
``WEBRTC_CANDIDATES_MAX`` candidates in all
not the client's JSON, or an SDP aiortc refuses    400 ``invalid_offer``
a second peer connection, or over                  400 ``webrtc_offer_conflict``
``WEBRTC_OFFERS_MAX`` offers
PATCH for an unknown ``pc_id``                     404 ``peer_connection_not_found``
no ``pipecat-ai[webrtc]`` in the agent             501 ``webrtc_unavailable``
an offer                                           200 ``{"sdp", "type": "answer", "pc_id"}``
a PATCH                                            200 ``{"status": "success"}``
=================================================  =========================================

ICE servers come as in PCC's base image: ``ICE_CONFIG_URL`` in the runtime's environment is
read at each new offer and must give ``{"iceConfig": {"iceServers": [{urls, username,
credential}]}}``. catflap's pool sets it to a ``data:`` URL holding the agent's ``[webrtc]
ice_servers``; an operator may set it to an ``http(s)`` service (one that mints short-lived
TURN credentials). Without it, or when it fails, the bot gathers host candidates only: unlike
PCC's base image, catflap never falls back to Google's STUN server. The URL and the
credentials are never logged.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import os
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from catflap.contract import limits
from catflap.contract.body import NotJson, loads_strict
from catflap.contract.errors import (
    InvalidOffer,
    OfferConflict,
    PeerConnectionNotFound,
    RequestTooLarge,
    SessionNotFound,
    WebRTCUnavailable,
    cut_error,
)
from catflap.contract.ice import ICE_CONFIG_URL_ENV

__all__ = [
    "OfferTimeout",
    "WebRTCPeer",
    "WebRTCSessions",
    "read_ice_servers",
]

logger = logging.getLogger("catflap.runtime.webrtc")


class OfferTimeout(Exception):
    """No offer arrived within ``WEBRTC_OFFER_TIMEOUT_S`` of the session's start; the session
    ends as ``agent_start_timeout``, ``bot()`` never having run."""


def _pipecat_webrtc() -> Any:
    """pipecat's request-handler module (aiortc behind it), imported when first needed.

    Raises:
        WebRTCUnavailable: 501, it cannot be imported.
    """
    try:
        from pipecat.transports.smallwebrtc import request_handler
    except ImportError as exc:
        raise WebRTCUnavailable(
            f"this agent cannot serve WebRTC sessions ({exc}): install pipecat-ai[webrtc] in "
            "its Python environment"
        ) from None
    return request_handler


@dataclass(eq=False)
class WebRTCPeer:
    """One WebRTC session of this runtime, from ``POST /bot`` to its end."""

    session_id: str
    #: The ``/bot`` body, for a ``bot()`` whose offer carries no ``requestData``.
    body: Any
    #: pipecat's ``SmallWebRTCRequestHandler`` (``ConnectionMode.SINGLE``) of this session.
    handler: Any
    #: Resolved by the first offer with ``(SmallWebRTCConnection, requestData)``.
    opened: asyncio.Future[tuple[Any, Any]]
    #: Offers are answered one at a time: two first offers at once would both open one.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    offers: int = 0
    candidates: int = 0


def _described(url: str) -> str:
    """``url`` as it may be logged: its scheme and host, never a path, query or data."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}" if parts.scheme != "data" else "a data: URL"


class _WithoutUrl(logging.Filter):
    """Drops httpx's own ``HTTP Request: GET <url>`` lines about ``url``: an ICE config URL may
    carry a credential in its path or query, and httpx logs the whole URL at INFO."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url

    def filter(self, record: logging.LogRecord) -> bool:
        return self.url not in record.getMessage()


async def _fetch(url: str) -> bytes:
    """The document at ``url`` (``data:``, ``http:`` or ``https:``), within the ICE bounds."""
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme == "data":
        meta, sep, payload = url[len("data:") :].partition(",")
        if not sep:
            raise ValueError("a data: URL without a comma")
        raw = (
            base64.b64decode(payload, validate=True)
            if meta.endswith(";base64")
            else urllib.parse.unquote_to_bytes(payload)
        )
        if len(raw) > limits.ICE_CONFIG_MAX_BYTES:
            raise ValueError(f"over {limits.ICE_CONFIG_MAX_BYTES} bytes")
        return raw
    if scheme not in ("http", "https"):
        raise ValueError(f"scheme {scheme!r} is neither data, http nor https")
    hide = _WithoutUrl(url)
    logging.getLogger("httpx").addFilter(hide)
    try:
        return await _fetch_http(url)
    finally:
        logging.getLogger("httpx").removeFilter(hide)


async def _fetch_http(url: str) -> bytes:
    """The body of ``GET url``, within the ICE bounds."""
    async with (
        asyncio.timeout(limits.ICE_CONFIG_FETCH_TIMEOUT_S),
        httpx.AsyncClient(trust_env=False) as client,
        client.stream("GET", url) as response,
    ):
        if response.status_code != 200:
            raise ValueError(f"HTTP {response.status_code}")
        data = bytearray()
        async for chunk in response.aiter_bytes():
            data += chunk
            if len(data) > limits.ICE_CONFIG_MAX_BYTES:
                raise ValueError(f"over {limits.ICE_CONFIG_MAX_BYTES} bytes")
        return bytes(data)


def _ice_servers(document: Any) -> list[dict[str, Any]]:
    """The ``iceServers`` of PCC's document, each ``{urls, username, credential}``."""
    servers = document.get("iceConfig", {}).get("iceServers", [])
    if not isinstance(servers, list):
        raise ValueError("iceConfig.iceServers is not a list")
    result = []
    for server in servers:
        urls = server.get("urls") if isinstance(server, dict) else None
        if isinstance(urls, str):
            urls = [urls]
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            raise ValueError("an ICE server without urls")
        username, credential = server.get("username"), server.get("credential")
        if not isinstance(username, str | None) or not isinstance(credential, str | None):
            raise ValueError("an ICE server's username or credential is not a string")
        result.append({"urls": urls, "username": username, "credential": credential})
    return result


async def read_ice_servers(env: Mapping[str, str] = os.environ) -> list[dict[str, Any]]:
    """The ICE servers ``ICE_CONFIG_URL`` gives (see the module docstring); ``[]`` without it
    or when it fails (logged, without the URL's path, query or data)."""
    url = env.get(ICE_CONFIG_URL_ENV)
    if not url:
        return []
    try:
        document = json.loads(await _fetch(url))
        if not isinstance(document, dict):
            raise ValueError("not a JSON object")
        return _ice_servers(document)
    except (OSError, TimeoutError, ValueError, binascii.Error, httpx.HTTPError) as exc:
        reason = exc.__class__.__name__ + (f": {exc}" if isinstance(exc, ValueError) else "")
        logger.warning(
            "! %s (%s) gave no ICE servers (%s); the bot gathers host candidates only",
            ICE_CONFIG_URL_ENV,
            _described(url),
            reason,
        )
        return []


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = loads_strict(data)
    except NotJson as exc:
        raise InvalidOffer(f"the {what} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidOffer(f"the {what} must be a JSON object")
    return value


def _optional(value: Any, kind: type | tuple[type, ...], name: str) -> Any:
    if value is not None and not isinstance(value, kind):
        raise InvalidOffer(f"the offer's {name} has the wrong type")
    return value


@dataclass(eq=False)
class WebRTCSessions:
    """This runtime's WebRTC sessions by session id, and their signalling."""

    #: How long a session waits for its first offer.
    offer_timeout: float = limits.WEBRTC_OFFER_TIMEOUT_S
    #: Gives the ICE servers for each new peer connection; injectable for tests.
    ice_servers: Callable[[], Awaitable[list[dict[str, Any]]]] = read_ice_servers
    _peers: dict[str, WebRTCPeer] = field(default_factory=dict)

    def open(self, session_id: str, body: Any) -> WebRTCPeer:
        """Register a WebRTC session that waits for its offer.

        Raises:
            WebRTCUnavailable: 501, pipecat-ai[webrtc] is not installed.
        """
        module = _pipecat_webrtc()
        peer = WebRTCPeer(
            session_id=session_id,
            body=body,
            handler=module.SmallWebRTCRequestHandler(connection_mode=module.ConnectionMode.SINGLE),
            opened=asyncio.get_running_loop().create_future(),
        )
        self._peers[session_id] = peer
        return peer

    async def wait_opened(
        self, peer: WebRTCPeer, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    ) -> tuple[Any, Any]:
        """Wait for the first offer's ``(connection, requestData)``.

        Raises:
            OfferTimeout: none came within :attr:`offer_timeout`.
        """
        timer: asyncio.Future[Any] = asyncio.ensure_future(sleep(self.offer_timeout))
        waits: set[asyncio.Future[Any]] = {peer.opened, timer}
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
        if not peer.opened.done():
            raise OfferTimeout(
                f"the client sent no WebRTC offer within {self.offer_timeout:g} s of the "
                "session's start (POST /v1/public/{agent}/sessions/{sessionId}/api/offer)"
            )
        return peer.opened.result()

    async def close(self, peer: WebRTCPeer) -> None:
        """Forget the session and close its peer connection; idempotent, never raises."""
        if self._peers.get(peer.session_id) is peer:
            del self._peers[peer.session_id]
        if not peer.opened.done():
            peer.opened.cancel()
        try:
            async with asyncio.timeout(limits.CLOSE_WAIT_S):
                await peer.handler.close()
        except Exception as exc:  # aiortc's own failures must not fail the session's end
            logger.warning("! closing the peer connection of %s failed: %r", peer.session_id, exc)

    def _peer(self, session_id: str) -> WebRTCPeer:
        peer = self._peers.get(session_id)
        if peer is None:
            raise SessionNotFound(
                f"no WebRTC session {session_id} runs on this agent instance (it ended, or was "
                'not started with "transport": "webrtc"); start a new one with /start'
            )
        return peer

    async def offer(self, session_id: str, data: bytes) -> dict[str, Any]:
        """Answer one ``POST /api/offer`` (see the module docstring's table)."""
        peer = self._peer(session_id)
        body = _json_object(data, "offer")
        sdp, sdp_type = body.get("sdp"), body.get("type")
        if not isinstance(sdp, str) or not sdp or sdp_type != "offer":
            raise InvalidOffer('an offer is {"sdp": "<SDP>", "type": "offer", "pc_id": ...}')
        module = _pipecat_webrtc()
        request = module.SmallWebRTCRequest(
            sdp=sdp,
            type=sdp_type,
            pc_id=_optional(body.get("pc_id"), str, "pc_id"),
            restart_pc=_optional(body.get("restart_pc"), bool, "restart_pc"),
            request_data=body.get("requestData", body.get("request_data")),
        )

        created: list[Any] = []

        async def opened(connection: Any) -> None:
            # Kept until the answer exists: pipecat calls this before it knows whether the
            # offer can be answered, and bot() must not start on a connection that failed.
            created.append(connection)

        async with peer.lock:
            if peer.offers >= limits.WEBRTC_OFFERS_MAX:
                raise OfferConflict(
                    f"session {session_id} had {limits.WEBRTC_OFFERS_MAX} offers already; "
                    "start a new session"
                )
            peer.offers += 1
            if request.pc_id is None:
                peer.handler.update_ice_servers(await self._ice_server_objects())
            try:
                answer = await peer.handler.handle_web_request(request, opened)
                if not isinstance(answer, dict):
                    raise RuntimeError("no SDP answer")
            except Exception as exc:
                for connection in created:
                    await _disconnect(connection)
                raise _signalling_error(exc, "offer") from None
            if created and not peer.opened.done():
                peer.opened.set_result((created[0], request.request_data))
        logger.info("< offer for %s answered (pc_id %s)", session_id, answer.get("pc_id"))
        return dict(answer)

    async def patch(self, session_id: str, data: bytes) -> dict[str, str]:
        """Apply one trickle-ICE ``PATCH /api/offer`` (see the module docstring's table)."""
        peer = self._peer(session_id)
        body = _json_object(data, "candidate patch")
        pc_id, candidates = body.get("pc_id"), body.get("candidates")
        if not isinstance(pc_id, str) or not isinstance(candidates, list):
            raise InvalidOffer('a candidate patch is {"pc_id": "...", "candidates": [...]}')
        module = _pipecat_webrtc()
        parsed = []
        for item in candidates:
            if not isinstance(item, dict) or not isinstance(item.get("candidate", ""), str):
                raise InvalidOffer('each candidate is {"candidate", "sdp_mid", "sdp_mline_index"}')
            parsed.append(
                module.IceCandidate(
                    candidate=item.get("candidate", ""),
                    sdp_mid=_optional(item.get("sdp_mid"), str, "sdp_mid"),
                    sdp_mline_index=_optional(item.get("sdp_mline_index"), int, "sdp_mline_index"),
                )
            )
        if peer.candidates + len(parsed) > limits.WEBRTC_CANDIDATES_MAX:
            raise RequestTooLarge(
                f"session {session_id} may send at most {limits.WEBRTC_CANDIDATES_MAX} ICE "
                "candidates in all"
            )
        peer.candidates += len(parsed)
        try:
            await peer.handler.handle_patch_request(
                module.SmallWebRTCPatchRequest(pc_id=pc_id, candidates=parsed)
            )
        except Exception as exc:
            raise _signalling_error(exc, "candidate patch") from None
        return {"status": "success"}

    async def _ice_server_objects(self) -> list[Any]:
        from pipecat.transports.smallwebrtc.connection import IceServer

        return [
            IceServer(
                urls=server["urls"],
                username=server["username"] or "",
                credential=server["credential"] or "",
            )
            for server in await self.ice_servers()
        ]


async def _disconnect(connection: Any) -> None:
    """Close a peer connection whose offer failed; aiortc's own errors are only logged."""
    try:
        async with asyncio.timeout(limits.CLOSE_WAIT_S):
            await connection.disconnect()
    except Exception as exc:
        logger.debug("closing a failed peer connection raised %r", exc)


def _signalling_error(exc: Exception, what: str) -> Exception:
    """pipecat's ``HTTPException`` (400: a second connection; 404: an unknown ``pc_id``) as
    catflap's errors; anything else aiortc raised means the SDP or candidate was refused."""
    status = getattr(exc, "status_code", None)
    detail = str(getattr(exc, "detail", exc))
    if status == 400:
        return OfferConflict(
            f"{detail}: this session has a peer connection already; send its pc_id to "
            "renegotiate, or start a new session"
        )
    if status == 404:
        return PeerConnectionNotFound(f"{detail}: send the pc_id of the session's offer answer")
    logger.info("! the %s was refused by aiortc: %r", what, exc)
    return InvalidOffer(cut_error(f"the {what} could not be applied: {type(exc).__name__}: {exc}"))
