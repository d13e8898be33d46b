"""A peer that breaks RFC 6455's control-frame rules ends its session with 1002, whatever the
chunking, and nothing of the bad frame is relayed (issue 11 row 5).

A real :class:`Relay` on the event loop, over real socket pairs; the test holds the far ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from catflap.contract import limits
from catflap.gateway.relay import Relay

from .conftest import seconds
from .test_frames import encode, frame_specs


def _bad_frame(opcode: int, declared: int, fragmented: bool) -> bytes:
    if fragmented:
        return encode(opcode, b"x" * 10, masked=True, fin=False)
    head = bytes([0x80 | opcode])
    if declared < 65536:
        return head + bytes([0x80 | 126]) + struct.pack("!H", declared) + b"mask"
    return head + bytes([0x80 | 127]) + struct.pack("!Q", declared) + b"mask"


async def _run(good: bytes, bad: bytes, cuts: list[int]) -> tuple[bytes, bytes, int | None]:
    """Send ``good + bad + junk`` from the client in the given cuts; return what the agent's
    end and the client's end received, and the gateway's close code."""
    loop = asyncio.get_running_loop()
    client_far, client_near = socket.socketpair()
    agent_far, agent_near = socket.socketpair()
    for sock in (client_far, agent_far):
        sock.setblocking(False)
    client_t, _ = await loop.create_unix_connection(asyncio.Protocol, sock=client_near)
    agent_t, _ = await loop.create_unix_connection(asyncio.Protocol, sock=agent_near)
    relay = Relay(client_t, agent_t, lane=None)  # type: ignore[arg-type]
    relay.start(client_pending=b"", agent_pending=b"")
    stream = good + bad + b"j" * 300
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    try:
        for start, end in zip(points, points[1:], strict=False):
            try:
                await loop.sock_sendall(client_far, stream[start:end])
            except OSError:
                break  # the gateway has closed: the rest would never be read
            await asyncio.sleep(0)
        agent_got = await _until_eof(agent_far)
        client_got = await _until_eof(client_far)
    finally:
        client_far.close()  # the client answers the lingering close by closing
        agent_far.close()
    stats = await asyncio.wait_for(relay.done, seconds(5))
    return agent_got, client_got, stats.gateway_close_code


async def _until_eof(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    async with asyncio.timeout(seconds(5)):
        try:
            while chunk := await loop.sock_recv(sock, 65536):
                data += chunk
        except ConnectionResetError:
            pass
    return data


def _unmasked_close(frame: bytes) -> tuple[int, bytes]:
    """(code, reason) of a close frame, masked or not."""
    assert frame[0] == 0x88, frame[:4]
    length = frame[1] & 0x7F
    if frame[1] & 0x80:
        mask, payload = frame[2:6], frame[6 : 6 + length]
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    else:
        payload = frame[2 : 2 + length]
    return struct.unpack("!H", payload[:2])[0], payload[2:]


@settings(max_examples=40, deadline=None)
@given(
    specs=frame_specs,
    cuts=st.lists(st.integers(0, 10**6), max_size=8),
    opcode=st.sampled_from([0x8, 0x9, 0xA]),
    declared=st.sampled_from([126, 1000, 65536, 16 * 1024 * 1024]),
    fragmented=st.booleans(),
)
def test_a_bad_control_frame_from_the_client_always_ends_with_1002(
    specs: list[tuple[int, int]], cuts: list[int], opcode: int, declared: int, fragmented: bool
) -> None:
    good = b"".join(encode(op, b"x" * min(size, 2000), masked=True) for op, size in specs)
    bad = _bad_frame(opcode, declared, fragmented)
    agent_got, client_got, gateway_code = asyncio.run(_run(good, bad, cuts))
    assert gateway_code == 1002
    limit = limits.CONTROL_FRAME_MAX_PAYLOAD_BYTES
    why = "fragmented control frame" if fragmented else f"control frame declares more than {limit}"
    code, reason = _unmasked_close(client_got)
    assert code == 1002 and reason.decode().startswith(why)
    if agent_got == good + bad[:1]:
        # The bad frame's first byte had already gone out alone: the agent leg was aborted,
        # mid-frame, rather than sent a close frame inside another frame.
        return
    # Otherwise the agent gets every good byte, then a close 1001 of the gateway's own, and
    # nothing of the bad frame.
    assert agent_got.startswith(good)
    assert _unmasked_close(agent_got[len(good) :]) == (1001, b"client broke the protocol")


async def test_pending_bytes_that_fill_the_agent_buffer_keep_the_client_paused() -> None:
    """Relay.start writes what was read before the relay existed: if that fills the agent's
    buffer, the client stays paused (its reading was once resumed after the write)."""
    loop = asyncio.get_running_loop()
    client_far, client_near = socket.socketpair()
    agent_far, agent_near = socket.socketpair()
    for sock in (client_far, agent_far, agent_near):
        sock.setblocking(False)
    agent_near.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    client_t, _ = await loop.create_unix_connection(asyncio.Protocol, sock=client_near)
    agent_t, _ = await loop.create_unix_connection(asyncio.Protocol, sock=agent_near)
    relay = Relay(client_t, agent_t, lane=None)  # type: ignore[arg-type]
    pending = encode(0x2, b"p" * (4 * limits.RELAY_HIGH_WATER_BYTES), masked=True)
    try:
        relay.start(client_pending=pending, agent_pending=b"")
        # The agent reads nothing: its buffer is over the high-water mark...
        assert agent_t.get_write_buffer_size() > limits.RELAY_HIGH_WATER_BYTES
        # ...so the client must not be read from, however much it sends.
        for _ in range(64):
            with contextlib.suppress(BlockingIOError):
                client_far.send(encode(0x2, b"q" * 1000, masked=True))
            await asyncio.sleep(0)
        assert not client_t.is_reading()
        assert agent_t.get_write_buffer_size() < 5 * limits.RELAY_HIGH_WATER_BYTES
    finally:
        relay.abort()
        client_far.close()
        agent_far.close()
        await asyncio.wait_for(relay.done, seconds(5))
