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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from catflap.config import AgentSpec
from catflap.contract.control import ControlChannel
from catflap.contract.ice import ICE_CONFIG_URL_ENV, ice_config_data_url
from catflap.pool.environment import SecretSource, instance_environment

__all__ = ["ChildRef", "LaunchedProcess", "Launcher", "ProcessRef", "SubprocessLauncher"]


class ProcessRef(Protocol):
    """How to wait for and signal one runtime process, whoever started it."""

    pid: int

    async def wait(self) -> int | None:
        """Wait for the process to end; its exit code when this process can know it."""
        ...

    def signal(self, sig: int) -> None: ...


class ChildRef:
    """A runtime that is our own child process."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.pid = process.pid

    async def wait(self) -> int | None:
        return await self.process.wait()

    def signal(self, sig: int) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)


@dataclass
class LaunchedProcess:
    """A running runtime process and our end of its control channel."""

    ref: ProcessRef
    channel: ControlChannel

    @property
    def pid(self) -> int:
        return self.ref.pid

    async def wait(self) -> int | None:
        return await self.ref.wait()

    def kill(self) -> None:
        self.ref.signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.ref.signal(signal.SIGTERM)


class Launcher(Protocol):
    async def prepare(self, agent: AgentSpec) -> None:
        """Get ready to launch the agent's instances quickly (called once at pool start)."""
        ...

    async def launch(self, agent: AgentSpec, instance_id: int) -> LaunchedProcess: ...

    async def close(self) -> None: ...


class SubprocessLauncher:
    """Start each instance as ``python -m catflap.runtime.main``.

    Instances listen on a Unix socket by default: that keeps the gateway -> agent hop off the
    TCP stack and needs no port allocation. Agent hosts use TCP so that remote gateways reach
    them. Each instance's environment is :func:`~catflap.pool.environment.instance_environment`:
    the allow-list of this process's, the agent's ``pass_env``, and its secret set read at
    launch (so a changed set reaches new instances only).
    """

    def __init__(
        self,
        socket_dir: Path,
        *,
        log_level: str = "info",
        tcp_host: str | None = None,
        log_dir: Path | None = None,
        log_format: str = "json",
        secrets: SecretSource | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        """Args:
        socket_dir: Where instances' Unix sockets go.
        log_level: The runtimes' ``--log-level``.
        tcp_host: Listen on TCP at this address (agent hosts: gateways on other machines
            connect) instead of a Unix socket.
        log_dir: The runtimes' ``--log-dir``: each session's bot output goes below it.
        log_format: The runtimes' ``--log-format`` (``json`` or ``text``) on stderr.
        secrets: Reads an agent's secret set at each launch; None: agents get no secrets.
        environ: The environment the allow-list is taken from; None: ``os.environ`` as it
            is at each launch.
        """
        self._socket_dir = socket_dir
        self._log_level = log_level
        self._tcp_host = tcp_host
        #: Absolute: the runtime runs in the bot's folder.
        self._log_dir = log_dir.resolve() if log_dir is not None else None
        self._log_format = log_format
        self._serial = itertools.count(1)
        self._secrets = secrets
        self._environ = environ

    async def prepare(self, agent: AgentSpec) -> None:
        """Nothing to prepare: every instance is a fresh interpreter."""

    async def close(self) -> None:
        """Nothing to release."""

    def base_environment(self, agent: AgentSpec) -> dict[str, str]:
        """What every instance of ``agent`` inherits, without its secrets."""
        return instance_environment(
            os.environ if self._environ is None else self._environ, agent, {}
        )

    async def environment(self, agent: AgentSpec) -> dict[str, str]:
        """One new instance's whole environment, its secret set read now.

        Raises:
            SecretSetNotFound, SecretStoreError: the set cannot be read; no instance starts.
        """
        secrets = {} if self._secrets is None else await self._secrets(agent)
        return {**self.base_environment(agent), **self.runtime_env(agent), **secrets}

    async def launch(self, agent: AgentSpec, instance_id: int) -> LaunchedProcess:
        env = await self.environment(agent)  # first: a missing secret set starts nothing
        # Short, unique names: AF_UNIX paths are limited to 107 bytes and agent names can be
        # long; instance ids are only unique within one agent.
        serial = next(self._serial)
        if self._tcp_host is not None:
            listen = f"tcp:{self._tcp_host}:0"
        else:
            sock_path = self._socket_dir / f"i{serial}.sock"
            sock_path.unlink(missing_ok=True)
            listen = f"unix:{sock_path}"
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            ref = await self._start(agent, self.runtime_args(agent, listen), theirs, env)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return LaunchedProcess(ref, await ControlChannel.from_socket(ours))

    def runtime_args(self, agent: AgentSpec, listen: str) -> list[str]:
        """``catflap agent`` options for one instance, without ``--control-fd``."""
        args = [
            "--bot-dir",
            str(agent.config.path),
            "--listen",
            listen,
            "--agent-name",
            agent.key,
            "--log-level",
            self._log_level,
            "--log-format",
            self._log_format,
            # The runtime refuses a POST /bot past the pool's own count (503 instance_full,
            # which the gateway retries elsewhere), so the two can never disagree silently.
            "--sessions-per-instance",
            str(agent.config.scaling.sessions_per_instance),
            "--webrtc-offer-timeout",
            str(agent.config.webrtc.offer_timeout),
        ]
        if self._log_dir is not None:
            args += ["--log-dir", str(self._log_dir)]
        return args

    def runtime_env(self, agent: AgentSpec) -> dict[str, str]:
        """Environment variables an instance gets on top of the allow-list: for an agent with
        ``[webrtc] ice_servers``, ``ICE_CONFIG_URL`` (PCC's name) as a ``data:`` URL of them,
        so the credentials are on no command line (:mod:`catflap.contract.ice`)."""
        servers = agent.config.webrtc.ice_servers
        if not servers:
            return {}
        return {ICE_CONFIG_URL_ENV: ice_config_data_url([s.to_wire() for s in servers])}

    async def _start(
        self, agent: AgentSpec, args: list[str], control: socket.socket, env: dict[str, str]
    ) -> ProcessRef:
        """Start the runtime with ``control`` as its control channel and ``env`` as its whole
        environment (a fresh interpreter)."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "catflap.runtime.main",
            *args,
            "--control-fd",
            str(control.fileno()),
            pass_fds=(control.fileno(),),
            cwd=str(agent.config.path),
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
        )
        return ChildRef(process)
