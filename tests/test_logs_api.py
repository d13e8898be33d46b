"""The logs API against a real gateway and a bot that writes with logging, loguru and print."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from websockets.asyncio.client import connect

from catflap.contract import limits

from .conftest import PRIVATE_KEY, PUBLIC_KEY, ROOT, RunningGateway, running_gateway, seconds

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

AGENTS: dict[str, dict[str, Any]] = {
    "chatty": {"path": ROOT / "tests" / "bots" / "chatty", "scaling": {"min_agents": 1}},
}
LOGS = "/v1/agents/chatty/logs"
UNKNOWN = "123e4567-e89b-42d3-a456-426614174000"


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gw() -> AsyncIterator[RunningGateway]:
    async with running_gateway(AGENTS) as running:
        await running.wait_ready("chatty.my-org")
        yield running


async def chatty_session(gw: RunningGateway, numbered: int = 5) -> str:
    """Run one session to its end; its id."""
    async with connect(gw.ws + "/ws/generic/chatty.my-org") as ws:
        async with asyncio.timeout(seconds(10)):
            sid = str(await ws.recv())
            await ws.send(f"log:{numbered}")
            assert await ws.recv() == f"logged {numbered}"
    async with asyncio.timeout(seconds(10)):
        while sid not in gw.gateway.sessions.ended:
            await asyncio.sleep(0.02)
    return sid


async def get(
    gw: RunningGateway, params: dict[str, Any] | None = None, *, key: str | None = PRIVATE_KEY
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(base_url=gw.http, timeout=seconds(10)) as client:
        return await client.get(LOGS, params=params, headers=headers)


async def page(gw: RunningGateway, **params: Any) -> dict[str, Any]:
    response = await get(gw, params)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def assert_error(response: httpx.Response, status: int, code: str, text: str = "") -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "code"} and body["code"] == code
    assert text in body["error"]


async def test_a_sessions_lines_are_the_bots_own_output_in_order(gw: RunningGateway) -> None:
    sid = await chatty_session(gw)
    answer = await page(gw, sessionId=sid, order="asc", limit=1000)
    logs = answer["logs"]
    assert answer["total"] == {"value": len(logs), "relation": "eq"}
    assert {entry["sessionId"] for entry in logs} == {sid}
    by_text = {entry["log"]: entry for entry in logs}
    assert by_text[f"chatty: logging line of {sid}"]["stream"] == "logging"
    assert by_text[f"print line of {sid}"]["stream"] == "stdout"
    assert by_text[f"stderr line of {sid}"]["stream"] == "stderr"
    assert by_text[f"chatty: logging from a thread of {sid}"]["level"] == "INFO"
    (loguru,) = [e for e in logs if e["log"].endswith(f"loguru line of {sid}")]
    assert loguru["stream"] == "loguru" and loguru["level"] == "INFO"
    (error,) = [e for e in logs if e["log"].startswith("chatty: logging an exception")]
    assert error["level"] == "ERROR" and "ValueError: handled error" in error["log"]
    texts = [entry["log"] for entry in logs]
    numbered = [t for t in texts if t.startswith("chatty: numbered line")]
    assert numbered == [f"chatty: numbered line {n}" for n in range(5)]
    assert texts[-1].startswith("catflap.runtime.app: = session ended: completed")
    # Each print is one line: the text tap neither splits nor doubles it, and loguru's own
    # stderr output is not captured a second time as text.
    assert texts.count(f"print line of {sid}") == 1
    assert sum(f"loguru line of {sid}" in t for t in texts) == 1
    stamps = [entry["timestamp"] for entry in logs]
    assert stamps == sorted(stamps) and all(s.endswith("Z") for s in stamps)


async def test_order_limit_and_offset_page_through_a_session(gw: RunningGateway) -> None:
    sid = await chatty_session(gw, numbered=8)
    everything = (await page(gw, sessionId=sid, order="asc", limit=1000))["logs"]
    total = len(everything)
    newest = await page(gw, sessionId=sid, order="desc", limit=3)
    assert newest["total"]["value"] == total
    assert newest["logs"] == everything[::-1][:3]
    second = await page(gw, sessionId=sid, order="asc", limit=4, offset=4)
    assert second["logs"] == everything[4:8]
    default = await page(gw, sessionId=sid)
    assert default["logs"] == everything[::-1][: limits.LOGS_LIMIT_DEFAULT]  # desc, 100


async def test_without_a_session_id_recent_sessions_are_merged(gw: RunningGateway) -> None:
    first = await chatty_session(gw, numbered=1)
    second = await chatty_session(gw, numbered=1)
    answer = await page(gw, limit=1000)
    sessions = [entry["sessionId"] for entry in answer["logs"]]
    assert {first, second} <= set(sessions)
    assert sessions.index(second) < sessions.index(first)  # newest first
    stamps = [entry["timestamp"] for entry in answer["logs"]]
    assert stamps == sorted(stamps, reverse=True)


async def test_the_logs_api_needs_a_private_key(gw: RunningGateway) -> None:
    assert_error(await get(gw, {"sessionId": UNKNOWN}, key=None), 401, "401", "private API key")
    assert_error(await get(gw, {"sessionId": UNKNOWN}, key=PUBLIC_KEY), 401, "401", "public key")
    assert_error(await get(gw, {"sessionId": UNKNOWN}, key="sk_wrong"), 401, "401")


@pytest.mark.parametrize(
    ("params", "text"),
    [
        ({"sessionId": "nope"}, "invalid session id"),
        ({"limit": 0}, "invalid limit"),
        ({"limit": limits.LOGS_LIMIT_MAX + 1}, "invalid limit"),
        ({"offset": -1}, "invalid offset"),
        ({"order": "sideways"}, "invalid order"),
    ],
)
async def test_bad_parameters_are_a_400_naming_them(
    gw: RunningGateway, params: dict[str, Any], text: str
) -> None:
    assert_error(await get(gw, params), 400, "bad_request", text)


async def test_unknown_agents_and_sessions_are_404(gw: RunningGateway) -> None:
    async with httpx.AsyncClient(base_url=gw.http, timeout=seconds(10)) as client:
        response = await client.get(
            "/v1/agents/nobody/logs", headers={"Authorization": f"Bearer {PRIVATE_KEY}"}
        )
    assert_error(response, 404, "404", "no agent 'nobody'")
    assert_error(await get(gw, {"sessionId": UNKNOWN}), 404, "404", f"no session {UNKNOWN}")
