"""``POST /bot``, a session without a WebSocket, as PCC's base image serves it: read and check
the request, run the session, answer when ``bot()`` has ended.

======================================  =====================================================
request                                 what the runtime does
======================================  =====================================================
``x-daily-session-id`` missing          400 ``missing_session_id``
body over ``BOT_BODY_MAX_BYTES``        413 ``body_too_large`` (counted as it arrives)
body not strict JSON                    400 ``invalid_body``; an empty body is ``None``
session id already running              409 ``session_already_running``
``sessions_per_instance`` running       503 ``instance_full``
after ``shutdown``                      503 ``draining``
otherwise                               the session runs; then 200
                                        ``{"sessionId": id, "status": <how it ended>}``
======================================  =====================================================

``x-pcc-max-session-seconds`` is the budget, read as on ``/ws``. With ``x-daily-room-url`` (and
``x-daily-room-token``) the bot gets ``DailySessionArguments``; with ``x-daily-transport-type:
webrtc`` it gets ``SmallWebRTCSessionArguments`` once the client's offer has come through
``/api/offer`` (:mod:`~catflap.runtime.webrtc`; a runtime without pipecat-ai[webrtc] answers
501 ``webrtc_unavailable``), else ``PipecatSessionArguments``. A client that hangs up does not
stop the bot: the session ends when ``bot()`` returns, its budget runs out or ``stop_session``
arrives, as in PCC.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi.responses import JSONResponse
from starlette.requests import Request

from catflap.contract import headers, limits
from catflap.contract.body import NotJson, loads_strict
from catflap.contract.errors import (
    BodyTooLarge,
    InvalidBody,
    MissingSessionId,
    RequestRejected,
    RequestTooLarge,
)
from catflap.logs import session_log
from catflap.requestbody import read_bounded_body
from catflap.runtime.args import DailyRoom
from catflap.runtime.session import BotSession, SessionRunner, read_budget
from catflap.runtime.webrtc import WebRTCSessions

__all__ = [
    "bot_endpoint",
    "offer_endpoint",
    "read_bot_request",
]

logger = logging.getLogger("catflap.runtime.app")


def _too_large(size: int) -> BodyTooLarge:
    return BodyTooLarge(
        f"the /bot body is {size} bytes or more; at most {limits.BOT_BODY_MAX_BYTES} are allowed"
    )


async def read_bot_request(request: Request) -> BotSession:
    """Read and check one ``POST /bot`` request (see the module docstring's table).

    Raises:
        MissingSessionId: 400, no ``x-daily-session-id``.
        BodyTooLarge: 413, the body is over ``BOT_BODY_MAX_BYTES``.
        InvalidBody: 400, the body is not strict JSON.
        BadRequest: 400, the client left before its body was complete.
    """
    session_id = request.headers.get(headers.SESSION_ID_HEADER)
    if not session_id:
        raise MissingSessionId(
            f"POST {headers.BOT_PATH} needs the {headers.SESSION_ID_HEADER} header"
        )
    data = await read_bounded_body(request, limits.BOT_BODY_MAX_BYTES, _too_large)
    body: Any = None
    if data.strip():
        try:
            body = loads_strict(data)
        except NotJson as exc:
            raise InvalidBody(f"the /bot body is not strict JSON: {exc}") from None
    log = session_log(logger, session_id)
    room_url = request.headers.get(headers.DAILY_ROOM_URL_HEADER)
    return BotSession(
        session_id=session_id,
        body=body,
        budget=read_budget(request.headers.get(headers.MAX_SESSION_SECONDS_HEADER), log),
        daily=(
            DailyRoom(room_url, request.headers.get(headers.DAILY_ROOM_TOKEN_HEADER))
            if room_url
            else None
        ),
        webrtc=request.headers.get(headers.DAILY_TRANSPORT_TYPE_HEADER)
        == headers.TRANSPORT_TYPE_WEBRTC,
    )


def _rejection(error: RequestRejected) -> JSONResponse:
    return JSONResponse(error.to_body(), status_code=error.status, headers=dict(error.headers))


def bot_endpoint(sessions: SessionRunner) -> Callable[[Request], Awaitable[JSONResponse]]:
    """The ``POST /bot`` handler for the runtime's app; it answers when the session has ended."""

    async def handle(request: Request) -> JSONResponse:
        try:
            session = await read_bot_request(request)
            status = await sessions.run_bot(session, request.is_disconnected)
        except RequestRejected as exc:
            logger.info("! POST %s refused: %d %s", headers.BOT_PATH, exc.status, exc.code)
            return _rejection(exc)
        return JSONResponse({"sessionId": session.session_id, "status": status})

    return handle


def offer_endpoint(webrtc: WebRTCSessions) -> Callable[[Request], Awaitable[JSONResponse]]:
    """The ``POST``/``PATCH /api/offer`` handler: SmallWebRTC signalling for the session named
    by ``x-daily-session-id`` (the session proxy adds it; :mod:`~catflap.runtime.webrtc` has the
    table of answers)."""

    async def handle(request: Request) -> JSONResponse:
        patch = request.method == "PATCH"
        limit = limits.WEBRTC_PATCH_MAX_BYTES if patch else limits.WEBRTC_OFFER_MAX_BYTES
        try:
            session_id = request.headers.get(headers.SESSION_ID_HEADER)
            if not session_id:
                raise MissingSessionId(
                    f"{request.method} {headers.WEBRTC_OFFER_PATH} needs the "
                    f"{headers.SESSION_ID_HEADER} header (the session proxy adds it)"
                )
            data = await read_bounded_body(
                request,
                limit,
                lambda size: RequestTooLarge(
                    f"the {request.method} {headers.WEBRTC_OFFER_PATH} body is {size} bytes or "
                    f"more; at most {limit} are allowed"
                ),
            )
            if patch:
                return JSONResponse(await webrtc.patch(session_id, data))
            return JSONResponse(await webrtc.offer(session_id, data))
        except RequestRejected as exc:
            logger.info(
                "! %s %s refused: %d %s",
                request.method,
                headers.WEBRTC_OFFER_PATH,
                exc.status,
                exc.code,
            )
            return _rejection(exc)

    return handle
