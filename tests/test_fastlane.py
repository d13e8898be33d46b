"""The relay's fast lane: bytes cross untouched on the native thread, and every reason to hand a
session back (close frame, full buffer, EOF, recall, stop) ends where the event loop would.

These tests drive a real :class:`Relay` over real socket pairs: the test holds the far end of
each, as the client and the agent would.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from catflap.contract.closecodes import CloseCode
from catflap.gateway import fastlane
from catflap.gateway.frames import FrameScanner
from catflap.gateway.relay import Relay

from .test_frames import encode, frame_specs

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the fast lane is built on Linux only"
)


def test_the_extension_is_built() -> None:
    # CI installs with a C compiler: a missing extension there is a build failure, not a skip.
    assert fastlane.available()


@dataclass
class Session:
    relay: Relay
    lane: fastlane.FastLane
    client: socket.socket  # the test's end: what a WebSocket client holds
    agent: socket.socket  # the test's end: what the agent runtime holds

    async def recv_exactly(self, sock: socket.socket, n: int, timeout: float = 5.0) -> bytes:
        loop = asyncio.get_running_loop()
        data = b""
        async with asyncio.timeout(timeout):
            while len(data) < n:
                chunk = await loop.sock_recv(sock, n - len(data))
                if not chunk:
                    raise EOFError(f"EOF after {len(data)} of {n} bytes")
                data += chunk
        return data

    async def recv_until_eof(self, sock: socket.socket, timeout: float = 5.0) -> bytes:
        loop = asyncio.get_running_loop()
        data = b""
        async with asyncio.timeout(timeout):
            while chunk := await loop.sock_recv(sock, 65536):
                data += chunk
        return data

    async def wait_in_lane(self, expected: bool = True) -> None:
        async with asyncio.timeout(5):
            while self.relay.in_lane is not expected:
                await asyncio.sleep(0.005)


@asynccontextmanager
async def lane_session(**relay_options: float) -> AsyncIterator[Session]:
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
        relay.start(client_pending=b"", agent_pending=b"")
        session = Session(relay, lane, client_far, agent_far)
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
        assert await s.recv_exactly(s.agent, len(up)) == up
        assert await s.recv_exactly(s.client, len(down)) == down
        assert s.relay.in_lane and s.lane.active == 1
        assert s.relay.traffic() == {
            "bytes_client_to_agent": len(up),
            "bytes_agent_to_client": len(down),
            "frames_client_to_agent": 50,
            "frames_agent_to_client": 50,
        }


@settings(max_examples=100, deadline=None)
@given(
    specs=frame_specs,
    masked=st.booleans(),
    cuts=st.lists(st.integers(0, 10**6), max_size=20),
    close_at=st.one_of(st.none(), st.integers(0, 11)),
)
def test_lane_scanner_agrees_with_frame_scanner_for_any_chunking(
    specs: list[tuple[int, int]], masked: bool, cuts: list[int], close_at: int | None
) -> None:
    frames = [encode(op, b"x" * size, masked=masked) for op, size in specs]
    if close_at is not None:
        frames.insert(close_at % (len(frames) + 1), encode(0x8, b"\x03\xe8", masked=masked))
    stream = b"".join(frames)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    scanner = FrameScanner()
    for start, end in zip(points, points[1:], strict=False):
        chunk = stream[start:end]
        state = scanner.lane_state()
        assert state is not None
        before = scanner.frames
        closes, skip, partial, counted = fastlane.native.scan(state, chunk)
        scanner.feed(chunk)
        if closes:  # the lane leaves this chunk to Python: a close frame starts in it
            assert scanner.close_seen or scanner.lane_state() is None
            return
        assert (skip, partial) == scanner.lane_state()
        assert counted == scanner.frames - before
    assert close_at is None  # a close frame must have been noticed
    assert scanner.frames == len(specs)


def test_lane_scanner_counts_the_same_frames_as_frame_scanner() -> None:
    stream = b"".join(encode(0x2, b"y" * n, masked=True) for n in (0, 1, 125, 126, 65535, 70000))
    state: tuple[int, bytes] = (0, b"")
    total = 0
    for i in range(0, len(stream), 7):  # 7-byte cuts land inside every kind of header
        closes, skip, partial, frames = fastlane.native.scan(state, stream[i : i + 7])
        assert not closes
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
        assert await s.recv_exactly(s.agent, len(stream)) == stream
        # The big frame may have filled the socket pair's buffer (a hand-back): it re-enters.
        await s.wait_in_lane()
        assert s.relay.traffic()["frames_client_to_agent"] == 5


async def test_a_close_frame_hands_the_session_back_and_ends_it_cleanly() -> None:
    async with lane_session() as s:
        loop = asyncio.get_running_loop()
        data = encode(0x2, b"a" * 10, masked=True)
        close = encode(0x8, close_payload(4000, "bye"), masked=True)
        await loop.sock_sendall(s.client, data + close)
        assert await s.recv_exactly(s.agent, len(data + close)) == data + close
        assert not s.relay.in_lane
        answer = encode(0x8, close_payload(4000, "bye"), masked=False)
        await loop.sock_sendall(s.agent, answer)
        assert await s.recv_exactly(s.client, len(answer)) == answer
        s.agent.close()
        s.client.close()
        async with asyncio.timeout(5):
            stats = await s.relay.done
    assert (stats.client_close_code, stats.agent_close_code) == (4000, 4000)
    assert (stats.frames_client_to_agent, stats.frames_agent_to_client) == (2, 1)
    assert stats.bytes_client_to_agent == len(data + close)
    assert stats.client_initiated and not stats.agent_vanished


async def test_a_client_that_vanishes_in_the_lane_gets_1001_sent_to_the_agent() -> None:
    async with lane_session() as s:
        s.client.close()  # no close frame: a dropped call
        got = await s.recv_until_eof(s.agent)
        assert got[0] == 0x88 and struct.unpack("!H", unmask(got)[:2])[0] == 1001
        stats = await asyncio.wait_for(s.relay.done, 5)
    assert stats.client_close_code is None and stats.client_initiated


async def test_an_agent_that_vanishes_in_the_lane_closes_the_client_with_1011() -> None:
    async with lane_session() as s:
        s.agent.close()
        got = await s.recv_until_eof(s.client)
        assert got == bytes([0x88, 2 + len(b"agent connection lost")]) + close_payload(
            1011, "agent connection lost"
        )
        stats = await asyncio.wait_for(s.relay.done, 5)
    assert stats.agent_vanished and stats.gateway_close_code == 1011


async def test_close_both_recalls_the_session_and_sends_1012_both_ways() -> None:
    async with lane_session() as s:
        s.relay.close_both(CloseCode.SERVICE_RESTART, "gateway shutting down")
        to_client = await s.recv_until_eof(s.client)
        to_agent = await s.recv_until_eof(s.agent)
        stats = await asyncio.wait_for(s.relay.done, 5)
    assert to_client == bytes([0x88, 23]) + close_payload(1012, "gateway shutting down")
    assert struct.unpack("!H", unmask(to_agent)[:2])[0] == 1012
    assert stats.gateway_close_code == 1012


async def test_abort_recalls_the_session_and_drops_both_sockets() -> None:
    async with lane_session() as s:
        s.relay.abort()
        assert await s.recv_until_eof(s.client) == b""
        assert await s.recv_until_eof(s.agent) == b""
        await asyncio.wait_for(s.relay.done, 5)


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
            async with asyncio.timeout(5):
                while s.relay.in_lane:  # the lane cannot place a chunk: back to the loop
                    await asyncio.sleep(0.01)
            stats = await asyncio.wait_for(s.relay.done, 10)
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
        assert await s.recv_exactly(s.agent, len(frame)) == frame
        assert s.relay.traffic()["frames_client_to_agent"] == 1
