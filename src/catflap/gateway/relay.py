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

The fast lane. While a session needs no decisions, its bytes move on a native thread instead
(:mod:`catflap.gateway.fastlane`): the relay lends both sockets to the lane, and the lane hands
the session back, scanner state and all, when a close frame starts, a peer's buffer fills, a
side ends or the gateway needs the session (drain, stop, abort). Everything in the table above
then happens here, on the event loop, exactly as without the lane.

The lifecycle. A relay is always in one :class:`~catflap.gateway.relaystate.RelayState`, held
by its :class:`~catflap.gateway.relaystate.RelayMachine`; each method below fires the event it
stands for (:class:`~catflap.gateway.relaystate.RelayEvent`) through the machine's transition
table, then acts. The fast lane is the states ``IN_LANE`` and ``RECALLING`` of that table, where
the machine refuses any Python I/O on the sockets. The hot path (``data_received``,
``pause_writing``, ``resume_writing``) fires nothing: per-frame work is not a lifecycle event.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from catflap.contract import limits
from catflap.contract.closecodes import CloseCode
from catflap.gateway.fastlane import FastLane, HandBack, LegReturn, LentTransport
from catflap.gateway.frames import FrameScanner, close_frame
from catflap.gateway.relaystate import RelayEvent, RelayMachine, RelayState
from catflap.logs import not_logged, refusal_log_budget
from catflap.sessions.record import RelayStats

__all__ = ["Relay", "RelayLeg"]

#: After the lane handed a session back for backpressure, how soon to try again, and the most
#: the wait grows to while the session's buffers stay full.
LANE_REENTRY_FIRST_S = 0.05
LANE_REENTRY_MAX_S = 2.0


class RelayLeg(asyncio.Protocol):
    """One side of a relayed session: reads from its socket, writes to the peer's."""

    __slots__ = (
        "bytes_in",
        "closed",
        "dropped",
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
        self.scanner = FrameScanner(on_close=self._close_frame_read)
        self.bytes_in = 0
        #: Bytes dropped after this side broke the protocol (the lingering close's bound).
        self.dropped = 0
        self.closed = False
        #: Runs while this side's write buffer is over the high-water mark.
        self.slow_timer: asyncio.TimerHandle | None = None

    # hot path ---------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        broken_at = self.scanner.feed(data)
        peer = self.peer
        if broken_at is None:
            if peer is not None and not peer.closed:
                peer.transport.write(data)
            return
        self.relay.protocol_error(self, data, broken_at)

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

    def _close_frame_read(self) -> None:
        self.relay.close_frame_seen(self)

    def eof_received(self) -> bool:
        return False  # let the transport close; connection_lost does the bookkeeping

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.leg_lost(self)


class Relay:
    """Joins a client transport and an agent transport until both are closed."""

    def __init__(
        self,
        client: asyncio.Transport,
        agent: asyncio.Transport,
        *,
        close_wait: float = limits.CLOSE_WAIT_S,
        slow_peer_timeout: float = limits.SLOW_PEER_TIMEOUT_S,
        lane: FastLane | None = None,
        session_id: str | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self._machine = RelayMachine(session_id)
        self._log = self._machine.log
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
        #: None once the session relays on the event loop for good (or was never to use a lane).
        self._lane = lane
        #: The session's handle in the lane, while the state is one of ``SOCKETS_LENT``.
        self._lane_handle: int | None = None
        #: What the gateway asked for while the session was in the lane; runs on its return.
        self._after_lane: list[Callable[[], None]] = []
        self._lane_timer: asyncio.TimerHandle | None = None
        self._lane_wait = LANE_REENTRY_FIRST_S
        #: The lane could not keep the session's bytes (an allocation failed).
        self._relay_failed = False

    def start(self, client_pending: bytes, agent_pending: bytes) -> None:
        """Take over both transports; ``*_pending`` are bytes already read from each side."""
        self._machine.fire(RelayEvent.START)
        for leg in (self.client, self.agent):
            leg.transport.set_write_buffer_limits(
                high=limits.RELAY_HIGH_WATER_BYTES, low=limits.RELAY_LOW_WATER_BYTES
            )
            leg.transport.set_protocol(leg)
            if leg.transport.is_closing():
                # It closed while we were setting up; its connection_lost went elsewhere.
                self.loop.call_soon(self.leg_lost, leg)
        # Reading resumes before the pending bytes are written, as in lane_returned: if they
        # fill a side's buffer, pause_writing pauses the other side and nothing resumes it
        # until that buffer drains (resuming after would undo the backpressure for good).
        for leg in (self.client, self.agent):
            if not leg.transport.is_closing():
                leg.transport.resume_reading()
        if client_pending:
            self.client.data_received(client_pending)
        if agent_pending:
            self.agent.data_received(agent_pending)
        self._enter_lane()

    @property
    def state(self) -> RelayState:
        """Where the session is in its life (see :mod:`catflap.gateway.relaystate`)."""
        return self._machine.state

    @property
    def in_lane(self) -> bool:
        """True while the session's bytes move on the fast lane's thread."""
        return self._machine.sockets_lent

    def close_both(self, code: CloseCode, reason: str) -> None:
        """End the session from the gateway: close both sides with ``code`` (drain, stop)."""
        if self._recall(lambda: self.close_both(code, reason)):
            return
        if self._machine.fire(RelayEvent.GATEWAY_CLOSE, str(int(code))) is RelayState.DONE:
            return
        self._close_both_now(code, reason)

    def _close_both_now(self, code: CloseCode, reason: str) -> None:
        self._gateway_close = int(code)
        for leg, masked in ((self.client, False), (self.agent, True)):
            self._send_close(leg, code, reason, masked=masked)
        self._arm_timer()

    def traffic(self) -> dict[str, int]:
        """Bytes and frames relayed so far, for metrics (read at scrape time)."""
        lane = (0, 0, 0, 0)
        if self.in_lane:
            assert self._lane is not None and self._lane_handle is not None
            lane = self._lane.counters(self._lane_handle)
        return {
            "bytes_client_to_agent": self.client.bytes_in + lane[0],
            "bytes_agent_to_client": self.agent.bytes_in + lane[2],
            "frames_client_to_agent": self.client.scanner.frames + lane[1],
            "frames_agent_to_client": self.agent.scanner.frames + lane[3],
        }

    def slow_started(self, leg: RelayLeg) -> None:
        if leg.slow_timer is None and not leg.closed:
            leg.slow_timer = self.loop.call_later(self._slow_peer_timeout, self._too_slow, leg)

    def _too_slow(self, leg: RelayLeg) -> None:
        """``leg`` kept its buffer full for the whole bound: end the session with 1013."""
        leg.slow_timer = None
        if self._recall(lambda: self._too_slow(leg)):
            return
        if leg.closed or self.done.done():
            return
        side = "client" if leg.is_client else "agent"
        self._machine.fire(RelayEvent.SLOW_PEER, side)
        # The close toward the slow side queues behind its full buffer; the close-wait timer
        # aborts it if it never drains.
        self._close_both_now(CloseCode.TRY_AGAIN_LATER, f"{side} stopped reading")

    def protocol_error(self, leg: RelayLeg, data: bytes, broken_at: int) -> None:
        """``leg``'s peer broke RFC 6455 at ``data[broken_at]`` (-1: in an earlier chunk).

        The good bytes before the bad frame are relayed, nothing after it; the sender gets
        1002 and the other side 1001 (the client broke it) or 1011 (the agent did).
        """
        peer = leg.peer
        assert peer is not None
        # Only what was relayed counts as relayed: the bad frame and all after it are dropped.
        leg.bytes_in -= len(data) - max(broken_at, 0)
        if broken_at > 0 and not peer.closed:
            peer.transport.write(data[:broken_at])
        who = "client" if leg.is_client else "agent"
        ending = self._machine.state is RelayState.ENDING or self.done.done()
        self._machine.fire(RelayEvent.PROTOCOL_ERROR, who)
        if ending:
            # Already ending this session: its scanner drops what still comes, up to a bound.
            leg.dropped += len(data)
            if leg.dropped > limits.LINGERING_CLOSE_MAX_BYTES and not leg.closed:
                leg.transport.abort()
            return
        self._gateway_close = int(CloseCode.PROTOCOL_ERROR)
        reason = leg.scanner.protocol_error or "protocol error"
        skipped = refusal_log_budget.take()
        if skipped is not None:
            self._log.info("! %s broke the protocol: %s%s", who, reason, not_logged(skipped))
        transport = leg.transport
        if leg.closed or transport.is_closing():
            pass
        elif peer.scanner.at_boundary and transport.can_write_eof():
            # Lingering close: the sender may still be sending, and closing on unread input
            # would reset the connection and lose the close frame. Its scanner now drops
            # every byte, and the close timer below bounds the wait.
            transport.write(close_frame(CloseCode.PROTOCOL_ERROR, reason, masked=not leg.is_client))
            transport.write_eof()
        else:
            self._send_close(leg, CloseCode.PROTOCOL_ERROR, reason, masked=not leg.is_client)
        code, why = (
            (CloseCode.GOING_AWAY, "client broke the protocol")
            if leg.is_client
            else (CloseCode.INTERNAL_ERROR, "agent broke the protocol")
        )
        if peer.closed or peer.transport.is_closing():
            pass
        elif broken_at >= 0:  # the stream toward peer ends at a frame boundary
            peer.transport.write(close_frame(code, why, masked=leg.is_client))
            peer.transport.close()
        else:
            peer.transport.abort()  # part of the bad frame already went out
        self._arm_timer()

    def abort(self) -> None:
        """Drop both connections at once (second SIGTERM, cancellation)."""
        if self._recall(self.abort):
            return
        self._machine.fire(RelayEvent.ABORT)
        self._abort_both()

    def close_frame_seen(self, leg: RelayLeg) -> None:
        """``leg``'s side sent its first close frame (the scanner read it; it is relayed next)."""
        self._machine.fire(
            RelayEvent.CLOSE_FRAME,
            f"{'client' if leg.is_client else 'agent'} {leg.scanner.close_code}",
        )

    # --- the fast lane ---------------------------------------------------------------------

    def _lane_states(self) -> tuple[tuple[int, bytes], tuple[int, bytes]] | None:
        """The scanner states to hand the lane, or None while the session needs Python."""
        if self._machine.state is not RelayState.RELAYING:
            return None
        states = []
        for leg in (self.client, self.agent):
            transport = leg.transport
            if leg.closed or transport.is_closing() or leg.slow_timer is not None:
                return None
            if transport.get_write_buffer_size():
                return None
            state = leg.scanner.lane_state()
            if state is None:
                return None
            states.append(state)
        return states[0], states[1]

    def _enter_lane(self) -> None:
        self._lane_timer = None
        if self._lane is None or self.in_lane:
            return
        states = self._lane_states()
        if states is None:
            if self._may_reenter():
                # Something passing holds it back (a full write buffer, a slow-peer bound
                # running): look again later.
                self._lane_timer = self.loop.call_later(self._lane_wait, self._enter_lane)
                self._lane_wait = min(self._lane_wait * 2, LANE_REENTRY_MAX_S)
            return
        legs = (self.client, self.agent)
        if any(leg.transport.get_extra_info("sslcontext") is not None for leg in legs):
            # TLS: the socket carries ciphertext (and the SSL layer may hold plaintext it has
            # read already), while the lane relays raw socket bytes.
            self._lane = None
            self._machine.fire(RelayEvent.LANE_REFUSED, "TLS")
            return
        sockets = [leg.transport.get_extra_info("socket") for leg in legs]
        if None in sockets:
            self._lane = None  # not socket transports (tests): relay on the event loop
            self._machine.fire(RelayEvent.LANE_REFUSED, "not a socket")
            return
        for leg in legs:
            leg.transport.pause_reading()
        try:
            self._lane_handle = self._lane.enter(
                self, (sockets[0].fileno(), sockets[1].fileno()), states
            )
        except (OSError, RuntimeError, MemoryError) as exc:
            self._log.warning("fast lane refused a session (%r); it relays on the event loop", exc)
            self._lane = None
            self._machine.fire(RelayEvent.LANE_REFUSED, type(exc).__name__)
            for leg in legs:
                leg.transport.resume_reading()
            return
        self._machine.fire(RelayEvent.LANE_ENTERED)
        # Until lane_returned, the lane's thread alone may touch the sockets: a write, close or
        # pause from Python meanwhile is refused by the machine instead of corrupting the stream.
        for leg in legs:
            side = "client" if leg.is_client else "agent"
            leg.transport = LentTransport(leg.transport, side, self._machine)
        self._lane_wait = LANE_REENTRY_FIRST_S

    def _may_reenter(self) -> bool:
        """False once the session is ending (any state but ``RELAYING``): then it stays on the
        event loop to the end."""
        return (
            self._lane is not None
            and not self._lane.closed
            and self._machine.state is RelayState.RELAYING
        )

    def _recall(self, action: Callable[[], None]) -> bool:
        """If the session is in the lane, run ``action`` once it is back; True if deferred."""
        if not self.in_lane:
            return False
        assert self._lane is not None and self._lane_handle is not None
        self._machine.fire(RelayEvent.RECALL)
        self._after_lane.append(action)
        self._lane.recall(self._lane_handle)
        return True

    def lane_returned(self, reason: int, client: LegReturn, agent: LegReturn) -> None:
        """The lane handed the session back: continue exactly where it stopped."""
        failed = reason == HandBack.FAILED
        self._machine.fire(
            RelayEvent.LANE_FAILED if failed else RelayEvent.HANDED_BACK, _hand_back_name(reason)
        )
        self._lane_handle = None
        returns = ((self.client, client), (self.agent, agent))
        for leg, back in returns:
            if isinstance(leg.transport, LentTransport):
                leg.transport = leg.transport.lent
            leg.scanner.resume(back.skip, back.partial, back.frames)
            leg.bytes_in += back.relayed
        if failed:
            self._lane_failed(client, agent)
            return
        # Reading resumes before the leftovers are written, so that backpressure they cause
        # (pause_writing -> pause_reading) is not undone; no bytes arrive before the next turn.
        for leg, _ in returns:
            if not leg.transport.is_closing():
                leg.transport.resume_reading()
        for leg, back in returns:
            peer = leg.peer
            if back.to_write and peer is not None and not peer.closed:
                peer.transport.write(back.to_write)
        for leg, back in returns:
            if back.to_feed:
                leg.data_received(back.to_feed)
        actions, self._after_lane = self._after_lane, []
        for action in actions:
            action()
        if self._may_reenter() and self._lane_timer is None:
            self._lane_timer = self.loop.call_later(self._lane_wait, self._enter_lane)

    def _lane_failed(self, client: LegReturn, agent: LegReturn) -> None:
        """The lane lost bytes to an allocation failure: end the session with 1011."""
        self._log.error(
            "! the fast lane ran out of memory (%d bytes not relayed); ending the session "
            "with 1011",
            client.dropped + agent.dropped,
        )
        self._relay_failed = True
        for leg, back in ((self.client, client), (self.agent, agent)):
            peer = leg.peer
            if back.cut and peer is not None and not peer.closed:
                peer.transport.abort()  # it holds part of a chunk: no close frame can follow
        # What the gateway asked for meanwhile (drain, stop) is moot now, except an abort.
        actions, self._after_lane = self._after_lane, []
        self._close_both_now(CloseCode.INTERNAL_ERROR, "relay failure")
        if self.abort in actions:
            self.abort()

    # --- internals -------------------------------------------------------------------------

    def _send_close(self, leg: RelayLeg, code: CloseCode, reason: str, *, masked: bool) -> None:
        """Write a close frame of catflap's own to ``leg`` if that stream is at a boundary."""
        if leg.closed or leg.transport.is_closing():
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
        side = "client" if leg.is_client else "agent"
        if other.closed:
            self._machine.fire(RelayEvent.LAST_LEG_LOST, side)
            self._finish()
            return
        ending = self._machine.state is RelayState.ENDING
        if leg.scanner.close_seen:
            self._machine.fire(RelayEvent.LEG_CLOSED, side)
        else:
            self._machine.fire(RelayEvent.CLIENT_LOST if leg.is_client else RelayEvent.AGENT_LOST)
        if ending:
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
            self._timer = self.loop.call_later(self._close_wait, self._close_wait_expired)

    def _close_wait_expired(self) -> None:
        self._machine.fire(RelayEvent.CLOSE_WAIT_EXPIRED)
        self._abort_both()

    def _abort_both(self) -> None:
        for leg in (self.client, self.agent):
            if not leg.closed:
                leg.transport.abort()

    def _finish(self) -> None:
        for timer in (
            self._timer,
            self.client.slow_timer,
            self.agent.slow_timer,
            self._lane_timer,
        ):
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
                relay_failed=self._relay_failed,
            )
        )

    def _client_first(self) -> bool:
        client, agent = self.client.scanner.close_seq, self.agent.scanner.close_seq
        if client or agent:
            return bool(client) and (not agent or client < agent)
        return self._first_lost is self.client


def _hand_back_name(reason: int) -> str:
    """``reason``'s name for the log (the extension might one day send a code Python lacks)."""
    try:
        return HandBack(reason).name
    except ValueError:
        return str(reason)
