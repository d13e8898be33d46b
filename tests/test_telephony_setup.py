"""Setting up telephony: /start with provider transports, and `catflap telephony-xml`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import pytest_asyncio
from websockets.asyncio.client import connect

from .conftest import ECHO, PUBLIC_KEY, RunningGateway, running_gateway

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

AGENTS: dict[str, dict[str, Any]] = {
    "open-phone": {"path": ECHO, "scaling": {"min_agents": 1}},
    "tok-phone": {"path": ECHO, "websocket_auth": "token", "scaling": {"min_agents": 1}},
}
BASE = "ws://gateway.test:8080"  # the public_url running_gateway configures


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gw() -> AsyncIterator[RunningGateway]:
    async with running_gateway(AGENTS) as running:
        await running.wait_ready("open-phone.my-org")
        await running.wait_ready("tok-phone.my-org")
        yield running


async def start(gw: RunningGateway, agent: str, payload: dict[str, Any]) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"{gw.http}/v1/public/{agent}/start",
            json=payload,
            headers={"Authorization": f"Bearer {PUBLIC_KEY}"},
        )
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


@pytest.mark.parametrize(
    ("transport", "expected"),
    [
        ("twilio", f"{BASE}/ws/twilio"),
        ("telnyx", f"{BASE}/ws/telnyx?serviceHost=open-phone.my-org"),
        ("plivo", f"{BASE}/ws/plivo?serviceHost=open-phone.my-org"),
        ("exotel", f"{BASE}/ws/exotel?serviceHost=open-phone.my-org"),
    ],
)
async def test_start_returns_the_provider_url(
    gw: RunningGateway, transport: str, expected: str
) -> None:
    started = await start(gw, "open-phone", {"transport": transport})
    assert started["wsUrl"] == expected
    assert started["serviceHost"] == "open-phone.my-org"
    assert "token" not in started


async def test_token_agent_gets_the_token_as_a_path_segment_and_it_works(
    gw: RunningGateway,
) -> None:
    started = await start(gw, "tok-phone", {"transport": "plivo", "body": {"crm": 7}})
    parts = urlsplit(started["wsUrl"])
    assert parts.path == f"/ws/plivo/{started['token']}"
    query = parse_qs(parts.query)
    assert query == {"serviceHost": ["tok-phone.my-org"], "body": [started["body"]]}
    # The URL, pointed at this test's gateway, connects a Plivo stream to the bot.
    url = started["wsUrl"].replace(BASE, gw.ws)
    async with connect(url) as ws:
        await ws.send(json.dumps({"event": "start", "start": {"streamId": "s", "callId": "c"}}))
        hello = json.loads(await ws.recv())
    assert hello["session_id"] == started["sessionId"]
    assert hello["body"] == {"crm": 7}
    assert hello["transport_type"] is None


async def test_twilio_url_never_carries_a_query_string(gw: RunningGateway) -> None:
    started = await start(gw, "tok-phone", {"transport": "twilio", "body": {"x": 1}})
    assert started["wsUrl"] == f"{BASE}/ws/twilio/{started['token']}"
