"""Judging a telephony provider's opening messages: pure, one message at a time."""

from __future__ import annotations

import json
from typing import Any

import pytest

from catflap.gateway.providers import (
    PROVIDERS,
    SERVICE_HOST_PARAMETER,
    HandshakeDone,
    HandshakeInvalid,
    ProviderHandshake,
)

#: A valid ``start`` message per provider (the fields pipecat's detection reads).
STARTS: dict[str, dict[str, Any]] = {
    "twilio": {"event": "start", "start": {"streamSid": "MZ1", "callSid": "CA1"}},
    "telnyx": {"event": "start", "stream_id": "s1", "start": {"call_control_id": "c1"}},
    "plivo": {"event": "start", "start": {"streamId": "s1", "callId": "c1"}},
    "exotel": {
        "event": "start",
        "start": {"stream_sid": "s1", "call_sid": "c1", "account_sid": "a1"},
    },
}
CONNECTED = json.dumps({"event": "connected", "protocol": "Call"})
TELNYX = "expected Telnyx 'start' (stream_id, call_control_id)"


def judge(provider: str, *messages: str | None) -> HandshakeDone | HandshakeInvalid | None:
    handshake = ProviderHandshake(PROVIDERS[provider])
    verdict = None
    for message in messages:
        verdict = handshake.feed(message)
    return verdict


@pytest.mark.parametrize("provider", sorted(STARTS))
def test_a_start_message_is_accepted_with_or_without_connected_first(provider: str) -> None:
    start = json.dumps(STARTS[provider])
    assert judge(provider, start) == HandshakeDone(service_host=None)
    handshake = ProviderHandshake(PROVIDERS[provider])
    assert handshake.feed(CONNECTED) is None  # more is needed
    assert handshake.feed(start) == HandshakeDone(service_host=None)


@pytest.mark.parametrize("provider", sorted(STARTS))
def test_each_required_field_of_start_is_checked(provider: str) -> None:
    for dotted in PROVIDERS[provider].start_fields:
        message = json.loads(json.dumps(STARTS[provider]))
        *parents, last = dotted.split(".")
        holder = message
        for part in parents:
            holder = holder[part]
        holder[last] = ""
        verdict = judge(provider, json.dumps(message))
        assert isinstance(verdict, HandshakeInvalid)
        assert verdict.reason.endswith(f"'start' lacks {last}")


def test_twilio_names_its_agent_in_a_custom_parameter() -> None:
    start = json.loads(json.dumps(STARTS["twilio"]))
    start["start"]["customParameters"] = {SERVICE_HOST_PARAMETER: "echo.my-org"}
    assert judge("twilio", CONNECTED, json.dumps(start)) == HandshakeDone("echo.my-org")
    # Only Twilio routes from its start message; elsewhere the parameter means nothing.
    other = json.loads(json.dumps(STARTS["plivo"]))
    other["start"]["customParameters"] = {SERVICE_HOST_PARAMETER: "echo.my-org"}
    assert judge("plivo", json.dumps(other)) == HandshakeDone(None)


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ((None,), f"{TELNYX}; got a binary frame"),
        (("not json",), f"{TELNYX}; got non-JSON text"),
        (("[1, 2]",), f"{TELNYX}; got non-JSON text"),
        (
            ('{"event": "media"}',),
            f"{TELNYX}; got event 'media'",
        ),
        (
            (CONNECTED, CONNECTED),
            f"{TELNYX}; got event 'connected'",
        ),
        (
            ("[" * 100_000,),
            f"{TELNYX}; got non-JSON text",
        ),
    ],
    ids=["binary", "text", "json-array", "other-event", "connected-twice", "deep-nesting"],
)
def test_a_stream_that_is_not_the_provider_is_refused_with_a_reason(
    messages: tuple[str | None, ...], reason: str
) -> None:
    assert judge("telnyx", *messages) == HandshakeInvalid(reason)


def test_a_numeric_id_counts_but_a_boolean_does_not() -> None:
    start = {"event": "start", "start": {"streamId": 7, "callId": True}}
    verdict = judge("plivo", json.dumps(start))
    assert isinstance(verdict, HandshakeInvalid) and verdict.reason.endswith("lacks callId")


def test_an_overlong_event_name_is_cut_in_the_reason() -> None:
    verdict = judge("plivo", json.dumps({"event": "x" * 500}))
    assert isinstance(verdict, HandshakeInvalid)
    assert verdict.reason.endswith(f"got event {'x' * 20!r}")


@pytest.mark.parametrize("provider", sorted(PROVIDERS))
def test_every_expectation_fits_in_a_close_reason(provider: str) -> None:
    # A close frame's reason is at most 123 bytes, with room left for what was got.
    assert len(PROVIDERS[provider].expectation().encode()) <= 80
