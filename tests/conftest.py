"""Shared test harness: real gateways on port 0, real agent processes, raw HTTP helpers.

Every timeout in the suite is a multiple of ``MS`` (env ``CATFLAP_TEST_MS``, default 1.0), so a
slow machine can scale them all at once.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from catflap.auth.replay import MemoryReplayStore
from catflap.auth.tokens import KeyRing, SigningKey
from catflap.compose import AgentLaunch, Overrides, build_gateway
from catflap.config import CatflapConfig, load_config
from catflap.gateway.listener import Gateway
from catflap.gateway.relaystate import IllegalTransition, RelayEvent, RelayMachine, RelayState
from catflap.gateway.timings import Timings
from catflap.pool.pool import LocalPool
from catflap.sessions.sqlite import SqliteSessionStore
from catflap.sessions.store import SessionStore

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
ECHO = EXAMPLES / "echo"
PIPECAT_ECHO = EXAMPLES / "pipecat-echo"
PIPECAT_TELEPHONY = EXAMPLES / "pipecat-telephony"
BOTS = ROOT / "tests" / "bots"
_PR_SET_PDEATHSIG = 1
MS = float(os.environ.get("CATFLAP_TEST_MS", "1.0"))

PUBLIC_KEY = "pk_test_123"
PRIVATE_KEY = "sk_test_123"
TEST_KEYRING = KeyRing([SigningKey("k1", b"test-secret-one-0123456789abcdef")])

#: Run a test both ways a gateway relays: on the fast lane's thread and on the event loop.
RELAY_MODES = pytest.mark.parametrize("native_relay", [True, False], ids=["lane", "event-loop"])


@pytest.hookimpl(optionalhook=True)
def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Async tests run on asyncio's own loop; a test module that defines ``LOOP_FACTORIES``
    (name -> loop factory) runs each of its async tests on every loop named there instead
    (tests/test_fastlane.py: on uvloop too, which ``catflap serve`` runs on)."""
    factories = getattr(getattr(item, "module", None), "LOOP_FACTORIES", None)
    return dict(factories) if factories else {"asyncio": asyncio.new_event_loop}


@pytest.fixture(autouse=True)
def strict_relay_states(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[IllegalTransition]]:
    """Illegal transitions raise; and since a protocol callback or a timer that raises is only
    logged by the event loop, each one is also kept, and the test fails at teardown if any
    happened. Autouse: every in-process relay in the suite runs strict."""
    monkeypatch.setattr(RelayMachine, "strict", True)
    seen: list[IllegalTransition] = []
    fire = RelayMachine.fire

    def checked(self: RelayMachine, event: RelayEvent, detail: str = "") -> RelayState:
        try:
            return fire(self, event, detail)
        except IllegalTransition as error:
            seen.append(error)
            raise

    monkeypatch.setattr(RelayMachine, "fire", checked)
    yield seen
    assert not seen, f"illegal relay transitions: {[str(e) for e in seen]}"


def die_with_test_process() -> None:
    """``preexec_fn`` for servers a test starts: Linux sends the child SIGTERM when the test
    process dies, so no server outlives a killed test run."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def seconds(value: float) -> float:
    """A test timeout, scaled for slow machines."""
    return value * MS


class FakeClock:
    """A wall clock tests can move."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def agent_toml(name: str, path: Path, **settings: Any) -> str:
    scaling = settings.pop("scaling", {})
    lines = [f"[organizations.my-org.agents.{name}]", f'path = "{path}"']
    lines += [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    if scaling:
        lines.append(f"[organizations.my-org.agents.{name}.scaling]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in scaling.items()]
    return "\n".join(lines) + "\n"


def write_config(directory: Path, agents: dict[str, dict[str, Any]]) -> Path:
    text = (
        'listen = "127.0.0.1:0"\npublic_url = "ws://gateway.test:8080"\n'
        "[organizations.my-org]\n"
        f'public_keys = ["{PUBLIC_KEY}"]\nprivate_keys = ["{PRIVATE_KEY}"]\n'
    )
    for name, settings in agents.items():
        settings = dict(settings)
        path = settings.pop("path", ECHO)
        text += agent_toml(name, path, **settings)
    path = directory / "catflap.toml"
    path.write_text(text)
    return path


@dataclass
class RunningGateway:
    gateway: Gateway
    pool: LocalPool
    config: CatflapConfig

    @property
    def port(self) -> int:
        return self.gateway.port

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def wait_ready(self, agent_key: str, count: int = 1) -> None:
        """Wait until ``count`` instances of the agent are ready."""
        from catflap.pool.instance import InstanceState

        pool = self.pool.agents[agent_key]
        async with asyncio.timeout(seconds(30)):
            while sum(i.state is InstanceState.READY for i in pool.live()) < count:
                await asyncio.sleep(0.02)


@asynccontextmanager
async def running_gateway(
    agents: dict[str, dict[str, Any]],
    *,
    clock: Callable[[], float] = time.time,
    keyring: KeyRing = TEST_KEYRING,
    ready_timeout: float = 30.0,
    store: SessionStore | None = None,
    adjust: Callable[[CatflapConfig], CatflapConfig] | None = None,
    pool_options: dict[str, float] | None = None,
    dashboard: bool = False,
    native_relay: bool = True,
    timings: dict[str, float] | None = None,
) -> AsyncIterator[RunningGateway]:
    """A gateway on 127.0.0.1:0 with a real pool of agent processes, wired by
    :func:`catflap.compose.build_gateway` as ``catflap serve`` wires it; stops itself.

    Session records go to ``store`` (which the caller closes), or else to a fresh SQLite file;
    session logs to a fresh folder (``config.log_dir``). ``adjust`` may change the loaded
    config (to go below a validated minimum in a test), ``pool_options`` are the pool's ping
    interval and timeout, ``dashboard`` serves the live view, ``native_relay`` false relays on
    the event loop instead of the fast lane, and ``timings`` replaces fields of
    :class:`~catflap.gateway.timings.Timings` (e.g. ``slow_peer``).
    """
    workdir = Path(tempfile.mkdtemp(prefix="cf"))  # short: AF_UNIX paths are limited
    try:
        config = load_config(write_config(workdir, agents))
        logs = config.logs.model_copy(update={"dir": workdir / "logs"})
        settings = config.gateway.model_copy(
            update={"dashboard": dashboard, "native_relay": native_relay}
        )
        config = config.model_copy(update={"logs": logs, "gateway": settings})
        if adjust is not None:
            config = adjust(config)
        own_store = store is None
        if store is None:
            store = SqliteSessionStore(workdir / "sessions.sqlite3")
        overrides = Overrides(
            keyring=keyring,
            store=store,
            replay=MemoryReplayStore(clock=clock),
            clock=clock,
            timings=dataclasses.replace(Timings.from_settings(config.gateway), **(timings or {})),
        )
        launch = AgentLaunch(
            workdir,
            log_level="warning",
            ready_timeout=seconds(ready_timeout),
            **(pool_options or {}),
        )
        gateway = await build_gateway(config, overrides, launch=launch)
        await gateway.start("127.0.0.1", 0)
        pool = gateway.pool
        assert isinstance(pool, LocalPool)
        try:
            yield RunningGateway(gateway, pool, config)
        finally:
            await gateway.shutdown(drain_timeout=0)
            await gateway.close()
            if own_store:
                await store.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def raw_request(port: int, request: bytes, *, timeout: float = 10.0) -> RawResponse:
    """Send raw bytes, read the whole response until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(seconds(timeout)):
            data = await reader.read()
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return RawResponse(status, headers, body)


def upgrade_request(
    target: str,
    *,
    extra: str = "",
    method: str = "GET",
    key: str = "dGhlIHNhbXBsZSBub25jZQ==",
    version: str = "13",
) -> bytes:
    """A valid WebSocket upgrade request head (break one field to test a refusal)."""
    return (
        f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        f"Sec-WebSocket-Version: {version}\r\n{extra}\r\n"
    ).encode("latin-1")


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock()


@contextmanager
def catflap_serve(
    args: list[str],
    *,
    env: dict[str, str] | None = None,
    preexec: Callable[[], None] = die_with_test_process,
) -> Iterator[tuple[subprocess.Popen[str], int, list[str]]]:
    """Run ``catflap serve ARGS`` (it must listen on 127.0.0.1:0); yield the process, its port
    and its stderr lines so far. stderr is drained all along, so the server never blocks on a
    full pipe; at the end the server gets SIGTERM, then SIGKILL if it lingers."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "catflap", "serve", *args],
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=preexec,
        env={**os.environ, **(env or {})},
    )
    lines: list[str] = []
    port: list[int] = []
    started = threading.Event()

    def drain() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            match = re.search(r"gateway listening on 127\.0\.0\.1:(\d+)", line)
            if match:
                port.append(int(match.group(1)))
                started.set()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        assert started.wait(seconds(30)), "catflap serve did not start:\n" + "\n".join(lines)
        yield proc, port[0], lines
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=seconds(15))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        reader.join(timeout=seconds(5))
        assert proc.stderr is not None
        proc.stderr.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """With ``CATFLAP_NO_SKIPS=1`` (``.ci/run`` sets it), a skipped test fails: a test that
    needs a service (Redis, PostgreSQL, Chromium) skips on a developer's machine that lacks
    it, but CI must never pass by skipping."""
    outcome: Any = yield
    report = outcome.get_result()
    no_skips = os.environ.get("CATFLAP_NO_SKIPS") == "1"
    if no_skips and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped, and CI runs every test: {report.longrepr}"
