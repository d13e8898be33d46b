"""The session-arguments object that ``bot(args)`` receives for a WebSocket session, and the
decoding of its ``body`` from ``?body=``.

Bots check it with ``isinstance`` (``create_transport`` does), so the runtime hands over the most
specific class that is installed, in this order:

1. ``pipecatcloud.agent.WebSocketSessionArguments``: what PCC's base image passes. It subclasses
   pipecat's ``WebSocketRunnerArguments``, so it passes every pipecat check too.
2. ``pipecat.runner.types.WebSocketRunnerArguments``: pipecat without the PCC SDK.
3. catflap's own :class:`WebSocketSessionArguments`: neither is installed (plain bots that only
   use ``args.websocket``, ``args.session_id`` and ``args.body``).

Objects are built with keywords only: in pipecat >= 1.2 the field order of the SDK classes
differs from their declaration order, and keywords are what the base image uses.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from dataclasses import dataclass
from typing import Any

from starlette.websockets import WebSocket

__all__ = [
    "WebSocketSessionArguments",
    "decode_body_param",
    "make_session_args",
    "session_args_class",
]


@dataclass(kw_only=True)
class WebSocketSessionArguments:
    """Fallback session arguments with the fields of pipecat's ``WebSocketRunnerArguments``."""

    session_id: str | None
    websocket: WebSocket
    body: Any = None
    #: ``"websocket"`` for a plain client; ``None`` lets pipecat auto-detect telephony.
    transport_type: str | None = None
    call_data: Any = None
    #: The runtime owns the signals; a bot must never install its own handlers.
    handle_sigint: bool = False
    handle_sigterm: bool = False
    #: pipecat's ``RunnerArguments`` default.
    pipeline_idle_timeout_secs: float | None = 300


def session_args_class() -> type:
    """Return the best installed session-arguments class (see the module docstring).

    Imported on every call rather than cached, so that the choice follows what is importable.
    """
    try:
        from pipecatcloud.agent import WebSocketSessionArguments as Sdk
    except ImportError:
        pass
    else:
        return _as_type(Sdk)
    try:
        from pipecat.runner.types import WebSocketRunnerArguments
    except ImportError:
        pass
    else:
        return _as_type(WebSocketRunnerArguments)
    return WebSocketSessionArguments


def _as_type(cls: type) -> type:
    # Typed as ``type`` whether or not mypy can see the package (it is optional).
    return cls


def make_session_args(
    *, session_id: str, websocket: WebSocket, body: Any, transport_type: str | None
) -> Any:
    """Build the argument object for ``bot(args)``.

    Args:
        session_id: The session id (from the gateway, or generated for direct use).
        websocket: The accepted Starlette WebSocket the bot talks over.
        body: The decoded ``?body=`` JSON value, or ``None``.
        transport_type: ``"websocket"`` for a plain client, ``None`` for telephony detection.

    Returns:
        An instance of :func:`session_args_class`, with ``handle_sigint``/``handle_sigterm``
        false and ``call_data`` ``None``.
    """
    args = session_args_class()(
        session_id=session_id, websocket=websocket, body=body, transport_type=transport_type
    )
    # pipecat sets these in __post_init__ today; pin them in case a future version does not.
    args.handle_sigint = False
    args.handle_sigterm = False
    args.call_data = None
    return args


def decode_body_param(raw: str | None, log: logging.LoggerAdapter[logging.Logger]) -> Any:
    """Decode an already percent-decoded ``?body=`` value; ``None`` if absent or invalid.

    Like PCC's base image, a body that fails to decode is logged and passed on as ``None``
    instead of failing the session.
    """
    if not raw:
        return None
    try:
        # Starlette reads '+' in a query string as a space; base64 has no spaces.
        data = base64.b64decode(raw.replace(" ", "+"), validate=True)
        return json.loads(data.decode("utf-8"))
    except (binascii.Error, ValueError) as exc:  # UnicodeDecodeError, JSONDecodeError too
        log.warning("?body= is not base64 UTF-8 JSON, passing body=None: %s", exc)
        return None
