"""The control API's connections: the protocol each one gets after the front's hand-off.

uvicorn's httptools protocol, bounded on every request of the connection (head size, head and
body deadlines, idle keep-alive): see :mod:`catflap.gateway.apiprotocol`. The app is built on
the first API connection, so a gateway that only relays never imports FastAPI's routes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from catflap.contract import limits
from catflap.contract.errors import RequestRejected
from catflap.gateway.apiprotocol import BoundedHttpToolsProtocol

__all__ = ["ApiConnections"]


class ApiConnections:
    """Makes the protocol of each control-API connection and holds the open ones."""

    def __init__(
        self,
        app: Callable[[], Any],
        *,
        on_refusal: Callable[[str, RequestRejected], None],
    ) -> None:
        """
        Args:
            app: builds the ASGI app (``create_api(deps)``), called once, on first use.
            on_refusal: counts a request the bounded protocol refused (status, refusal).
        """
        self._app = app
        self._on_refusal = on_refusal
        self._state = ServerState()
        self._config: uvicorn.Config | None = None

    def __len__(self) -> int:
        return len(self._state.connections)

    def protocol(self) -> asyncio.Protocol:
        """The protocol for one connection the front hands over."""
        if self._config is None:
            self._config = uvicorn.Config(
                self._app(),
                http="httptools",
                ws="none",
                lifespan="off",
                access_log=False,
                log_level="warning",
                server_header=False,
                log_config=None,  # catflap's logging setup (JSON or text) applies
                # Annotated int by uvicorn, but only ever passed to loop.call_later.
                timeout_keep_alive=limits.KEEPALIVE_IDLE_TIMEOUT_S,  # type: ignore[arg-type]
            )
            self._config.load()
        protocol: HttpToolsProtocol = BoundedHttpToolsProtocol(
            config=self._config,
            server_state=self._state,
            app_state={},
            on_refusal=lambda rejected: self._on_refusal(str(rejected.status), rejected),
        )
        return protocol

    def shutdown(self) -> None:
        """Ask every open connection to finish its request and close (uvicorn's shutdown)."""
        for connection in list(self._state.connections):
            connection.shutdown()
