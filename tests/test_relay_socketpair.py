"""The relay and its fast lane over socketpair transports, on asyncio's loop and on uvloop: exact
bytes, close codes and frame counts, and the path each session takes through the state table.

The second tier of the suite: no server, no process, no port. The client leg is a transport the
gateway "accepted" (``connect_accepted_socket``), the agent leg one it "connected"
(``create_connection(sock=...)``), each over one end of a ``socket.socketpair()``; the test holds
the other ends, as the client and the agent would. Each async test runs once per loop in
``LOOP_FACTORIES`` (read by ``pytest_asyncio_loop_factories`` in tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import uvloop

from catflap.contract.closecodes import CloseCode
from catflap.gateway import fastlane
from catflap.gateway.relay import Relay
from catflap.gateway.relaystate import RelayState, SocketsLent
from catflap.sessions.record import RelayStats

from .conftest import seconds
from .test_fastlane import close_payload, recv_exactly, recv_until_eof
from .test_frames import encode
from .test_relay_state import Step, steps_fixture  # noqa: F401 (a fixture)

LOOP_FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}

#: Run a test on the event loop's relay and on the fast lane (where the lane is built).
MODES = pytest.mark.parametrize(
    "lane",
    [
        False,
        pytest.param(
            True,
            marks=pytest.mark.skipif(
                not (sys.platform.startswith("linux") and fastlane.available()),
                reason="the fast lane is built on Linux only",
            ),
        ),
    ],
    ids=["event-loop", "lane"],
)


@dataclass
class Pair:
    relay: Relay
    client: socket.socket  # the test's end: what a WebSocket client holds
    agent: socket.socket  # the test's end: what the agent runtime holds
    lane: fastlane.FastLane | None

    async def send(self, sock: socket.socket, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(sock, data)

    async def wait_in_lane(self, expected: bool = True) -> None:
        """Bounded polling: the lane takes the session on its own schedule."""
        async with asyncio.timeout(seconds(5)):
            while self.relay.in_lane is not expected:
                await asyncio.sleep(0.005)

    async def stats(self) -> RelayStats:
        async with asyncio.timeout(seconds(5)):
            return await self.relay.done


@asynccontextmanager
async def relayed(
    *,
    lane: bool,
    client_pending: bytes = b"",
    agent_pending: bytes = b"",
    close_wait: float | None = None,
) -> AsyncIterator[Pair]:
    loop = asyncio.get_running_loop()
    client_far, client_near = socket.socketpair()
    agent_far, agent_near = socket.socketpair()
    for sock in (client_far, agent_far):
        sock.setblocking(False)
    fast = fastlane.FastLane() if lane else None
    try:
        client_t, _ = await loop.connect_accepted_socket(asyncio.Protocol, sock=client_near)
        agent_t, _ = await loop.create_connection(asyncio.Protocol, sock=agent_near)
        client_t.pause_reading()  # as the front hands them over
        agent_t.pause_reading()
        options = {} if close_wait is None else {"close_wait": close_wait}
        relay = Relay(
            client_t,
            agent_t,
            lane=fast,
            session_id="sp-1",
            **options,
        )
        relay.start(client_pending=client_pending, agent_pending=agent_pending)
        pair = Pair(relay, client_far, agent_far, fast)
        if lane:
            await pair.wait_in_lane()
        yield pair
    finally:
        if fast is not None:
            fast.close()
        client_far.close()
        agent_far.close()


def unmasked(frame: bytes) -> bytes:
    """The whole of one short masked frame, with its payload unmasked and no mask."""
    assert frame[1] & 0x80, "expected a masked frame"
    mask, payload = frame[2:6], frame[6:]
    return bytes([frame[0], frame[1] & 0x7F]) + bytes(
        b ^ mask[i % 4] for i, b in enumerate(payload)
    )


def gateway_close(code: int, reason: str) -> bytes:
    """A close frame of the gateway's own, unmasked (as the client gets it)."""
    payload = close_payload(code, reason)
    return bytes([0x88, len(payload)]) + payload


UP = b"".join(encode(0x2, bytes([i]) * (10 + 37 * i), masked=True) for i in range(40))
DOWN = b"".join(encode(0x1, b"echo %d" % i, masked=False) for i in range(40))


def lane_steps(lane: bool, *middle: Step) -> list[Step]:
    """The steps of a session that starts, enters the lane (with ``lane``), then ``middle``."""
    head = ["NEW START RELAYING"]
    if lane:
        head.append("RELAYING LANE_ENTERED IN_LANE")
    return [*head, *middle]


@MODES
async def test_frames_cross_byte_exact_and_a_client_close_ends_the_session_cleanly(
    lane: bool, steps: list[Step]
) -> None:
    async with relayed(lane=lane) as s:
        await s.send(s.client, UP)
        await s.send(s.agent, DOWN)
        assert await recv_exactly(s.agent, len(UP)) == UP
        assert await recv_exactly(s.client, len(DOWN)) == DOWN
        assert s.relay.in_lane is lane
        assert s.relay.traffic() == {
            "bytes_client_to_agent": len(UP),
            "bytes_agent_to_client": len(DOWN),
            "frames_client_to_agent": 40,
            "frames_agent_to_client": 40,
        }
        close = encode(0x8, close_payload(1000, "bye"), masked=True)
        await s.send(s.client, close)
        assert await recv_exactly(s.agent, len(close)) == close
        answer = encode(0x8, close_payload(1000, "bye"), masked=False)
        await s.send(s.agent, answer)
        assert await recv_exactly(s.client, len(answer)) == answer
        s.agent.close()  # the server closes the TCP connection first (RFC 6455 7.1.1)
        assert await recv_until_eof(s.client) == b""
        stats = await s.stats()
    assert stats == RelayStats(
        bytes_client_to_agent=len(UP + close),
        bytes_agent_to_client=len(DOWN + answer),
        frames_client_to_agent=41,
        frames_agent_to_client=41,
        client_close_code=1000,
        agent_close_code=1000,
        gateway_close_code=None,
        client_initiated=True,
        agent_vanished=False,
    )
    in_lane = ["IN_LANE HANDED_BACK RELAYING"] if lane else []
    assert steps == lane_steps(
        lane,
        *in_lane,
        "RELAYING CLOSE_FRAME CLOSING",
        "CLOSING CLOSE_FRAME CLOSING",
        "CLOSING LEG_CLOSED HALF_CLOSED",
        "HALF_CLOSED LAST_LEG_LOST DONE",
    )


@MODES
async def test_bytes_read_before_the_relay_reach_each_side_first_in_order(
    lane: bool, steps: list[Step]
) -> None:
    early_up = encode(0x1, b"hello from the client", masked=True)
    early_down = encode(0x1, b"hello from the bot", masked=False)
    async with relayed(lane=lane, client_pending=early_up, agent_pending=early_down) as s:
        await s.send(s.client, UP)
        await s.send(s.agent, DOWN)
        assert await recv_exactly(s.agent, len(early_up + UP)) == early_up + UP
        assert await recv_exactly(s.client, len(early_down + DOWN)) == early_down + DOWN
        assert s.relay.traffic()["frames_client_to_agent"] == 41
        assert s.relay.traffic()["frames_agent_to_client"] == 41
        s.relay.abort()
        await s.stats()
    recall = ["IN_LANE RECALL RECALLING", "RECALLING HANDED_BACK RELAYING"] if lane else []
    assert steps == lane_steps(
        lane,
        *recall,
        "RELAYING ABORT ENDING",
        "ENDING CLIENT_LOST ENDING",
        "ENDING LAST_LEG_LOST DONE",
    )


@MODES
async def test_a_client_that_vanishes_gets_1001_sent_to_the_agent(
    lane: bool, steps: list[Step]
) -> None:
    async with relayed(lane=lane) as s:
        await s.send(s.client, UP)
        assert await recv_exactly(s.agent, len(UP)) == UP
        s.client.close()  # a dropped call: no close frame
        rest = await recv_until_eof(s.agent)
        stats = await s.stats()
    assert unmasked(rest) == gateway_close(1001, "client went away")
    assert (stats.frames_client_to_agent, stats.bytes_client_to_agent) == (40, len(UP))
    assert stats.client_close_code is None and stats.gateway_close_code is None
    assert stats.client_initiated and not stats.agent_vanished
    in_lane = ["IN_LANE HANDED_BACK RELAYING"] if lane else []
    assert steps == lane_steps(
        lane,
        *in_lane,
        "RELAYING CLIENT_LOST HALF_CLOSED",
        "HALF_CLOSED LAST_LEG_LOST DONE",
    )


@MODES
async def test_an_agent_that_vanishes_closes_the_client_with_1011(
    lane: bool, steps: list[Step]
) -> None:
    async with relayed(lane=lane) as s:
        await s.send(s.agent, DOWN)
        assert await recv_exactly(s.client, len(DOWN)) == DOWN
        s.agent.close()  # the bot crashed
        rest = await recv_until_eof(s.client)
        stats = await s.stats()
    assert rest == gateway_close(1011, "agent connection lost")
    assert stats.agent_vanished and stats.gateway_close_code == 1011
    assert (stats.frames_agent_to_client, stats.agent_close_code) == (40, None)
    assert not stats.client_initiated
    in_lane = ["IN_LANE HANDED_BACK RELAYING"] if lane else []
    assert steps == lane_steps(
        lane,
        *in_lane,
        "RELAYING AGENT_LOST ENDING",
        "ENDING LAST_LEG_LOST DONE",
    )


@MODES
async def test_the_gateway_closes_both_sides_with_1012_and_the_lane_is_recalled_first(
    lane: bool, steps: list[Step], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, "catflap.gateway"):
        async with relayed(lane=lane) as s:
            await s.send(s.client, UP)
            assert await recv_exactly(s.agent, len(UP)) == UP
            s.relay.close_both(CloseCode.SERVICE_RESTART, "gateway shutting down")
            to_client = await recv_until_eof(s.client)
            to_agent = await recv_until_eof(s.agent)
            stats = await s.stats()
            s.relay.close_both(CloseCode.SERVICE_RESTART, "late")  # a drain racing the end
    assert to_client == gateway_close(1012, "gateway shutting down")
    assert unmasked(to_agent) == gateway_close(1012, "gateway shutting down")
    assert stats.gateway_close_code == 1012 and stats.frames_client_to_agent == 40
    recall = ["IN_LANE RECALL RECALLING", "RECALLING HANDED_BACK RELAYING"] if lane else []
    assert steps == lane_steps(
        lane,
        *recall,
        "RELAYING GATEWAY_CLOSE ENDING",
        "ENDING CLIENT_LOST ENDING",
        "ENDING LAST_LEG_LOST DONE",
        "DONE GATEWAY_CLOSE DONE",
    )
    # Each change of state, and only those, is logged, with the session attached.
    lines = [r for r in caplog.records if r.getMessage().startswith("= relay")]
    lane_lines = [
        "= relay RELAYING --LANE_ENTERED--> IN_LANE",
        "= relay IN_LANE --RECALL--> RECALLING",
        "= relay RECALLING --HANDED_BACK (RECALLED)--> RELAYING",
    ]
    assert [r.getMessage() for r in lines] == [
        "= relay NEW --START--> RELAYING",
        *(lane_lines if lane else []),
        "= relay RELAYING --GATEWAY_CLOSE (1012)--> ENDING",
        "= relay ENDING --LAST_LEG_LOST (agent)--> DONE",
    ]
    assert {r.levelno for r in lines} == {logging.DEBUG}
    assert {r.session_id for r in lines} == {"sp-1"}  # type: ignore[attr-defined]


@MODES
async def test_a_broken_client_is_closed_with_1002_and_cut_off_after_close_wait(
    lane: bool, steps: list[Step]
) -> None:
    good = encode(0x2, b"g" * 20, masked=True)
    bad = encode(0x9, b"p" * 10, masked=True, fin=False)  # a fragmented ping (RFC 6455 5.5)
    async with relayed(lane=lane, close_wait=seconds(0.1)) as s:
        await s.send(s.client, good + bad + b"junk" * 50)
        to_agent = await recv_until_eof(s.agent)
        # The client got its 1002 and then EOF (a lingering close); it never answers, so the
        # close-wait bound aborts its leg.
        to_client = await recv_until_eof(s.client)
        stats = await s.stats()
    assert to_agent[: len(good)] == good
    assert unmasked(to_agent[len(good) :]) == gateway_close(1001, "client broke the protocol")
    assert to_client == gateway_close(1002, "fragmented control frame")
    assert stats.gateway_close_code == 1002
    assert (stats.frames_client_to_agent, stats.bytes_client_to_agent) == (1, len(good))
    in_lane = ["IN_LANE HANDED_BACK RELAYING"] if lane else []
    assert steps == lane_steps(
        lane,
        *in_lane,
        "RELAYING PROTOCOL_ERROR ENDING",
        "ENDING AGENT_LOST ENDING",
        "ENDING CLOSE_WAIT_EXPIRED ENDING",
        "ENDING LAST_LEG_LOST DONE",
    )


@pytest.mark.skipif(
    not (sys.platform.startswith("linux") and fastlane.available()),
    reason="the fast lane is built on Linux only",
)
async def test_python_cannot_write_while_the_lane_holds_the_sockets(steps: list[Step]) -> None:
    async with relayed(lane=True) as s:
        with pytest.raises(SocketsLent, match="state IN_LANE"):
            s.relay.client.transport.write(gateway_close(1000, "sneaky"))
        with pytest.raises(SocketsLent, match="state IN_LANE"):
            s.relay.agent.transport.close()
        assert s.relay.state is RelayState.IN_LANE
        # Nothing went out, and the lane carries on byte exact.
        await s.send(s.agent, DOWN)
        assert await recv_exactly(s.client, len(DOWN)) == DOWN
        s.relay.close_both(CloseCode.SERVICE_RESTART, "gateway shutting down")
        assert steps[-1] == "IN_LANE RECALL RECALLING"
        with pytest.raises(SocketsLent, match="state RECALLING"):
            s.relay.client.transport.write(b"x")
        assert await recv_until_eof(s.client) == gateway_close(1012, "gateway shutting down")
        await s.stats()
    assert steps[:3] == [
        "NEW START RELAYING",
        "RELAYING LANE_ENTERED IN_LANE",
        "IN_LANE RECALL RECALLING",
    ]


@pytest.mark.skipif(
    not (sys.platform.startswith("linux") and fastlane.available()),
    reason="the fast lane is built on Linux only",
)
async def test_a_client_that_reads_slowly_takes_the_session_out_of_the_lane_and_back(
    steps: list[Step],
) -> None:
    frames = [encode(0x2, bytes([i % 251]) * 8000, masked=False) for i in range(200)]
    burst = b"".join(frames)
    async with relayed(lane=True) as s:
        s.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        # 1.6 MB toward a client that is not reading: the lane cannot place it all.
        sending = asyncio.ensure_future(s.send(s.agent, burst))
        async with asyncio.timeout(seconds(5)):
            while "IN_LANE HANDED_BACK RELAYING" not in steps:
                await asyncio.sleep(0.005)
        assert await recv_exactly(s.client, len(burst)) == burst
        await sending
        await s.wait_in_lane()  # the buffers drained: the session went back into the lane
        assert s.relay.traffic()["frames_agent_to_client"] == 200
        assert s.relay.traffic()["bytes_agent_to_client"] == len(burst)
        s.relay.close_both(CloseCode.SERVICE_RESTART, "gateway shutting down")
        assert await recv_until_eof(s.client) == gateway_close(1012, "gateway shutting down")
        stats = await s.stats()
    assert (stats.frames_agent_to_client, stats.bytes_agent_to_client) == (200, len(burst))
    out_and_back = steps.index("IN_LANE HANDED_BACK RELAYING")
    assert "RELAYING LANE_ENTERED IN_LANE" in steps[out_and_back:]
