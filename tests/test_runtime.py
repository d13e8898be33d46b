"""The agent runtime end to end: a real ``catflap.runtime.main`` process, real uvicorn, real
WebSocket clients over a unix socket, and the control channel over a ``socketpair()``."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import socket
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect, unix_connect
from websockets.exceptions import ConnectionClosed

from catflap.contract import headers
from catflap.contract.closecodes import CloseCode
from catflap.contract.control import ControlChannel
from catflap.contract.errors import ConfigError
from catflap.runtime.exits import (
    EXIT_BOT_IMPORT_FAILED,
    EXIT_BOT_STUCK,
    EXIT_CONFIG,
    EXIT_LISTEN_FAILED,
)
from catflap.runtime.listen import ListenAddress, parse_listen

from .conftest import ECHO, seconds

pytestmark = pytest.mark.slow  # end to end: real gateways, agent processes

#: Upper bound of any single wait; generous, because a busy CI machine is slow to start Python.
WAIT_S = seconds(15)
#: {"k": "ÿÿþ"}: its padded standard base64 contains '+', '/' and '='.
BODY = {"k": "ÿÿþ"}


def encoded_body(value: Any) -> str:
    """``?body=`` as the gateway forwards it: percent-encoded padded standard base64 JSON."""
    return quote(base64.b64encode(json.dumps(value).encode()).decode(), safe="")


@dataclass
class Agent:
    """One runtime process and the parent end of its control channel."""

    proc: asyncio.subprocess.Process
    control: ControlChannel
    socket_path: Path
    stderr_path: Path
    events: list[dict[str, Any]] = field(default_factory=list)

    async def event(self, name: str, timeout: float = WAIT_S) -> dict[str, Any]:
        """The next control event called ``name`` (others are kept in ``events``)."""
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.control.receive()
                if msg is None:
                    stderr = self.stderr_path.read_text(errors="replace")[-4000:]
                    raise AssertionError(f"control channel closed before {name!r}:\n{stderr}")
                self.events.append(msg)
                if msg.get("event") == name:
                    return msg

    def connect(
        self,
        *,
        session_id: str | None = None,
        query: str = "",
        websocket_transport: bool = True,
        max_seconds: str | None = None,
        subprotocols: list[str] | None = None,
    ) -> Any:
        extra: dict[str, str] = {}
        if session_id is not None:
            extra[headers.SESSION_ID_HEADER] = session_id
        if websocket_transport:
            extra[headers.TRANSPORT_TYPE_HEADER] = headers.TRANSPORT_TYPE_WEBSOCKET
        if max_seconds is not None:
            extra[headers.MAX_SESSION_SECONDS_HEADER] = max_seconds
        return unix_connect(
            str(self.socket_path),
            uri=f"ws://agent{headers.AGENT_PATH}{query}",
            additional_headers=extra,
            subprotocols=subprotocols,
            open_timeout=WAIT_S,
        )

    def http(self) -> httpx.AsyncClient:
        transport = httpx.AsyncHTTPTransport(uds=str(self.socket_path))
        return httpx.AsyncClient(transport=transport, base_url="http://agent", timeout=WAIT_S)

    async def exit_code(self, timeout: float = WAIT_S) -> int:
        return await asyncio.wait_for(self.proc.wait(), timeout)


Spawn = Callable[..., Awaitable[Agent]]


@pytest.fixture
async def spawn() -> AsyncIterator[Spawn]:
    """Start runtime processes; every one is killed and reaped at the end of the test."""
    agents: list[Agent] = []
    # A short directory: unix socket paths are limited to 107 bytes.
    with tempfile.TemporaryDirectory(prefix="catflap-rt-") as tmp:

        async def start(
            bot_dir: Path = ECHO,
            *extra_args: str,
            wait_ready: bool = True,
            socket_path: Path | None = None,
        ) -> Agent:
            n = len(agents)
            parent, child = socket.socketpair()
            socket_path = socket_path or Path(tmp) / f"a{n}.sock"
            stderr_path = Path(tmp) / f"stderr{n}.log"
            with open(stderr_path, "wb") as stderr:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "catflap.runtime.main",
                    "--bot-dir", str(bot_dir),
                    "--listen", f"unix:{socket_path}",
                    "--control-fd", str(child.fileno()),
                    "--agent-name", "test-agent",
                    *extra_args,
                    pass_fds=[child.fileno()],
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=stderr,
                )  # fmt: skip
            child.close()
            agent = Agent(proc, await ControlChannel.from_socket(parent), socket_path, stderr_path)
            agents.append(agent)
            if wait_ready:
                ready = await agent.event("ready")
                assert ready == {
                    "event": "ready",
                    "address": f"unix:{socket_path}",
                    "pid": proc.pid,
                }
            return agent

        try:
            yield start
        finally:
            for agent in agents:
                if agent.proc.returncode is None:
                    agent.proc.kill()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(agent.proc.wait(), WAIT_S)
                await agent.control.aclose()


def write_bot(directory: Path, source: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "bot.py").write_text(textwrap.dedent(source))
    return directory


async def hello(ws: ClientConnection) -> dict[str, Any]:
    """The echo bot's first frame."""
    first = await asyncio.wait_for(ws.recv(), WAIT_S)
    assert isinstance(first, str)
    result: dict[str, Any] = json.loads(first)
    return result


async def closed_with(ws: ClientConnection) -> tuple[int, str]:
    """Wait until the server closes ``ws``; return the close code and reason it sent."""
    with pytest.raises(ConnectionClosed) as info:
        async with asyncio.timeout(WAIT_S):
            while True:
                await ws.recv()
    assert info.value.rcvd is not None
    return info.value.rcvd.code, info.value.rcvd.reason


# --- Pure functions ---------------------------------------------------------------------------


def test_parse_listen_accepts_unix_and_tcp() -> None:
    assert parse_listen("unix:/run/a.sock") == ListenAddress("unix", path="/run/a.sock")
    assert parse_listen("unix:rel.sock") == ListenAddress("unix", path=os.path.abspath("rel.sock"))
    assert parse_listen("tcp:127.0.0.1:0") == ListenAddress("tcp", host="127.0.0.1", port=0)
    assert parse_listen("tcp:[::1]:8080") == ListenAddress("tcp", host="::1", port=8080)


@pytest.mark.parametrize("spec", ["", "unix:", "tcp:127.0.0.1", "tcp::80", "tcp:h:99999", "x:y"])
def test_parse_listen_rejects_garbage(spec: str) -> None:
    with pytest.raises(ConfigError):
        parse_listen(spec)


# --- Sessions ---------------------------------------------------------------------------------


async def test_session_gets_id_body_and_transport_and_echoes_byte_exact(spawn: Spawn) -> None:
    agent = await spawn()
    async with agent.connect(session_id="sess-1", query=f"?body={encoded_body(BODY)}") as ws:
        assert await hello(ws) == {
            "session_id": "sess-1",
            "body": BODY,
            "transport_type": "websocket",
        }
        # permessage-deflate is offered by the client and declined by the runtime.
        assert ws.response is not None
        assert ws.response.headers.get("sec-websocket-extensions") is None
        assert ws.subprotocol is None
        started = await agent.event("session_started")
        assert started == {"event": "session_started", "session_id": "sess-1"}
        for text in ["hello", "ÿ \U0001f600 +/=", "x" * 100_000]:
            await ws.send(text)
            assert await ws.recv() == text
        for data in [bytes(range(256)), b"", b"\x00" * 70_000]:
            await ws.send(data)
            assert await ws.recv() == data
    ended = await agent.event("session_ended")
    assert ended["bot_seconds"] > 0
    assert ended == {
        "event": "session_ended",
        "session_id": "sess-1",
        "status": "completed",
        "error": None,
        "client_disconnected": True,
        "bot_seconds": ended["bot_seconds"],
        "resources": ended["resources"],
    }
    resources = ended["resources"]
    assert resources["sampleCount"] == len(resources["timeseries"]) >= 1
    assert resources["memoryBytesP50"] > 10 * 2**20  # a Python process with FastAPI loaded


async def test_without_headers_the_id_is_generated_and_body_and_transport_are_none(
    spawn: Spawn,
) -> None:
    agent = await spawn()
    async with agent.connect(websocket_transport=False) as ws:
        first = await hello(ws)
    assert uuid.UUID(first["session_id"]).version == 4
    assert first["body"] is None
    assert first["transport_type"] is None
    assert (await agent.event("session_started"))["session_id"] == first["session_id"]


async def test_undecodable_body_reaches_the_bot_as_none(spawn: Spawn) -> None:
    agent = await spawn()
    async with agent.connect(session_id="s", query="?body=%25%25not-base64") as ws:
        assert (await hello(ws))["body"] is None
        await ws.send("still works")
        assert await ws.recv() == "still works"


async def test_bot_that_raises_closes_1011_and_reports_bot_error(spawn: Spawn) -> None:
    agent = await spawn()
    async with agent.connect(session_id="boom") as ws:
        await hello(ws)
        await ws.send("__raise__")
        assert await closed_with(ws) == (CloseCode.INTERNAL_ERROR, "RuntimeError")
    ended = await agent.event("session_ended")
    assert ended["status"] == "bot_error"
    assert ended["error"] == "RuntimeError: echo bot asked to raise"
    assert ended["client_disconnected"] is False
    records = [
        json.loads(line)
        for line in agent.stderr_path.read_text().splitlines()
        if line.startswith("{")
    ]
    (raised,) = [r for r in records if r["message"] == "! bot() raised"]
    assert (raised["session_id"], raised["level"]) == ("boom", "ERROR")
    assert "RuntimeError: echo bot asked to raise" in raised["exc_info"]


async def test_bot_that_closes_the_socket_itself_keeps_its_code(spawn: Spawn) -> None:
    agent = await spawn()
    async with agent.connect(session_id="c") as ws:
        await hello(ws)
        await ws.send("__close__:4000:bye: now")
        assert await closed_with(ws) == (4000, "bye: now")
    ended = await agent.event("session_ended")
    assert (ended["status"], ended["client_disconnected"]) == ("completed", False)


async def test_session_budget_cancels_the_bot_and_closes_1000(spawn: Spawn) -> None:
    agent = await spawn()
    async with agent.connect(session_id="t", max_seconds="1") as ws:
        opened = time.monotonic()
        await hello(ws)
        await ws.send("__sleep_forever__")
        assert await closed_with(ws) == (CloseCode.NORMAL, "session time limit reached")
        elapsed = time.monotonic() - opened
    assert 0.9 <= elapsed <= 2.5
    ended = await agent.event("session_ended")
    assert (ended["status"], ended["error"]) == ("time_limit", None)
    assert 0.9 <= ended["bot_seconds"] <= 2.5


@pytest.mark.parametrize("budget", ["0", "-5", "", "soon"])
async def test_budget_that_is_not_a_positive_integer_means_no_limit(
    spawn: Spawn, budget: str
) -> None:
    agent = await spawn()
    async with agent.connect(session_id="n", max_seconds=budget) as ws:
        await hello(ws)
        await ws.send("ping")
        assert await ws.recv() == "ping"
    assert (await agent.event("session_ended"))["status"] == "completed"


async def test_stop_session_cancels_the_bot_and_closes_1000(spawn: Spawn) -> None:
    agent = await spawn()
    async with agent.connect(session_id="stop-me") as ws:
        await hello(ws)
        await ws.send("__sleep_forever__")
        await agent.event("session_started")
        await agent.control.send({"command": "stop_session", "session_id": "not-running"})
        await agent.control.send({"command": "stop_session", "session_id": "stop-me"})
        assert await closed_with(ws) == (CloseCode.NORMAL, "session stopped")
    ended = await agent.event("session_ended")
    assert (ended["status"], ended["error"], ended["client_disconnected"]) == (
        "stopped",
        None,
        False,
    )


async def test_ping_gets_pong_and_bad_lines_are_ignored(spawn: Spawn) -> None:
    agent = await spawn()
    writer = agent.control._writer  # a raw line that ControlChannel.send would never write
    writer.write(b"not json\n[1]\n")
    await agent.control.send({"command": "no_such_command"})
    await agent.control.send({"command": "ping", "seq": 41})
    await agent.control.send({"command": "ping", "seq": 42})
    assert await agent.event("pong") == {"event": "pong", "seq": 41}
    assert await agent.event("pong") == {"event": "pong", "seq": 42}


async def test_sessions_run_concurrently_in_one_process(spawn: Spawn) -> None:
    agent = await spawn()

    async def one(n: int) -> None:
        async with agent.connect(session_id=f"c{n}") as ws:
            assert (await hello(ws))["session_id"] == f"c{n}"
            for i in range(20):
                await ws.send(f"{n}:{i}")
                assert await ws.recv() == f"{n}:{i}"
                await asyncio.sleep(0)

    await asyncio.gather(*(one(n) for n in range(5)))
    ended = {(await agent.event("session_ended"))["session_id"] for _ in range(5)}
    assert ended == {f"c{n}" for n in range(5)}


async def test_duplicate_session_id_is_refused_while_the_first_runs(spawn: Spawn) -> None:
    agent = await spawn()
    async with agent.connect(session_id="dup") as first:
        await hello(first)  # sent by bot(), so the session is registered by now
        async with agent.connect(session_id="dup") as second:
            assert await closed_with(second) == (CloseCode.POLICY_VIOLATION, "duplicate session id")
        await first.send("alive")
        assert await first.recv() == "alive"


async def test_subprotocol_comes_from_the_bot_hook(spawn: Spawn, tmp_path: Path) -> None:
    bot_dir = write_bot(
        tmp_path / "proto",
        """
        def select_subprotocol(offered):
            return "b" if "b" in offered else None

        async def bot(args):
            await args.websocket.send_text("hi")
        """,
    )
    agent = await spawn(bot_dir)
    async with agent.connect(subprotocols=["a", "b"]) as ws:
        assert ws.subprotocol == "b"
    plain = await spawn()  # no hook: accept with none, as PCC does
    async with plain.connect(subprotocols=["a", "b"]) as ws:
        assert ws.subprotocol is None


# --- Health ------------------------------------------------------------------------------------


async def test_livez_and_readyz_without_a_hook(spawn: Spawn) -> None:
    agent = await spawn()
    async with agent.http() as http:
        for path in ["/livez", "/readyz"]:
            response = await http.get(path)
            assert (response.status_code, response.json()) == (200, {"status": "ok"})


@pytest.mark.parametrize(
    ("source", "status"),
    [
        ("def readyz():\n    return False\n", 503),
        ("def readyz():\n    return True\n", 200),
        ("async def readyz():\n    return {'ready': True, 'extra': 1}\n", 200),
        ("async def readyz():\n    return {'ready': False}\n", 503),
        ("def readyz():\n    raise ValueError('nope')\n", 503),
    ],
    ids=["false", "true", "async-dict-ready", "async-dict-not-ready", "raises"],
)
async def test_readyz_follows_the_bot_hook(
    spawn: Spawn, tmp_path: Path, source: str, status: int
) -> None:
    bot_dir = write_bot(tmp_path / "ready", source + "\nasync def bot(args):\n    pass\n")
    agent = await spawn(bot_dir)
    async with agent.http() as http:
        response = await http.get("/readyz")
        assert response.status_code == status
        assert response.json() == {"status": "ok" if status == 200 else "not ready"}
        assert (await http.get("/livez")).status_code == 200


# --- Start-up failures ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import catflap_no_such_module\n", "ModuleNotFoundError: No module named"),
        ("async def bot(args)\n    pass\n", "SyntaxError"),
        ("raise RuntimeError('at import')\n", "RuntimeError: at import"),
        ("def bot(args):\n    pass\n", "bot must be an async function"),
        ("x = 1\n", "defines no bot()"),
    ],
    ids=["import-error", "syntax-error", "raises", "not-async", "no-bot"],
)
async def test_bad_bot_sends_start_failed_and_exits_3(
    spawn: Spawn, tmp_path: Path, source: str, expected: str
) -> None:
    agent = await spawn(write_bot(tmp_path / "bad", source), wait_ready=False)
    failed = await agent.event("start_failed")
    assert expected in failed["error"]
    assert await agent.exit_code() == EXIT_BOT_IMPORT_FAILED
    stderr = agent.stderr_path.read_text()
    assert stderr.count(expected) == 1
    if "Traceback" in failed["error"]:
        assert stderr.count("Traceback (most recent call last)") == 1
    assert [e["event"] for e in agent.events] == ["start_failed"]


async def test_unusable_listen_address_sends_start_failed(spawn: Spawn, tmp_path: Path) -> None:
    agent = await spawn(socket_path=tmp_path / "no-such-dir" / "a.sock", wait_ready=False)
    failed = await agent.event("start_failed")
    assert failed["error"].startswith("cannot listen on unix:")
    assert await agent.exit_code() == EXIT_LISTEN_FAILED


# --- Lifecycle -----------------------------------------------------------------------------------


async def test_parent_gone_stops_sessions_and_exits_within_2s(spawn: Spawn) -> None:
    agent = await spawn()
    async with agent.connect(session_id="orphan") as ws:
        await hello(ws)
        await ws.send("__sleep_forever__")
        await agent.event("session_started")
        closed_at = time.monotonic()
        await agent.control.aclose()
        assert await agent.exit_code(timeout=2.0) == 0
        assert time.monotonic() - closed_at < 2.0
        assert await closed_with(ws) == (CloseCode.NORMAL, "session stopped")
    assert not agent.socket_path.exists()


async def test_shutdown_refuses_new_sessions_and_waits_for_running_ones(spawn: Spawn) -> None:
    agent = await spawn()
    async with agent.connect(session_id="last") as ws:
        await hello(ws)
        await agent.control.send({"command": "shutdown"})
        await agent.control.send({"command": "ping", "seq": 1})
        await agent.event("pong")
        with pytest.raises(OSError):
            async with agent.connect(session_id="late"):
                pass
        # The running session is still served after the refusal: the runtime waits for it.
        await ws.send("still here")
        assert await ws.recv() == "still here"
        assert agent.proc.returncode is None
    assert (await agent.event("session_ended"))["status"] == "completed"
    assert await agent.exit_code() == 0


async def test_bot_ignoring_cancellation_is_reported_and_the_process_still_exits(
    spawn: Spawn, tmp_path: Path
) -> None:
    bot_dir = write_bot(
        tmp_path / "stubborn",
        """
        import asyncio

        async def bot(args):
            while True:
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    pass
        """,
    )
    agent = await spawn(bot_dir)
    async with agent.connect(session_id="stubborn") as ws:
        await agent.event("session_started")
        await agent.control.send({"command": "stop_session", "session_id": "stubborn"})
        ended = await agent.event("session_ended")
        assert await closed_with(ws) == (CloseCode.NORMAL, "session stopped")
    assert (ended["status"], ended["error"]) == ("stopped", "bot ignored cancellation")
    await agent.control.send({"command": "shutdown"})
    assert await agent.exit_code() == EXIT_BOT_STUCK


async def test_standalone_over_tcp_prints_its_address_and_stops_on_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "catflap.runtime.main",
        "--bot-dir", str(ECHO), "--listen", "tcp:127.0.0.1:0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), WAIT_S)).decode()
        address = line.rsplit(" ", 1)[-1].strip()
        assert line.startswith("catflap agent listening on tcp:127.0.0.1:")
        port = int(address.rsplit(":", 1)[1])
        assert port > 0
        async with connect(f"ws://127.0.0.1:{port}/ws", open_timeout=WAIT_S) as ws:
            assert (await hello(ws))["body"] is None
            await ws.send(b"tcp")
            assert await ws.recv() == b"tcp"
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal.
        assert await asyncio.wait_for(proc.wait(), WAIT_S) == -signal.SIGTERM
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_bad_listen_address_exits_with_config_error() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "catflap.runtime.main", "--bot-dir", str(ECHO), "--listen", "nope",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(proc.communicate(), WAIT_S)
    assert proc.returncode == EXIT_CONFIG
    assert b"--listen" in stderr
