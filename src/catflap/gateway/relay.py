"""The byte relay: client <-> gateway <-> agent, after both upgrades succeeded.

Theory of operation. Each side is an asyncio ``Protocol`` (:class:`RelayLeg`) whose
``data_received`` writes the bytes, unchanged, to the other side's transport. Frames are never
decoded or re-encoded; a :class:`~catflap.gateway.frames.FrameScanner` per direction reads only
frame headers, to know where frames end and whether a close frame went by.

Backpressure: when one side's write buffer passes the high-water mark, asyncio calls that
leg's ``pause_writing``, which pauses *reading* on the other side; ``resume_writing`` resumes
it. A slow reader therefore slows the sender through TCP, and memory per session stays bounded
by the two write buffers.

Ending (never sending 1005/1006/1015):

============================  =======================================================
event                         what the gateway does
============================  =======================================================
a peer sent a close frame     it was relayed; the other side answers and closes
client vanished (no close)    send close 1001 to the agent, then close that leg
agent vanished (no close)     send close 1011 to the client (the agent crashed)
a side stops reading          pause the other side; after ``SLOW_PEER_TIMEOUT_S`` with the
                              buffer still full, close both sides with 1013
gateway drain deadline        close both sides with 1012
either leg lingers            abort it after ``CLOSE_WAIT_S``
============================  =======================================================

A close frame is injected only at a frame boundary; mid-frame, the socket is aborted instead.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from catflap.contract import limits
from catflap.contract.closecodes import CloseCode
from catflap.gateway.frames import FrameScanner, close_frame

__all__ = ["Relay", "RelayLeg", "RelayStats"]


class RelayLeg(asyncio.Protocol):
    """One side of a relayed session: reads from its socket, writes to the peer's."""

    __slots__ = (
        "bytes_in",
        "closed",
        "is_client",
        "peer",
        "relay",
        "scanner",
        "slow_timer",
        "transport",
    )

    def __init__(self, relay: Relay, transport: asyncio.Transport, *, is_client: bool) -> None:
        self.relay = relay
        self.transport = transport
        self.is_client = is_client
        self.peer: RelayLeg | None = None
        #: Scans what *this* side sends (client -> agent for the client leg).
        self.scanner = FrameScanner()
        self.bytes_in = 0
        self.closed = False
        #: Runs while this side's write buffer is over the high-water mark.
        self.slow_timer: asyncio.TimerHandle | None = None

    # hot path ---------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self.scanner.feed(data)
        peer = self.peer
        if peer is not None and not peer.closed:
            peer.transport.write(data)

    def pause_writing(self) -> None:
        # This side reads too slowly: stop reading from the other side, and give it a bound.
        peer = self.peer
        if peer is not None and not peer.closed:
            peer.transport.pause_reading()
        self.relay.slow_started(self)

    def resume_writing(self) -> None:
        peer = self.peer
        if peer is not None and not peer.closed:
            peer.transport.resume_reading()
        if self.slow_timer is not None:
            self.slow_timer.cancel()
            self.slow_timer = None

    # ending -------------------------------------------------------------------------------

    def eof_received(self) -> bool:
        return False  # let the transport close; connection_lost does the bookkeeping

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.leg_lost(self)


@dataclass(frozen=True, slots=True)
class RelayStats:
    """What passed through one session, for its record."""

    bytes_client_to_agent: int
    bytes_agent_to_client: int
    frames_client_to_agent: int
    frames_agent_to_client: int
    #: The close code each peer sent (None: it sent none; 1005: a close without a code).
    client_close_code: int | None
    agent_close_code: int | None
    #: The code the gateway itself sent to the client, if it had to.
    gateway_close_code: int | None
    #: True when the client's side ended first (close frame or vanished).
    client_initiated: bool
    #: True when the agent's connection dropped with no close frame.
    agent_vanished: bool


class Relay:
    """Joins a client transport and an agent transport until both are closed."""

    def __init__(
        self,
        client: asyncio.Transport,
        agent: asyncio.Transport,
        *,
        close_wait: float = limits.CLOSE_WAIT_S,
        slow_peer_timeout: float = limits.SLOW_PEER_TIMEOUT_S,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.client = RelayLeg(self, client, is_client=True)
        self.agent = RelayLeg(self, agent, is_client=False)
        self.client.peer = self.agent
        self.agent.peer = self.client
        self.done: asyncio.Future[RelayStats] = self.loop.create_future()
        self._close_wait = close_wait
        self._slow_peer_timeout = slow_peer_timeout
        self._timer: asyncio.TimerHandle | None = None
        self._first_lost: RelayLeg | None = None
        self._gateway_close: int | None = None
        self._agent_vanished = False
        #: Set by the gateway when it ends the session because its drain deadline passed.
        self.drained = False

    def start(self, client_pending: bytes, agent_pending: bytes) -> None:
        """Take over both transports; ``*_pending`` are bytes already read from each side."""
        for leg in (self.client, self.agent):
            leg.transport.set_write_buffer_limits(
                high=limits.RELAY_HIGH_WATER_BYTES, low=limits.RELAY_LOW_WATER_BYTES
            )
            leg.transport.set_protocol(leg)
            if leg.transport.is_closing():
                # It closed while we were setting up; its connection_lost went elsewhere.
                self.loop.call_soon(self.leg_lost, leg)
        if client_pending:
            self.client.data_received(client_pending)
        if agent_pending:
            self.agent.data_received(agent_pending)
        for leg in (self.client, self.agent):
            if not leg.transport.is_closing():
                leg.transport.resume_reading()

    def close_both(self, code: CloseCode, reason: str) -> None:
        """End the session from the gateway: close both sides with ``code`` (drain, stop)."""
        self._gateway_close = int(code)
        for leg, masked in ((self.client, False), (self.agent, True)):
            self._send_close(leg, code, reason, masked=masked)
        self._arm_timer()

    def traffic(self) -> dict[str, int]:
        """Bytes and frames relayed so far, for metrics (read at scrape time)."""
        return {
            "bytes_client_to_agent": self.client.bytes_in,
            "bytes_agent_to_client": self.agent.bytes_in,
            "frames_client_to_agent": self.client.scanner.frames,
            "frames_agent_to_client": self.agent.scanner.frames,
        }

    def slow_started(self, leg: RelayLeg) -> None:
        if leg.slow_timer is None and not leg.closed:
            leg.slow_timer = self.loop.call_later(self._slow_peer_timeout, self._too_slow, leg)

    def _too_slow(self, leg: RelayLeg) -> None:
        """``leg`` kept its buffer full for the whole bound: end the session with 1013."""
        leg.slow_timer = None
        if leg.closed or self.done.done():
            return
        self._gateway_close = int(CloseCode.TRY_AGAIN_LATER)
        reason = f"{'client' if leg.is_client else 'agent'} stopped reading"
        # The close toward the slow side queues behind its full buffer; the timer below
        # aborts it if it never drains.
        for target, masked in ((self.client, False), (self.agent, True)):
            self._send_close(target, CloseCode.TRY_AGAIN_LATER, reason, masked=masked)
        self._arm_timer()

    def abort(self) -> None:
        """Drop both connections at once (second SIGTERM, cancellation)."""
        self._abort_both()

    # --- internals -------------------------------------------------------------------------

    def _send_close(self, leg: RelayLeg, code: CloseCode, reason: str, *, masked: bool) -> None:
        """Write a close frame of catflap's own to ``leg`` if that stream is at a boundary."""
        if leg.closed:
            return
        # Frames written *to* leg come from its peer; the peer's scanner knows the boundaries.
        assert leg.peer is not None
        if leg.peer.scanner.at_boundary:
            leg.transport.write(close_frame(code, reason, masked=masked))
            leg.transport.close()
        else:
            leg.transport.abort()

    def leg_lost(self, leg: RelayLeg) -> None:
        if leg.closed:
            return
        leg.closed = True
        if self._first_lost is None:
            self._first_lost = leg
        other = leg.peer
        assert other is not None
        if other.closed:
            self._finish()
            return
        if self._gateway_close is not None:
            # catflap is already ending this session (drain, slow peer): its closes are on
            # their way, so a leg dropping now is expected, not a vanished peer.
            pass
        elif leg.is_client:
            if not leg.scanner.close_seen:
                # The client vanished: tell the bot, as a clean client would have.
                self._send_close(other, CloseCode.GOING_AWAY, "client went away", masked=True)
        elif leg.scanner.close_seen:
            other.transport.close()  # the agent's close frame went through; flush and close
        else:
            self._agent_vanished = True
            self._gateway_close = int(CloseCode.INTERNAL_ERROR)
            self._send_close(other, CloseCode.INTERNAL_ERROR, "agent connection lost", masked=False)
        self._arm_timer()

    def _arm_timer(self) -> None:
        if self._timer is None:
            self._timer = self.loop.call_later(self._close_wait, self._abort_both)

    def _abort_both(self) -> None:
        for leg in (self.client, self.agent):
            if not leg.closed:
                leg.transport.abort()

    def _finish(self) -> None:
        for timer in (self._timer, self.client.slow_timer, self.agent.slow_timer):
            if timer is not None:
                timer.cancel()
        if self.done.done():
            return
        self.done.set_result(
            RelayStats(
                bytes_client_to_agent=self.client.bytes_in,
                bytes_agent_to_client=self.agent.bytes_in,
                frames_client_to_agent=self.client.scanner.frames,
                frames_agent_to_client=self.agent.scanner.frames,
                client_close_code=self.client.scanner.close_code,
                agent_close_code=self.agent.scanner.close_code,
                gateway_close_code=self._gateway_close,
                client_initiated=self._client_first(),
                agent_vanished=self._agent_vanished,
            )
        )

    def _client_first(self) -> bool:
        client, agent = self.client.scanner.close_seq, self.agent.scanner.close_seq
        if client or agent:
            return bool(client) and (not agent or client < agent)
        return self._first_lost is self.client
