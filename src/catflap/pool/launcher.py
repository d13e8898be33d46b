"""Starting agent runtime processes.

A launcher turns "start instance N of this agent" into a running ``catflap agent`` process with
a connected control channel. The pool does not care how the process came to be, so a fork
server (a pre-imported runtime that forks) can replace :class:`SubprocessLauncher` without the
pool changing.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from catflap.config import AgentSpec
from catflap.runtime.control import ControlChannel

__all__ = ["LaunchedProcess", "Launcher", "SubprocessLauncher"]


@dataclass
class LaunchedProcess:
    """A running runtime process and our end of its control channel."""

    pid: int
    channel: ControlChannel
    process: asyncio.subprocess.Process

    async def wait(self) -> int:
        return await self.process.wait()

    def kill(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()

    def terminate(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)


class Launcher(Protocol):
    async def launch(self, agent: AgentSpec, instance_id: int) -> LaunchedProcess: ...


class SubprocessLauncher:
    """Start each instance as ``python -m catflap.runtime.main``.

    Instances listen on a Unix socket by default: that keeps the gateway -> agent hop off the
    TCP stack and needs no port allocation. Agent hosts use TCP so that remote gateways reach
    them.
    """

    def __init__(
        self,
        socket_dir: Path,
        *,
        log_level: str = "info",
        tcp_host: str | None = None,
        log_dir: Path | None = None,
        log_format: str = "json",
    ) -> None:
        """Args:
        socket_dir: Where instances' Unix sockets go.
        log_level: The runtimes' ``--log-level``.
        tcp_host: Listen on TCP at this address (agent hosts: gateways on other machines
            connect) instead of a Unix socket.
        log_dir: The runtimes' ``--log-dir``: each session's bot output goes below it.
        log_format: The runtimes' ``--log-format`` (``json`` or ``text``) on stderr.
        """
        self._socket_dir = socket_dir
        self._log_level = log_level
        self._tcp_host = tcp_host
        #: Absolute: the runtime runs in the bot's folder.
        self._log_dir = log_dir.resolve() if log_dir is not None else None
        self._log_format = log_format
        self._serial = itertools.count(1)

    async def launch(self, agent: AgentSpec, instance_id: int) -> LaunchedProcess:
        # Short, unique names: AF_UNIX paths are limited to 107 bytes and agent names can be
        # long; instance ids are only unique within one agent.
        serial = next(self._serial)
        if self._tcp_host is not None:
            listen = f"tcp:{self._tcp_host}:0"
        else:
            sock_path = self._socket_dir / f"i{serial}.sock"
            sock_path.unlink(missing_ok=True)
            listen = f"unix:{sock_path}"
        options = ["--log-level", self._log_level, "--log-format", self._log_format]
        if self._log_dir is not None:
            options += ["--log-dir", str(self._log_dir)]
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "catflap.runtime.main",
                "--bot-dir",
                str(agent.config.path),
                "--listen",
                listen,
                "--control-fd",
                str(theirs.fileno()),
                "--agent-name",
                agent.key,
                *options,
                pass_fds=(theirs.fileno(),),
                cwd=str(agent.config.path),
                env=dict(os.environ),
                stdin=asyncio.subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        channel = await ControlChannel.from_socket(ours)
        return LaunchedProcess(pid=process.pid, channel=channel, process=process)
