"""Secret sets reach only their agent's instances, at launch, and nothing of the gateway's own
environment does: real gateways, real agent processes (fresh interpreters and fork server
children), a bot that reports its environment into its session log. Then the leak check: a
distinctive value is in no log line, record, metric, dashboard state or error text, nor in the
store file; a changed set reaches new instances only; a missing set starts no instance."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from catflap.config import CatflapConfig
from catflap.pool.instance import InstanceState
from catflap.runtime.botlogs import session_log_path
from catflap.secretsets.cipher import generate_key
from catflap.secretsets.filestore import STORE_FILE, FileSecretStore
from tests.conftest import (
    BOTS,
    PRIVATE_KEY,
    PUBLIC_KEY,
    RunningGateway,
    running_gateway,
    seconds,
)

pytestmark = pytest.mark.slow

ENV_BOT = BOTS / "env_report"
#: Distinctive, so that a grep finds it wherever it leaked.
SECRET_A = "sekrit-A-7f3c0d5b2f6e4e0aa1b2c3d4"
SECRET_B = "sekrit-B-0a1b2c3d4e5f60718293a4b5"
GATEWAY_ONLY = "gateway-only-93a4b5c6d7e8f901"

FORK_MODES = pytest.mark.parametrize("fork_server", [True, False], ids=["fork", "fresh"])


def _agents() -> dict[str, dict[str, Any]]:
    return {
        "agent-a": {"path": ENV_BOT, "secret_set": "a-keys", "scaling": {"min_agents": 1}},
        "agent-b": {"path": ENV_BOT, "secret_set": "b-keys", "scaling": {"min_agents": 1}},
        "agent-c": {"path": ENV_BOT, "scaling": {"min_agents": 1}},
    }


def _settings(state_dir: Path, fork_server: bool) -> Callable[[CatflapConfig], CatflapConfig]:
    def adjust(config: CatflapConfig) -> CatflapConfig:
        gateway = config.gateway.model_copy(update={"fork_server": fork_server})
        return config.model_copy(update={"state_dir": state_dir, "gateway": gateway})

    return adjust


@asynccontextmanager
async def _gateway(
    state_dir: Path, *, fork_server: bool, agents: dict[str, dict[str, Any]] | None = None
) -> AsyncIterator[RunningGateway]:
    agents = agents or _agents()
    async with running_gateway(agents, adjust=_settings(state_dir, fork_server)) as gw:
        for name in agents:
            await gw.wait_ready(f"{name}.my-org")
        yield gw


async def _session(gw: RunningGateway, agent: str, body: dict[str, Any] | None = None) -> str:
    """Run one session of ``agent`` to its end; its session id."""
    async with httpx.AsyncClient(base_url=gw.http, timeout=seconds(30)) as client:
        response = await client.post(
            f"/v1/public/{agent}/start",
            json={"body": body or {}},
            headers={"authorization": f"Bearer {PUBLIC_KEY}"},
        )
    assert response.status_code == 200, response.text
    session_id: str = response.json()["sessionId"]
    async with asyncio.timeout(seconds(10)):
        while session_id not in gw.gateway.sessions.ended:
            await asyncio.sleep(0.01)
    return session_id


def _printed(gw: RunningGateway, agent: str, session_id: str) -> list[str]:
    """What the bot printed in that session, from its session log."""
    path = session_log_path(gw.config.log_dir, "my-org", agent, session_id)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [line["line"] for line in lines if line["stream"] == "stdout"]


async def _put(state_dir: Path, name: str, secrets: dict[str, str]) -> None:
    store = FileSecretStore(state_dir, warn=lambda _: None)
    await store.put("my-org", name, secrets)


@FORK_MODES
async def test_each_agent_sees_its_own_set_and_none_of_the_gateways_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fork_server: bool
) -> None:
    monkeypatch.setenv("SOME_GATEWAY_ONLY_VAR", GATEWAY_ONLY)
    monkeypatch.setenv("CATFLAP_SECRETS_KEY", generate_key())  # the gateway's, not theirs
    await _put(tmp_path, "a-keys", {"MY_SECRET": SECRET_A})
    await _put(tmp_path, "b-keys", {"MY_SECRET": SECRET_B, "ONLY_B": "b"})
    async with _gateway(tmp_path, fork_server=fork_server) as gw:
        a = _printed(gw, "agent-a", await _session(gw, "agent-a"))
        b = _printed(gw, "agent-b", await _session(gw, "agent-b"))
        c_body = {"names": ["MY_SECRET", "ONLY_B", "SOME_GATEWAY_ONLY_VAR", "CATFLAP_SECRETS_KEY"]}
        c = _printed(gw, "agent-c", await _session(gw, "agent-c", c_body))
    assert a == [
        f"MY_SECRET={SECRET_A}",
        "SOME_GATEWAY_ONLY_VAR is not set",
        # With a fork server, bot.py's sibling modules are imported in the child, after its
        # environment is in place.
        f"SETTING_AT_IMPORT={SECRET_A}",
    ]
    assert b == [
        f"MY_SECRET={SECRET_B}",
        "SOME_GATEWAY_ONLY_VAR is not set",
        f"SETTING_AT_IMPORT={SECRET_B}",
    ]
    assert c == [
        "MY_SECRET is not set",
        "ONLY_B is not set",
        "SOME_GATEWAY_ONLY_VAR is not set",
        "CATFLAP_SECRETS_KEY is not set",
        "SETTING_AT_IMPORT=(not set at import)",
    ]


@FORK_MODES
async def test_the_allow_list_and_pass_env_reach_instances(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fork_server: bool
) -> None:
    monkeypatch.setenv("TZ", "Europe/Paris")
    monkeypatch.setenv("LC_TIME", "C")
    monkeypatch.setenv("DEEPGRAM_API_KEY", "from-the-host")
    monkeypatch.setenv("DEEPGRAM_URL", "wss://dg")
    monkeypatch.setenv("SOME_GATEWAY_ONLY_VAR", GATEWAY_ONLY)
    agents = {
        "agent-p": {"path": ENV_BOT, "pass_env": ["DEEPGRAM_*"], "scaling": {"min_agents": 1}}
    }
    async with _gateway(tmp_path, fork_server=fork_server, agents=agents) as gw:
        names = ["TZ", "LC_TIME", "DEEPGRAM_API_KEY", "DEEPGRAM_URL", "SOME_GATEWAY_ONLY_VAR"]
        printed = _printed(gw, "agent-p", await _session(gw, "agent-p", {"names": names}))
    assert printed[:5] == [
        "TZ=Europe/Paris",
        "LC_TIME=C",
        "DEEPGRAM_API_KEY=from-the-host",
        "DEEPGRAM_URL=wss://dg",
        "SOME_GATEWAY_ONLY_VAR is not set",
    ]


def _files_containing(root: Path, needle: bytes) -> list[str]:
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_socket() and needle in path.read_bytes():
            found.append(str(path))
    return found


async def test_a_secret_value_appears_in_no_log_record_metric_dashboard_or_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("CATFLAP_SECRETS_KEY", "")
    await _put(tmp_path, "a-keys", {"MY_SECRET": SECRET_A})
    agents = {
        "agent-a": {"path": ENV_BOT, "secret_set": "a-keys", "scaling": {"min_agents": 1}},
        # An agent whose set is missing: its failed start is logged, and its 503 answered.
        "agent-m": {"path": ENV_BOT, "secret_set": "missing"},
    }
    async with running_gateway(
        agents, adjust=_settings(tmp_path, True), dashboard=True, ready_timeout=5
    ) as gw:
        await gw.wait_ready("agent-a.my-org")
        session_id = await _session(gw, "agent-a", {"digest": True})
        auth = {"authorization": f"Bearer {PRIVATE_KEY}"}
        async with httpx.AsyncClient(base_url=gw.http, timeout=seconds(30)) as client:
            refused = await client.post(
                "/v1/public/agent-m/start",
                json={},
                headers={"authorization": f"Bearer {PUBLIC_KEY}"},
            )
            answers = [
                refused.text,
                (await client.get("/metrics")).text,
                (await client.get("/v1/dashboard/state", headers=auth)).text,
                (await client.get("/v1/agents/agent-a/sessions", headers=auth)).text,
                (await client.get(f"/v1/agents/agent-a/sessions/{session_id}", headers=auth)).text,
                (await client.get("/v1/agents/agent-a/logs", headers=auth)).text,
            ]
        digest = hashlib.sha256(SECRET_A.encode()).hexdigest()
        assert _printed(gw, "agent-a", session_id)[0] == f"MY_SECRET sha256={digest}"
        workdir = gw.config.log_dir.parent  # the records' SQLite file, the session logs
        record = sqlite3.connect(workdir / "sessions.sqlite3").execute("SELECT * FROM sessions")
        rows = repr(record.fetchall())
        files = _files_containing(workdir, SECRET_A.encode()) + _files_containing(
            tmp_path, SECRET_A.encode()
        )
    assert refused.status_code == 503, refused.text
    assert refused.json() == {
        "error": "agent agent-m.my-org failed to start (SecretSetNotFound: agent agent-m.my-org "
        "uses secret set 'missing' (secret_set), which organization 'my-org' does not have: "
        "create it with `catflap secrets set missing KEY=VALUE --org my-org`, or remove "
        "secret_set). The gateway log has the traceback.",
        "code": "PCC-1001",
    }
    captured = capfd.readouterr()
    texts = {
        "answers": "\n".join(answers),
        "gateway log": "\n".join(r.getMessage() + str(r.exc_text or "") for r in caplog.records),
        "agents' stdout/stderr": captured.out + captured.err,
        "records": rows,
    }
    leaked = [where for where, text in texts.items() if SECRET_A in text]
    assert not leaked, f"the secret's value is in: {leaked}"
    assert not files, f"files holding the secret's value: {files}"
    assert (tmp_path / STORE_FILE).stat().st_mode & 0o777 == 0o600


async def test_a_changed_set_reaches_new_instances_and_running_ones_keep_theirs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CATFLAP_SECRETS_KEY", "")
    await _put(tmp_path, "a-keys", {"MY_SECRET": "v1"})
    agents = {"agent-a": {"path": ENV_BOT, "secret_set": "a-keys", "scaling": {"min_agents": 1}}}
    async with _gateway(tmp_path, fork_server=True, agents=agents) as gw:
        assert _printed(gw, "agent-a", await _session(gw, "agent-a"))[0] == "MY_SECRET=v1"
        await _put(tmp_path, "a-keys", {"MY_SECRET": "v2"})
        # The warm instance started with v1 and keeps it (PCC: running pods keep old values).
        assert _printed(gw, "agent-a", await _session(gw, "agent-a"))[0] == "MY_SECRET=v1"
        (old,) = gw.pool.agents["agent-a.my-org"].live()
        assert old.process is not None
        old.process.kill()
        async with asyncio.timeout(seconds(30)):
            while not any(
                i is not old and i.state is InstanceState.READY
                for i in gw.pool.agents["agent-a.my-org"].live()
            ):
                await asyncio.sleep(0.02)
        assert _printed(gw, "agent-a", await _session(gw, "agent-a"))[0] == "MY_SECRET=v2"


def test_the_store_file_never_holds_a_value_in_clear(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CATFLAP_SECRETS_KEY", raising=False)
    asyncio.run(_put(tmp_path, "a-keys", {"MY_SECRET": SECRET_A}))
    assert _files_containing(tmp_path, SECRET_A.encode()) == []
    assert _files_containing(tmp_path, b"MY_SECRET") == []


# --- cluster mode: the set in Redis, read by `catflap agent-host` ------------------------------

_IMPORT_REPORTER = """\
import os
import pathlib

with open(pathlib.Path(__file__).with_name("seen.txt"), "a") as seen:
    seen.write(f"{os.environ.get('MY_SECRET')} {os.environ.get('SOME_GATEWAY_ONLY_VAR')}\\n")


async def bot(args):
    pass
"""


async def test_an_agent_host_gives_its_instances_the_set_from_redis(tmp_path: Path) -> None:
    import redis.asyncio as aioredis

    from catflap.cluster.keys import Keys
    from catflap.secretsets.redisstore import RedisSecretStore
    from tests.test_cluster import REDIS_URL, _spawn, _stop

    bot = tmp_path / "bot"
    bot.mkdir()
    (bot / "bot.py").write_text(_IMPORT_REPORTER)
    config = tmp_path / "catflap.toml"
    config.write_text(
        f'[organizations.my-org.agents.agent-a]\npath = "{bot}"\nsecret_set = "a-keys"\n'
        '[logs]\ndir = "logs"\n'
    )
    prefix = f"cftest-{uuid.uuid4().hex[:8]}"
    key = generate_key()
    client = aioredis.Redis.from_url(REDIS_URL)
    store = RedisSecretStore(client, Keys(prefix), environ={"CATFLAP_SECRETS_KEY": key})
    await store.put("my-org", "a-keys", {"MY_SECRET": SECRET_A})
    env = {"CATFLAP_SECRETS_KEY": key, "SOME_GATEWAY_ONLY_VAR": GATEWAY_ONLY}
    host = _spawn(
        [
            "agent-host", "--config", str(config), "--redis", REDIS_URL, "--prefix", prefix,
            "--agent", "agent-a.my-org", "--slots", "1", "--warm", "1",
        ],
        None,
        env=env,
    )  # fmt: skip
    try:
        async with asyncio.timeout(seconds(30)):
            while not await client.smembers(f"{prefix}:agent:agent-a.my-org:instances"):
                await asyncio.sleep(0.05)
        seen = (bot / "seen.txt").read_text().splitlines()
    finally:
        _stop(host)
        leftover = [k async for k in client.scan_iter(f"{prefix}:*")]
        if leftover:
            await client.delete(*leftover)
        await client.aclose()
    # No bot code runs in the fork server (it only imports bot.py's dependencies); the
    # instance imported bot.py with the set. It did not see the agent host's own variable, and
    # the host's log never shows the value.
    assert seen == [f"{SECRET_A} None"]
    assert not any(SECRET_A in line for line in host.lines)
