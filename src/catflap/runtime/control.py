"""The control channel between the agent pool (parent) and one agent runtime (child).

The pool creates ``socket.socketpair()`` and hands the child end to the runtime as
``--control-fd N``. Both ends speak newline-delimited compact JSON objects, one message a line,
through the same :class:`ControlChannel` class.

Child -> parent events::

    {"event":"ready","address":"unix:/p"|"tcp:host:port","pid":int}
    {"event":"start_failed","error":str}
    {"event":"session_started","session_id":str}
    {"event":"session_ended","session_id":str,"status":SessionStatus,"error":str|null,
     "client_disconnected":bool,"bot_seconds":float}
    {"event":"pong","seq":int}

Parent -> child commands::

    {"command":"ping","seq":int}
    {"command":"stop_session","session_id":str}
    {"command":"shutdown"}

End of file means the other side is gone: the runtime then cancels every session and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Mapping
from typing import Any, Literal, TypedDict

from catflap.contract.errors import CatflapError

__all__ = [
    "BOT_IGNORED_CANCELLATION",
    "CONTROL_LINE_MAX_BYTES",
    "ChildEvent",
    "ControlChannel",
    "ControlProtocolError",
    "ParentCommand",
    "PingCommand",
    "PongEvent",
    "ReadyEvent",
    "SessionEndedEvent",
    "SessionStartedEvent",
    "SessionStatus",
    "ShutdownCommand",
    "StartFailedEvent",
    "StopSessionCommand",
]

#: Longest control line either end accepts. ``start_failed`` carries a whole traceback, which
#: can exceed asyncio's 64 KiB default for a deep import chain; 1 MiB still bounds memory.
CONTROL_LINE_MAX_BYTES = 1024 * 1024

#: ``session_ended.error`` when ``bot()`` outlived its cancellation grace: the pool must kill
#: and replace the process, since that bot may still be running in it.
BOT_IGNORED_CANCELLATION = "bot ignored cancellation"

#: How a session ended: ``bot()`` returned, ``bot()`` raised, the session budget ran out, or the
#: pool asked for a stop.
SessionStatus = Literal["completed", "bot_error", "time_limit", "stopped"]


class ReadyEvent(TypedDict):
    event: Literal["ready"]
    address: str
    pid: int


class StartFailedEvent(TypedDict):
    event: Literal["start_failed"]
    error: str


class SessionStartedEvent(TypedDict):
    event: Literal["session_started"]
    session_id: str


class SessionEndedEvent(TypedDict):
    event: Literal["session_ended"]
    session_id: str
    status: SessionStatus
    error: str | None
    client_disconnected: bool
    bot_seconds: float


class PongEvent(TypedDict):
    event: Literal["pong"]
    seq: int


class PingCommand(TypedDict):
    command: Literal["ping"]
    seq: int


class StopSessionCommand(TypedDict):
    command: Literal["stop_session"]
    session_id: str


class ShutdownCommand(TypedDict):
    command: Literal["shutdown"]


ChildEvent = ReadyEvent | StartFailedEvent | SessionStartedEvent | SessionEndedEvent | PongEvent
ParentCommand = PingCommand | StopSessionCommand | ShutdownCommand


class ControlProtocolError(CatflapError, ValueError):
    """The peer sent a line that is not one JSON object (or one longer than the limit)."""


class ControlChannel:
    """Line-delimited JSON over an already-connected stream socket; used by both ends.

    ``send`` writes each message with a single ``write`` call, so concurrent senders never
    interleave lines.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def from_socket(cls, sock: socket.socket) -> ControlChannel:
        """Wrap a connected ``AF_UNIX`` stream socket (one end of a ``socketpair()``)."""
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=CONTROL_LINE_MAX_BYTES)
        return cls(reader, writer)

    async def send(self, msg: Mapping[str, Any]) -> None:
        """Send one message.

        Raises:
            ConnectionError: the peer has closed its end.
        """
        line = json.dumps(msg, separators=(",", ":")).encode() + b"\n"
        self._writer.write(line)
        await self._writer.drain()

    async def receive(self) -> dict[str, Any] | None:
        """Return the next message, or ``None`` once the peer has closed its end.

        Raises:
            ControlProtocolError: the line is too long, not JSON, or not a JSON object.
        """
        try:
            line = await self._reader.readline()
        except ValueError as exc:  # asyncio reports an over-long line as ValueError
            raise ControlProtocolError(f"control line too long: {exc}") from None
        except ConnectionError:
            return None
        if not line.endswith(b"\n"):
            return None  # EOF, possibly after a partial line from a dying peer
        try:
            msg = json.loads(line)
        except ValueError as exc:
            raise ControlProtocolError(f"control line is not JSON: {exc}") from None
        if not isinstance(msg, dict):
            raise ControlProtocolError(f"control line is not a JSON object: {line[:80]!r}")
        return msg

    async def aclose(self) -> None:
        """Close our end; the peer's next ``receive()`` returns ``None``."""
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()
