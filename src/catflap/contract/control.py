"""The control channel between the agent pool (parent) and one agent runtime (child).

The pool creates ``socket.socketpair()`` and hands the child end to the runtime as
``--control-fd N``. Both ends speak newline-delimited compact JSON objects, one message a line,
through the same :class:`ControlChannel` class.

Child -> parent events::

    {"event":"ready","address":"unix:/p"|"tcp:host:port","pid":int}
    {"event":"start_failed","error":str}
    {"event":"session_started","session_id":str}
    {"event":"session_ended","session_id":str,"status":SessionStatus,"error":str|null,
     "client_disconnected":bool,"bot_seconds":float,"resources":ResourceMetrics|null}
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
from collections.abc import Awaitable, Callable, Mapping
from typing import (
    Annotated,
    Any,
    Literal,
    NotRequired,  # pydantic needs these on 3.11
    TypeVar,
)

from pydantic import Field, TypeAdapter, ValidationError
from typing_extensions import TypedDict

from catflap.contract.errors import CatflapError
from catflap.contract.resources import ResourceMetrics
from catflap.contract.status import BotStatus

__all__ = [
    "BOT_IGNORED_CANCELLATION",
    "CONTROL_LINE_MAX_BYTES",
    "ChildEvent",
    "ControlChannel",
    "ControlProtocolError",
    "EventSink",
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

#: How a session ended, as the runtime reports it (one source: :mod:`catflap.contract.status`).
SessionStatus = BotStatus


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
    #: CPU and memory of the instance's process while the session ran
    #: (:mod:`catflap.contract.resources`); absent or null when it could not be read.
    resources: NotRequired[ResourceMetrics | None]


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

#: Where a runtime reports its events: the channel to the pool, or a log line when standalone.
#: It must not raise: a pool that went away is noticed by the control loop, not by the sender.
EventSink = Callable[[ChildEvent], Awaitable[None]]


#: Parsers for each direction: the ``event``/``command`` field picks the message type, and a
#: message with a missing or mistyped field is refused as a whole (never a ``KeyError`` later).
_CHILD_EVENTS: TypeAdapter[ChildEvent] = TypeAdapter(
    Annotated[ChildEvent, Field(discriminator="event")]
)
_PARENT_COMMANDS: TypeAdapter[ParentCommand] = TypeAdapter(
    Annotated[ParentCommand, Field(discriminator="command")]
)


_Message = TypeVar("_Message")


class ControlProtocolError(CatflapError, ValueError):
    """The peer sent a line that is not a valid message (or one longer than the limit)."""

    def __init__(self, message: str, *, kind: str | None = None) -> None:
        super().__init__(message)
        #: The ``event``/``command`` the bad message named, when it was an object naming one:
        #: a receiver may treat a broken report of some kinds more strictly than others.
        self.kind = kind


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
            line = await self._reader.readuntil(b"\n")
        except asyncio.IncompleteReadError:
            return None  # EOF, possibly after a partial line from a dying peer
        except asyncio.LimitOverrunError as exc:
            await self._discard_line(exc.consumed)
            raise ControlProtocolError(
                f"control line too long (over {CONTROL_LINE_MAX_BYTES} bytes)"
            ) from None
        except ConnectionError:
            return None
        try:
            msg = json.loads(line)
        except ValueError as exc:
            raise ControlProtocolError(f"control line is not JSON: {exc}") from None
        if not isinstance(msg, dict):
            raise ControlProtocolError(f"control line is not a JSON object: {line[:80]!r}")
        return msg

    async def _discard_line(self, consumed: int) -> None:
        """Drop the rest of an over-long line, its newline included.

        asyncio's ``readline`` would drop only what it had buffered, and the tail that arrives
        later would be read as a line of its own: a tail that happens to be a valid message
        (a traceback quoting one) must never be obeyed.
        """
        while True:
            # ``consumed`` bytes are buffered: either the line up to its newline, or all of
            # the line read so far.
            await self._reader.readexactly(consumed)
            try:
                await self._reader.readuntil(b"\n")
            except asyncio.LimitOverrunError as exc:
                consumed = exc.consumed
            except (asyncio.IncompleteReadError, ConnectionError):
                return  # EOF: the next receive() reports it
            else:
                return

    async def receive_event(self) -> ChildEvent | None:
        """The parent's side: the next event from the runtime, or ``None`` at end of file.

        Raises:
            ControlProtocolError: the line is not a well-formed :data:`ChildEvent`.
        """
        msg = await self.receive()
        return None if msg is None else _validated(_CHILD_EVENTS, msg)

    async def receive_command(self) -> ParentCommand | None:
        """The runtime's side: the next command from the pool, or ``None`` at end of file.

        Raises:
            ControlProtocolError: the line is not a well-formed :data:`ParentCommand`.
        """
        msg = await self.receive()
        return None if msg is None else _validated(_PARENT_COMMANDS, msg)

    async def aclose(self) -> None:
        """Close our end; the peer's next ``receive()`` returns ``None``."""
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()


def _validated(adapter: TypeAdapter[_Message], msg: dict[str, Any]) -> _Message:
    try:
        return adapter.validate_python(msg, strict=True)
    except ValidationError as exc:
        errors = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'message'}: {e['msg']}" for e in exc.errors()
        )
        named = msg.get("event", msg.get("command"))
        raise ControlProtocolError(
            f"bad control message ({errors}): {str(msg)[:200]}",
            kind=named if isinstance(named, str) else None,
        ) from None
