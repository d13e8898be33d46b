"""The FastAPI app that the catflap agent runtime serves, for bots written for PCC's base image.

A bot adds its own HTTP routes at import time, unchanged from Pipecat Cloud::

    from pipecatcloud_system import app

    @app.get("/status")
    async def status() -> dict[str, str]:
        return {"status": "running"}

``catflap agent`` serves this very :data:`app`: the runtime imports ``bot.py`` (whose routes
land here), then puts its own routes (``/ws``, ``/bot``, ``/livez``, ``/readyz``, ``/metrics``)
ahead of the bot's; a bot route on one of those paths fails the start. Clients reach a bot's
routes through the gateway's session proxy, ``/v1/public/{agent}/sessions/{id}/{path}``.

Imported outside a runtime (plain ``python``, a test, an IDE), :data:`app` is an ordinary
FastAPI app that nothing serves: adding routes works, and nobody answers them.
"""

from __future__ import annotations

from fastapi import FastAPI

__all__ = ["app"]

#: The runtime's app; created on import, before ``bot.py`` is imported.
app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
