"""``POST /bot`` and ``pipecatcloud_system`` end to end: a real runtime process, real uvicorn,
HTTP over a unix socket and the control channel over a ``socketpair()``.

The test bot (``tests/bots/pcc_session``) records what ``bot(args)`` got and shows it through
routes it adds with ``from pipecatcloud_system import app``.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from catflap.contract import headers, limits
from catflap.runtime.exits import EXIT_BOT_IMPORT_FAILED

from . import test_runtime
from .conftest import BOTS, EXAMPLES
from .test_runtime import WAIT_S, Agent, Spawn

#: test_runtime's fixture: runtime processes, each killed and reaped after the test.
spawn = test_runtime.spawn

pytestmark = pytest.mark.slow  # end to end: agent processes

PCC_SESSION = BOTS / "pcc_session"


def start_bot(
    agent: Agent, body: Any = None, *, session_id: str | None = "s-1", **extra: str
) -> asyncio.Task[httpx.Response]:
    """``POST /bot`` as a task: its answer comes when the session has ended."""
    request_headers = dict(extra)
    if session_id is not None:
        request_headers[headers.SESSION_ID_HEADER] = session_id

    async def post() -> httpx.Response:
        async with agent.http() as http:
            return await http.post("/bot", json=body, headers=request_headers)

    return asyncio.create_task(post())


async def seen(agent: Agent, session_id: str) -> dict[str, Any]:
    """What the bot recorded for ``session_id``, once its ``bot()`` has started."""
    async with agent.http() as http, asyncio.timeout(WAIT_S):
        while True:
            recorded: dict[str, Any] = (await http.get(f"/sessions/{session_id}")).json()
            if recorded:
                return recorded
            await asyncio.sleep(0.02)


async def test_bot_gets_pipecat_arguments_and_the_request_is_held_until_bot_returns(
    spawn: Spawn,
) -> None:
    agent = await spawn(PCC_SESSION)
    answer = start_bot(agent, {"wait": True, "k": "ÿ"})
    assert await agent.event("session_started") == {
        "event": "session_started",
        "session_id": "s-1",
    }
    assert await seen(agent, "s-1") == {
        "type": "PipecatSessionArguments",
        "session_id": "s-1",
        "body": {"wait": True, "k": "ÿ"},
        "room_url": None,
        "token": None,
    }
    assert not answer.done()
    async with agent.http() as http:
        assert (await http.post("/release/s-1")).json() == {"released": "s-1"}
    response = await asyncio.wait_for(answer, WAIT_S)
    assert (response.status_code, response.json()) == (
        200,
        {"sessionId": "s-1", "status": "completed"},
    )
    ended = await agent.event("session_ended")
    assert (ended["session_id"], ended["status"], ended["error"]) == ("s-1", "completed", None)


async def test_daily_headers_give_daily_session_arguments(spawn: Spawn) -> None:
    agent = await spawn(PCC_SESSION)
    daily = {"x-daily-room-url": "https://me.daily.co/room", "x-daily-room-token": "tok"}
    response = await asyncio.wait_for(start_bot(agent, {"n": 1}, session_id="d-1", **daily), WAIT_S)
    assert response.json() == {"sessionId": "d-1", "status": "completed"}
    assert await seen(agent, "d-1") == {
        "type": "DailySessionArguments",
        "session_id": "d-1",
        "body": {"n": 1},
        "room_url": "https://me.daily.co/room",
        "token": "tok",
    }


async def test_budget_ends_a_bot_session_as_time_limit(spawn: Spawn) -> None:
    agent = await spawn(PCC_SESSION)
    answer = start_bot(agent, {"wait": True}, **{headers.MAX_SESSION_SECONDS_HEADER: "1"})
    response = await asyncio.wait_for(answer, WAIT_S)
    assert response.json() == {"sessionId": "s-1", "status": "time_limit"}
    assert (await agent.event("session_ended"))["status"] == "time_limit"


async def test_stop_session_ends_a_bot_session_as_stopped(spawn: Spawn) -> None:
    agent = await spawn(PCC_SESSION)
    answer = start_bot(agent, {"wait": True}, session_id="stop-me")
    await agent.event("session_started")
    await agent.control.send({"command": "stop_session", "session_id": "stop-me"})
    response = await asyncio.wait_for(answer, WAIT_S)
    assert response.json() == {"sessionId": "stop-me", "status": "stopped"}
    ended = await agent.event("session_ended")
    assert (ended["status"], ended["error"]) == ("stopped", None)


async def test_body_at_the_limit_runs_and_one_byte_more_is_413(spawn: Spawn) -> None:
    agent = await spawn(PCC_SESSION)
    at_limit = "a" * (limits.BOT_BODY_MAX_BYTES - 2)  # with its quotes, exactly the limit
    response = await asyncio.wait_for(start_bot(agent, at_limit), WAIT_S)
    assert response.json() == {"sessionId": "s-1", "status": "completed"}
    over = await asyncio.wait_for(start_bot(agent, at_limit + "a", session_id="s-2"), WAIT_S)
    assert over.status_code == 413
    assert over.json()["code"] == "body_too_large"
    async with agent.http() as http:
        assert (await http.get("/sessions/s-2")).json() == {}


async def test_bot_request_without_a_session_id_is_400(spawn: Spawn) -> None:
    agent = await spawn(PCC_SESSION)
    response = await asyncio.wait_for(start_bot(agent, {}, session_id=None), WAIT_S)
    assert response.status_code == 400
    assert response.json() == {
        "error": f"POST /bot needs the {headers.SESSION_ID_HEADER} header",
        "code": "missing_session_id",
    }


async def test_a_bot_route_on_a_reserved_path_fails_the_start_naming_it(spawn: Spawn) -> None:
    agent = await spawn(BOTS / "reserved_route", wait_ready=False)
    failed = await agent.event("start_failed")
    assert "declares /metrics on pipecatcloud_system.app" in failed["error"]
    assert await agent.exit_code() == EXIT_BOT_IMPORT_FAILED
    assert "declares /metrics" in agent.stderr_path.read_text()


async def test_the_session_api_example_serves_status_until_stopped(spawn: Spawn) -> None:
    agent = await spawn(EXAMPLES / "pcc-session-api")
    answer = start_bot(agent, {"user": "ada"}, session_id="ex-1")
    await agent.event("session_started")
    async with agent.http() as http:
        status = await http.get("/status", headers={headers.SESSION_ID_HEADER: "ex-1"})
        unknown = await http.get("/status", headers={headers.SESSION_ID_HEADER: "other"})
    assert status.status_code == 200
    assert {k: v for k, v in status.json().items() if k != "running_s"} == {
        "session_id": "ex-1",
        "args": "PipecatSessionArguments",
        "body": {"user": "ada"},
    }
    assert unknown.status_code == 404
    await agent.control.send({"command": "stop_session", "session_id": "ex-1"})
    response = await asyncio.wait_for(answer, WAIT_S)
    assert response.json() == {"sessionId": "ex-1", "status": "stopped"}


async def test_shutdown_lets_a_running_bot_session_finish_and_refuses_new_ones(
    spawn: Spawn,
) -> None:
    agent = await spawn(PCC_SESSION)
    answer = start_bot(agent, {"wait": True}, session_id="last")
    await seen(agent, "last")
    async with agent.http() as kept_alive:
        await kept_alive.get("/livez")  # a connection that outlives the listener
        await agent.control.send({"command": "shutdown"})
        await agent.control.send({"command": "ping", "seq": 1})
        await agent.event("pong")
        late = await kept_alive.post("/bot", json={}, headers={headers.SESSION_ID_HEADER: "late"})
        assert (late.status_code, late.json()["code"]) == (503, "draining")
        assert not answer.done()
        await kept_alive.post("/release/last")
    response = await asyncio.wait_for(answer, WAIT_S)
    assert response.json() == {"sessionId": "last", "status": "completed"}
    assert await agent.exit_code() == 0


async def test_a_bot_sessions_output_goes_to_its_own_log_file(spawn: Spawn, tmp_path: Path) -> None:
    agent = await spawn(PCC_SESSION, "--log-dir", str(tmp_path))
    response = await asyncio.wait_for(start_bot(agent, {"n": 1}, session_id="logged"), WAIT_S)
    assert response.json()["status"] == "completed"
    await agent.event("session_ended")  # the file is complete once the end is reported
    path = tmp_path / "local" / "test-agent" / "logged.jsonl"
    lines = [json.loads(line)["line"] for line in path.read_text().splitlines()]
    assert "bot() got PipecatSessionArguments for logged" in lines
