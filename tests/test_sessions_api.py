"""The sessions API against a real gateway and echo agents, over SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import pytest_asyncio
import websockets
from websockets.asyncio.client import ClientConnection, connect

from catflap.api.sessions import SessionModel
from catflap.contract import limits
from catflap.contract.body import encode_body
from catflap.sessions.record import SessionRecord

from .conftest import BOTS, PRIVATE_KEY, PUBLIC_KEY, RunningGateway, running_gateway, seconds
from .sessionstores import BACKENDS, store_factory

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

AGENTS: dict[str, dict[str, Any]] = {
    "echo": {"scaling": {"min_agents": 1, "max_agents": 5}},
    "other": {"scaling": {"min_agents": 0}},
    "slowstop": {"path": BOTS / "slowstop", "scaling": {"min_agents": 1}},
    "stubborn": {"path": BOTS / "stubborn", "scaling": {"min_agents": 1}},
}
ECHO = "/ws/generic/echo.my-org"
#: The slowstop bot's answer when it is stopped, as the first DELETE of a live session gets it.
TERMINATED = {"status": "terminated", "completionStatus": "stopped", "endState": "terminated"}
SESSIONS = "/v1/agents/echo/sessions"


@pytest_asyncio.fixture(loop_scope="module", scope="module", params=BACKENDS)
async def gw(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningGateway]:
    directory = tmp_path_factory.mktemp("store")
    async with (
        store_factory(request.param, directory) as stores,
        running_gateway(AGENTS, store=stores.open()) as running,
    ):
        await running.wait_ready("echo.my-org")
        yield running


async def api(
    gw: RunningGateway,
    method: str,
    path: str,
    *,
    key: str | None = PRIVATE_KEY,
    authorization: str | None = None,
    params: dict[str, Any] | None = None,
) -> httpx.Response:
    if authorization is None and key is not None:
        authorization = f"Bearer {key}"
    headers = {"Authorization": authorization} if authorization is not None else {}
    async with httpx.AsyncClient(base_url=gw.http, timeout=seconds(10)) as client:
        return await client.request(method, path, headers=headers, params=params)


async def show(gw: RunningGateway, session_id: str) -> dict[str, Any]:
    response = await api(gw, "GET", f"{SESSIONS}/{session_id}")
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


async def listed(gw: RunningGateway, **params: Any) -> dict[str, Any]:
    response = await api(gw, "GET", SESSIONS, params={"limit": 1000, **params})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


async def session_id(ws: ClientConnection) -> str:
    async with asyncio.timeout(seconds(10)):
        return str(json.loads(await ws.recv())["session_id"])


async def until_ended(gw: RunningGateway, sid: str) -> dict[str, Any]:
    async with asyncio.timeout(seconds(10)):
        while (record := await show(gw, sid))["endedAt"] is None:
            await asyncio.sleep(0.02)
    return record


async def until_listed_on(gw: RunningGateway, agent: str, sid: str) -> None:
    """Wait until the store has the session's first record (it is saved asynchronously)."""
    async with asyncio.timeout(seconds(10)):
        while (await api(gw, "GET", f"/v1/agents/{agent}/sessions/{sid}")).status_code != 200:
            await asyncio.sleep(0.02)


async def until_ended_on(gw: RunningGateway, agent: str, sid: str) -> dict[str, Any]:
    async with asyncio.timeout(seconds(15)):
        while True:
            record: dict[str, Any] = (
                await api(gw, "GET", f"/v1/agents/{agent}/sessions/{sid}")
            ).json()
            if record.get("endedAt") is not None:
                return record
            await asyncio.sleep(0.05)


async def until_listed(gw: RunningGateway, sid: str, status: str) -> dict[str, Any]:
    """The session as the list shows it, once it shows (the first save is asynchronous)."""
    async with asyncio.timeout(seconds(10)):
        while True:
            found = [
                s for s in (await listed(gw, status=status))["sessions"] if s["sessionId"] == sid
            ]
            if found:
                return found[0]
            await asyncio.sleep(0.02)


def assert_error(response: httpx.Response, status: int, code: str, text: str = "") -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "code"}
    assert body["code"] == code
    assert text in body["error"]


# --- list and show -------------------------------------------------------------------------------


async def test_list_shows_a_live_session_as_active_then_as_client_closed(
    gw: RunningGateway,
) -> None:
    async with connect(gw.ws + ECHO) as ws:
        sid = await session_id(ws)
        active = await until_listed(gw, sid, "active")
        assert active["endedAt"] is None and active["completionStatus"] is None
        assert active["agent"] == "echo" and active["organization"] == "my-org"
        assert sid not in [s["sessionId"] for s in (await listed(gw, status="ended"))["sessions"]]
    await until_ended(gw, sid)
    ended = await until_listed(gw, sid, "ended")
    assert ended["completionStatus"] == "client_closed"
    assert ended["endedAt"] >= ended["createdAt"]
    assert sid not in [s["sessionId"] for s in (await listed(gw, status="active"))["sessions"]]


async def test_show_returns_the_whole_record_with_codes_and_counts(gw: RunningGateway) -> None:
    before = time.time()
    async with connect(gw.ws + ECHO) as ws:
        sid = await session_id(ws)
        for frame in ("text", b"bytes", "more"):
            await ws.send(frame)
            assert await ws.recv() == frame
    record = await until_ended(gw, sid)
    assert set(record) == set(SessionModel.model_fields)
    assert set(record) >= {
        "sessionId",
        "agent",
        "organization",
        "createdAt",
        "endedAt",
        "botStartSeconds",
        "coldStart",
        "completionStatus",
        "error",
        "clientCloseCode",
        "agentCloseCode",
        "gatewayCloseCode",
        "bytesClientToAgent",
        "bytesAgentToClient",
        "framesClientToAgent",
        "framesAgentToClient",
    }
    assert record["sessionId"] == sid
    assert (record["agent"], record["organization"]) == ("echo", "my-org")
    assert before <= record["createdAt"] <= record["endedAt"] <= time.time()
    assert record["coldStart"] is False
    assert 0 < record["botStartSeconds"] < 10
    assert record["completionStatus"] == "client_closed"
    assert record["error"] is None
    assert (record["clientCloseCode"], record["agentCloseCode"]) == (1000, 1000)
    assert record["framesClientToAgent"] == 4  # 3 data frames + close
    assert record["framesAgentToClient"] == 5  # hello + 3 echoes + close
    assert record["bytesClientToAgent"] > len("text") + len(b"bytes") + len("more")
    assert record["bytesAgentToClient"] > record["bytesClientToAgent"] - 4  # hello is bigger


async def test_list_pages_and_filters_by_creation_time(gw: RunningGateway) -> None:
    sids = []
    for _ in range(3):
        async with connect(gw.ws + ECHO) as ws:
            sids.append(await session_id(ws))
        await until_ended(gw, sids[-1])
    everything = await listed(gw)
    assert everything["total_count"] == len(everything["sessions"]) >= 3
    newest_first = [s["sessionId"] for s in everything["sessions"]]
    assert newest_first[:3] == sids[::-1]
    created = [s["createdAt"] for s in everything["sessions"]]
    assert created == sorted(created, reverse=True)

    page = (await api(gw, "GET", SESSIONS, params={"limit": 1, "offset": 1})).json()
    assert page["total_count"] == everything["total_count"]
    assert [s["sessionId"] for s in page["sessions"]] == [sids[1]]
    default = (await api(gw, "GET", SESSIONS)).json()
    assert len(default["sessions"]) == min(10, everything["total_count"])

    first, last = (await show(gw, sids[0])), (await show(gw, sids[2]))
    window = await listed(gw, startTime=first["createdAt"], endTime=last["createdAt"])
    assert [s["sessionId"] for s in window["sessions"]] == sids[::-1]
    assert (await listed(gw, startTime=time.time() + 3600))["total_count"] == 0


async def test_sessions_are_listed_per_agent(gw: RunningGateway) -> None:
    async with connect(gw.ws + ECHO) as ws:
        sid = await session_id(ws)
    await until_ended(gw, sid)
    other = await api(gw, "GET", "/v1/agents/other/sessions")
    assert other.status_code == 200
    assert sid not in [s["sessionId"] for s in other.json()["sessions"]]
    assert_error(await api(gw, "GET", f"/v1/agents/other/sessions/{sid}"), 404, "404", sid)


# --- stop ----------------------------------------------------------------------------------------


async def test_delete_stops_a_live_session_and_the_client_gets_1000(gw: RunningGateway) -> None:
    async with connect(gw.ws + ECHO) as ws:
        sid = await session_id(ws)
        await ws.send("__sleep_forever__")  # bot() stops reading; only a cancel ends it
        response = await api(gw, "DELETE", f"{SESSIONS}/{sid}")
        assert response.status_code == 200, response.text
        assert response.json() == {**TERMINATED, "session_id": sid}
        with pytest.raises(websockets.ConnectionClosedOK):
            async with asyncio.timeout(seconds(2)):
                await ws.recv()
    assert ws.close_code == 1000
    assert ws.close_reason == "session stopped"
    record = await until_ended(gw, sid)
    assert record["completionStatus"] == "stopped"
    assert record["agentCloseCode"] == 1000
    again = await api(gw, "DELETE", f"{SESSIONS}/{sid}")
    assert_error(again, 404, "404", "already ended")


async def test_delete_accepts_an_upper_case_session_id(gw: RunningGateway) -> None:
    async with connect(gw.ws + ECHO) as ws:
        sid = await session_id(ws)
        await until_listed(gw, sid, "active")
        response = await api(gw, "DELETE", f"{SESSIONS}/{sid.upper()}")
        assert response.json() == {**TERMINATED, "session_id": sid}
        with pytest.raises(websockets.ConnectionClosedOK):
            async with asyncio.timeout(seconds(2)):
                await ws.recv()


@pytest.mark.parametrize(
    "path", ["/v1/agents/slowstop", "/v1/organizations/my-org/services/slowstop"]
)
async def test_delete_answers_once_bot_has_ended_and_the_record_is_final(
    gw: RunningGateway, tmp_path: Path, path: str
) -> None:
    """The bot takes 1 s to unwind; the answer comes after that, with the final record."""
    await gw.wait_ready("slowstop.my-org")
    body = quote(encode_body({"marker_dir": str(tmp_path)}))
    async with connect(f"{gw.ws}/ws/generic/slowstop.my-org?body={body}") as ws:
        sid = await session_id(ws)
        await until_listed_on(gw, "slowstop", sid)
        started = time.perf_counter()
        response = await api(gw, "DELETE", f"{path}/sessions/{sid}")
        took = time.perf_counter() - started
        # At the moment of the answer: bot() has returned, the record is final.
        assert (tmp_path / f"{sid}.ended").read_text() == "ended"
        live = gw.gateway.sessions.get(sid)
        assert live is not None and live.completion_status == "stopped"
        assert response.status_code == 200, response.text
        assert response.json() == {**TERMINATED, "session_id": sid}
        assert 1.0 <= took < limits.STOP_WAIT_S
        with pytest.raises(websockets.ConnectionClosedOK):
            async with asyncio.timeout(seconds(2)):
                await ws.recv()
    assert (ws.close_code, ws.close_reason) == (1000, "session stopped")
    # The recorder writes the final record to the store after the live view has it (the API
    # answers from the live view); on PostgreSQL under load that write can trail the close.
    async with asyncio.timeout(seconds(5)):
        while (stored := await gw.gateway.store.get(sid)) is None or stored.ended_at is None:
            await asyncio.sleep(0.02)
    assert stored.completion_status == "stopped"


async def test_delete_of_a_bot_that_ignores_cancellation_answers_202_stopping(
    gw: RunningGateway,
) -> None:
    await gw.wait_ready("stubborn.my-org")
    async with connect(f"{gw.ws}/ws/generic/stubborn.my-org") as ws:
        assert await asyncio.wait_for(ws.recv(), seconds(10)) == "ready"
        (sid,) = [r.session_id for r in gw.gateway.sessions.live.values() if r.agent == "stubborn"]
        started = time.perf_counter()
        response = await api(gw, "DELETE", f"/v1/agents/stubborn/sessions/{sid}")
        took = time.perf_counter() - started
        assert (response.status_code, response.json()) == (
            202,
            {"status": "stopping", "session_id": sid},
        )
        assert limits.STOP_WAIT_S <= took < limits.STOP_WAIT_S + seconds(1)
        # The runtime gives up on the bot after its grace; the record ends then, as stopped.
        record = await until_ended_on(gw, "stubborn", sid)
    assert record["completionStatus"] == "stopped"
    assert record["error"] == "bot ignored cancellation"


# --- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "DELETE"])
@pytest.mark.parametrize("bad_id", ["not-a-uuid", "1234", "0b3e6c9e1f7a4c559d0e5a1f2b3c4d5e"])
async def test_a_session_id_that_is_not_a_uuid_is_400(
    gw: RunningGateway, method: str, bad_id: str
) -> None:
    assert_error(await api(gw, method, f"{SESSIONS}/{bad_id}"), 400, "bad_request", "UUID")


@pytest.mark.parametrize("method", ["GET", "DELETE"])
async def test_an_unknown_session_is_404(gw: RunningGateway, method: str) -> None:
    unknown = str(uuid.uuid4())
    assert_error(await api(gw, method, f"{SESSIONS}/{unknown}"), 404, "404", unknown)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", SESSIONS),
        # Fixed ids, not uuid4(): every xdist worker must collect the same test names.
        ("GET", f"{SESSIONS}/5d1f0c2e-7a41-4b8e-9f3a-0c6b2d8e4a17"),
        ("DELETE", f"{SESSIONS}/9b7e3a10-2c5d-4f86-a1e4-6d0f8c3b5e92"),
        ("DELETE", f"{SESSIONS}/not-a-uuid"),
        ("GET", f"{SESSIONS}?limit=0&status=bogus"),  # the key is checked first
        ("GET", "/v1/agents/nope/sessions"),
    ],
)
@pytest.mark.parametrize(
    ("authorization", "text"),
    [
        (f"Bearer {PUBLIC_KEY}", "this is a public key"),
        (None, "missing or invalid private API key"),
        ("Bearer sk_wrong", "missing or invalid private API key"),
        ("Bearer", "missing or invalid private API key"),
        (f"Token {PRIVATE_KEY}", "missing or invalid private API key"),
        (f"Basic {PRIVATE_KEY}", "missing or invalid private API key"),
    ],
)
async def test_without_a_private_key_every_call_is_401(
    gw: RunningGateway, method: str, path: str, authorization: str | None, text: str
) -> None:
    response = await api(gw, method, path, key=None, authorization=authorization)
    assert_error(response, 401, "401", text)


@pytest.mark.parametrize("method", ["GET", "DELETE"])
async def test_an_unknown_agent_is_404(gw: RunningGateway, method: str) -> None:
    path = f"/v1/agents/nope/sessions/{uuid.uuid4()}"
    assert_error(await api(gw, method, path), 404, "404", "no agent 'nope'")
    assert_error(await api(gw, "GET", "/v1/agents/nope/sessions"), 404, "404", "no agent 'nope'")


@pytest.mark.parametrize(
    ("params", "text"),
    [
        ({"status": "running"}, "invalid status"),
        ({"limit": 0}, "invalid limit"),
        ({"limit": 1001}, "invalid limit"),
        ({"limit": "ten"}, "invalid limit"),
        ({"offset": -1}, "invalid offset"),
        ({"startTime": "yesterday"}, "invalid startTime"),
        ({"endTime": "nan"}, "invalid endTime"),
        ({"startTime": -5}, "invalid startTime"),
        ({"startTime": 200, "endTime": 100}, "startTime (200) is after endTime (100)"),
    ],
)
async def test_bad_list_parameters_are_400_naming_the_parameter(
    gw: RunningGateway, params: dict[str, Any], text: str
) -> None:
    assert_error(await api(gw, "GET", SESSIONS, params=params), 400, "bad_request", text)


# --- the OpenAPI document ------------------------------------------------------------------------


async def test_openapi_documents_the_sessions_endpoints_with_models(gw: RunningGateway) -> None:
    doc = (await api(gw, "GET", "/openapi.json", key=None)).json()
    schemas = {
        ("get", SESSIONS): "SessionList",
        ("get", SESSIONS + "/{session_id}"): "SessionModel",
        ("delete", SESSIONS + "/{session_id}"): "StopResponse",
    }
    for (method, path), model in schemas.items():
        operation = doc["paths"][path.replace("/echo/", "/{agent}/")][method]
        ok = operation["responses"]["200"]["content"]["application/json"]["schema"]
        assert ok == {"$ref": f"#/components/schemas/{model}"}
        for status in ("400", "401", "404"):
            error = operation["responses"][status]["content"]["application/json"]["schema"]
            assert error == {"$ref": "#/components/schemas/ErrorBody"}
        assert operation["security"] == [{"private key": []}]


async def test_the_response_model_has_exactly_the_record_fields() -> None:
    record = SessionRecord(session_id="s", agent="a", organization="o", created_at=0.0)
    assert set(SessionModel.model_fields) == set(record.to_api())
