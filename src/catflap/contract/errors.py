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
    │   │   ├── DailyNotConfigured    400 daily_not_configured (a Daily room, no Daily API key)
    │   │   ├── InvalidHandshake      400 invalid_handshake
    │   │   ├── InvalidProxyPath      400 invalid_proxy_path (the session proxy: . or ..)
    │   │   ├── InvalidOffer          400 invalid_offer (the runtime's /api/offer)
    │   │   ├── OfferConflict         400 webrtc_offer_conflict (a second peer connection)
    │   │   ├── InvalidSecretName     400 invalid_secret_name (a secret set's or secret's name)
    │   │   ├── InvalidSecretValue    400 invalid_secret_value (a NUL byte: not an env value)
    │   │   ├── SecretTooLarge        400 secret_too_large (SECRET_*_MAX_BYTES)
    │   │   ├── TooManySecretSets     400 too_many_secret_sets (SECRET_SETS_PER_ORG_MAX)
    │   │   ├── MalformedRequest      400 malformed_request
    │   │   └── PlainHttpOnTlsPort    400 plain_http_on_tls_port (listen_tls)
    │   ├── Unauthorized              401 "401" (PCC's code)
    │   ├── TokenRejected             403 token_<reason>
    │   ├── MetricsForbidden          403 metrics_forbidden
    │   ├── NotFound                  404 not_found
    │   │   ├── AgentNotFound         404 "404" (PCC's code)
    │   │   ├── SessionNotFound       404 session_not_found (the session proxy)
    │   │   ├── ReservedPath          404 reserved_path (the session proxy)
    │   │   ├── PeerConnectionNotFound  404 peer_connection_not_found (PATCH /api/offer)
    │   │   ├── SecretSetNotFound     404 secret_set_not_found
    │   │   └── SecretNotFound        404 secret_not_found
    │   ├── MethodNotAllowed          405 method_not_allowed
    │   ├── RequestTimeout            408 request_timeout
    │   ├── DuplicateSession          409 session_already_running (the runtime's POST /bot)
    │   ├── BodyTooLarge              413 body_too_large
    │   ├── RequestTooLarge           413 request_too_large
    │   ├── UrlTooLong                414 url_too_long
    │   ├── UnsupportedMediaType      415 unsupported_media_type
    │   ├── UpgradeRequired           426 upgrade_required
    │   ├── AtCapacity                429 PCC-AGENT-AT-CAPACITY (+ Retry-After)
    │   ├── TooManyStarts             429 too_many_starts (one address over
    │   │                             session_starts_per_source; + Retry-After)
    │   ├── HeadersTooLarge           431 headers_too_large
    │   ├── InternalError             500 internal_error (details only in the log)
    │   ├── NotSupportedSelfHosted    501 not_supported_self_hosted (a PCC call with no
    │   │                             meaning self-hosted: deploy, builds, regions, ...)
    │   ├── WebRTCUnavailable         501 webrtc_unavailable (no pipecat-ai[webrtc] in the agent)
    │   ├── SessionUnreachable        502 session_unreachable (the session proxy)
    │   ├── DailyApiError             502 daily_api_error (Daily's REST API refused or broke)
    │   ├── ServiceUnavailable        503 (+ Retry-After)
    │   │   ├── AgentNotReady         503 PCC-1001
    │   │   ├── Draining              503 draining (gateway or runtime shutting down)
    │   │   ├── InstanceFull          503 instance_full (the runtime's POST /bot)
    │   │   ├── RedisUnreachable      503 redis_unreachable (cluster mode: no new session)
    │   │   └── SessionStarting       503 session_starting (the session proxy)
    │   ├── SessionProxyTimeout       504 session_proxy_timeout (the session proxy)
    │   └── DailyApiTimeout           504 daily_api_timeout (Daily's REST API did not answer)
    ├── ConfigError                   bad configuration; the CLI exits with EXIT_CONFIG
    ├── StartupError                  cannot start (port taken, state dir); exits EXIT_STARTUP
    ├── SecretStoreError              the secret store cannot be read (key, file, Redis)
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
    "AgentNotFound",
    "AgentNotReady",
    "AtCapacity",
    "BadRequest",
    "BodyNotAllowed",
    "BodyTooLarge",
    "CatflapError",
    "CatflapMisuse",
    "ConfigError",
    "DailyApiError",
    "DailyApiTimeout",
    "DailyNotConfigured",
    "Draining",
    "DuplicateSession",
    "HeadersTooLarge",
    "InstanceFull",
    "InternalError",
    "InvalidBody",
    "InvalidHandshake",
    "InvalidOffer",
    "InvalidProxyPath",
    "InternalError",
    "InvalidSecretName",
    "InvalidSecretValue",
    "InvalidServiceHost",
    "MalformedRequest",
    "MethodNotAllowed",
    "MetricsForbidden",
    "MissingSessionId",
    "NotFound",
    "NotSupportedSelfHosted",
    "OfferConflict",
    "PeerConnectionNotFound",
    "PlainHttpOnTlsPort",
    "RedisUnreachable",
    "RequestRejected",
    "RequestTimeout",
    "RequestTooLarge",
    "ReservedPath",
    "SecretNotFound",
    "SecretSetNotFound",
    "SecretStoreError",
    "SecretTooLarge",
    "ServiceUnavailable",
    "SessionNotFound",
    "SessionProxyTimeout",
    "SessionStarting",
    "SessionUnreachable",
    "StartupError",
    "TokenRejected",
    "TooManyConnections",
    "TooManyStarts",
    "TooManySecretSets",
    "Unauthorized",
    "UnsupportedMediaType",
    "UnsupportedTransport",
    "UpgradeRequired",
    "UrlTooLong",
    "WebRTCUnavailable",
    "cut_error",
    "error_body",
    "http_error_response",
]


class CatflapError(Exception):
    """Base of every error catflap raises on purpose."""


class CatflapMisuse(CatflapError, AssertionError):
    """catflap or its caller broke an internal rule. Never the peer's fault."""


class StartupError(CatflapError):
    """catflap cannot start; the message says why and what to do (exit code EXIT_STARTUP)."""


class SecretStoreError(CatflapError):
    """The secret store cannot be read or written: no usable ``CATFLAP_SECRETS_KEY``, a store
    written with another key, an unreadable file, Redis unreachable. The message says what to
    do; it never holds a secret's value."""


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


class DailyNotConfigured(BadRequest):
    """``/start`` asks for a Daily room, and the organization has no Daily API key."""

    code = "daily_not_configured"


class InvalidHandshake(BadRequest):
    code = "invalid_handshake"


class InvalidOffer(BadRequest):
    """A ``POST``/``PATCH /api/offer`` body that is not the SmallWebRTC client's JSON, or an
    SDP offer the bot's WebRTC stack cannot answer."""

    code = "invalid_offer"


class OfferConflict(BadRequest):
    """A second peer connection for one session: an offer without ``pc_id`` (or with another
    one) while one is open, as pipecat's ``ConnectionMode.SINGLE`` refuses, or more offers than
    ``WEBRTC_OFFERS_MAX``."""

    code = "webrtc_offer_conflict"


class InvalidProxyPath(BadRequest):
    """A session proxy path with a ``.`` or ``..`` segment (percent-encoded or not): no bot
    route needs one, and servers disagree on resolving them."""

    code = "invalid_proxy_path"


class MalformedRequest(BadRequest):
    code = "malformed_request"


class InvalidSecretName(BadRequest):
    """A secret set's or a secret's name outside PCC's ``[a-zA-Z0-9_-]{1,64}``."""

    code = "invalid_secret_name"


class InvalidSecretValue(BadRequest):
    """A secret's value that cannot be an environment variable (it holds a NUL byte)."""

    code = "invalid_secret_value"


class SecretTooLarge(BadRequest):
    """A secret's value over ``SECRET_VALUE_MAX_BYTES``, or a set over ``SECRET_SET_MAX_BYTES``."""

    code = "secret_too_large"


class TooManySecretSets(BadRequest):
    """A new set in an organisation that has ``SECRET_SETS_PER_ORG_MAX`` already."""

    code = "too_many_secret_sets"


class PlainHttpOnTlsPort(BadRequest):
    """A plain HTTP request on the ``listen_tls`` port (nginx answers it with 400 too)."""

    code = "plain_http_on_tls_port"


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


class SessionNotFound(NotFound):
    """The session proxy's session id is not a live session of that agent (unknown or ended)."""

    code = "session_not_found"


class PeerConnectionNotFound(NotFound):
    """A trickle-ICE ``PATCH /api/offer`` for a ``pc_id`` the session has no peer connection
    for (PCC's base image answers 404 too)."""

    code = "peer_connection_not_found"


class ReservedPath(NotFound):
    """The session proxy does not reach the agent runtime's own paths (``RUNTIME_PATHS``)."""

    code = "reserved_path"


class SecretSetNotFound(NotFound):
    """No secret set of that name in the organisation."""

    code = "secret_set_not_found"


class SecretNotFound(NotFound):
    """The secret set has no secret of that name."""

    code = "secret_not_found"


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


class TooManyStarts(RequestRejected):
    """One client address started sessions faster than ``[gateway] session_starts_per_source``
    (:mod:`catflap.gateway.sourcelimit`); ``Retry-After`` says when its next start is allowed."""

    status = 429
    code = "too_many_starts"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message, headers=[("retry-after", str(retry_after))])
        self.retry_after = retry_after


class HeadersTooLarge(RequestRejected):
    status = 431
    code = "headers_too_large"


class InternalError(RequestRejected):
    status = 500
    code = "internal_error"


class SessionUnreachable(RequestRejected):
    """The session proxy could not reach the session's instance, or its answer broke off."""

    status = 502
    code = "session_unreachable"


class SessionProxyTimeout(RequestRejected):
    """The session's bot did not answer a proxied request within ``SESSION_PROXY_TIMEOUT_S``."""

    status = 504
    code = "session_proxy_timeout"


class DailyApiError(RequestRejected):
    """Daily's REST API refused to create the room or token, or answered something that is not
    Daily's answer; the message carries Daily's status, never the API key."""

    status = 502
    code = "daily_api_error"


class DailyApiTimeout(RequestRejected):
    """Daily's REST API did not answer within ``DAILY_API_TIMEOUT_S`` (or could not be reached
    in that time)."""

    status = 504
    code = "daily_api_timeout"


class WebRTCUnavailable(RequestRejected):
    """A WebRTC session or offer reached an agent whose Python environment lacks
    ``pipecat-ai[webrtc]`` (aiortc)."""

    status = 501
    code = "webrtc_unavailable"


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


class RedisUnreachable(ServiceUnavailable):
    """Cluster mode: the gateway cannot reach Redis, so it can neither spend a token nor
    reserve a slot; it refuses new sessions (live ones go on) and its ``/readyz`` answers 503."""

    code = "redis_unreachable"

    def __init__(self) -> None:
        super().__init__("the session broker (Redis) is unreachable; retry shortly")


class SessionStarting(ServiceUnavailable):
    """The session proxy's session has not reached ``bot()`` within
    ``SESSION_PROXY_START_WAIT_S`` (its instance is still starting)."""

    code = "session_starting"


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
