"""`catflap logs` against a real gateway: print, --json, and --follow until the session ends."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from click.testing import CliRunner, Result
from websockets.asyncio.client import connect

from catflap.cli import cli
from catflap.cli.logs import format_line

from .conftest import PRIVATE_KEY, ROOT, RunningGateway, running_gateway, seconds

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

AGENTS: dict[str, dict[str, Any]] = {
    "chatty": {"path": ROOT / "tests" / "bots" / "chatty", "scaling": {"min_agents": 1}},
}
ENDED = "catflap.runtime.app: = session ended: completed"


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gw() -> AsyncIterator[RunningGateway]:
    async with running_gateway(AGENTS) as running:
        await running.wait_ready("chatty.my-org")
        yield running


async def invoke(gw: RunningGateway, *args: str) -> Result:
    """Run the CLI off the event loop (it makes blocking HTTP calls to this loop's gateway)."""
    runner = CliRunner()
    command = ["logs", *args, "--url", gw.http, "--key", PRIVATE_KEY]
    return await asyncio.wait_for(
        asyncio.to_thread(runner.invoke, cli, command, catch_exceptions=False), seconds(20)
    )


async def ended_session(gw: RunningGateway) -> str:
    async with connect(gw.ws + "/ws/generic/chatty.my-org") as ws:
        async with asyncio.timeout(seconds(10)):
            sid = str(await ws.recv())
            await ws.send("log:4")
            await ws.recv()
    async with asyncio.timeout(seconds(10)):
        while sid not in gw.gateway.sessions.ended:
            await asyncio.sleep(0.02)
    return sid


async def test_logs_prints_the_latest_lines_oldest_first(gw: RunningGateway) -> None:
    sid = await ended_session(gw)
    result = await invoke(gw, "chatty", "--session", sid, "--limit", "3")
    assert result.exit_code == 0, result.output
    printed = result.output.splitlines()
    assert len(printed) == 3
    assert printed[-1].split(" ", 2)[2].strip().startswith(ENDED)
    assert "INFO" in printed[-1].split()[1]
    as_json = await invoke(gw, "chatty", "--session", sid, "--limit", "3", "--json")
    entries = [json.loads(line) for line in as_json.output.splitlines()]
    assert [format_line(entry) for entry in entries] == printed
    assert {entry["sessionId"] for entry in entries} == {sid}


async def test_logs_errors_exit_1_with_the_apis_message(gw: RunningGateway) -> None:
    unknown = "123e4567-e89b-42d3-a456-426614174000"
    result = await invoke(gw, "chatty", "--session", unknown)
    assert result.exit_code == 1
    assert f"no session {unknown}" in result.stderr
    usage = await invoke(gw, "chatty", "--follow")
    assert usage.exit_code == 2 and "--follow needs --session" in usage.stderr


async def test_follow_prints_new_lines_and_returns_when_the_session_ends(
    gw: RunningGateway,
) -> None:
    async with connect(gw.ws + "/ws/generic/chatty.my-org") as ws:
        sid = str(await asyncio.wait_for(ws.recv(), seconds(10)))
        follower = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "catflap", "logs", "chatty", "--session", sid, "--follow"),
            *("--interval", "0.1", "--url", gw.http, "--key", PRIVATE_KEY),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert follower.stdout is not None
        try:
            async with asyncio.timeout(seconds(15)):
                first = await follower.stdout.readline()  # following: lines so far are out
            assert b"= session started" in first
            await ws.send("log:3")
            assert await asyncio.wait_for(ws.recv(), seconds(10)) == "logged 3"
            await asyncio.sleep(0.3)  # at least one poll while the session is still live
            assert follower.returncode is None
        except BaseException:
            follower.kill()
            await follower.wait()
            raise
    try:
        async with asyncio.timeout(seconds(15)):
            rest, errors = await follower.communicate()
    finally:
        if follower.returncode is None:
            follower.kill()
            await follower.wait()
    assert follower.returncode == 0, errors.decode()
    printed = [first.decode().rstrip("\n"), *rest.decode().splitlines()]
    texts = [line.split(" ", 2)[2].strip() for line in printed]
    numbered = [t for t in texts if t.startswith("chatty: numbered line")]
    assert numbered == [f"chatty: numbered line {n}" for n in range(3)]  # each once, in order
    assert texts[-1].startswith(ENDED)
    assert len(texts) == len(set(texts))
