"""Scale-out on the real Redis: two gateways and two agent hosts as real processes.

Each test uses its own key prefix and deletes its keys afterwards; the Redis-restart test runs
a private redis-server on a free port.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import websockets
from websockets.asyncio.client import ClientConnection, connect

from catflap.cluster.keys import HEARTBEAT_TTL_S, RESERVATION_TTL_S

from .conftest import ROOT, die_with_test_process, seconds

pytestmark = pytest.mark.slow  # end to end: real gateways, agent processes

REDIS_URL = os.environ.get("CATFLAP_TEST_REDIS", "redis://127.0.0.1:6379/0")
EXCLUSIVE = ROOT / "tests" / "bots" / "exclusive"
KEYS_ENV = {"CATFLAP_TOKEN_KEYS": "k1:cluster-test-secret"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Proc:
    popen: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid


@dataclass
class Cluster:
    redis_url: str
    prefix: str
    config: Path
    gateways: list[tuple[Proc, int]] = field(default_factory=list)
    hosts: list[Proc] = field(default_factory=list)
    #: With ``own_dirs``: each host's folder, then each gateway's (working dir, config file,
    #: state_dir and logs below it).
    dirs: list[Path] = field(default_factory=list)

    def url(self, index: int) -> str:
        return f"ws://127.0.0.1:{self.gateways[index][1]}"

    def http(self, index: int) -> str:
        return f"http://127.0.0.1:{self.gateways[index][1]}"

    def registered(self) -> int:
        client = redis.Redis.from_url(self.redis_url)
        try:
            ids = client.smembers(f"{self.prefix}:agent:echo.my-org:instances")
            return sum(client.exists(f"{self.prefix}:inst:{i.decode()}") for i in ids)
        finally:
            client.close()

    def instance_states(self) -> list[str]:
        """The ``state`` of every instance registered in Redis."""
        client = redis.Redis.from_url(self.redis_url)
        try:
            ids = client.smembers(f"{self.prefix}:agent:echo.my-org:instances")
            states = [client.hget(f"{self.prefix}:inst:{i.decode()}", "state") for i in ids]
            return [state.decode() for state in states if state is not None]
        finally:
            client.close()


def _spawn(
    args: list[str],
    ready_marker: str | None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Proc:
    popen = subprocess.Popen(
        [sys.executable, "-m", "catflap", *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        preexec_fn=die_with_test_process,
        env={**os.environ, **KEYS_ENV, **(env or {})},
        cwd=cwd,
    )
    proc = Proc(popen)
    ready = threading.Event()

    def drain() -> None:
        assert popen.stderr is not None
        for line in popen.stderr:
            proc.lines.append(line)
            if ready_marker and ready_marker in line:
                ready.set()

    proc.reader = threading.Thread(target=drain, daemon=True)
    proc.reader.start()
    if ready_marker and not ready.wait(seconds(30)):
        popen.kill()
        raise AssertionError(f"{args[0]} did not start:\n" + "".join(proc.lines))
    return proc


def _stop(proc: Proc) -> None:
    if proc.popen.poll() is None:
        proc.popen.send_signal(signal.SIGTERM)
        try:
            proc.popen.wait(timeout=seconds(10))
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait()
    if proc.reader is not None:
        proc.reader.join(timeout=seconds(5))
    if proc.popen.stderr is not None:
        proc.popen.stderr.close()


@asynccontextmanager
async def cluster(
    *,
    gateways: int = 2,
    hosts: int = 2,
    slots: int = 2,
    max_agents: int = 50,
    redis_url: str = REDIS_URL,
    bot: Path = EXCLUSIVE,
    org_settings: str = "",
    sessions_per_instance: int = 1,
    host_redis_url: str | None = None,
    settings: str = "",
    own_dirs: bool = False,
    warm: int | None = None,
) -> AsyncIterator[Cluster]:
    """``org_settings``: more lines for ``[organizations.my-org]`` (e.g. its Daily API key);
    ``host_redis_url``: the agent hosts' ``--redis`` (a proxy), when not ``redis_url``;
    ``settings``: top-level lines of the config file (e.g. ``database_url``);
    ``warm``: each host's ``--warm`` (default: ``slots``).
    ``own_dirs``: every process gets a folder of its own (its working directory, config file,
    state_dir and logs), so none shares a file with another; else they share one config
    file and its ``logs`` folder."""
    warm = slots if warm is None else warm
    workdir = Path(tempfile.mkdtemp(prefix="cfcl"))
    prefix = f"cftest-{uuid.uuid4().hex[:8]}"
    config = workdir / "catflap.toml"
    text = (
        settings + 'state_dir = "state"\n'
        '[organizations.my-org]\npublic_keys = ["pk_test"]\nprivate_keys = ["sk_test"]\n'
        + org_settings
        + f'[organizations.my-org.agents.echo]\npath = "{bot}"\n'
        'websocket_auth = "token"\n'
        f"[organizations.my-org.agents.echo.scaling]\nmax_agents = {max_agents}\n"
        f"sessions_per_instance = {sessions_per_instance}\n"
        '[logs]\ndir = "logs"\n'  # below the config file's folder
    )
    config.write_text(text)
    running = Cluster(redis_url, prefix, config)

    def place() -> tuple[Path | None, list[str]]:
        """The next process's working dir and config arguments."""
        if not own_dirs:
            return None, ["--config", str(config)]
        folder = workdir / f"p{len(running.dirs)}"
        folder.mkdir()
        (folder / "catflap.toml").write_text(text)
        running.dirs.append(folder)
        return folder, ["--config", str(folder / "catflap.toml")]

    common = [
        "--redis",
        redis_url,
        "--prefix",
        prefix,
        "--log-level",
        "info",
    ]
    try:
        for _ in range(hosts):
            cwd, config_args = place()
            running.hosts.append(
                _spawn(
                    [
                        "agent-host",
                        *config_args,
                        *common,
                        *(["--redis", host_redis_url] if host_redis_url else []),
                        "--agent",
                        "echo.my-org",
                        "--slots",
                        str(slots),
                        "--warm",
                        str(warm),
                    ],
                    None,
                    cwd=cwd,
                )
            )
        for _ in range(gateways):
            port = _free_port()
            cwd, config_args = place()
            proc = _spawn(
                ["gateway", *config_args, *common, "--listen", f"127.0.0.1:{port}"],
                "gateway listening on",
                cwd=cwd,
            )
            running.gateways.append((proc, port))
        want = min(hosts * warm, max_agents)
        async with asyncio.timeout(seconds(60)):
            while running.registered() < want:
                await asyncio.sleep(0.1)
        yield running
    finally:
        for proc, _ in running.gateways:
            _stop(proc)
        for proc in running.hosts:
            _stop(proc)
        with suppress(redis.RedisError):
            client = redis.Redis.from_url(redis_url)
            keys = list(client.scan_iter(f"{prefix}:*"))
            if keys:
                client.delete(*keys)
            client.close()
        shutil.rmtree(workdir, ignore_errors=True)


async def _token(cl: Cluster, gateway: int) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"{cl.http(gateway)}/v1/public/echo/start",
            json={"transport": "websocket"},
            headers={"Authorization": "Bearer pk_test"},
        )
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


async def _open(cl: Cluster, gateway: int) -> tuple[ClientConnection, dict[str, Any]]:
    started = await _token(cl, gateway)
    ws = await connect(
        f"{cl.url(gateway)}/ws/generic/echo.my-org/{started['token']}", open_timeout=seconds(20)
    )
    hello = json.loads(await asyncio.wait_for(ws.recv(), seconds(10)))
    assert hello["session_id"] == started["sessionId"]
    return ws, hello


async def test_two_hundred_sessions_spread_and_never_share_an_instance() -> None:
    async with cluster(slots=3) as cl:
        pids: set[int] = set()
        gateways_used: set[int] = set()

        async def worker(n: int) -> None:
            for i in range(n):
                gateway = i % 2
                for _ in range(50):  # all six instances may be briefly busy: retry
                    try:
                        ws, hello = await _open(cl, gateway)
                        break
                    except websockets.InvalidStatus as exc:
                        assert exc.response.status_code in (429, 503)
                        await asyncio.sleep(0.05)
                else:
                    raise AssertionError("no instance became free")
                assert hello["concurrent"] == 1
                pids.add(hello["pid"])
                gateways_used.add(gateway)
                await ws.send("ping")
                assert await ws.recv() == "ping"
                await ws.close()

        await asyncio.gather(*(worker(40) for _ in range(5)))
        assert len(pids) == 6  # every instance on both hosts took sessions
        assert gateways_used == {0, 1}


async def test_a_token_spent_on_one_gateway_is_refused_on_the_other() -> None:
    async with cluster(hosts=1, slots=2) as cl:
        started = await _token(cl, 0)
        path = f"/ws/generic/echo.my-org/{started['token']}"
        async with connect(cl.url(0) + path) as ws:
            await ws.recv()
            with pytest.raises(websockets.InvalidStatus) as refused:
                await connect(cl.url(1) + path)
        assert refused.value.response.status_code == 403
        body = json.loads(refused.value.response.body)
        assert body["code"] == "token_replayed"


async def test_an_agent_hosts_session_logs_are_read_through_any_gateway() -> None:
    async with cluster(hosts=1, slots=1) as cl:
        ws, hello = await _open(cl, 0)
        await ws.close()
        sid = hello["session_id"]
        headers = {"Authorization": "Bearer sk_test"}
        async with httpx.AsyncClient(base_url=cl.http(1), timeout=seconds(10)) as client:
            async with asyncio.timeout(seconds(10)):
                while True:
                    answer = (
                        await client.get(
                            "/v1/agents/echo/logs",
                            params={"sessionId": sid, "order": "asc"},
                            headers=headers,
                        )
                    ).json()
                    texts = [entry["log"] for entry in answer.get("logs", [])]
                    if texts and "= session ended" in texts[-1]:
                        break
                    await asyncio.sleep(0.05)
        assert any(t.startswith("catflap.runtime.app: = session started") for t in texts)
        assert (cl.config.parent / "logs" / "my-org" / "echo" / f"{sid}.jsonl").is_file()


async def test_cluster_wide_max_agents_gives_429() -> None:
    async with cluster(hosts=2, slots=2, max_agents=3) as cl:
        assert cl.registered() == 3  # the fourth instance was refused registration
        spare = await _token(cl, 1)  # minted while there is room
        sessions = [await _open(cl, i % 2) for i in range(3)]
        with pytest.raises(websockets.InvalidStatus) as refused:
            await connect(f"{cl.url(1)}/ws/generic/echo.my-org/{spare['token']}")
        assert refused.value.response.status_code == 429
        assert refused.value.response.headers["retry-after"] == "1"
        async with httpx.AsyncClient() as client:
            start = await client.post(
                f"{cl.http(0)}/v1/public/echo/start",
                json={"transport": "websocket"},
                headers={"Authorization": "Bearer pk_test"},
            )
        assert start.status_code == 429
        for ws, _ in sessions:
            await ws.close()


async def test_killing_a_gateway_leaves_the_other_intact_and_frees_its_instances() -> None:
    async with cluster(hosts=1, slots=2) as cl:
        survivor, _ = await _open(cl, 1)
        doomed, doomed_hello = await _open(cl, 0)
        os.kill(cl.gateways[0][0].pid, signal.SIGKILL)
        killed = time.perf_counter()
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(doomed.recv(), seconds(5))
        await survivor.send("still here")
        assert await survivor.recv() == "still here"
        # The dead gateway's instance comes back: a new session lands on it.
        async with asyncio.timeout(seconds(RESERVATION_TTL_S + HEARTBEAT_TTL_S + 10)):
            while True:
                ws, hello = await _open(cl, 1)
                if hello["pid"] == doomed_hello["pid"]:
                    await ws.close()
                    break
                await ws.close()
        assert time.perf_counter() - killed < RESERVATION_TTL_S + HEARTBEAT_TTL_S
        await survivor.close()


async def test_killing_an_instance_on_an_agent_host_is_handled_like_a_crash() -> None:
    async with cluster(gateways=1, hosts=1, slots=1) as cl:
        ws, hello = await _open(cl, 0)
        os.kill(hello["pid"], signal.SIGKILL)
        with pytest.raises(websockets.ConnectionClosedError):
            await asyncio.wait_for(ws.recv(), seconds(5))
        assert ws.close_code == 1011
        # The host replaces it and registers the replacement.
        async with asyncio.timeout(seconds(30)):
            while True:
                try:
                    ws, again = await _open(cl, 0)
                    break
                except websockets.InvalidStatus:
                    await asyncio.sleep(0.2)
        assert again["pid"] != hello["pid"]
        await ws.close()


@contextmanager
def private_redis() -> Iterator[tuple[str, Any]]:
    port = _free_port()
    workdir = tempfile.mkdtemp(prefix="cfredis")

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                workdir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_test_process,
        )

    state = {"proc": start()}

    def restart(down_for: float) -> None:
        state["proc"].terminate()
        state["proc"].wait(timeout=10)
        time.sleep(down_for)
        state["proc"] = start()

    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis(port=port).ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    try:
        yield f"redis://127.0.0.1:{port}/0", restart
    finally:
        state["proc"].terminate()
        state["proc"].wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


async def test_sessions_survive_redis_going_away_and_new_ones_resume_after() -> None:
    with private_redis() as (url, restart):
        async with cluster(hosts=1, slots=2, redis_url=url) as cl:
            live, _ = await _open(cl, 0)
            await asyncio.get_running_loop().run_in_executor(None, restart, 1.0)
            await live.send("during")
            assert await live.recv() == "during"  # the relay never touched Redis
            # Service resumes by itself: hosts re-register, gateways dispatch again.
            async with asyncio.timeout(seconds(30)):
                while True:
                    try:
                        ws, _ = await _open(cl, 1)
                        break
                    except (websockets.InvalidStatus, AssertionError, httpx.HTTPError):
                        await asyncio.sleep(0.2)
            await ws.close()
            await live.close()


async def test_an_agent_host_drains_on_sigterm() -> None:
    async with cluster(gateways=1, hosts=1, slots=1) as cl:
        live, _ = await _open(cl, 0)
        host = cl.hosts[0].popen
        host.send_signal(signal.SIGTERM)
        async with asyncio.timeout(seconds(10)):
            while cl.instance_states() != ["draining"]:
                await asyncio.sleep(0.05)
        with pytest.raises(websockets.InvalidStatus) as refused:
            started = await _token(cl, 0)
            await connect(f"{cl.url(0)}/ws/generic/echo.my-org/{started['token']}")
        assert refused.value.response.status_code == 503
        await live.send("still here")
        assert await live.recv() == "still here"
        assert host.poll() is None  # it waits for the live call
        await live.close()
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, lambda: host.wait(timeout=seconds(20))) == 0


async def test_a_busy_instance_keeps_its_slot_when_redis_forgets_it() -> None:
    async with cluster(gateways=1, hosts=1, slots=1) as cl:
        live, hello = await _open(cl, 0)
        client = redis.Redis.from_url(cl.redis_url)
        try:
            keys = list(client.scan_iter(f"{cl.prefix}:*"))
            client.delete(*keys)  # what a Redis restart without persistence does
            async with asyncio.timeout(seconds(15)):
                while cl.registered() < 1:  # the heartbeat notices and registers again
                    await asyncio.sleep(0.1)
            (iid,) = [
                i.decode() for i in client.smembers(f"{cl.prefix}:agent:echo.my-org:instances")
            ]
            active = {s.decode() for s in client.smembers(f"{cl.prefix}:inst:{iid}:active")}
        finally:
            client.close()
        assert active == {hello["session_id"]}
        with pytest.raises(websockets.InvalidStatus) as refused:
            started = await _token(cl, 0)
            await connect(f"{cl.url(0)}/ws/generic/echo.my-org/{started['token']}")
        assert refused.value.response.status_code == 503  # not a second session on it
        await live.send("fine")
        assert await live.recv() == "fine"
        await live.close()
