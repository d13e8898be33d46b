"""The agent runtime's ASGI app: ``WS /ws``, ``POST /bot``, ``GET /livez``, ``GET /readyz`` and
``GET /metrics``, ahead of the routes the bot adds.

Each ``/ws`` connection is one session, served by
:meth:`~catflap.runtime.session.SessionRunner.run`; each ``POST /bot`` request is one too
(:mod:`~catflap.runtime.botroute`). The other routes answer from the bot's ``readyz()`` hook and
the runtime's metrics. A bot adds its own routes to the same app through
``pipecatcloud_system.app`` while it is imported; the runtime's routes go first, and a bot route
on one of :data:`RESERVED_PATHS` fails the start (:func:`check_bot_routes`).
"""

from __future__ import annotations

import inspect
import logging

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from starlette.websockets import WebSocket

from catflap.contract import headers
from catflap.runtime.botloader import BotImportError, LoadedBot
from catflap.runtime.botroute import bot_endpoint, offer_endpoint
from catflap.runtime.session import SessionRunner

__all__ = ["RESERVED_PATHS", "ReservedRouteError", "check_bot_routes", "create_app"]

#: The runtime's own paths, and PCC's SmallWebRTC signalling route (which the session proxy
#: reaches): a bot may not declare a route on any of them.
RESERVED_PATHS = (*headers.RUNTIME_PATHS, headers.WEBRTC_OFFER_PATH)


class ReservedRouteError(BotImportError):
    """``bot.py`` added a route on one of the runtime's paths (:data:`RESERVED_PATHS`)."""


def check_bot_routes(app: FastAPI) -> None:
    """Refuse a bot's routes that would take one of the runtime's paths.

    Raises:
        ReservedRouteError: a route or mount of ``app`` is on a reserved path; the message names
            it (the start fails with ``start_failed``).
    """
    taken = sorted(
        {path for route in app.router.routes if (path := _path(route)) in RESERVED_PATHS}
    )
    if taken:
        raise ReservedRouteError(
            f"bot.py declares {', '.join(taken)} on pipecatcloud_system.app: the runtime serves "
            f"{', '.join(RESERVED_PATHS)} itself; move the bot's route to another path"
        )


def _path(route: object) -> str | None:
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else None


logger = logging.getLogger(__name__)


async def _check_ready(loaded: LoadedBot) -> bool:
    if loaded.readyz is None:
        return True
    try:
        result = loaded.readyz()
        if inspect.isawaitable(result):
            result = await result
    except Exception:
        logger.exception("! readyz() raised; reporting not ready")
        return False
    return bool(result.get("ready")) if isinstance(result, dict) else bool(result)


def create_app(sessions: SessionRunner, app: FastAPI | None = None) -> FastAPI:
    """Build the runtime's ASGI app around the bot that ``sessions`` runs.

    Args:
        sessions: Serves each ``/ws`` connection and ``POST /bot`` request; its bot answers
            ``/readyz`` and its metrics ``/metrics``.
        app: The app to add the runtime's routes to, ahead of the routes already on it
            (``pipecatcloud_system.app`` with the bot's routes); a new app when ``None``.

    Raises:
        ReservedRouteError: a route already on ``app`` takes a reserved path.
    """
    if app is None:
        app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    check_bot_routes(app)
    bot_routes = list(app.router.routes)
    app.router.routes.clear()

    async def ws_endpoint(websocket: WebSocket) -> None:
        await sessions.run(websocket)

    async def metrics_endpoint() -> Response:
        return Response(sessions.metrics.render(), media_type=CONTENT_TYPE_PLAIN_0_0_4)

    async def livez() -> dict[str, str]:
        return {"status": "ok"}

    async def readyz() -> JSONResponse:
        if await _check_ready(sessions.bot):
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "not ready"}, status_code=503)

    app.add_api_websocket_route(headers.AGENT_PATH, ws_endpoint)
    app.add_api_route(headers.BOT_PATH, bot_endpoint(sessions), methods=["POST"])
    app.add_api_route(
        headers.WEBRTC_OFFER_PATH, offer_endpoint(sessions.webrtc), methods=["POST", "PATCH"]
    )
    app.add_api_route("/livez", livez, methods=["GET"])
    app.add_api_route("/readyz", readyz, methods=["GET"])
    app.add_api_route("/metrics", metrics_endpoint, methods=["GET"])
    # Starlette tries routes in order: the runtime's first, so no bot route shadows them.
    app.router.routes.extend(bot_routes)
    return app
