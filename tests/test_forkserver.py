"""The fork server: instances forked from a pre-imported runtime, and its fallbacks."""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
from pathlib import Path

import pytest

from catflap.config import load_config
from catflap.pool.forkserver import ForkServerLauncher

from .conftest import PIPECAT_ECHO, seconds, write_config

pytestmark = pytest.mark.slow  # end to end: real gateways, agent processes


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


async def _ready(launcher: ForkServerLauncher, agent, instance_id: int):  # type: ignore[no-untyped-def]
    process = await launcher.launch(agent, instance_id)
    async with asyncio.timeout(seconds(30)):
        while (message := await process.channel.receive()) is not None:
            if message["event"] == "ready":
                return process, message
    raise AssertionError("no ready event")


async def test_instances_are_forked_from_the_fork_server_and_it_can_die() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="cf"))
    agent = next(load_config(write_config(workdir, {"pe": {"path": PIPECAT_ECHO}})).agents())
    launcher = ForkServerLauncher(workdir, log_level="warning")
    try:
        await launcher.prepare(agent)
        server = launcher._servers[agent.key].process
        first, ready = await _ready(launcher, agent, 1)
        assert ready["pid"] == first.pid
        assert _parent(first.pid) == server.pid  # forked, not a fresh interpreter
        first.kill()
        await asyncio.wait_for(first.wait(), seconds(5))
        await first.channel.aclose()

        os.kill(server.pid, signal.SIGKILL)
        await server.wait()
        second, _ = await _ready(launcher, agent, 2)  # a new fork server, or the slow way
        assert second.pid != first.pid
        second.kill()
        await asyncio.wait_for(second.wait(), seconds(5))
        await second.channel.aclose()
    finally:
        await launcher.close()


async def test_an_environment_too_large_for_one_fork_request_starts_the_slow_way(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from catflap.pool.forkserver import FORK_MESSAGE_MAX_BYTES

    workdir = Path(tempfile.mkdtemp(prefix="cf"))
    agents = {"pe": {"path": PIPECAT_ECHO, "pass_env": ["HUGE_*"]}}
    agent = next(load_config(write_config(workdir, agents)).agents())
    huge = {f"HUGE_{n}": "x" * 60_000 for n in range(4)}  # passed through, over the bound
    launcher = ForkServerLauncher(workdir, log_level="warning", environ={**os.environ, **huge})
    try:
        await launcher.prepare(agent)
        server = launcher._servers[agent.key]
        process, _ = await _ready(launcher, agent, 1)
        assert _parent(process.pid) == os.getpid()  # a fresh interpreter, our own child
        assert server.alive and launcher._servers[agent.key] is server  # the server stays
        process.kill()
        await asyncio.wait_for(process.wait(), seconds(5))
        await process.channel.aclose()
    finally:
        await launcher.close()
    (message,) = [r.getMessage() for r in caplog.records if "too large" in r.getMessage()]
    assert message.startswith(f"! {agent.key}: an environment of ")
    assert int(message.split()[5]) > FORK_MESSAGE_MAX_BYTES
    assert "x" * 100 not in message


# --- what the fork server preloads: bot.py's imports, read without running it ---------------


def test_bot_dependencies_are_the_module_level_imports_without_running_bot_py(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from catflap.pool.forkserver import bot_dependencies

    # As in the fork server, whose working directory is the bot's folder: siblings are found
    # there, and are bot code, not dependencies to preload.
    monkeypatch.syspath_prepend(str(tmp_path))

    (tmp_path / "helpers.py").write_text("")
    (tmp_path / "bot.py").write_text(
        "import json, os.path\n"
        "from email import message\n"
        "from . import sibling\n"
        "import helpers\n"
        "try:\n    import tomllib\nexcept ImportError:\n    import tomli\n"
        "else:\n    import csv\nfinally:\n    import array\n"
        "if True:\n    import zlib\nelse:\n    import bz2\n"
        "with open(__file__):\n    import heapq\n"
        "if __name__ == '__main__':\n    import argparse\n"
        "def bot():\n    import socket\n"
        "raise SystemExit('bot.py must not run in the fork server')\n"
    )
    assert bot_dependencies(tmp_path) == [
        "json",
        "os.path",
        "email",
        "email.message",
        "tomllib",
        "tomli",
        "csv",
        "array",
        "zlib",
        "bz2",
        "heapq",
    ]


@pytest.mark.parametrize(
    "source", [None, "def broken(:\n", "\x00"], ids=["missing", "syntax", "nul"]
)
def test_bot_dependencies_of_an_unreadable_bot_are_none(tmp_path: Path, source: str | None) -> None:
    from catflap.pool.forkserver import bot_dependencies

    if source is not None:
        (tmp_path / "bot.py").write_text(source)
    assert bot_dependencies(tmp_path) == []
