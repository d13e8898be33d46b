"""`catflap sessions list|show|stop` against real gateways, and `serve`'s storage options."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest
import pytest_asyncio
import websockets
from click.testing import CliRunner, Result
from websockets.asyncio.client import ClientConnection, connect
from websockets.sync.client import connect as connect_sync

from catflap.cli import cli
from catflap.cli.sessions import format_table

from .conftest import ECHO, PRIVATE_KEY, PUBLIC_KEY, RunningGateway, running_gateway, seconds
from .sessionstores import DATABASE_URL
from .test_cli import serve

pytestmark = pytest.mark.slow  # end to end: real gateways, agent processes

#: The async tests share one gateway, so they share its event loop.
on_gateway_loop = pytest.mark.asyncio(loop_scope="module")

AGENTS: dict[str, dict[str, Any]] = {"echo": {"scaling": {"min_agents": 1, "max_agents": 5}}}
ECHO_WS = "/ws/generic/echo.my-org"


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gw() -> AsyncIterator[RunningGateway]:
    async with running_gateway(AGENTS) as running:
        await running.wait_ready("echo.my-org")
        yield running


async def catflap(gw: RunningGateway | None, *args: str, key: str | None = PRIVATE_KEY) -> Result:
    """Run ``catflap sessions ARGS`` in a thread, so the gateway's loop keeps serving."""
    env = {"CATFLAP_URL": gw.http if gw else None, "CATFLAP_PRIVATE_KEY": key}
    runner = CliRunner()
    return await asyncio.to_thread(runner.invoke, cli, ["sessions", *args], env=env)


async def session_id(ws: ClientConnection) -> str:
    async with asyncio.timeout(seconds(10)):
        return str(json.loads(await ws.recv())["session_id"])


async def ended_session(gw: RunningGateway) -> str:
    async with connect(gw.ws + ECHO_WS) as ws:
        sid = await session_id(ws)
        await ws.send("hi")
        await ws.recv()
    async with asyncio.timeout(seconds(10)):
        while (record := await gw.gateway.store.get(sid)) is None or record.ended_at is None:
            await asyncio.sleep(0.02)
    return sid


# --- list, show, stop ----------------------------------------------------------------------------


@on_gateway_loop
async def test_list_prints_a_table_of_sessions(gw: RunningGateway) -> None:
    sid = await ended_session(gw)
    result = await catflap(gw, "list", "echo")
    assert result.exit_code == 0, result.output
    header, *rows, footer = result.stdout.splitlines()
    assert header.split("  ")[0] == "SESSION ID"
    assert "CREATED (UTC)" in header and "STATUS" in header and "DURATION" in header
    (row,) = [line for line in rows if line.startswith(sid)]
    assert "client_closed" in row
    assert row.endswith("1000/1000/-")
    assert footer.startswith("sessions 1-")


@on_gateway_loop
async def test_list_json_is_the_api_answer(gw: RunningGateway) -> None:
    sid = await ended_session(gw)
    result = await catflap(gw, "list", "echo", "--json", "--status", "ended", "--limit", "1")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["total_count"] >= 1
    assert [s["sessionId"] for s in answer["sessions"]] == [sid]


@on_gateway_loop
async def test_list_active_shows_a_live_session(gw: RunningGateway) -> None:
    async with connect(gw.ws + ECHO_WS) as ws:
        sid = await session_id(ws)
        async with asyncio.timeout(seconds(10)):
            while await gw.gateway.store.get(sid) is None:
                await asyncio.sleep(0.02)
        result = await catflap(gw, "list", "echo", "--status", "active")
    assert result.exit_code == 0, result.output
    (row,) = [line for line in result.stdout.splitlines() if line.startswith(sid)]
    assert " active " in row and row.endswith("-/-/-")


@on_gateway_loop
async def test_show_prints_the_record_and_json_matches_the_api(gw: RunningGateway) -> None:
    sid = await ended_session(gw)
    result = await catflap(gw, "show", "echo", sid)
    assert result.exit_code == 0, result.output
    lines = dict(line.split(None, 1) for line in result.stdout.splitlines())
    assert lines["sessionId"] == sid
    assert lines["status"] == "client_closed"
    assert lines["clientCloseCode"] == "1000"
    assert lines["framesClientToAgent"] == "2"  # "hi" + close
    assert lines["createdAt"].endswith(")") and " UTC (" in lines["createdAt"]
    as_json = await catflap(gw, "show", "echo", sid, "--json")
    record = await gw.gateway.store.get(sid)
    assert record is not None
    assert json.loads(as_json.stdout) == record.to_api()


@on_gateway_loop
async def test_stop_ends_a_live_session(gw: RunningGateway) -> None:
    async with connect(gw.ws + ECHO_WS) as ws:
        sid = await session_id(ws)
        await ws.send("__sleep_forever__")
        result = await catflap(gw, "stop", "echo", sid)
        assert result.exit_code == 0, result.output
        assert result.stdout == f"terminated {sid}\n"
        with pytest.raises(websockets.ConnectionClosedOK):
            async with asyncio.timeout(seconds(2)):
                await ws.recv()
    assert (ws.close_code, ws.close_reason) == (1000, "session stopped")
    again = await catflap(gw, "stop", "echo", sid, "--json")
    assert again.exit_code == 1
    assert "already ended" in again.stderr and "HTTP 404" in again.stderr


# --- errors --------------------------------------------------------------------------------------


@on_gateway_loop
@pytest.mark.parametrize(
    ("args", "key", "message"),
    [
        (["list", "echo"], "sk_wrong", "Bearer sk_... (HTTP 401, code 401)"),
        (["list", "echo"], PUBLIC_KEY, "this is a public key"),
        (["list", "nope"], PRIVATE_KEY, "no agent 'nope' in organization 'my-org'"),
        (["show", "echo", "not-a-uuid"], PRIVATE_KEY, "session ids are UUID strings"),
        (["show", "echo", str(uuid.uuid4())], PRIVATE_KEY, "(HTTP 404, code 404)"),
        (["stop", "echo", str(uuid.uuid4())], PRIVATE_KEY, "(HTTP 404, code 404)"),
    ],
)
async def test_api_errors_print_the_message_and_exit_1(
    gw: RunningGateway, args: list[str], key: str, message: str
) -> None:
    result = await catflap(gw, *args, key=key)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith("catflap: ")
    assert message in result.stderr


@on_gateway_loop
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["list"], "Missing argument 'AGENT'"),
        (["list", "echo", "--status", "running"], "Invalid value for '--status'"),
        (["list", "echo", "--limit", "0"], "Invalid value for '--limit'"),
        (["show", "echo"], "Missing argument 'SESSION_ID'"),
    ],
)
async def test_usage_mistakes_exit_2(gw: RunningGateway, args: list[str], message: str) -> None:
    result = await catflap(gw, *args)
    assert result.exit_code == 2
    assert message in result.stderr


@on_gateway_loop
async def test_a_missing_key_is_a_usage_error(gw: RunningGateway) -> None:
    result = await catflap(gw, "list", "echo", key=None)
    assert result.exit_code == 2
    assert "Missing option '--key'" in result.stderr


@on_gateway_loop
async def test_options_override_the_environment(gw: RunningGateway) -> None:
    args = ["list", "echo", "--url", gw.http, "--key", PRIVATE_KEY]
    result = await catflap(None, *args, key="sk_wrong")
    assert result.exit_code == 0, result.output


@on_gateway_loop
async def test_an_unreachable_gateway_exits_1() -> None:
    result = await catflap(None, "list", "echo", "--url", "http://127.0.0.1:1")
    assert result.exit_code == 1
    assert "could not reach the gateway at http://127.0.0.1:1" in result.stderr


@on_gateway_loop
async def test_a_gateway_that_is_not_catflap_exits_1() -> None:
    async def not_catflap(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 4\r\n\r\noops")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(not_catflap, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        result = await catflap(None, "list", "echo", "--url", f"http://127.0.0.1:{port}")
    assert result.exit_code == 1
    assert "unexpected answer from" in result.stderr and "HTTP 502: oops" in result.stderr


def test_the_table_says_when_there_is_more() -> None:
    record = {"sessionId": "s1", "createdAt": 0.0, "endedAt": 3725.0, "completionStatus": "stopped"}
    text = format_table({"total_count": 12, "sessions": [record]}, offset=10, now=0.0)
    assert text.splitlines()[1].split() == [
        "s1",
        "1970-01-01",
        "00:00:00",
        "stopped",
        "1h02m",
        "-/-/-",
    ]
    assert text.splitlines()[-1] == "sessions 11-11 of 12; --offset 11 for more"
    assert format_table({"total_count": 0, "sessions": []}, offset=0, now=0) == "no sessions"


# --- `catflap serve --state-dir / --database-url`: records survive a restart ------------------


@pytest.fixture
def database() -> Iterator[str]:
    """A fresh PostgreSQL database for one `catflap serve`, dropped afterwards."""
    name = f"catflap_test_{uuid.uuid4().hex[:8]}"

    async def run(statement: str) -> None:
        conn = await asyncpg.connect(DATABASE_URL)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(run(f"CREATE DATABASE {name}"))
    try:
        yield DATABASE_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        asyncio.run(run(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


def _serve_and_record_one_session(*args: str) -> str:
    """Run `catflap serve ARGS`, hold one session, stop; the session id."""
    with serve(str(ECHO), "--org", "my-org", "--private-key", PRIVATE_KEY, *args) as (proc, port):
        url = f"ws://127.0.0.1:{port}/ws/generic/my-agent.my-org"
        with connect_sync(url, open_timeout=seconds(30)) as ws:
            sid = str(json.loads(ws.recv(timeout=seconds(10)))["session_id"])
        _wait_listed(port, sid, "ended")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=seconds(15)) == 0
    return sid


def _wait_listed(port: int, sid: str, status: str) -> None:
    runner = CliRunner()
    args = ["sessions", "list", "my-agent", "--json", "--status", status, "--limit", "1000"]
    env = {"CATFLAP_URL": f"http://127.0.0.1:{port}", "CATFLAP_PRIVATE_KEY": PRIVATE_KEY}
    for _ in range(int(seconds(500))):
        result = runner.invoke(cli, args, env=env)
        assert result.exit_code == 0, result.output
        if sid in [s["sessionId"] for s in json.loads(result.stdout)["sessions"]]:
            return
        time.sleep(0.02)
    raise AssertionError(f"{sid} never listed as {status}")


@pytest.mark.parametrize("backend", ["state-dir", "database-url"])
def test_serve_keeps_records_across_a_restart(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if backend == "state-dir":
        args = ("--state-dir", str(tmp_path / "state"))
    else:
        args = ("--database-url", request.getfixturevalue("database"))
    first = _serve_and_record_one_session(*args)
    if backend == "state-dir":
        assert (tmp_path / "state" / "sessions.sqlite3").is_file()
    second = _serve_and_record_one_session(*args)
    with serve(str(ECHO), "--org", "my-org", "--private-key", PRIVATE_KEY, *args) as (_, port):
        _wait_listed(port, first, "ended")
        _wait_listed(port, second, "ended")


def test_serve_refuses_an_unknown_database_url() -> None:
    result = CliRunner().invoke(
        cli, ["serve", str(ECHO), "--org", "my-org", "--database-url", "mysql://db/x"]
    )
    assert result.exit_code == 2
    assert "--database-url: database_url: unsupported URL 'mysql'" in result.stderr
