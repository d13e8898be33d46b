"""The agent runtime's ASGI app: ``WS /ws``, ``GET /livez``, ``GET /readyz`` and ``GET /metrics``.

Each ``/ws`` connection is one session, served by
:meth:`~catflap.runtime.session.SessionRunner.run`; the HTTP routes answer from the bot's
``readyz()`` hook and the runtime's metrics.
"""

from __future__ import annotations

import inspect
import logging

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from starlette.websockets import WebSocket

from catflap.contract import headers
from catflap.runtime.botloader import LoadedBot
from catflap.runtime.session import SessionRunner

__all__ = ["create_app"]

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


def create_app(sessions: SessionRunner) -> FastAPI:
    """Build the runtime's ASGI app around the bot that ``sessions`` runs.

    Args:
        sessions: Serves each ``/ws`` connection; its bot answers ``/readyz`` and its metrics
            ``/metrics``.
    """
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

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
    app.add_api_route("/livez", livez, methods=["GET"])
    app.add_api_route("/readyz", readyz, methods=["GET"])
    app.add_api_route("/metrics", metrics_endpoint, methods=["GET"])
    return app
