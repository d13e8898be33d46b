"""The control channel (catflap.contract.control) over a real ``socketpair()``, both directions:
every valid message round-trips, and every malformed line is one ``ControlProtocolError`` after
which the channel reads the next line as before."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import uvloop

from catflap.contract.control import (
    CONTROL_LINE_MAX_BYTES,
    ChildEvent,
    ControlChannel,
    ControlProtocolError,
    ParentCommand,
)

from .conftest import seconds

#: Every async test runs on asyncio's loop and on uvloop, which the runtime and the pool use
#: (see pytest_asyncio_loop_factories in conftest.py).
LOOP_FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}

EVENTS: list[ChildEvent] = [
    {"event": "ready", "address": "unix:/run/a.sock", "pid": 4242},
    {"event": "ready", "address": "tcp:127.0.0.1:9000", "pid": 1},
    {"event": "start_failed", "error": "Traceback (most recent call last):\n  ...\nÿ"},
    {"event": "session_started", "session_id": "sess-1"},
    {
        "event": "session_ended",
        "session_id": "sess-1",
        "status": "completed",
        "error": None,
        "client_disconnected": True,
        "bot_seconds": 0.25,
    },
    {
        "event": "session_ended",
        "session_id": "sess-2",
        "status": "stopped",
        "error": "bot ignored cancellation",
        "client_disconnected": False,
        "bot_seconds": 5.0,
    },
    {"event": "pong", "seq": 7},
]
COMMANDS: list[ParentCommand] = [
    {"command": "ping", "seq": 0},
    {"command": "ping", "seq": 2**40},
    {"command": "stop_session", "session_id": "sess-1"},
    {"command": "shutdown"},
]
PING: ParentCommand = {"command": "ping", "seq": 99}


@dataclass
class Wire:
    """A channel, and the raw socket at the other end of its ``socketpair()``."""

    channel: ControlChannel
    raw: socket.socket

    async def write(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.raw, data)

    async def read_line(self) -> bytes:
        loop = asyncio.get_running_loop()
        data = b""
        async with asyncio.timeout(seconds(5)):
            while not data.endswith(b"\n"):
                data += await loop.sock_recv(self.raw, 4096)
        return data

    async def command(self) -> ParentCommand | None:
        async with asyncio.timeout(seconds(5)):
            return await self.channel.receive_command()

    async def event(self) -> ChildEvent | None:
        async with asyncio.timeout(seconds(5)):
            return await self.channel.receive_event()


@pytest.fixture
async def wire() -> AsyncIterator[Wire]:
    raw, theirs = socket.socketpair()
    raw.setblocking(False)
    channel = await ControlChannel.from_socket(theirs)
    try:
        yield Wire(channel, raw)
    finally:
        await channel.aclose()
        raw.close()


@pytest.fixture
async def pair() -> AsyncIterator[tuple[ControlChannel, ControlChannel]]:
    """``(pool, runtime)``: both ends as ControlChannels, as in production."""
    ours, theirs = socket.socketpair()
    pool = await ControlChannel.from_socket(ours)
    runtime = await ControlChannel.from_socket(theirs)
    try:
        yield pool, runtime
    finally:
        await pool.aclose()
        await runtime.aclose()


def line(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg).encode() + b"\n"


# --- Valid messages ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [*EVENTS, *COMMANDS],
    ids=lambda m: str(m.get("event") or f"command-{m['command']}"),
)
async def test_each_message_round_trips_in_its_direction(
    pair: tuple[ControlChannel, ControlChannel], message: ChildEvent | ParentCommand
) -> None:
    """Events go from the runtime to the pool, commands from the pool to the runtime."""
    pool, runtime = pair
    receive: Callable[[], Awaitable[object]]
    if "event" in message:
        await runtime.send(message)
        receive = pool.receive_event
    else:
        await pool.send(message)
        receive = runtime.receive_command
    async with asyncio.timeout(seconds(5)):
        assert await receive() == message


async def test_a_message_is_one_compact_json_line(wire: Wire) -> None:
    await wire.channel.send({"command": "stop_session", "session_id": "ÿ"})
    assert await wire.read_line() == b'{"command":"stop_session","session_id":"\\u00ff"}\n'


async def test_messages_sent_back_to_back_arrive_in_order(wire: Wire) -> None:
    await wire.write(b"".join(line(dict(c)) for c in COMMANDS))
    assert [await wire.command() for _ in COMMANDS] == COMMANDS


async def test_an_integer_bot_seconds_is_read_as_a_float(wire: Wire) -> None:
    ended = {**EVENTS[4], "bot_seconds": 2}
    await wire.write(line(ended))
    received = await wire.event()
    assert received == {**EVENTS[4], "bot_seconds": 2.0}
    assert received is not None and type(dict(received)["bot_seconds"]) is float


async def test_unknown_extra_fields_are_dropped(wire: Wire) -> None:
    await wire.write(line({"command": "shutdown", "reason": "deploy"}))
    assert await wire.command() == {"command": "shutdown"}


# --- Malformed lines: one error each, then the next line reads as usual -----------------------


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"not json\n", "control line is not JSON: Expecting value: line 1 column 1 (char 0)"),
        (b"\n", "control line is not JSON: Expecting value: line 2 column 1 (char 1)"),
        (
            b"\xff\n",
            "control line is not JSON: 'utf-8' codec can't decode byte 0xff in position 0: "
            "invalid start byte",
        ),
        (b"[1]\n", "control line is not a JSON object: b'[1]\\n'"),
        (b'"ping"\n', "control line is not a JSON object: b'\"ping\"\\n'"),
        (
            b'{"command":"ping"}\n',
            "bad control message (ping.seq: Field required): {'command': 'ping'}",
        ),
        (
            b'{"command":"ping","seq":"1"}\n',
            "bad control message (ping.seq: Input should be a valid integer): "
            "{'command': 'ping', 'seq': '1'}",
        ),
        (
            b'{"command":"ping","seq":true}\n',
            "bad control message (ping.seq: Input should be a valid integer): "
            "{'command': 'ping', 'seq': True}",
        ),
        (
            b'{"command":"ping","seq":1.0}\n',
            "bad control message (ping.seq: Input should be a valid integer): "
            "{'command': 'ping', 'seq': 1.0}",
        ),
        (
            b'{"command":"stop_session","session_id":3}\n',
            "bad control message (stop_session.session_id: Input should be a valid string): "
            "{'command': 'stop_session', 'session_id': 3}",
        ),
        (
            b'{"command":"reboot"}\n',
            "bad control message (message: Input tag 'reboot' found using 'command' does not "
            "match any of the expected tags: 'ping', 'stop_session', 'shutdown'): "
            "{'command': 'reboot'}",
        ),
        (
            b'{"seq":1}\n',
            "bad control message (message: Unable to extract tag using discriminator "
            "'command'): {'seq': 1}",
        ),
        (
            b'{"event":"pong","seq":1}\n',
            "bad control message (message: Unable to extract tag using discriminator "
            "'command'): {'event': 'pong', 'seq': 1}",
        ),
    ],
    ids=[
        "not-json",
        "empty-line",
        "not-utf8",
        "array",
        "string",
        "missing-field",
        "string-for-int",
        "bool-for-int",
        "float-for-int",
        "int-for-string",
        "unknown-command",
        "no-command",
        "an-event-sent-as-a-command",
    ],
)
async def test_runtime_side_refuses_a_bad_line_and_reads_the_next(
    wire: Wire, raw: bytes, error: str
) -> None:
    await wire.write(raw + line(dict(PING)))
    with pytest.raises(ControlProtocolError) as info:
        await wire.command()
    assert str(info.value) == error
    assert await wire.command() == PING


@pytest.mark.parametrize(
    ("msg", "error"),
    [
        (
            {"event": "ready", "address": "unix:/a"},
            "bad control message (ready.pid: Field required): "
            "{'event': 'ready', 'address': 'unix:/a'}",
        ),
        (
            {**EVENTS[4], "status": "finished"},
            "bad control message (session_ended.status: Input should be 'completed', "
            "'bot_error', 'time_limit', 'stopped' or 'agent_start_timeout'): "
            "{'event': 'session_ended', 'session_id': 'sess-1', 'status': 'finished', "
            "'error': None, 'client_disconnected': True, 'bot_seconds': 0.25}",
        ),
        (
            {"event": "nope"},
            "bad control message (message: Input tag 'nope' found using 'event' does not match "
            "any of the expected tags: 'ready', 'start_failed', 'session_started', "
            "'session_ended', 'pong'): {'event': 'nope'}",
        ),
        (
            {"command": "ping", "seq": 1},
            "bad control message (message: Unable to extract tag using discriminator 'event'): "
            "{'command': 'ping', 'seq': 1}",
        ),
    ],
    ids=["missing-field", "unknown-status", "unknown-event", "a-command-sent-as-an-event"],
)
async def test_pool_side_refuses_a_bad_event_and_reads_the_next(
    wire: Wire, msg: dict[str, Any], error: str
) -> None:
    pong: ChildEvent = {"event": "pong", "seq": 5}
    await wire.write(line(msg) + line(dict(pong)))
    with pytest.raises(ControlProtocolError) as info:
        await wire.event()
    assert str(info.value) == error
    assert await wire.event() == pong


# --- Line length ------------------------------------------------------------------------------


def padded_ping(seq: int, length: int) -> bytes:
    """A ping command exactly ``length`` bytes long before its newline."""
    head = b'{"command":"ping","seq":%d,"pad":"' % seq
    return head + b"x" * (length - len(head) - 2) + b'"}\n'


async def test_a_line_of_exactly_the_limit_is_read(wire: Wire) -> None:
    await wire.write(padded_ping(1, CONTROL_LINE_MAX_BYTES))
    assert await wire.command() == {"command": "ping", "seq": 1}


async def test_an_over_long_line_is_one_error_and_is_dropped_whole(wire: Wire) -> None:
    # The tail of the long line is a valid command: it must not be obeyed.
    long_line = b"x" * (CONTROL_LINE_MAX_BYTES + 10) + b'{"command":"shutdown"}\n'
    # Written while the channel reads: more than its buffer and the socket's hold at once.
    sender = asyncio.create_task(
        wire.write(long_line + padded_ping(2, CONTROL_LINE_MAX_BYTES + 1) + line(dict(PING)))
    )
    for _ in range(2):
        with pytest.raises(ControlProtocolError) as info:
            await wire.command()
        assert str(info.value) == f"control line too long (over {CONTROL_LINE_MAX_BYTES} bytes)"
    assert await wire.command() == PING
    await sender


async def test_a_line_many_times_the_limit_is_dropped_whole(wire: Wire) -> None:
    sender = asyncio.create_task(
        wire.write(b"y" * (5 * CONTROL_LINE_MAX_BYTES) + b"\n" + line(dict(PING)))
    )
    with pytest.raises(ControlProtocolError) as info:
        await wire.command()
    assert str(info.value) == f"control line too long (over {CONTROL_LINE_MAX_BYTES} bytes)"
    assert await wire.command() == PING
    await sender


# --- End of file ------------------------------------------------------------------------------


async def test_end_of_file_is_none_on_both_sides(
    pair: tuple[ControlChannel, ControlChannel],
) -> None:
    pool, runtime = pair
    await pool.aclose()
    async with asyncio.timeout(seconds(5)):
        assert await runtime.receive_command() is None
    await runtime.aclose()


async def test_end_of_file_after_the_runtime_closes_is_none_for_the_pool(
    pair: tuple[ControlChannel, ControlChannel],
) -> None:
    pool, runtime = pair
    await runtime.send({"event": "pong", "seq": 1})
    await runtime.aclose()
    async with asyncio.timeout(seconds(5)):
        assert await pool.receive_event() == {"event": "pong", "seq": 1}
        assert await pool.receive_event() is None


async def test_end_of_file_mid_line_is_none_not_an_error(wire: Wire) -> None:
    await wire.write(line(dict(PING)) + b'{"command":"shut')
    wire.raw.shutdown(socket.SHUT_WR)
    assert await wire.command() == PING
    assert await wire.command() is None


async def test_end_of_file_inside_an_over_long_line_is_an_error_then_none(wire: Wire) -> None:
    async def send_then_close() -> None:
        await wire.write(b"z" * (CONTROL_LINE_MAX_BYTES + 1))
        wire.raw.shutdown(socket.SHUT_WR)

    sender = asyncio.create_task(send_then_close())
    with pytest.raises(ControlProtocolError):
        await wire.command()
    assert await wire.command() is None
    await sender
