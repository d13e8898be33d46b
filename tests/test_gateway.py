"""End to end through the gateway: real sockets, real uvicorn agents, real bots."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import websockets
from websockets.asyncio.client import ClientConnection, connect

from catflap.auth.tokens import KeyRing, SigningKey, mint_token
from catflap.contract import limits

from .conftest import (
    PUBLIC_KEY,
    ROOT,
    TEST_KEYRING,
    FakeClock,
    RunningGateway,
    raw_request,
    running_gateway,
    seconds,
    upgrade_request,
)

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

CLOCK = FakeClock()
AGENTS: dict[str, dict[str, Any]] = {
    "my-agent": {"scaling": {"min_agents": 1, "max_agents": 5}},
    "tok-agent": {"websocket_auth": "token", "scaling": {"min_agents": 1, "max_agents": 5}},
    "auto-agent": {"generic_transport_type": "auto", "scaling": {"min_agents": 0}},
    "solo": {"scaling": {"min_agents": 1, "max_agents": 1}},
    "closecode": {"path": ROOT / "tests/bots/closecode", "scaling": {"min_agents": 1}},
}


@pytest_asyncio.fixture(
    loop_scope="module", scope="module", params=[True, False], ids=["lane", "event-loop"]
)
async def gw(request: pytest.FixtureRequest) -> AsyncIterator[RunningGateway]:
    async with running_gateway(AGENTS, clock=CLOCK, native_relay=request.param) as running:
        for key in ("my-agent.my-org", "tok-agent.my-org", "solo.my-org", "closecode.my-org"):
            await running.wait_ready(key)
        yield running


async def hello(ws: ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(seconds(10)):
        frame = await ws.recv()
    assert isinstance(frame, str)
    result: dict[str, Any] = json.loads(frame)
    return result


def _b64_raw(data: bytes) -> str:
    return base64.b64encode(data).decode()


def b64(value: Any) -> str:
    return base64.b64encode(json.dumps(value).encode()).decode()


async def start(
    gw: RunningGateway, agent: str, payload: dict[str, Any], key: str = PUBLIC_KEY
) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.post(
            f"{gw.http}/v1/public/{agent}/start",
            json=payload,
            headers={"Authorization": f"Bearer {key}"},
        )


# --- routes and relay ---------------------------------------------------------------------------


async def test_path_form_reaches_the_bot_with_a_plain_transport(gw: RunningGateway) -> None:
    async with connect(f"{gw.ws}/ws/generic/my-agent.my-org") as ws:
        first = await hello(ws)
        assert first["body"] is None
        assert first["transport_type"] == "websocket"
        assert len(first["session_id"]) == 36


async def test_query_form_reaches_the_same_agent(gw: RunningGateway) -> None:
    async with connect(
        f"{gw.ws}/ws/generic?serviceHost=my-agent.my-org&body={b64({'x': 1})}"
    ) as ws:
        assert (await hello(ws))["body"] == {"x": 1}


async def test_auto_agent_leaves_transport_type_unset(gw: RunningGateway) -> None:
    async with connect(f"{gw.ws}/ws/generic/auto-agent.my-org") as ws:
        assert (await hello(ws))["transport_type"] is None


def _random_frames(count: int, rng: random.Random) -> list[str | bytes]:
    edges = [0, 1, 125, 126, 127, 65535, 65536]
    frames: list[str | bytes] = []
    for index in range(count):
        size = edges[index] if index < len(edges) else int(2 ** rng.uniform(0, 16))
        if rng.random() < 0.5:
            frames.append(rng.randbytes(size))
        else:  # valid UTF-8 text of about `size` bytes, multi-byte characters included
            text = "".join(rng.choice("aé€𝄞 ") for _ in range(max(0, size // 3)))
            frames.append(text)
    return frames


async def test_ten_thousand_random_frames_come_back_byte_exact_and_in_order(
    gw: RunningGateway,
) -> None:
    frames = _random_frames(10_000, random.Random(1234))
    async with connect(
        f"{gw.ws}/ws/generic/my-agent.my-org", max_size=2**20, compression=None
    ) as ws:
        await hello(ws)

        async def send_all() -> None:
            for frame in frames:
                await ws.send(frame)

        sender = asyncio.create_task(send_all())
        async with asyncio.timeout(seconds(90)):
            for index, expected in enumerate(frames):
                got = await ws.recv()
                assert type(got) is type(expected), index
                assert got == expected, index
        await sender


async def test_client_close_code_and_reason_reach_the_bot(
    gw: RunningGateway, tmp_path: Path
) -> None:
    report = tmp_path / "close.json"
    url = f"{gw.ws}/ws/generic/closecode.my-org?body={b64({'report': str(report)})}"
    async with connect(url) as ws:
        assert await ws.recv() == "ready"
        await ws.close(4321, "client says bye")
    async with asyncio.timeout(seconds(5)):
        while not report.exists() or not report.read_text():
            await asyncio.sleep(0.02)
    assert json.loads(report.read_text()) == {"code": 4321, "reason": "client says bye"}


async def test_bot_close_code_and_reason_reach_the_client(gw: RunningGateway) -> None:
    async with connect(f"{gw.ws}/ws/generic/my-agent.my-org") as ws:
        await hello(ws)
        await ws.send("__close__:4001:bot says bye")
        with pytest.raises(websockets.ConnectionClosed):
            async with asyncio.timeout(seconds(5)):
                await ws.recv()
    assert ws.close_code == 4001
    assert ws.close_reason == "bot says bye"


async def test_a_steady_session_relays_on_the_fast_lane_unless_turned_off(
    gw: RunningGateway,
) -> None:
    async with connect(f"{gw.ws}/ws/generic/my-agent.my-org") as ws:
        sid = (await hello(ws))["session_id"]
        relay = gw.gateway.relays[sid]
        if not gw.gateway.config.gateway.native_relay:
            assert gw.gateway.lane is None and not relay.in_lane
            return
        async with asyncio.timeout(seconds(5)):
            while not relay.in_lane:  # it enters once the hello has been relayed
                await asyncio.sleep(0.01)
        assert gw.gateway.lane is not None and gw.gateway.lane.active >= 1
        await ws.send(b"through the lane")
        assert await ws.recv() == b"through the lane"
        assert relay.traffic()["frames_client_to_agent"] == 1


async def test_subprotocol_offer_passes_through(gw: RunningGateway) -> None:
    # The echo bot selects no subprotocol (PCC behaviour); the offer must still reach the
    # agent and its (empty) answer must come back as a valid handshake.
    async with connect(f"{gw.ws}/ws/generic/my-agent.my-org", subprotocols=["x-test"]) as ws:
        assert ws.subprotocol is None
        await hello(ws)


async def test_session_record_counts_frames_and_codes(gw: RunningGateway) -> None:
    async with connect(f"{gw.ws}/ws/generic/my-agent.my-org") as ws:
        sid = (await hello(ws))["session_id"]
        for _ in range(3):
            await ws.send(b"abc")
            await ws.recv()
    async with asyncio.timeout(seconds(5)):
        while (record := gw.gateway.sessions.ended.get(sid)) is None:
            await asyncio.sleep(0.02)
    assert record.completion_status == "client_closed"
    assert record.client_close_code == 1000
    assert record.agent_close_code == 1000
    assert record.frames_client_to_agent == 4  # 3 data frames + close
    assert record.frames_agent_to_client == 5  # hello + 3 echoes + close


# --- refusals before the upgrade ---------------------------------------------------------------


def _no_session_started(gw: RunningGateway, before: int) -> None:
    assert gw.gateway.sessions.started_total == before


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (upgrade_request("/ws/generic/my-agent.my-org", method="POST"), 405, "method_not_allowed"),
        (b"GET /ws/generic/my-agent.my-org HTTP/1.1\r\nHost: x\r\n\r\n", 426, "upgrade_required"),
        (upgrade_request("/ws/generic/my-agent.my-org", version="8"), 426, "upgrade_required"),
        (upgrade_request("/ws/generic/my-agent.my-org", key="short"), 400, "invalid_handshake"),
        (upgrade_request("/ws/generic/nope.my-org"), 404, "404"),
        (upgrade_request("/ws/generic/my-agent.other-org"), 404, "404"),
        (upgrade_request("/ws/elsewhere/my-agent.my-org"), 404, "not_found"),
        (upgrade_request("/ws/generic/my-agent.my.org"), 400, "invalid_service_host"),
        (upgrade_request("/ws/generic/My-Agent.my-org"), 400, "invalid_service_host"),
        (upgrade_request("/ws/generic/a" + "b" * 200 + ".my-org"), 400, "invalid_service_host"),
        (
            upgrade_request("/ws/generic/my-agent.my-org?serviceHost=solo.my-org"),
            400,
            "invalid_service_host",
        ),
        (
            upgrade_request("/ws/generic/my-agent.my-org?body=e30%3D&body=e30%3D"),
            400,
            "bad_request",
        ),
        (upgrade_request("/ws/generic/my-agent.my-org?body=!!!"), 400, "invalid_body"),
        (
            upgrade_request("/ws/generic/my-agent.my-org?body=" + b64("x" * 5000)),
            413,
            "body_too_large",
        ),
        (upgrade_request("/ws/generic/my-agent.my-org?body=" + "A" * 30000), 414, "url_too_long"),
        (
            upgrade_request("/ws/generic/my-agent.my-org", extra="X-Big: " + "a" * 40000 + "\r\n"),
            431,
            "headers_too_large",
        ),
        (
            upgrade_request("/ws/generic/my-agent.my-org?body=" + _b64_raw(b"[" * 10_000)),
            413,
            "body_too_large",
        ),
        (
            upgrade_request("/ws/generic/my-agent.my-org?body=" + _b64_raw(b"[" * 3000)),
            400,
            "invalid_body",
        ),
        (
            upgrade_request("/ws/generic/my-agent.my-org?body=" + _b64_raw(b"\xff\xfe{}")),
            400,
            "invalid_body",
        ),
        (upgrade_request("/ws/generic?serviceHost=a.b&serviceHost=a.b"), 400, "bad_request"),
        (b"GARBAGE\r\n\r\n", 400, "malformed_request"),
        (upgrade_request("/ws/generic/tok-agent.my-org"), 403, "token_missing"),
        (upgrade_request("/ws/generic/tok-agent.my-org?token=abc.def"), 403, "token_malformed"),
    ],
)
async def test_bad_requests_are_refused_with_json_before_the_upgrade(
    gw: RunningGateway, request_bytes: bytes, status: int, code: str
) -> None:
    before = gw.gateway.sessions.started_total
    response = await raw_request(gw.port, request_bytes)
    assert response.status == status
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["code"] == code
    assert set(body) == {"error", "code"} and body["error"]
    _no_session_started(gw, before)


async def test_get_root_is_404_json(gw: RunningGateway) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{gw.http}/")
    assert response.status_code == 404
    assert response.json() == {"error": "not found", "code": "404"}


async def test_at_capacity_is_429_with_retry_after(gw: RunningGateway) -> None:
    async with connect(f"{gw.ws}/ws/generic/solo.my-org") as ws:
        await hello(ws)
        response = await raw_request(gw.port, upgrade_request("/ws/generic/solo.my-org"))
        assert response.status == 429
        assert response.headers["retry-after"] == "1"
        assert response.json()["code"] == "PCC-AGENT-AT-CAPACITY"
        start_response = await start(gw, "solo", {"transport": "websocket"})
        assert start_response.status_code == 429
        assert start_response.headers["retry-after"] == "1"


async def test_draining_gateway_refuses_upgrades_with_503(gw: RunningGateway) -> None:
    gw.gateway.draining = True
    try:
        response = await raw_request(gw.port, upgrade_request("/ws/generic/my-agent.my-org"))
    finally:
        gw.gateway.draining = False
    assert response.status == 503
    assert response.headers["retry-after"] == "2"
    assert response.json()["code"] == "draining"


# --- body decoding -----------------------------------------------------------------------------

BODY = {"k": "ÿÿþ", "n": [1, 2.5, None, True]}
_STD = base64.b64encode(
    json.dumps(BODY, separators=(",", ":"), ensure_ascii=False).encode()
).decode()
assert "+" in _STD and "/" in _STD


@pytest.mark.parametrize(
    "encoded",
    [
        _STD,  # raw standard, with '+' in it, as the PCC docs append it
        urllib.parse.quote(_STD, safe=""),  # percent-encoded
        _STD.replace("+", "%20"),  # '+' mangled into a space by a form encoder
        _STD.rstrip("="),  # unpadded
        base64.urlsafe_b64encode(base64.b64decode(_STD)).decode(),  # URL-safe
        base64.urlsafe_b64encode(base64.b64decode(_STD)).decode().rstrip("="),  # both
    ],
    ids=["raw-plus", "percent", "space", "unpadded", "urlsafe", "urlsafe-unpadded"],
)
async def test_every_body_variant_reaches_the_bot_intact(gw: RunningGateway, encoded: str) -> None:
    async with connect(f"{gw.ws}/ws/generic/my-agent.my-org?body={encoded}") as ws:
        assert (await hello(ws))["body"] == BODY


# --- tokens ------------------------------------------------------------------------------------


async def _token(gw: RunningGateway, body: Any = None) -> dict[str, Any]:
    payload: dict[str, Any] = {"transport": "websocket"}
    if body is not None:
        payload["body"] = body
    response = await start(gw, "tok-agent", payload)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


async def test_start_returns_token_url_and_body(gw: RunningGateway) -> None:
    started = await _token(gw, body={"caller_id": "abc123"})
    assert set(started) == {"sessionId", "wsUrl", "token", "body"}
    assert started["wsUrl"] == "ws://gateway.test:8080/ws/generic/tok-agent.my-org"
    assert started["body"] == "eyJjYWxsZXJfaWQiOiJhYmMxMjMifQ=="  # PCC's OAS example


@pytest.mark.parametrize("placement", ["header", "query", "path"])
async def test_each_token_placement_works_and_binds_the_session_id(
    gw: RunningGateway, placement: str
) -> None:
    started = await _token(gw, body={"caller_id": "abc123"})
    token, body = started["token"], started["body"]
    url = f"{gw.ws}/ws/generic/tok-agent.my-org"
    headers: dict[str, str] = {}
    if placement == "header":
        headers["Authorization"] = f"Bearer {token}"
        url += f"?body={body}"
    elif placement == "query":
        url += f"?token={token}&body={body}"
    else:
        url += f"/{token}?body={body}"
    async with connect(url, additional_headers=headers) as ws:
        first = await hello(ws)
    assert first["session_id"] == started["sessionId"]
    assert first["body"] == {"caller_id": "abc123"}


async def _refused(gw: RunningGateway, token: str, agent: str = "tok-agent") -> dict[str, Any]:
    before = gw.gateway.sessions.started_total
    response = await raw_request(
        gw.port,
        upgrade_request(f"/ws/generic/{agent}.my-org", extra=f"Authorization: Bearer {token}\r\n"),
    )
    assert response.status == 403
    _no_session_started(gw, before)
    result: dict[str, Any] = response.json()
    return result


async def test_replayed_token_is_refused(gw: RunningGateway) -> None:
    token = (await _token(gw))["token"]
    async with connect(f"{gw.ws}/ws/generic/tok-agent.my-org/{token}") as ws:
        await hello(ws)
    assert (await _refused(gw, token))["code"] == "token_replayed"


async def test_expired_token_is_refused(gw: RunningGateway) -> None:
    token = (await _token(gw))["token"]
    CLOCK.now += 300
    try:
        assert (await _refused(gw, token))["code"] == "token_expired"
    finally:
        CLOCK.now -= 300


async def test_tampered_token_is_refused(gw: RunningGateway) -> None:
    token = (await _token(gw))["token"]
    payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["exp"] += 3600
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    assert (await _refused(gw, f"{forged}.{signature}"))["code"] == "token_bad_signature"


async def test_token_for_another_agent_is_refused(gw: RunningGateway) -> None:
    token, _ = mint_token(TEST_KEYRING, "my-agent.my-org", now=CLOCK())
    assert (await _refused(gw, token))["code"] == "token_wrong_agent"


async def test_token_signed_with_a_rotated_out_key_is_refused(gw: RunningGateway) -> None:
    old = KeyRing([SigningKey("k0", b"an-old-secret-that-was-rotated-out")])
    token, _ = mint_token(old, "tok-agent.my-org", now=CLOCK())
    assert (await _refused(gw, token))["code"] == "token_unknown_key"


async def test_previous_key_still_verifies_after_rotation() -> None:
    new = SigningKey("k2", b"the-new-secret-0123456789abcdef!")
    rotated = KeyRing([new, *(TEST_KEYRING.get(kid) for kid in TEST_KEYRING.kids)])  # type: ignore[misc]
    async with running_gateway({"tok-agent": {"websocket_auth": "token"}}, keyring=rotated) as g:
        old_token, _ = mint_token(TEST_KEYRING, "tok-agent.my-org", now=CLOCK())
        async with connect(f"{g.ws}/ws/generic/tok-agent.my-org/{old_token}") as ws:
            await hello(ws)


# --- /start ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("agent", "payload", "key", "status", "code"),
    [
        ("my-agent", {"transport": "websocket"}, "pk_wrong", 401, "401"),
        ("nope", {"transport": "websocket"}, PUBLIC_KEY, 404, "404"),
        (
            "my-agent",
            {"transport": "websocket", "body": {"a": 1}},
            PUBLIC_KEY,
            400,
            "body_not_allowed",
        ),
        (
            "tok-agent",
            {"transport": "websocket", "body": "x" * 5000},
            PUBLIC_KEY,
            413,
            "body_too_large",
        ),
        ("my-agent", {"transport": "daily"}, PUBLIC_KEY, 400, "daily_not_configured"),
        ("my-agent", {"transport": "smoke"}, PUBLIC_KEY, 400, "unsupported_transport"),
    ],
)
async def test_start_refusals(
    gw: RunningGateway, agent: str, payload: dict[str, Any], key: str, status: int, code: str
) -> None:
    response = await start(gw, agent, payload, key=key)
    assert response.status_code == status
    assert response.json()["code"] == code


async def test_start_refuses_non_json_and_wrong_content_type(gw: RunningGateway) -> None:
    url = f"{gw.http}/v1/public/my-agent/start"
    auth = {"Authorization": f"Bearer {PUBLIC_KEY}"}
    async with httpx.AsyncClient() as client:
        wrong_type = await client.post(
            url, content=b"{}", headers={**auth, "content-type": "text/plain"}
        )
        not_json = await client.post(
            url, content=b"{nope", headers={**auth, "content-type": "application/json"}
        )
        too_big = await client.post(
            url,
            content=b" " * (limits.START_REQUEST_MAX_BYTES + 1),
            headers={**auth, "content-type": "application/json"},
        )
        missing = await client.post(url, json={"transport": "websocket"})
    assert (wrong_type.status_code, wrong_type.json()["code"]) == (415, "unsupported_media_type")
    assert (not_json.status_code, not_json.json()["code"]) == (400, "bad_request")
    assert (too_big.status_code, too_big.json()["code"]) == (413, "request_too_large")
    assert (missing.status_code, missing.json()["code"]) == (401, "401")


async def test_openapi_document_is_served(gw: RunningGateway) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{gw.http}/openapi.json")
    assert response.status_code == 200
    assert "/v1/public/{agent}/start" in response.json()["paths"]
