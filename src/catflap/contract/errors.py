"""catflap's error hierarchy and the one place it becomes an HTTP response.

::

    CatflapError                      base; never raised directly
    ├── RequestRejected               the peer broke a rule; carries status + code  (4xx/5xx)
    │   ├── BadRequest                400 bad_request
    │   │   ├── InvalidServiceHost    400 invalid_service_host
    │   │   ├── InvalidBody           400 invalid_body
    │   │   ├── MissingSessionId      400 missing_session_id (the runtime's POST /bot)
    │   │   ├── BodyNotAllowed        400 body_not_allowed
    │   │   ├── UnsupportedTransport  400 unsupported_transport
    │   │   ├── InvalidHandshake      400 invalid_handshake
    │   │   └── MalformedRequest      400 malformed_request
    │   ├── Unauthorized              401 "401" (PCC's code)
    │   ├── TokenRejected             403 token_<reason>
    │   ├── MetricsForbidden          403 metrics_forbidden
    │   ├── NotFound                  404 not_found
    │   │   └── AgentNotFound         404 "404" (PCC's code)
    │   ├── MethodNotAllowed          405 method_not_allowed
    │   ├── RequestTimeout            408 request_timeout
    │   ├── DuplicateSession          409 session_already_running (the runtime's POST /bot)
    │   ├── BodyTooLarge              413 body_too_large
    │   ├── RequestTooLarge           413 request_too_large
    │   ├── UrlTooLong                414 url_too_long
    │   ├── UnsupportedMediaType      415 unsupported_media_type
    │   ├── UpgradeRequired           426 upgrade_required
    │   ├── AtCapacity                429 PCC-AGENT-AT-CAPACITY (+ Retry-After)
    │   ├── HeadersTooLarge           431 headers_too_large
    │   ├── InternalError             500 internal_error (details only in the log)
    │   ├── NotSupportedSelfHosted    501 not_supported_self_hosted (a PCC call with no
    │   │                             meaning self-hosted: deploy, builds, regions, ...)
    │   └── ServiceUnavailable        503 (+ Retry-After)
    │       ├── AgentNotReady         503 PCC-1001
    │       ├── Draining              503 draining (gateway or runtime shutting down)
    │       └── InstanceFull          503 instance_full (the runtime's POST /bot)
    ├── ConfigError                   bad configuration; the CLI exits with EXIT_CONFIG
    ├── StartupError                  cannot start (port taken, state dir); exits EXIT_STARTUP
    ├── CatflapMisuse                 a bug in catflap or its caller (also an AssertionError)
    │   ├── IllegalTransition         a relay event its state table has no row for (relaystate)
    │   └── SocketsLent               Python I/O on a socket the fast lane holds (relaystate)
    ├── ControlProtocolError          a bad control-channel line (contract/control.py)
    └── BotImportError                bot.py failed to import (runtime/botloader.py)

Where PCC documents a ``code`` for the same condition, catflap uses PCC's value so that
existing clients keep working; everything else uses a catflap snake_case code.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from http import HTTPStatus
from typing import ClassVar

from catflap.contract import limits

__all__ = [
    "cut_error",
    "AgentNotFound",
    "AgentNotReady",
    "AtCapacity",
    "BadRequest",
    "BodyNotAllowed",
    "BodyTooLarge",
    "CatflapError",
    "CatflapMisuse",
    "ConfigError",
    "Draining",
    "DuplicateSession",
    "InstanceFull",
    "TooManyConnections",
    "HeadersTooLarge",
    "InvalidBody",
    "InvalidHandshake",
    "InternalError",
    "InvalidServiceHost",
    "MalformedRequest",
    "MethodNotAllowed",
    "MissingSessionId",
    "MetricsForbidden",
    "NotFound",
    "NotSupportedSelfHosted",
    "RequestRejected",
    "RequestTimeout",
    "RequestTooLarge",
    "ServiceUnavailable",
    "StartupError",
    "TokenRejected",
    "Unauthorized",
    "UnsupportedMediaType",
    "UnsupportedTransport",
    "UpgradeRequired",
    "UrlTooLong",
    "error_body",
    "http_error_response",
]


class CatflapError(Exception):
    """Base of every error catflap raises on purpose."""


class CatflapMisuse(CatflapError, AssertionError):
    """catflap or its caller broke an internal rule. Never the peer's fault."""


class StartupError(CatflapError):
    """catflap cannot start; the message says why and what to do (exit code EXIT_STARTUP)."""


class ConfigError(CatflapError):
    """The configuration is invalid. The message names the file, the key and the problem."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        super().__init__(f"{source}: {key}: {problem}")


class RequestRejected(CatflapError):
    """A request that catflap refuses with an HTTP status, before any bot is started.

    Subclasses set :attr:`status` and :attr:`code`; instances carry the human message and any
    extra response headers (``Retry-After``, ``Allow``, ``Upgrade``...).
    """

    status: ClassVar[int] = 400
    code: ClassVar[str] = "bad_request"

    def __init__(self, message: str, *, headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.headers: tuple[tuple[str, str], ...] = tuple(headers)

    def to_body(self) -> dict[str, str]:
        return error_body(self.message, self.code)


class BadRequest(RequestRejected):
    status = 400
    code = "bad_request"


class InvalidServiceHost(BadRequest):
    code = "invalid_service_host"


class MissingSessionId(BadRequest):
    """The runtime's ``POST /bot`` without ``x-daily-session-id``: the caller names the session."""

    code = "missing_session_id"


class InvalidBody(BadRequest):
    code = "invalid_body"


class BodyNotAllowed(BadRequest):
    code = "body_not_allowed"


class UnsupportedTransport(BadRequest):
    code = "unsupported_transport"


class InvalidHandshake(BadRequest):
    code = "invalid_handshake"


class MalformedRequest(BadRequest):
    code = "malformed_request"


class Unauthorized(RequestRejected):
    status = 401
    code = "401"


class TokenRejected(RequestRejected):
    """403: the session token is missing or not valid for this agent.

    ``reason`` is a :class:`catflap.auth.tokens.TokenFailure` value (``missing``,
    ``malformed``, ``unknown_key``, ``bad_signature``, ``expired``, ``not_yet_valid``,
    ``wrong_agent``, ``replayed``); the JSON code is ``token_<reason>``.
    """

    status = 403
    code = "token_rejected"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    def to_body(self) -> dict[str, str]:
        return error_body(self.message, f"token_{self.reason}")


class MetricsForbidden(RequestRejected):
    """403: ``/metrics`` on the main port, with neither ``metrics_key`` nor ``metrics_listen``
    set, from a client that is not on loopback (it lists every organization and agent)."""

    status = 403
    code = "metrics_forbidden"


class NotFound(RequestRejected):
    status = 404
    code = "not_found"


class AgentNotFound(NotFound):
    code = "404"


class MethodNotAllowed(RequestRejected):
    status = 405
    code = "method_not_allowed"


class DuplicateSession(RequestRejected):
    """The runtime's ``POST /bot`` names a session id that is already running there."""

    status = 409
    code = "session_already_running"


class RequestTimeout(RequestRejected):
    status = 408
    code = "request_timeout"


class BodyTooLarge(RequestRejected):
    status = 413
    code = "body_too_large"


class RequestTooLarge(RequestRejected):
    status = 413
    code = "request_too_large"


class UrlTooLong(RequestRejected):
    status = 414
    code = "url_too_long"


class UnsupportedMediaType(RequestRejected):
    status = 415
    code = "unsupported_media_type"


class UpgradeRequired(RequestRejected):
    status = 426
    code = "upgrade_required"


class AtCapacity(RequestRejected):
    status = 429
    code = "PCC-AGENT-AT-CAPACITY"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers=[("retry-after", str(limits.RETRY_AFTER_AT_CAPACITY_S))])


class HeadersTooLarge(RequestRejected):
    status = 431
    code = "headers_too_large"


class InternalError(RequestRejected):
    status = 500
    code = "internal_error"


class NotSupportedSelfHosted(RequestRejected):
    """501: a Pipecat Cloud API call that has no meaning in a self-hosted gateway (deploys,
    builds, regions, billing, ...); the message says what catflap does instead."""

    status = 501
    code = "not_supported_self_hosted"


class ServiceUnavailable(RequestRejected):
    status = 503
    code = "service_unavailable"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers=[("retry-after", str(limits.RETRY_AFTER_NOT_READY_S))])


class AgentNotReady(ServiceUnavailable):
    code = "PCC-1001"


class Draining(ServiceUnavailable):
    """The gateway is shutting down, or a runtime got ``shutdown``: running sessions finish,
    no new one starts."""

    code = "draining"


class InstanceFull(ServiceUnavailable):
    """The runtime's ``POST /bot`` finds the instance at its ``sessions_per_instance``."""

    code = "instance_full"


class TooManyConnections(ServiceUnavailable):
    """The gateway holds ``[gateway] max_connections`` connections already."""

    code = "too_many_connections"


def error_body(message: str, code: str) -> dict[str, str]:
    """The one JSON error shape: ``{"error": message, "code": code}``."""
    return {"error": message, "code": code}


def http_error_response(error: RequestRejected) -> bytes:
    """Serialise ``error`` as a complete HTTP/1.1 response that closes the connection."""
    payload = json.dumps(error.to_body(), separators=(",", ":")).encode()
    reason = HTTPStatus(error.status).phrase
    lines = [
        f"HTTP/1.1 {error.status} {reason}",
        "content-type: application/json",
        f"content-length: {len(payload)}",
        "connection: close",
    ]
    lines.extend(f"{name}: {value}" for name, value in error.headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


def cut_error(text: str, limit: int = limits.RECORD_ERROR_MAX_CHARS) -> str:
    """``text`` if it has at most ``limit`` characters, else its start and a marker saying how
    long it was, ``limit`` characters in all.

    Idempotent: a cut text is at most ``limit`` long, so cutting it again changes nothing (a
    record read back from a store keeps the original length in its marker).
    """
    if len(text) <= limit:
        return text
    marker = f"\u2026 [truncated, {len(text)} chars]"
    return text[: max(limit - len(marker), 0)] + marker
