"""Telephony provider endpoints: what each provider sends first, and how catflap checks it.

``/ws/{twilio,telnyx,plivo,exotel}`` accept the provider's WebSocket themselves, read its
opening messages, and only then start a session. The opening messages serve two purposes:

- **routing** (Twilio): the agent is named in ``start.customParameters._pipecatCloudServiceHost``
  because Twilio strips query strings from stream URLs;
- **validation** (all four): a stream that is not the named provider is refused with close 1008
  and a reason naming what was expected, before any bot is started.

The messages are then replayed to the bot byte for byte, so Pipecat's
``parse_telephony_websocket`` sees exactly what the provider sent. This module is pure: it
judges decoded messages and never touches a socket.

Opening messages, per provider (pipecat's detection rules, spec/pipecat-runtime.md §3.3):

=========  ============================================  ======================================
provider   opening messages                              the ``start`` message must carry
=========  ============================================  ======================================
twilio     ``connected``, then ``start``                 ``start.streamSid``, ``start.callSid``
telnyx     ``connected``, then ``start``                 ``stream_id``, ``start.call_control_id``
plivo      ``start``                                     ``start.streamId``, ``start.callId``
exotel     ``connected``, then ``start``                 ``start.stream_sid``, ``start.call_sid``,
                                                         ``start.account_sid``
=========  ============================================  ======================================

A ``connected`` message is optional: a stream that opens with a valid ``start`` is accepted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "PROVIDERS",
    "SERVICE_HOST_PARAMETER",
    "HandshakeDone",
    "HandshakeInvalid",
    "Provider",
    "ProviderHandshake",
]

#: The TwiML ``<Parameter>`` that names the agent on ``/ws/twilio``.
SERVICE_HOST_PARAMETER = "_pipecatCloudServiceHost"

ProviderName = Literal["twilio", "telnyx", "plivo", "exotel"]


@dataclass(frozen=True, slots=True)
class Provider:
    name: ProviderName
    title: str
    #: Dotted paths that must hold non-empty strings in the ``start`` message.
    start_fields: tuple[str, ...]
    #: Whether ``?serviceHost=`` is optional because the ``start`` message can name the agent.
    routes_from_start: bool = False

    def expectation(self) -> str:
        """What was expected, short enough for a close reason (at most 123 bytes)."""
        fields = ", ".join(f.rpartition(".")[2] for f in self.start_fields)
        return f"expected {self.title} 'start' ({fields})"


PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in (
        Provider("twilio", "Twilio", ("start.streamSid", "start.callSid"), routes_from_start=True),
        Provider("telnyx", "Telnyx", ("stream_id", "start.call_control_id")),
        Provider("plivo", "Plivo", ("start.streamId", "start.callId")),
        Provider("exotel", "Exotel", ("start.stream_sid", "start.call_sid", "start.account_sid")),
    )
}

#: At most this many messages are read before the ``start`` message must have arrived.
_MAX_OPENING_MESSAGES = 2


@dataclass(frozen=True, slots=True)
class HandshakeDone:
    """The stream is the provider; ``service_host`` is what the start message named, if any."""

    service_host: str | None


@dataclass(frozen=True, slots=True)
class HandshakeInvalid:
    reason: str


def _lookup(message: dict[str, Any], dotted: str) -> Any:
    value: Any = message
    for part in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


class ProviderHandshake:
    """Judge a provider's opening messages one at a time."""

    def __init__(self, provider: Provider) -> None:
        self.provider = provider
        self.messages = 0

    def feed(self, text: str | None) -> HandshakeDone | HandshakeInvalid | None:
        """Judge the next opening message (``None`` for a binary message).

        Returns:
            ``None`` while more messages are needed, else the verdict.
        """
        self.messages += 1
        provider = self.provider
        if text is None:
            return HandshakeInvalid(f"{provider.expectation()}; got a binary frame")
        try:
            message = json.loads(text)
        except (ValueError, RecursionError):
            message = None
        if not isinstance(message, dict):
            return HandshakeInvalid(f"{provider.expectation()}; got non-JSON text")
        event = str(message.get("event", "")).lower()
        if event == "connected" and self.messages < _MAX_OPENING_MESSAGES:
            return None
        if event != "start":
            got = str(message.get("event"))[:20]
            return HandshakeInvalid(f"{provider.expectation()}; got event {got!r}")
        missing = [f for f in provider.start_fields if not _nonempty(_lookup(message, f))]
        if missing:
            names = ", ".join(f.rpartition(".")[2] for f in missing)
            return HandshakeInvalid(f"{provider.expectation()}; 'start' lacks {names}")
        host = None
        if provider.routes_from_start:
            value = _lookup(message, f"start.customParameters.{SERVICE_HOST_PARAMETER}")
            host = value if isinstance(value, str) else None
        return HandshakeDone(service_host=host)


def _nonempty(value: Any) -> bool:
    return isinstance(value, str | int) and not isinstance(value, bool) and str(value) != ""
