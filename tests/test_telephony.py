"""Provider endpoints end to end: real Pipecat serializers behind /ws/{twilio,telnyx,plivo,exotel}.

Each provider test replays a realistic opening handshake with the provider's own field names,
then 200 media frames of 20 ms audio, and checks what a real Pipecat bot made of it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
import websockets
from websockets.asyncio.client import ClientConnection, connect

from catflap.auth.tokens import mint_token
from catflap.config import CatflapConfig, GatewaySettings
from catflap.contract import limits

from .conftest import (
    ECHO,
    PIPECAT_TELEPHONY,
    TEST_KEYRING,
    RunningGateway,
    raw_request,
    running_gateway,
    seconds,
    upgrade_request,
)

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

# The serializers refuse empty credentials; the bot is told not to call the providers' APIs.
DUMMY_ENV = {
    "TWILIO_ACCOUNT_SID": "ACtest",
    "TWILIO_AUTH_TOKEN": "test",
    "TELNYX_API_KEY": "test",
    "PLIVO_AUTH_ID": "test",
    "PLIVO_AUTH_TOKEN": "test",
    "HANG_UP_ON_END": "0",
}
AGENTS: dict[str, dict[str, Any]] = {
    # An instance sees none of catflap's environment but what its agent names.
    "phone-echo": {
        "path": PIPECAT_TELEPHONY,
        "pass_env": sorted(DUMMY_ENV),
        "scaling": {"min_agents": 2, "max_agents": 4},
    },
    "tok-phone": {"path": ECHO, "websocket_auth": "token", "scaling": {"min_agents": 1}},
    "echo": {"path": ECHO, "scaling": {"min_agents": 1}},
}
FRAMES = 200
STREAM, CALL = "MZ7f3c0d5b2f6e4e0aa1b2c3d4e5f60718", "CA0123456789abcdef0123456789abcdef"


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gw() -> AsyncIterator[RunningGateway]:
    saved = {key: os.environ.get(key) for key in DUMMY_ENV}
    os.environ.update(DUMMY_ENV)
    try:
        async with running_gateway(AGENTS) as running:
            await running.wait_ready("phone-echo.my-org", count=2)
            await running.wait_ready("tok-phone.my-org")
            await running.wait_ready("echo.my-org")
            yield running
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _ulaw(count: int, rng: random.Random) -> bytes:
    # 0x7F is mu-law's "negative zero": decoding and re-encoding turns it into 0xFF.
    return bytes(rng.choice([b for b in range(256) if b != 0x7F]) for _ in range(count))


@dataclass
class ProviderCase:
    name: str
    url: str
    opening: list[dict[str, Any]]
    media: Callable[[int, bytes], dict[str, Any]]
    chunk: int  # bytes of audio per 20 ms frame
    outbound_event: str
    outbound_stream: tuple[str, str]  # (field, expected stream id) on outbound media
    call_data: dict[str, Any]
    #: pipecat's parse_telephony_websocket always reads two messages; Plivo sends no
    #: "connected", so the first media frame is read and dropped by the bot (not the gateway).
    dropped_by_parser: int = 0


SH = "phone-echo.my-org"
CASES = [
    ProviderCase(
        name="twilio",
        url="/ws/twilio",
        opening=[
            {"event": "connected", "protocol": "Call", "version": "1.0.0"},
            {
                "event": "start",
                "sequenceNumber": "1",
                "start": {
                    "accountSid": "AC11111111111111111111111111111111",
                    "streamSid": STREAM,
                    "callSid": CALL,
                    "tracks": ["inbound"],
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                    "customParameters": {
                        "_pipecatCloudServiceHost": SH,
                        "from_number": "+15550001",
                    },
                },
                "streamSid": STREAM,
            },
        ],
        media=lambda i, audio: {
            "event": "media",
            "sequenceNumber": str(i + 2),
            "media": {
                "track": "inbound",
                "chunk": str(i + 1),
                "timestamp": str(i * 20),
                "payload": _b64(audio),
            },
            "streamSid": STREAM,
        },
        chunk=160,
        outbound_event="media",
        outbound_stream=("streamSid", STREAM),
        call_data={
            "stream_id": STREAM,
            "call_id": CALL,
            "from": "+15550001",
            "body": {"_pipecatCloudServiceHost": SH, "from_number": "+15550001"},
        },
    ),
    ProviderCase(
        name="telnyx",
        url=f"/ws/telnyx?serviceHost={SH}",
        opening=[
            {"event": "connected", "version": "1.0.0"},
            {
                "event": "start",
                "sequence_number": "1",
                "start": {
                    "user_id": "3e6f995f-85f7-4705-9741-53b116d28237",
                    "call_control_id": "v3:T02llQxIyaRkhfRKxgAP8nY511EhFLizdvdUKJiSw8d6A9BborherQ",
                    "call_session_id": "ff55a038-4f7e-11ed-8b74-02420a0daa69",
                    "from": "+13122010094",
                    "to": "+13122123456",
                    "tags": ["TAG1"],
                    "client_state": "aGF2ZSBhIG5pY2UgZGF5ID1d",
                    "media_format": {"encoding": "PCMU", "sample_rate": 8000, "channels": 1},
                },
                "stream_id": "32de0dea-53cb-4b21-89a4-9d4fd6d3b4e6",
            },
        ],
        media=lambda i, audio: {
            "event": "media",
            "sequence_number": str(i + 2),
            "media": {
                "track": "inbound",
                "chunk": str(i + 1),
                "timestamp": str(i * 20),
                "payload": _b64(audio),
            },
            "stream_id": "32de0dea-53cb-4b21-89a4-9d4fd6d3b4e6",
        },
        chunk=160,
        outbound_event="media",
        outbound_stream=("", ""),  # Telnyx outbound media carries no stream id
        call_data={
            "stream_id": "32de0dea-53cb-4b21-89a4-9d4fd6d3b4e6",
            "call_id": "v3:T02llQxIyaRkhfRKxgAP8nY511EhFLizdvdUKJiSw8d6A9BborherQ",
            "from": "+13122010094",
            "to": "+13122123456",
            "outbound_encoding": "PCMU",
        },
    ),
    ProviderCase(
        name="plivo",
        url=f"/ws/plivo?serviceHost={SH}",
        opening=[
            {
                "event": "start",
                "sequenceNumber": 0,
                "start": {
                    "callId": "c8e12c39-3a5f-4d8e-9a3f-1b5e7d9c2a41",
                    "streamId": "b77e037d-4119-44b5-902d-25826b654539",
                    "accountId": "MAXXXXXXXXXXXXXXXXXX",
                    "tracks": ["inbound"],
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000},
                },
                "extra_headers": "{}",
            },
        ],
        media=lambda i, audio: {
            "event": "media",
            "sequenceNumber": i + 1,
            "streamId": "b77e037d-4119-44b5-902d-25826b654539",
            "media": {
                "track": "inbound",
                "timestamp": str(1700000000000 + i * 20),
                "chunk": i + 1,
                "payload": _b64(audio),
            },
        },
        chunk=160,
        outbound_event="playAudio",
        outbound_stream=("streamId", "b77e037d-4119-44b5-902d-25826b654539"),
        call_data={
            "stream_id": "b77e037d-4119-44b5-902d-25826b654539",
            "call_id": "c8e12c39-3a5f-4d8e-9a3f-1b5e7d9c2a41",
        },
        dropped_by_parser=1,
    ),
    ProviderCase(
        name="exotel",
        url=f"/ws/exotel?serviceHost={SH}",
        opening=[
            {"event": "connected"},
            {
                "event": "start",
                "sequence_number": 1,
                "stream_sid": "eb8c2f1b3e0a4d6c9f7a5b3d1e9c7a52",
                "start": {
                    "stream_sid": "eb8c2f1b3e0a4d6c9f7a5b3d1e9c7a52",
                    "call_sid": "d3f0c6a9b2e84f17a5c3e1b9d7f5a3c1",
                    "account_sid": "exotel-account",
                    "from": "09999999999",
                    "to": "08888888888",
                    "custom_parameters": {"campaign": "spring"},
                    "media_format": {
                        "encoding": "base64",
                        "sample_rate": "8000",
                        "bit_rate": "128kbps",
                    },
                },
            },
        ],
        media=lambda i, audio: {
            "event": "media",
            "sequence_number": i + 2,
            "stream_sid": "eb8c2f1b3e0a4d6c9f7a5b3d1e9c7a52",
            "media": {"chunk": i + 1, "timestamp": str(i * 20), "payload": _b64(audio)},
        },
        chunk=320,  # 16-bit PCM, not mu-law
        outbound_event="media",
        outbound_stream=("stream_sid", "eb8c2f1b3e0a4d6c9f7a5b3d1e9c7a52"),
        call_data={
            "stream_id": "eb8c2f1b3e0a4d6c9f7a5b3d1e9c7a52",
            "call_id": "d3f0c6a9b2e84f17a5c3e1b9d7f5a3c1",
            "account_sid": "exotel-account",
            "custom_parameters": {"campaign": "spring"},
        },
    ),
]


def _with_body(url: str, body: dict[str, Any]) -> str:
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}body={_b64(json.dumps(body).encode())}"


async def _collect_audio(
    ws: ClientConnection, case: ProviderCase, want: int
) -> tuple[bytes, dict[str, Any]]:
    audio, report = b"", {}
    async with asyncio.timeout(seconds(20)):
        while len(audio) < want:
            message = json.loads(await ws.recv())
            if message.get("event") == "catflap-report":
                report = message
                continue
            assert message["event"] == case.outbound_event, message
            field, stream = case.outbound_stream
            if field:
                assert message[field] == stream
            if case.name == "plivo":
                assert message["media"]["contentType"] == "audio/x-mulaw"
                assert message["media"]["sampleRate"] == 8000
            audio += base64.b64decode(message["media"]["payload"])
    return audio, report


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_provider_call_reaches_a_real_pipecat_bot_and_echoes(
    gw: RunningGateway, case: ProviderCase
) -> None:
    rng = random.Random(case.name)
    # Send whole 40 ms output chunks' worth after the parser's drop: pipecat holds a last
    # partial chunk back until more audio comes.
    frames = FRAMES + case.dropped_by_parser
    audio = _ulaw(frames * case.chunk, rng) if case.chunk == 160 else rng.randbytes(frames * 320)
    body = {"report": True, "crm_id": "abc123"}
    before = set(gw.gateway.sessions.ended)
    async with connect(gw.ws + _with_body(case.url, body)) as ws:
        for message in case.opening:
            await ws.send(json.dumps(message))
        for index in range(frames):
            chunk = audio[index * case.chunk : (index + 1) * case.chunk]
            await ws.send(json.dumps(case.media(index, chunk)))
        expected = audio[case.dropped_by_parser * case.chunk :]
        echoed, report = await _collect_audio(ws, case, len(expected))
        assert report["transport_type"] == case.name
        assert {k: report["call_data"].get(k) for k in case.call_data} == case.call_data
        assert report["body"] == body
        assert echoed == expected
        hung_up = time.perf_counter()
    async with asyncio.timeout(seconds(5)):
        while not (new := set(gw.gateway.sessions.ended) - before):
            await asyncio.sleep(0.01)
    assert time.perf_counter() - hung_up < 1.0
    record = gw.gateway.sessions.ended[new.pop()]
    assert record.transport == case.name
    assert record.completion_status == "client_closed"
    assert record.frames_client_to_agent == len(case.opening) + frames + 1  # + close


async def test_opening_frames_are_replayed_byte_for_byte(gw: RunningGateway) -> None:
    # The echo bot sends back exactly the text frames it receives, from the very first one.
    case = CASES[1]
    sent = [json.dumps(m, indent=1) for m in case.opening]  # odd spacing must survive as is
    async with connect(f"{gw.ws}/ws/telnyx?serviceHost=echo.my-org") as ws:
        for text in sent:
            await ws.send(text)
        hello = json.loads(await ws.recv())
        assert hello["transport_type"] is None  # pipecat auto-detects on provider endpoints
        assert [await ws.recv() for _ in sent] == sent


async def _closed_with(ws: ClientConnection) -> tuple[int | None, str | None]:
    with pytest.raises(websockets.ConnectionClosed):
        async with asyncio.timeout(seconds(15)):
            while True:
                await ws.recv()
    return ws.close_code, ws.close_reason


@pytest.mark.parametrize(
    ("url", "messages", "reason_part"),
    [
        ("/ws/telnyx?serviceHost=echo.my-org", [{"event": "media"}], "expected Telnyx 'start'"),
        ("/ws/plivo?serviceHost=echo.my-org", [CASES[0].opening[1]], "expected Plivo 'start'"),
        (
            "/ws/twilio",
            [CASES[0].opening[0], {"event": "start", "start": {"streamSid": "x"}}],
            "lacks callSid",
        ),
        ("/ws/exotel?serviceHost=echo.my-org", ["not json"], "non-JSON"),
        (
            "/ws/twilio",
            [
                {"event": "connected"},
                {
                    "event": "start",
                    "streamSid": "s",
                    "start": {"streamSid": "s", "callSid": "c", "customParameters": {}},
                },
            ],
            "no _pipecatCloudServiceHost",
        ),
        (
            "/ws/twilio",
            [
                {
                    "event": "start",
                    "start": {
                        "streamSid": "s",
                        "callSid": "c",
                        "customParameters": {"_pipecatCloudServiceHost": "ghost.my-org"},
                    },
                }
            ],
            "no agent 'ghost'",
        ),
        (
            "/ws/twilio",
            [
                {
                    "event": "start",
                    "start": {
                        "streamSid": "s",
                        "callSid": "c",
                        "customParameters": {"_pipecatCloudServiceHost": "tok-phone.my-org"},
                    },
                }
            ],
            "/ws/twilio/<token>",
        ),
    ],
    ids=[
        "wrong-shape",
        "twilio-on-plivo",
        "missing-field",
        "not-json",
        "no-service-host",
        "unknown-agent",
        "token-agent-without-token",
    ],
)
async def test_streams_that_are_not_the_provider_are_closed_with_1008(
    gw: RunningGateway, url: str, messages: list[Any], reason_part: str
) -> None:
    started = gw.gateway.sessions.started_total
    async with connect(gw.ws + url) as ws:
        for message in messages:
            await ws.send(message if isinstance(message, str) else json.dumps(message))
        code, reason = await _closed_with(ws)
    assert code == 1008
    assert reason is not None and reason_part in reason
    assert gw.gateway.sessions.started_total == started


async def test_silence_before_start_is_closed_with_1008_after_the_bound() -> None:
    assert GatewaySettings().provider_handshake_timeout == limits.PROVIDER_HANDSHAKE_TIMEOUT_S

    def short_handshake(config: CatflapConfig) -> CatflapConfig:
        settings = config.gateway.model_copy(update={"provider_handshake_timeout": 0.5})
        return config.model_copy(update={"gateway": settings})

    agents = {"echo": {"scaling": {"min_agents": 1}}}
    async with running_gateway(agents, adjust=short_handshake) as gw:
        await gw.wait_ready("echo.my-org")
        async with connect(f"{gw.ws}/ws/telnyx?serviceHost=echo.my-org") as ws:
            waited = time.perf_counter()
            code, reason = await _closed_with(ws)
    assert code == 1008 and reason == "no Telnyx 'start' message within 0.5 s"
    assert 0.4 < time.perf_counter() - waited < 3.0


async def test_token_agent_with_a_valid_path_token_is_accepted(gw: RunningGateway) -> None:
    token, claims = mint_token(TEST_KEYRING, "tok-phone.my-org", now=time.time())
    async with connect(f"{gw.ws}/ws/telnyx/{token}?serviceHost=tok-phone.my-org") as ws:
        for message in CASES[1].opening:
            await ws.send(json.dumps(message))
        assert json.loads(await ws.recv())["session_id"] == claims.jti


async def test_twilio_token_agent_with_a_path_token_is_accepted(gw: RunningGateway) -> None:
    token, claims = mint_token(TEST_KEYRING, "tok-phone.my-org", now=time.time())
    start = json.loads(json.dumps(CASES[0].opening[1]))
    start["start"]["customParameters"]["_pipecatCloudServiceHost"] = "tok-phone.my-org"
    async with connect(f"{gw.ws}/ws/twilio/{token}") as ws:
        await ws.send(json.dumps(CASES[0].opening[0]))
        await ws.send(json.dumps(start))
        assert json.loads(await ws.recv())["session_id"] == claims.jti


@pytest.mark.parametrize(
    ("target", "status", "code"),
    [
        ("/ws/telnyx", 400, "invalid_service_host"),
        ("/ws/plivo?serviceHost=nope.my-org", 404, "404"),
        ("/ws/exotel?serviceHost=bad..host", 400, "invalid_service_host"),
        ("/ws/telnyx?serviceHost=tok-phone.my-org", 403, "token_missing"),
        ("/ws/telnyx/abc.def?serviceHost=tok-phone.my-org", 403, "token_malformed"),
        ("/ws/plivo?serviceHost=echo.my-org&body=%%", 400, "invalid_body"),
        ("/ws/vonage?serviceHost=echo.my-org", 404, "not_found"),
    ],
)
async def test_failures_known_before_the_upgrade_get_http_statuses(
    gw: RunningGateway, target: str, status: int, code: str
) -> None:
    response = await raw_request(gw.port, upgrade_request(target))
    assert (response.status, response.json()["code"]) == (status, code)


async def test_expired_path_token_is_refused(gw: RunningGateway) -> None:
    token, _ = mint_token(TEST_KEYRING, "tok-phone.my-org", now=time.time() - 301)
    response = await raw_request(
        gw.port, upgrade_request(f"/ws/plivo/{token}?serviceHost=tok-phone.my-org")
    )
    assert (response.status, response.json()["code"]) == (403, "token_expired")
    # On Twilio the agent is only known after the start message: the refusal is a close.
    start = json.loads(json.dumps(CASES[0].opening[1]))
    start["start"]["customParameters"]["_pipecatCloudServiceHost"] = "tok-phone.my-org"
    async with connect(f"{gw.ws}/ws/twilio/{token}") as ws:
        await ws.send(json.dumps(start))
        code, reason = await _closed_with(ws)
    assert code == 1008 and reason is not None and "expired" in reason
