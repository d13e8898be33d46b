"""Daily rooms for ``createDailyRoom`` sessions: one room and one meeting token from Daily's
REST API, each answer bounded in size and time.

``POST /v1/public/{agent}/start`` with ``createDailyRoom: true`` (or ``transport: "daily"``)
makes two calls with the organization's Daily API key, before any pool slot is taken:

1. ``POST {daily_api_url}/rooms`` with ``{"privacy": "private", "properties": {...}}``: the
   request's ``dailyRoomProperties`` over catflap's defaults, ``exp`` (the session's
   ``max_session_duration`` from now, so a room never outlives its session for long) and
   ``eject_at_room_exp: true`` (pipecat's dev runner sets the same two). Daily answers the room
   object; catflap reads its ``url`` and ``name``.
2. ``POST {daily_api_url}/meeting-tokens`` with ``{"properties": {...}}``: the request's
   ``dailyMeetingTokenProperties`` over ``exp`` (the room's), then ``room_name`` set to the new
   room, always: a token without it would open every room of the Daily domain. Daily answers
   ``{"token": ...}``.

The one token goes both to the bot (``x-daily-room-token``) and to the client
(``dailyToken``), as pipecat's dev runner does. A room whose bot then fails to start is not
deleted: its ``exp`` ends it.

Each call must be answered within ``DAILY_API_TIMEOUT_S`` (else 504 ``daily_api_timeout``) in at
most ``DAILY_API_RESPONSE_MAX_BYTES`` (else 502 ``daily_api_error``); a refusal by Daily is 502
with Daily's status and its error text. The API key is never logged nor put in an error, and
is scrubbed from anything Daily's answer repeats.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import SecretStr

from catflap.config import OrgConfig
from catflap.contract import limits
from catflap.contract.errors import DailyApiError, DailyApiTimeout, DailyNotConfigured

__all__ = [
    "DailyRoom",
    "create_daily_room",
    "daily_api_key",
    "room_request",
    "token_request",
]

log = logging.getLogger("catflap.daily")

#: What may stand in a header value the runtime receives: printable ASCII, no spaces.
_HEADER_SAFE = re.compile(r"[!-~]+")
_ROOM_URL = re.compile(r"https?://[!-~]+")
#: How much of Daily's own error text a 502 quotes.
_DETAIL_MAX_CHARS = 300


@dataclass(frozen=True, slots=True)
class DailyRoom:
    """A room Daily created for one session, and the meeting token to join it with."""

    url: str
    name: str
    token: str

    def __repr__(self) -> str:
        # The token opens the room: keep it out of reprs (and so out of tracebacks and logs).
        return f"DailyRoom(url={self.url!r}, name={self.name!r}, token=...)"


def daily_api_key(
    org: str, settings: OrgConfig, environ: Mapping[str, str] = os.environ
) -> SecretStr:
    """The organization's Daily API key: ``daily_api_key``, or the environment variable that
    ``daily_api_key_env`` names (read now, so that a rotated key needs no restart).

    Raises:
        DailyNotConfigured: 400, neither is set, or the variable is unset or empty.
    """
    if settings.daily_api_key is not None:
        return settings.daily_api_key
    if settings.daily_api_key_env is not None:
        value = environ.get(settings.daily_api_key_env, "").strip()
        if value:
            return SecretStr(value)
        raise DailyNotConfigured(
            f"organization {org!r} reads its Daily API key from the environment variable "
            f"{settings.daily_api_key_env}, which is not set in the gateway's environment: set "
            "it, or send no createDailyRoom (a session without a transport)"
        )
    raise DailyNotConfigured(
        f"organization {org!r} has no Daily API key, so catflap cannot create Daily rooms: set "
        f"[organizations.{org}] daily_api_key, or daily_api_key_env naming an environment "
        "variable that holds it; or send no createDailyRoom (a session without a transport)"
    )


def room_request(properties: Mapping[str, Any] | None, *, expires_at: int) -> dict[str, Any]:
    """The JSON of ``POST /rooms``: a private room with ``properties`` over catflap's
    defaults (see the module docstring)."""
    defaults: dict[str, Any] = {"exp": expires_at, "eject_at_room_exp": True}
    return {"privacy": "private", "properties": {**defaults, **(properties or {})}}


def token_request(
    room_name: str, properties: Mapping[str, Any] | None, *, expires_at: Any
) -> dict[str, Any]:
    """The JSON of ``POST /meeting-tokens``: ``properties`` over ``exp``, for ``room_name``
    only (see the module docstring)."""
    return {"properties": {"exp": expires_at, **(properties or {}), "room_name": room_name}}


def _scrubbed(text: str, key: str) -> str:
    """``text`` cut to a quotable length, printable, and without the API key in it."""
    text = text.replace(key, "[daily_api_key]")
    text = "".join(c if c.isprintable() else " " for c in text)
    return text if len(text) <= _DETAIL_MAX_CHARS else text[:_DETAIL_MAX_CHARS] + "…"


def _daily_detail(data: bytes, key: str) -> str:
    """`` (error: info)`` from Daily's JSON error, else the start of its text, else nothing."""
    try:
        answer = json.loads(data)
    except ValueError:
        answer = None
    if isinstance(answer, dict) and isinstance(answer.get("error"), str):
        text = answer["error"]
        if isinstance(answer.get("info"), str):
            text += f": {answer['info']}"
    else:
        text = data[:_DETAIL_MAX_CHARS].decode("utf-8", "replace").strip()
    return f" ({_scrubbed(text, key)})" if text else ""


async def _post(
    client: httpx.AsyncClient, url: str, path: str, payload: dict[str, Any], key: str
) -> dict[str, Any]:
    """POST ``payload`` to Daily's ``path`` and return its JSON object answer.

    Raises:
        DailyApiTimeout: 504, no complete answer within ``DAILY_API_TIMEOUT_S``.
        DailyApiError: 502, Daily unreachable, refusing (non-2xx), or answering too much or
            something that is not a JSON object.
    """
    what = f"POST {path}"
    try:
        async with asyncio.timeout(limits.DAILY_API_TIMEOUT_S):
            async with client.stream("POST", url + path, json=payload) as response:
                data = await _bounded_body(response, what)
    except (TimeoutError, httpx.TimeoutException):
        log.warning("! Daily API: %s%s: no answer in %gs", url, path, limits.DAILY_API_TIMEOUT_S)
        raise DailyApiTimeout(
            f"Daily's API did not answer {what} within {limits.DAILY_API_TIMEOUT_S:g} s; "
            "no session was started: retry shortly"
        ) from None
    except httpx.HTTPError as exc:
        log.warning("! Daily API: %s%s: %s", url, path, type(exc).__name__)
        raise DailyApiError(
            f"could not reach Daily's API, or read its answer, for {what} "
            f"({type(exc).__name__}); no session was started: check the organization's "
            "daily_api_url and the gateway's network, and retry"
        ) from None
    status = response.status_code
    if not 200 <= status < 300:
        log.warning("! Daily API: %s%s answered %d", url, path, status)
        raise DailyApiError(
            f"Daily's API answered {status} to {what}{_daily_detail(data, key)}; no session was "
            "started: check the organization's Daily API key and the "
            + ("dailyRoomProperties" if path == "/rooms" else "dailyMeetingTokenProperties")
        )
    try:
        answer = json.loads(data)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise DailyApiError(f"Daily's API answered {what} with something other than a JSON object")
    return answer


async def _bounded_body(response: httpx.Response, what: str) -> bytes:
    """The raw body of Daily's answer, at most ``DAILY_API_RESPONSE_MAX_BYTES``, counted as it
    arrives (the request asked for no content coding, so raw bytes are the JSON)."""
    declared = response.headers.get("content-length", "")
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise DailyApiError(f"Daily's API answered {what} with content-encoding {encoding[:32]!r}")
    too_large = DailyApiError(
        f"Daily's API answered {what} with more than {limits.DAILY_API_RESPONSE_MAX_BYTES} bytes"
    )
    if declared.isdigit() and int(declared) > limits.DAILY_API_RESPONSE_MAX_BYTES:
        raise too_large
    data = bytearray()
    async for chunk in response.aiter_raw():
        data += chunk
        if len(data) > limits.DAILY_API_RESPONSE_MAX_BYTES:
            raise too_large
    return bytes(data)


def _field(
    answer: dict[str, Any], name: str, pattern: re.Pattern[str], limit: int, what: str
) -> str:
    value = answer.get(name)
    if not isinstance(value, str) or len(value) > limit or not pattern.fullmatch(value):
        raise DailyApiError(
            f"Daily's API answered {what} without a usable {name!r} (a string of printable "
            f"ASCII, at most {limit} characters)"
        )
    return value


async def create_daily_room(
    *,
    api_url: str,
    api_key: SecretStr,
    room_properties: Mapping[str, Any] | None,
    token_properties: Mapping[str, Any] | None,
    expires_at: int,
) -> DailyRoom:
    """Create a room and its meeting token through Daily's REST API (see the module docstring).

    Args:
        api_url: ``daily_api_url``, e.g. ``https://api.daily.co/v1``.
        api_key: The organization's Daily API key.
        room_properties: ``dailyRoomProperties`` of the ``/start`` request.
        token_properties: ``dailyMeetingTokenProperties`` of the ``/start`` request.
        expires_at: Unix time when the room (and by default its token) expires.

    Raises:
        DailyApiTimeout: 504, a call was not answered in time.
        DailyApiError: 502, Daily refused or answered something unusable.
    """
    key = api_key.get_secret_value()
    url = api_url.rstrip("/")
    # No cookies, no redirects (a redirect would carry the key elsewhere) and no content
    # coding (the byte bound counts what arrives). One client, so both calls share a
    # connection.
    async with httpx.AsyncClient(
        headers={"authorization": f"Bearer {key}", "accept-encoding": "identity"},
        timeout=limits.DAILY_API_TIMEOUT_S,
        follow_redirects=False,
    ) as client:
        wanted = room_request(room_properties, expires_at=expires_at)
        room = await _post(client, url, "/rooms", wanted, key)
        room_url = _field(room, "url", _ROOM_URL, limits.DAILY_ROOM_URL_MAX_CHARS, "POST /rooms")
        name = _field(room, "name", _HEADER_SAFE, limits.DAILY_ROOM_URL_MAX_CHARS, "POST /rooms")
        # The token lasts as long as the room asked for, unless the client says otherwise.
        payload = token_request(name, token_properties, expires_at=wanted["properties"]["exp"])
        answer = await _post(client, url, "/meeting-tokens", payload, key)
        token = _field(
            answer, "token", _HEADER_SAFE, limits.DAILY_ROOM_TOKEN_MAX_CHARS, "POST /meeting-tokens"
        )
    log.info("= Daily room %s created", name)
    return DailyRoom(url=room_url, name=name, token=token)
