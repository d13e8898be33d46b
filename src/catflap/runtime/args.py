"""The session-arguments object that ``bot(args)`` receives, one class per kind of session,
and the decoding of a WebSocket session's ``body`` from ``?body=``.

Bots check it with ``isinstance`` (``create_transport`` does), so the runtime hands over the most
specific class that is installed, in this order:

=========  =============================  ============================  =======================
kind       1. ``pipecatcloud.agent``      2. ``pipecat.runner.types``   3. catflap's own
=========  =============================  ============================  =======================
websocket  ``WebSocketSessionArguments``  ``WebSocketRunnerArguments``  same names, this module
pipecat    ``PipecatSessionArguments``    ``RunnerArguments``           same names, this module
daily      ``DailySessionArguments``      ``DailyRunnerArguments``      same names, this module
webrtc     ``SmallWebRTCSession``         ``SmallWebRTCRunner``         same name, this module
           ``Arguments``                  ``Arguments``
=========  =============================  ============================  =======================

``websocket`` is a ``/ws`` session; ``pipecat``, ``daily`` and ``webrtc`` are ``POST /bot``
sessions, the second when the request names a Daily room, the third when it says
``x-daily-transport-type: webrtc`` and the client's offer has arrived
(:mod:`~catflap.runtime.webrtc`). The SDK's classes subclass pipecat's, so they pass
every pipecat check too; catflap's own serve plain bots when neither package is installed.

Objects are built with keywords only: in pipecat >= 1.2 the field order of the SDK classes
differs from their declaration order, and keywords are what the base image uses.
"""

from __future__ import annotations

import base64
import binascii
import importlib
import json
import logging
from dataclasses import dataclass
from typing import Any, Literal

from starlette.websockets import WebSocket

__all__ = [
    "DailyRoom",
    "DailySessionArguments",
    "PipecatSessionArguments",
    "SessionKind",
    "SmallWebRTCSessionArguments",
    "WebSocketSessionArguments",
    "decode_body_param",
    "make_bot_session_args",
    "make_session_args",
    "make_webrtc_session_args",
    "session_args_class",
]

#: Which ``bot(args)`` class a session gets (the rows of the module docstring's table).
SessionKind = Literal["websocket", "pipecat", "daily", "webrtc"]


@dataclass(kw_only=True)
class PipecatSessionArguments:
    """Fallback session arguments with the fields of pipecat's ``RunnerArguments``."""

    session_id: str | None
    body: Any = None
    call_data: Any = None
    #: The runtime owns the signals; a bot must never install its own handlers.
    handle_sigint: bool = False
    handle_sigterm: bool = False
    #: pipecat's ``RunnerArguments`` default.
    pipeline_idle_timeout_secs: float | None = 300


@dataclass(kw_only=True)
class WebSocketSessionArguments(PipecatSessionArguments):
    """Fallback session arguments with the fields of pipecat's ``WebSocketRunnerArguments``."""

    websocket: WebSocket
    #: ``"websocket"`` for a plain client; ``None`` lets pipecat auto-detect telephony.
    transport_type: str | None = None


@dataclass(kw_only=True)
class DailySessionArguments(PipecatSessionArguments):
    """Fallback session arguments with the fields of pipecat's ``DailyRunnerArguments``."""

    room_url: str
    token: str | None = None


@dataclass(kw_only=True)
class SmallWebRTCSessionArguments(PipecatSessionArguments):
    """Fallback session arguments with the fields of pipecat's ``SmallWebRTCRunnerArguments``."""

    #: pipecat's ``SmallWebRTCConnection`` the client's offer opened.
    webrtc_connection: Any


@dataclass(frozen=True)
class DailyRoom:
    """The Daily room a ``POST /bot`` session joins (``x-daily-room-url`` / ``-token``)."""

    room_url: str
    token: str | None


#: Per kind, the classes tried in order: (module, class name), then catflap's own.
_CANDIDATES: dict[SessionKind, tuple[tuple[str, str], ...]] = {
    "websocket": (
        ("pipecatcloud.agent", "WebSocketSessionArguments"),
        ("pipecat.runner.types", "WebSocketRunnerArguments"),
    ),
    "pipecat": (
        ("pipecatcloud.agent", "PipecatSessionArguments"),
        ("pipecat.runner.types", "RunnerArguments"),
    ),
    "daily": (
        ("pipecatcloud.agent", "DailySessionArguments"),
        ("pipecat.runner.types", "DailyRunnerArguments"),
    ),
    "webrtc": (
        ("pipecatcloud.agent", "SmallWebRTCSessionArguments"),
        ("pipecat.runner.types", "SmallWebRTCRunnerArguments"),
    ),
}
_OWN: dict[SessionKind, type] = {
    "websocket": WebSocketSessionArguments,
    "pipecat": PipecatSessionArguments,
    "daily": DailySessionArguments,
    "webrtc": SmallWebRTCSessionArguments,
}


def session_args_class(kind: SessionKind = "websocket") -> type:
    """Return the best installed session-arguments class for ``kind`` (see the module docstring).

    Imported on every call rather than cached, so that the choice follows what is importable.
    """
    for module_name, class_name in _CANDIDATES[kind]:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        cls = getattr(module, class_name, None)
        if isinstance(cls, type):
            return cls
    return _OWN[kind]


def _pin_runtime_fields(args: Any) -> Any:
    # pipecat sets these in __post_init__ today; pin them in case a future version does not.
    args.handle_sigint = False
    args.handle_sigterm = False
    args.call_data = None
    return args


def make_session_args(
    *, session_id: str, websocket: WebSocket, body: Any, transport_type: str | None
) -> Any:
    """Build the argument object for a ``/ws`` session's ``bot(args)``.

    Args:
        session_id: The session id (from the gateway, or generated for direct use).
        websocket: The accepted Starlette WebSocket the bot talks over.
        body: The decoded ``?body=`` JSON value, or ``None``.
        transport_type: ``"websocket"`` for a plain client, ``None`` for telephony detection.

    Returns:
        An instance of ``session_args_class("websocket")``, with
        ``handle_sigint``/``handle_sigterm`` false and ``call_data`` ``None``.
    """
    cls = session_args_class("websocket")
    return _pin_runtime_fields(
        cls(session_id=session_id, websocket=websocket, body=body, transport_type=transport_type)
    )


def make_bot_session_args(*, session_id: str, body: Any, daily: DailyRoom | None) -> Any:
    """Build the argument object for a ``POST /bot`` session's ``bot(args)``.

    Args:
        session_id: ``x-daily-session-id``.
        body: The request's JSON body, as sent (``None`` for an empty body).
        daily: The room to join, or ``None`` for a session without a transport.

    Returns:
        ``session_args_class("pipecat")(session_id, body)`` or, with ``daily``,
        ``session_args_class("daily")(room_url, token, session_id, body)``; the runtime's fields
        pinned as for :func:`make_session_args`.
    """
    if daily is None:
        return _pin_runtime_fields(session_args_class("pipecat")(session_id=session_id, body=body))
    cls = session_args_class("daily")
    return _pin_runtime_fields(
        cls(session_id=session_id, body=body, room_url=daily.room_url, token=daily.token)
    )


def make_webrtc_session_args(*, session_id: str, body: Any, connection: Any) -> Any:
    """Build the argument object for a WebRTC ``POST /bot`` session's ``bot(args)``.

    Args:
        session_id: ``x-daily-session-id``.
        body: The offer's ``requestData`` when it has one, else the ``/bot`` body (PCC's
            base image does the same).
        connection: pipecat's ``SmallWebRTCConnection`` for the client's offer.

    Returns:
        ``session_args_class("webrtc")(session_id, body, webrtc_connection)``, the runtime's
        fields pinned as for :func:`make_session_args`; ``create_transport`` builds a
        ``SmallWebRTCTransport`` from it.
    """
    cls = session_args_class("webrtc")
    return _pin_runtime_fields(cls(session_id=session_id, body=body, webrtc_connection=connection))


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
