"""The runtime's control loop: each command from the pool applied to the running bots and the
server, until the pool closes the channel.

========================  ===================================================================
command                   what the runtime does
========================  ===================================================================
``ping``                  answers ``pong`` with the same ``seq``
``stop_session``          asks that session to stop (unknown ids are logged and ignored)
``shutdown``              stops accepting at once (``POST /bot`` gets 503 on open connections),
                          lets running sessions finish, then exits
end of file               the pool is gone: stops every session, waits briefly, exits
a bad line                a logged protocol error; the loop reads the next command
========================  ===================================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol, assert_never

from catflap.contract import limits
from catflap.contract.control import ControlProtocolError, EventSink, ParentCommand
from catflap.runtime.running import RunningBots
from catflap.tasks import TaskSet

__all__ = ["CommandSource", "ControlLoop", "Serving"]

logger = logging.getLogger("catflap.runtime")


class CommandSource(Protocol):
    """Where commands come from: :class:`~catflap.contract.control.ControlChannel`."""

    async def receive_command(self) -> ParentCommand | None:
        """The next command, or ``None`` once the pool has closed its end.

        Raises:
            ControlProtocolError: the line is not a well-formed command.
        """


class Serving(Protocol):
    """The server the loop stops: the runtime's uvicorn server."""

    def stop_accepting(self) -> None:
        """Close the listening sockets; open connections carry on."""

    def exit(self) -> None:
        """Ask the server to shut down and the process to exit."""


class ControlLoop:
    """Reads commands until end of file; see the module docstring for what each one does."""

    def __init__(
        self,
        commands: CommandSource,
        server: Serving,
        running: RunningBots,
        emit: EventSink,
        *,
        orphan_grace_s: float = limits.BOT_CANCEL_GRACE_S + 1,
    ) -> None:
        """Args:
        commands: The pool's end of the control channel, as seen from here.
        server: Stopped on ``shutdown`` and at end of file.
        running: The bots that ``stop_session``, ``shutdown`` and end of file act on.
        emit: Gets the ``pong`` events.
        orphan_grace_s: At end of file, how long stopped sessions get to close their sockets
            with "session stopped" before the server's shutdown closes the rest with 1012.
        """
        self._commands = commands
        self._server = server
        self._running = running
        self._emit = emit
        self._orphan_grace_s = orphan_grace_s
        #: The drain that ``shutdown`` starts; the loop goes on answering pings meanwhile.
        self._background = TaskSet("runtime control loop")
        self._draining = False

    async def run(self) -> None:
        """Apply commands until the pool closes the channel, then stop the server."""
        try:
            while (command := await self._next_command()) is not None:
                await self.apply(command)
            await self._pool_gone()
        finally:
            await self._background.aclose()

    async def _next_command(self) -> ParentCommand | None:
        while True:
            try:
                return await self._commands.receive_command()
            except ControlProtocolError as exc:
                logger.warning("! ignoring a bad control line: %s", exc)

    async def apply(self, command: ParentCommand) -> None:
        """Carry out one command."""
        if command["command"] == "ping":
            await self._emit({"event": "pong", "seq": command["seq"]})
        elif command["command"] == "stop_session":
            if not self._running.stop(command["session_id"]):
                logger.info("stop_session: no running session %s", command["session_id"])
        elif command["command"] == "shutdown":
            # Stop accepting now, before the next command is read: the pool may rely on it.
            self._server.stop_accepting()
            self._running.refuse_new()
            if not self._draining:
                self._draining = True
                self._background.spawn(self._drain(), name="runtime drain")
        else:
            assert_never(command)

    async def _drain(self) -> None:
        """Let running sessions finish, then stop the server (which no longer accepts)."""
        logger.info("x shutdown requested: draining %d session(s)", len(self._running))
        await self._running.wait_idle()
        self._server.exit()

    async def _pool_gone(self) -> None:
        logger.warning("x control channel closed (the pool is gone): stopping all sessions")
        self._running.refuse_new()
        self._running.stop_all()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._orphan_grace_s):
                await self._running.wait_idle()
        self._server.exit()
