"""The relay's fast lane: bytes cross untouched on the native thread, and every reason to hand a
session back (close frame, bad control frame, full buffer, EOF, recall, stop, allocation
failure) ends where the event loop would.

These tests drive a real :class:`Relay` over real socket pairs: the test holds the far end of
each, as the client and the agent would. Each async test runs on asyncio's own loop and on
uvloop (``LOOP_FACTORIES``, read by tests/conftest.py), since ``catflap serve`` runs on uvloop.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st

from catflap.contract import limits
from catflap.contract.closecodes import CloseCode
from catflap.contract.errors import CatflapMisuse
from catflap.gateway import fastlane
from catflap.gateway.fastlane import HandBack, LegReturn, LentTransport
from catflap.gateway.frames import FrameScanner
from catflap.gateway.relay import Relay
from catflap.pool.instance import SessionEnd
from catflap.sessions.record import RelayStats, completion_status

from .conftest import seconds
from .test_frames import encode, frame_specs
from .test_relay_state import Step, steps_fixture  # noqa: F401 (a fixture)

pytestmark = [
    pytest.mark.skipif(
        not sys.platform.startswith("linux"), reason="the fast lane is built on Linux only"
    ),
]

#: Every async test here runs once per loop (see pytest_asyncio_loop_factories in conftest.py).
LOOP_FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


@pytest.fixture(autouse=True)
def _no_injected_faults() -> Iterator[None]:
    yield
    if fastlane.native is not None:
        fastlane.native._fail_allocations(0)  # a test that armed more than it used


def test_the_extension_is_built() -> None:
    # CI installs with a C compiler: a missing extension there is a build failure, not a skip.
    assert fastlane.available()


def test_the_extension_agrees_with_the_contract() -> None:
    native = fastlane.native
    assert native.FRAME_HEADER_MAX_BYTES == limits.FRAME_HEADER_MAX_BYTES
    assert native.CONTROL_FRAME_MAX_PAYLOAD_BYTES == limits.CONTROL_FRAME_MAX_PAYLOAD_BYTES
    assert {reason.name: int(reason) for reason in HandBack} == {
        reason.name: getattr(native, reason.name) for reason in HandBack
    }


async def test_async_tests_here_run_on_each_loop(request: pytest.FixtureRequest) -> None:
    loop = asyncio.get_running_loop()
    assert isinstance(loop, uvloop.Loop) == ("uvloop" in request.node.name)


async def recv_exactly(sock: socket.socket, n: int, timeout: float = 5.0) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    async with asyncio.timeout(seconds(timeout)):
        while len(data) < n:
            chunk = await loop.sock_recv(sock, n - len(data))
            if not chunk:
                raise EOFError(f"EOF after {len(data)} of {n} bytes")
            data += chunk
    return data


async def recv_until_eof(
    sock: socket.socket, timeout: float = 5.0, *, reset_ends: bool = False
) -> bytes:
    """What arrives on ``sock`` until EOF (or a reset, with ``reset_ends``: the other end closed
    with bytes it never read)."""
    loop = asyncio.get_running_loop()
    data = b""
    async with asyncio.timeout(seconds(timeout)):
        try:
            while chunk := await loop.sock_recv(sock, 65536):
                data += chunk
        except ConnectionResetError:
            if not reset_ends:
                raise
    return data


@dataclass
class Session:
    relay: Relay
    lane: fastlane.FastLane
    client: socket.socket  # the test's end: what a WebSocket client holds
    agent: socket.socket  # the test's end: what the agent runtime holds
    #: Every hand-back the relay received: (reason, client side, agent side).
    returns: list[tuple[int, LegReturn, LegReturn]] = field(default_factory=list)

    async def wait_in_lane(self, expected: bool = True) -> None:
        async with asyncio.timeout(seconds(5)):
            while self.relay.in_lane is not expected:
                await asyncio.sleep(0.005)


@asynccontextmanager
async def lane_session(*, in_lane: bool = True, **relay_options: float) -> AsyncIterator[Session]:
    loop = asyncio.get_running_loop()
    lane = fastlane.FastLane()
    client_far, client_near = socket.socketpair()
    agent_far, agent_near = socket.socketpair()
    for sock in (client_far, agent_far):
        sock.setblocking(False)
    try:
        client_transport, _ = await loop.create_unix_connection(asyncio.Protocol, sock=client_near)
        agent_transport, _ = await loop.create_unix_connection(asyncio.Protocol, sock=agent_near)
        relay = Relay(client_transport, agent_transport, lane=lane, **relay_options)  # type: ignore[arg-type]
        session = Session(relay, lane, client_far, agent_far)
        lane_returned = relay.lane_returned

        def spy(reason: int, client: LegReturn, agent: LegReturn) -> None:
            session.returns.append((reason, client, agent))
            lane_returned(reason, client, agent)

        relay.lane_returned = spy  # type: ignore[method-assign]
        relay.start(client_pending=b"", agent_pending=b"")
        if in_lane:
            await session.wait_in_lane()
        yield session
    finally:
        lane.close()
        client_far.close()
        agent_far.close()


def close_payload(code: int, reason: str) -> bytes:
    return struct.pack("!H", code) + reason.encode()


def unmask(frame: bytes) -> bytes:
    """The payload of one masked frame with a payload under 126 bytes."""
    mask, payload = frame[2:6], frame[6:]
    return bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def test_frames_cross_the_lane_byte_exact_both_ways() -> None:
    async with lane_session() as s:
        loop = asyncio.get_running_loop()
        up = b"".join(encode(0x2, bytes([i]) * 320, masked=True) for i in range(50))
        down = b"".join(encode(0x1, b"ok %d" % i, masked=False) for i in range(50))
        await loop.sock_sendall(s.client, up)
        await loop.sock_sendall(s.agent, down)
        assert await recv_exactly(s.agent, len(up)) == up
        assert await recv_exactly(s.client, len(down)) == down
        assert s.relay.in_lane and s.lane.active == 1
        assert s.relay.traffic() == {
            "bytes_client_to_agent": len(up),
            "bytes_agent_to_client": len(down),
            "frames_client_to_agent": 50,
            "frames_agent_to_client": 50,
        }


def length_bytes(size: int, masked: bool) -> bytes:
    """The second byte of a frame header and its extended length, for ``size`` bytes."""
    bit = 0x80 if masked else 0
    if size < 126:
        return bytes([bit | size])
    if size < 65536:
        return bytes([bit | 126]) + struct.pack("!H", size)
    return bytes([bit | 127]) + struct.pack("!Q", size)


#: A control frame that breaks RFC 6455 5.5: (opcode, declared size, or None: fragmented).
bad_control_frames = st.tuples(
    st.sampled_from([0x9, 0xA]),
    st.one_of(st.none(), st.sampled_from([126, 300, 65535, 65536, 16 * 1024 * 1024])),
)


def bad_control_head(opcode: int, size: int | None, masked: bool) -> bytes:
    """The start of a bad control frame: only its header when oversized (the payload need never
    exist: nothing may wait for it), a whole 10-byte frame without FIN when fragmented."""
    if size is None:
        return encode(opcode, b"x" * 10, masked=masked, fin=False)
    return bytes([0x80 | opcode]) + length_bytes(size, masked) + (b"m" * 4 if masked else b"")


@settings(max_examples=200, deadline=None)
@given(
    specs=frame_specs,
    masked=st.booleans(),
    cuts=st.lists(st.integers(0, 10**6), max_size=20),
    close_at=st.one_of(st.none(), st.integers(0, 11)),
    bad=st.one_of(st.none(), st.tuples(st.integers(0, 11), bad_control_frames)),
)
def test_lane_scanner_agrees_with_frame_scanner_for_any_chunking(
    specs: list[tuple[int, int]],
    masked: bool,
    cuts: list[int],
    close_at: int | None,
    bad: tuple[int, tuple[int, int | None]] | None,
) -> None:
    """Chunk by chunk the lane's scanner keeps FrameScanner's state, never holds more than an
    incomplete header, and hands back, unscanned, exactly the chunk where a close frame starts or
    where the second byte of a bad control frame arrives (FrameScanner reports that one in the
    same chunk): such a frame is never relayed by the lane."""
    pieces: list[tuple[str, bytes]] = [
        ("data", encode(op, b"x" * size, masked=masked)) for op, size in specs
    ]
    if close_at is not None:
        close = encode(0x8, b"\x03\xe8", masked=masked)
        pieces.insert(close_at % (len(pieces) + 1), ("close", close))
    if bad is not None:
        at, (opcode, size) = bad
        pieces.insert(at % (len(pieces) + 1), ("bad", bad_control_head(opcode, size, masked)))
    stream = b"".join(piece for _, piece in pieces)
    # Where the lane must stop: a close frame's first byte, a bad control frame's second.
    stop: tuple[int, int] | None = None
    offset = 0
    for kind, piece in pieces:
        if kind == "close":
            stop = (offset, fastlane.native.CLOSE_FRAME)
            break
        if kind == "bad":
            stop = (offset + 1, fastlane.native.CONTROL_FRAME)
            break
        offset += len(piece)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    scanner = FrameScanner()
    for start, end in zip(points, points[1:], strict=False):
        chunk = stream[start:end]
        state = scanner.lane_state()
        assert state is not None
        before = scanner.frames
        hand_back, skip, partial, counted = fastlane.native.scan(state, chunk)
        assert len(partial) < limits.FRAME_HEADER_MAX_BYTES
        broken_at = scanner.feed(chunk)
        if hand_back:  # the lane leaves this chunk to Python, its state as it was
            assert stop is not None and start <= stop[0] < end and hand_back == stop[1]
            assert (skip, partial, counted) == (*state, 0)
            if hand_back == fastlane.native.CONTROL_FRAME:
                assert broken_at is not None and scanner.protocol_error is not None
            else:
                assert scanner.close_seen or scanner.lane_state() is None
            return
        assert stop is None or end <= stop[0], "the lane scanned past a frame it must hand back"
        assert broken_at is None
        assert (skip, partial) == scanner.lane_state()
        assert counted == scanner.frames - before
    assert stop is None  # a close or bad control frame must have been noticed
    assert scanner.frames == len(specs)


def test_lane_scanner_refuses_a_partial_header_of_a_whole_header_or_more() -> None:
    longest = b"\x82" * (limits.FRAME_HEADER_MAX_BYTES - 1)
    assert fastlane.native.scan((0, longest), b"")[2] == longest
    with pytest.raises(ValueError, match="at most 13 bytes"):
        fastlane.native.scan((0, longest + b"\x00"), b"")


@pytest.mark.parametrize("masked", [True, False])
def test_lane_scanner_hands_back_bad_control_frames_at_their_second_byte(masked: bool) -> None:
    ping = encode(0x9, b"p" * 125, masked=masked)
    scan = fastlane.native.scan
    assert scan((0, b""), ping)[0] == 0  # 125 bytes: a valid ping is the lane's to relay
    for head in (
        bad_control_head(0x9, 126, masked),
        bad_control_head(0xA, 16 * 1024 * 1024, masked),
        bad_control_head(0x9, None, masked),
    ):
        data = encode(0x2, b"d" * 3, masked=masked) + head
        # The first byte alone says nothing yet; it waits as a partial header...
        assert scan((0, b""), data[: 6 if masked else 5] + head[:1])[0] == 0
        assert scan((0, head[:1]), head[1:]) == (fastlane.native.CONTROL_FRAME, 0, head[:1], 0)
        # ...and a chunk holding both bytes goes back whole, whatever precedes the frame.
        assert scan((0, b""), data) == (fastlane.native.CONTROL_FRAME, 0, b"", 0)


def test_lane_scanner_counts_the_same_frames_as_frame_scanner() -> None:
    stream = b"".join(encode(0x2, b"y" * n, masked=True) for n in (0, 1, 125, 126, 65535, 70000))
    state: tuple[int, bytes] = (0, b"")
    total = 0
    for i in range(0, len(stream), 7):  # 7-byte cuts land inside every kind of header
        hand_back, skip, partial, frames = fastlane.native.scan(state, stream[i : i + 7])
        assert not hand_back
        state, total = (skip, partial), total + frames
    assert (total, state) == (6, (0, b""))


async def test_chunks_cut_inside_headers_are_counted_exactly() -> None:
    async with lane_session() as s:
        loop = asyncio.get_running_loop()
        stream = b"".join(encode(0x2, b"z" * n, masked=True) for n in (3, 126, 300, 65536, 5))
        for i in range(0, len(stream), 5000):
            piece = stream[i : i + 5000]
            for j in range(0, 42, 3):  # a few 3-byte sends: headers split across reads
                await loop.sock_sendall(s.client, piece[j : j + 3])
                await asyncio.sleep(0.001)
            await loop.sock_sendall(s.client, piece[42:])
        assert await recv_exactly(s.agent, len(stream)) == stream
        # The big frame may have filled the socket pair's buffer (a hand-back): it re-enters.
        await s.wait_in_lane()
        assert s.relay.traffic()["frames_client_to_agent"] == 5


async def test_a_close_frame_hands_the_session_back_and_ends_it_cleanly() -> None:
    async with lane_session() as s:
        loop = asyncio.get_running_loop()
        data = encode(0x2, b"a" * 10, masked=True)
        close = encode(0x8, close_payload(4000, "bye"), masked=True)
        await loop.sock_sendall(s.client, data + close)
        assert await recv_exactly(s.agent, len(data + close)) == data + close
        assert not s.relay.in_lane
        answer = encode(0x8, close_payload(4000, "bye"), masked=False)
        await loop.sock_sendall(s.agent, answer)
        assert await recv_exactly(s.client, len(answer)) == answer
        s.agent.close()
        s.client.close()
        async with asyncio.timeout(seconds(5)):
            stats = await s.relay.done
    assert (stats.client_close_code, stats.agent_close_code) == (4000, 4000)
    assert (stats.frames_client_to_agent, stats.frames_agent_to_client) == (2, 1)
    assert stats.bytes_client_to_agent == len(data + close)
    assert stats.client_initiated and not stats.agent_vanished


async def test_a_client_that_vanishes_in_the_lane_gets_1001_sent_to_the_agent() -> None:
    async with lane_session() as s:
        s.client.close()  # no close frame: a dropped call
        got = await recv_until_eof(s.agent)
        assert got[0] == 0x88 and struct.unpack("!H", unmask(got)[:2])[0] == 1001
        stats = await asyncio.wait_for(s.relay.done, seconds(5))
    assert stats.client_close_code is None and stats.client_initiated


async def test_an_agent_that_vanishes_in_the_lane_closes_the_client_with_1011() -> None:
    async with lane_session() as s:
        s.agent.close()
        got = await recv_until_eof(s.client)
        assert got == bytes([0x88, 2 + len(b"agent connection lost")]) + close_payload(
            1011, "agent connection lost"
        )
        stats = await asyncio.wait_for(s.relay.done, seconds(5))
    assert stats.agent_vanished and stats.gateway_close_code == 1011


async def test_close_both_recalls_the_session_and_sends_1012_both_ways() -> None:
    async with lane_session() as s:
        s.relay.close_both(CloseCode.SERVICE_RESTART, "gateway shutting down")
        to_client = await recv_until_eof(s.client)
        to_agent = await recv_until_eof(s.agent)
        stats = await asyncio.wait_for(s.relay.done, seconds(5))
    assert to_client == bytes([0x88, 23]) + close_payload(1012, "gateway shutting down")
    assert struct.unpack("!H", unmask(to_agent)[:2])[0] == 1012
    assert stats.gateway_close_code == 1012


async def test_abort_recalls_the_session_and_drops_both_sockets() -> None:
    async with lane_session() as s:
        s.relay.abort()
        assert await recv_until_eof(s.client) == b""
        assert await recv_until_eof(s.agent) == b""
        await asyncio.wait_for(s.relay.done, seconds(5))


async def test_a_full_client_buffer_hands_back_then_the_slow_peer_bound_closes_with_1013() -> None:
    async with lane_session(slow_peer_timeout=0.5) as s:
        s.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        loop = asyncio.get_running_loop()
        frame = encode(0x2, b"f" * 4000, masked=False)

        async def flood() -> None:
            while True:
                await loop.sock_sendall(s.agent, frame)

        flooding = asyncio.create_task(flood())
        try:
            async with asyncio.timeout(seconds(5)):
                while s.relay.in_lane:  # the lane cannot place a chunk: back to the loop
                    await asyncio.sleep(0.01)
            stats = await asyncio.wait_for(s.relay.done, seconds(10))
        finally:
            flooding.cancel()
    assert stats.gateway_close_code == 1013


async def test_stopping_the_lane_returns_its_sessions_and_they_keep_relaying() -> None:
    async with lane_session() as s:
        s.lane.close()
        assert not s.relay.in_lane and s.lane.active == 0
        loop = asyncio.get_running_loop()
        frame = encode(0x2, b"after", masked=True)
        await loop.sock_sendall(s.client, frame)
        assert await recv_exactly(s.agent, len(frame)) == frame
        assert s.relay.traffic()["frames_client_to_agent"] == 1


@pytest.mark.parametrize(
    ("sender", "head"),
    [
        ("client", bad_control_head(0x9, 300, masked=True)),
        ("client", bad_control_head(0x9, None, masked=True)),
        ("agent", bad_control_head(0xA, 65536, masked=False)),
        ("agent", bad_control_head(0xA, None, masked=False)),
    ],
    ids=[
        "client-oversized-ping",
        "client-fragmented-ping",
        "agent-oversized-pong",
        "agent-fragmented-pong",
    ],
)
async def test_a_bad_control_frame_is_handed_back_unsent_and_the_sender_gets_1002(
    sender: str, head: bytes
) -> None:
    async with lane_session() as s:
        loop = asyncio.get_running_loop()
        from_client = sender == "client"
        source, target = (s.client, s.agent) if from_client else (s.agent, s.client)
        good = encode(0x2, b"g" * 20, masked=from_client)
        await loop.sock_sendall(source, good + head + b"j" * 300)
        to_target = await recv_until_eof(target)
        to_source = await recv_until_eof(source)
        source.close()  # the sender gives up too (else the gateway lingers CLOSE_WAIT_S for it)
        stats = await asyncio.wait_for(s.relay.done, seconds(5))
    assert s.returns[0][0] == HandBack.CONTROL_FRAME
    # The good frame before it went through; nothing of the bad frame did.
    assert to_target.startswith(good) and to_target[len(good)] == 0x88
    assert close_code_of(to_target[len(good) :])[0] == (1001 if from_client else 1011)
    assert to_source[0] == 0x88 and close_code_of(to_source)[0] == 1002
    assert stats.gateway_close_code == 1002


async def test_python_cannot_act_on_a_transport_lent_to_the_lane() -> None:
    async with lane_session() as s:
        for leg in (s.relay.client, s.relay.agent):
            lent = leg.transport
            assert isinstance(lent, LentTransport)
            # Looking passes through...
            assert lent.get_extra_info("socket") is not None and not lent.is_closing()
            assert lent.get_write_buffer_size() == 0
            # ...acting is a bug, caught before it corrupts the stream.
            actions: list[Callable[[], object]] = [
                lambda t=lent: t.write(b"x"),  # type: ignore[misc]
                lent.close,
                lent.abort,
                lent.pause_reading,
                lent.resume_reading,
            ]
            for act in actions:
                with pytest.raises(CatflapMisuse, match="lent to the fast lane"):
                    act()
        assert s.relay.traffic()["bytes_client_to_agent"] == 0
        s.relay.close_both(CloseCode.SERVICE_RESTART, "gateway shutting down")  # via a recall
        await recv_until_eof(s.client)
        await recv_until_eof(s.agent)
        await asyncio.wait_for(s.relay.done, seconds(5))
        for leg in (s.relay.client, s.relay.agent):
            assert not isinstance(leg.transport, LentTransport)


# --- allocation failures ---------------------------------------------------------------------


def close_code_of(frame: bytes) -> tuple[int, bytes]:
    payload = unmask(frame) if frame[1] & 0x80 else frame[2:]
    return struct.unpack("!H", payload[:2])[0], payload[2:]


def test_completion_status_is_error_when_the_relay_failed() -> None:
    stats = RelayStats(0, 0, 0, 0, None, None, 1011, False, False, relay_failed=True)
    assert completion_status(SessionEnd(status="completed"), stats, drained=True) == "error"
    ok = RelayStats(0, 0, 0, 0, None, None, None, False, False)
    assert not ok.relay_failed
    assert completion_status(SessionEnd(status="completed"), ok, drained=False) == "completed"


def test_a_lane_without_memory_for_its_buffer_is_not_created() -> None:
    fastlane.native._fail_allocations(1)
    with pytest.raises(MemoryError):
        fastlane.native.Lane()
    fastlane.native.Lane().stop()


async def test_a_session_the_lane_cannot_take_relays_on_the_event_loop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fastlane.native._fail_allocations(1, skip=1)  # the lane's read buffer, then enter()'s session
    with caplog.at_level(logging.WARNING, "catflap.gateway"):
        async with lane_session(in_lane=False) as s:
            loop = asyncio.get_running_loop()
            frame = encode(0x2, b"still here", masked=True)
            await loop.sock_sendall(s.client, frame)
            assert await recv_exactly(s.agent, len(frame)) == frame
            assert not s.relay.in_lane and s.lane.active == 0
    assert "fast lane refused a session (MemoryError" in caplog.text


async def test_no_memory_for_a_close_frame_chunk_ends_the_session_with_1011() -> None:
    async with lane_session() as s:
        loop = asyncio.get_running_loop()
        close = encode(0x8, close_payload(1000, "bye"), masked=True)
        fastlane.native._fail_allocations(1)  # the copy of the chunk for Python
        await loop.sock_sendall(s.client, close)
        to_client = await recv_until_eof(s.client)
        to_agent = await recv_until_eof(s.agent)
        stats = await asyncio.wait_for(s.relay.done, seconds(5))
    reason, client, _ = s.returns[0]
    assert reason == HandBack.FAILED and client.dropped == len(close) and not client.cut
    # The chunk never went out, so both streams are intact: 1011 reaches both sides.
    assert to_client == bytes([0x88, 2 + len(b"relay failure")]) + close_payload(
        1011, "relay failure"
    )
    assert close_code_of(to_agent) == (1011, b"relay failure")
    assert stats.relay_failed and stats.gateway_close_code == 1011


async def test_no_memory_for_what_a_full_peer_could_not_take_aborts_that_peer() -> None:
    async with lane_session() as s:
        s.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        loop = asyncio.get_running_loop()
        frame = encode(0x2, b"f" * 4000, masked=False)

        async def flood() -> None:
            with suppress(OSError):
                while True:
                    await loop.sock_sendall(s.agent, frame)

        fastlane.native._fail_allocations(1)  # the copy of what the client could not take
        flooding = asyncio.create_task(flood())
        try:
            stats = await asyncio.wait_for(s.relay.done, seconds(10))
        finally:
            flooding.cancel()
            with suppress(asyncio.CancelledError):
                await flooding
        to_agent = await recv_until_eof(s.agent, reset_ends=True)  # the flood is unread
    reason, _, agent = s.returns[0]
    assert reason == HandBack.FAILED and agent.cut and agent.dropped > 0
    # The client got part of a chunk: no close frame can follow there, it is aborted. The
    # agent's incoming stream is intact: it gets 1011.
    assert close_code_of(to_agent) == (1011, b"relay failure")
    assert stats.relay_failed and stats.gateway_close_code == 1011


async def test_no_memory_to_hand_a_session_to_python_fails_it_with_1011() -> None:
    async with lane_session() as s:
        fastlane.native._fail_allocations(1, skip=1)  # take(): the list, then the session
        s.relay.close_both(CloseCode.SERVICE_RESTART, "gateway shutting down")
        to_client = await recv_until_eof(s.client)
        to_agent = await recv_until_eof(s.agent)
        stats = await asyncio.wait_for(s.relay.done, seconds(5))
    assert [r[0] for r in s.returns] == [HandBack.FAILED]
    # The drain's 1012 is moot: the session failed, and says so.
    assert close_code_of(to_client) == close_code_of(to_agent) == (1011, b"relay failure")
    assert stats.relay_failed and stats.gateway_close_code == 1011


async def test_no_memory_for_the_whole_hand_back_batch_loses_nothing_and_retries(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with lane_session() as s:
        fastlane.native._fail_allocations(1)  # take()'s list: the batch stays queued
        with caplog.at_level(logging.ERROR, "catflap.gateway"):
            s.relay.close_both(CloseCode.SERVICE_RESTART, "gateway shutting down")
            to_client = await recv_until_eof(s.client)
            to_agent = await recv_until_eof(s.agent)
        stats = await asyncio.wait_for(s.relay.done, seconds(5))
    assert "out of memory handing sessions back" in caplog.text
    assert [r[0] for r in s.returns] == [HandBack.RECALLED]
    assert close_code_of(to_client) == close_code_of(to_agent) == (1012, b"gateway shutting down")
    assert not stats.relay_failed and stats.gateway_close_code == 1012


# --- TLS ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost: (certificate, key)."""
    if shutil.which("openssl") is None:  # pragma: no cover - openssl ships with the CI image
        pytest.skip("no openssl to make a test certificate")
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_a_tls_session_never_enters_the_lane(
    tls_certificate: tuple[Path, Path], steps: list[Step]
) -> None:
    cert, key = tls_certificate
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    client_tls = ssl.create_default_context(cafile=str(cert))
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[asyncio.Transport] = loop.create_future()

    class Accept(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            transport.pause_reading()  # type: ignore[attr-defined]
            accepted.set_result(transport)  # type: ignore[arg-type]

    server = await loop.create_server(Accept, "127.0.0.1", 0, ssl=server_tls)
    lane = fastlane.FastLane()
    agent_far, agent_near = socket.socketpair()
    agent_far.setblocking(False)
    entered: list[object] = []
    enter = lane.enter

    def spy_enter(*args: object) -> int:
        entered.append(args)
        return enter(*args)  # type: ignore[arg-type]

    lane.enter = spy_enter  # type: ignore[method-assign,assignment]
    try:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_tls, server_hostname="localhost"
        )
        client_transport = await asyncio.wait_for(accepted, seconds(5))
        agent_transport, _ = await loop.create_unix_connection(asyncio.Protocol, sock=agent_near)
        relay = Relay(client_transport, agent_transport, lane=lane)  # type: ignore[arg-type]
        relay.start(client_pending=b"", agent_pending=b"")
        # Once refused for TLS, the relay drops the lane: no re-entry is ever tried after.
        async with asyncio.timeout(seconds(5)):
            while "RELAYING LANE_REFUSED RELAYING" not in steps:
                await asyncio.sleep(0.005)
        up = b"".join(encode(0x2, bytes([i]) * 300, masked=True) for i in range(50))
        down = b"".join(encode(0x1, b"ok %d" % i, masked=False) for i in range(50))
        writer.write(up)
        await writer.drain()
        assert await recv_exactly(agent_far, len(up)) == up
        await loop.sock_sendall(agent_far, down)
        assert await asyncio.wait_for(reader.readexactly(len(down)), seconds(5)) == down
        assert not relay.in_lane and lane.active == 0 and entered == []
        writer.write(up)  # and still byte exact after it
        await loop.sock_sendall(agent_far, down)
        assert await recv_exactly(agent_far, len(up)) == up
        assert await asyncio.wait_for(reader.readexactly(len(down)), seconds(5)) == down
        close = encode(0x8, close_payload(1000, "done"), masked=True)
        writer.write(close)
        assert await recv_exactly(agent_far, len(close)) == close
        answer = encode(0x8, close_payload(1000, "done"), masked=False)
        await loop.sock_sendall(agent_far, answer)
        assert await asyncio.wait_for(reader.readexactly(len(answer)), seconds(5)) == answer
        agent_far.close()
        writer.close()
        stats = await asyncio.wait_for(relay.done, seconds(5))
        assert stats.bytes_client_to_agent == 2 * len(up) + len(close)
        assert stats.bytes_agent_to_client == 2 * len(down) + len(answer)
        assert entered == []
    finally:
        lane.close()
        agent_far.close()
        server.close()


async def test_a_session_whose_second_leg_cannot_join_moves_no_byte(tmp_path: Path) -> None:
    """``enter`` adds the client leg to the epoll before the agent leg. If the second add
    fails (here: a regular file, which epoll refuses), the call raises, the first leg's bytes
    stay unread for Python, and the lane frees the session itself, later, on its thread."""
    lane = fastlane.FastLane()
    client_far, client_near = socket.socketpair()
    regular = open(tmp_path / "not-a-socket", "wb")  # noqa: SIM115, ASYNC230
    try:
        client_far.sendall(b"\x82\x01a" * 100)  # readable at once on the first leg
        with pytest.raises(OSError):
            lane.enter(_NoUser(), (client_near.fileno(), regular.fileno()), ((0, b""), (0, b"")))
        await asyncio.sleep(0.05)  # the thread had every chance to read the first leg
        client_near.setblocking(False)
        assert client_near.recv(1000) == b"\x82\x01a" * 100  # nothing was taken
        assert lane.active == 0
        # The lane is unharmed: another session goes through it.
        async with lane_session() as session:
            await session.wait_in_lane()
            frame = encode(0x2, b"ok", masked=True)
            session.client.sendall(frame)
            assert await recv_exactly(session.agent, len(frame)) == frame
    finally:
        regular.close()
        client_far.close()
        client_near.close()
        lane.close()


class _NoUser:
    def lane_returned(self, reason: int, client: LegReturn, agent: LegReturn) -> None:
        raise AssertionError("a session that never entered was handed back")


# --- the lane thread's priority -------------------------------------------------------------

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="lowering a thread's nice value needs root (CAP_SYS_NICE)"
)


def _slice_ns(tid: int) -> int:
    """The fair scheduler's time slice of thread ``tid`` of this process, in ns."""
    for line in Path(f"/proc/self/task/{tid}/sched").read_text().splitlines():
        if line.startswith("se.slice"):
            return int(line.split(":")[1])
    pytest.skip("this kernel's /proc/<pid>/sched shows no se.slice (shown since Linux 6.14)")


def _custom_slices() -> None:
    """Skip unless the kernel honours a slice request (EEVDF custom slices, Linux 6.12)."""
    major, minor = (int(part) for part in os.uname().release.split(".")[:2])
    if (major, minor) < (6, 12):
        pytest.skip(f"Linux {os.uname().release} ignores a task's slice request (since 6.12)")


async def test_the_slice_alone_needs_no_privilege_and_leaves_the_nice_value() -> None:
    _custom_slices()
    before = os.getpriority(os.PRIO_PROCESS, 0)
    lane = fastlane.FastLane(nice=0, slice_us=100)
    try:
        assert (lane.nice, lane.slice_us) == (before, 100)
        assert os.getpriority(os.PRIO_PROCESS, lane._native.thread_id) == before
        assert _slice_ns(lane._native.thread_id) == 100_000
    finally:
        lane.close()


@needs_root
async def test_the_lane_thread_runs_at_the_configured_nice_and_slice_and_the_loop_does_not() -> (
    None
):
    _custom_slices()
    loop_slice = _slice_ns(threading.get_native_id())
    lane = fastlane.FastLane(nice=-7, slice_us=250)
    try:
        assert (lane.nice, lane.slice_us) == (-7, 250)
        assert os.getpriority(os.PRIO_PROCESS, lane._native.thread_id) == -7
        assert _slice_ns(lane._native.thread_id) == 250_000
        assert lane._native.thread_id != threading.get_native_id()
        with open(f"/proc/self/task/{lane._native.thread_id}/comm") as comm:  # noqa: ASYNC230
            assert comm.read() == "catflap-lane\n"
        # Only the lane thread: the event loop (and every process it spawns) keeps its own.
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == 0
        assert _slice_ns(threading.get_native_id()) == loop_slice != 250_000
    finally:
        lane.close()


_WITHOUT_SYS_NICE = """
import asyncio, logging, os, sys
logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout)
from catflap.gateway import fastlane
async def main() -> None:
    lane = fastlane.FastLane(nice=-10, slice_us=100)
    tid = lane._native.thread_id
    sched = open(f"/proc/self/task/{tid}/sched").read().splitlines()
    slice_ns = next((int(l.split(":")[1]) for l in sched if l.startswith("se.slice")), -1)
    print("nice", lane.nice, os.getpriority(os.PRIO_PROCESS, tid), "slice", lane.slice_us, slice_ns)
    lane.close()
asyncio.run(main())
"""


@needs_root
def test_without_cap_sys_nice_the_lane_warns_once_runs_at_nice_0_and_still_takes_its_slice() -> (
    None
):
    setpriv = shutil.which("setpriv")
    assert setpriv is not None, "util-linux's setpriv is needed to drop CAP_SYS_NICE"
    result = subprocess.run(
        [setpriv, "--bounding-set", "-sys_nice", "--inh-caps", "-sys_nice",
         sys.executable, "-c", _WITHOUT_SYS_NICE],
        capture_output=True, text=True, timeout=seconds(30), check=True,
    )  # fmt: skip
    lines = result.stdout.splitlines()
    if lines[-1].endswith(" -1"):
        pytest.skip("this kernel's /proc/<pid>/sched shows no se.slice (shown since Linux 6.14)")
    _custom_slices()
    assert lines[-1] == "nice 0 0 slice 100 100000"
    warnings = [line for line in lines if "could not take nice -10" in line]
    assert len(warnings) == 1, result.stdout
    assert "CAP_SYS_NICE or LimitNICE=30" in warnings[0]
    assert "relay_thread_nice = 0" in warnings[0]


class _NoSchedSetattr:
    """The native lane as seen under a seccomp filter that refuses sched_setattr (EPERM)."""

    def __init__(self, native_lane: Any) -> None:
        self.thread_id = native_lane.thread_id

    def prioritise(self, policy: int, nice: int, slice_ns: int) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")


@needs_root
async def test_where_sched_setattr_is_refused_the_lane_takes_the_nice_value_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lane = fastlane.FastLane(nice=0, slice_us=0)
    native_lane = lane._native
    try:
        lane._native = _NoSchedSetattr(native_lane)  # type: ignore[assignment]
        with caplog.at_level(logging.WARNING, logger=fastlane.log.name):
            assert lane._prioritise(-4, 100) == (-4, 0)
        assert os.getpriority(os.PRIO_PROCESS, native_lane.thread_id) == -4
        # The nice value was taken, so only the slice is reported missing, once.
        messages = [r.getMessage() for r in caplog.records]
        assert len(messages) == 1, messages
        assert "could not ask for 100 µs time slices (Operation not permitted" in messages[0]
        assert "relay_thread_slice_us = 0" in messages[0]
    finally:
        lane._native = native_lane
        lane.close()


async def test_prioritise_refuses_a_stopped_thread_and_a_policy_that_is_not_fair() -> None:
    lane = fastlane.FastLane()
    try:
        with pytest.raises(ValueError, match="SCHED_OTHER or SCHED_BATCH"):
            lane._native.prioritise(os.SCHED_FIFO, 0, 0)
    finally:
        lane.close()
    with pytest.raises(RuntimeError, match="the lane thread has stopped"):
        lane._native.prioritise(os.SCHED_OTHER, 0, 100_000)


async def test_nice_0_and_slice_0_leave_the_thread_alone() -> None:
    lane = fastlane.FastLane(nice=0, slice_us=0)
    try:
        assert (lane.nice, lane.slice_us) == (0, 0)
        assert os.getpriority(os.PRIO_PROCESS, lane._native.thread_id) == os.getpriority(
            os.PRIO_PROCESS, 0
        )
        assert _slice_ns(lane._native.thread_id) == _slice_ns(threading.get_native_id())
    finally:
        lane.close()
