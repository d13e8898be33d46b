"""Step five: relay an upgraded session until both sides close, and record it meanwhile.

:class:`LiveRelays` is the gateway's registry of running relays (the dashboard and the metrics
read it, the shutdown closes what is left in it with 1012) and the settings each relay starts
with: the fast lane, once the gateway has started it, and the relay's timeouts.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from catflap.contract.closecodes import CloseCode
from catflap.gateway.fastlane import FastLane
from catflap.gateway.recorder import Recorder
from catflap.gateway.relay import Relay
from catflap.gateway.upgrade import UpgradeAccepted
from catflap.gateway.upstream import UpstreamReply
from catflap.pool.interface import SessionLease

if TYPE_CHECKING:
    from catflap.gateway.front import GatewayConnection

__all__ = ["LiveRelays", "relay_session"]


class LiveRelays:
    """The relays running now, by session id, and how a new one is made."""

    def __init__(self, *, close_wait: float, slow_peer_timeout: float) -> None:
        self.close_wait = close_wait
        self.slow_peer_timeout = slow_peer_timeout
        #: The native relay thread, set by the gateway while it runs (None: the event loop).
        self.lane: FastLane | None = None
        self.live: dict[str, Relay] = {}

    def __len__(self) -> int:
        return len(self.live)

    def open(self, session_id: str, client: asyncio.Transport, agent: asyncio.Transport) -> Relay:
        relay = Relay(
            client,
            agent,
            close_wait=self.close_wait,
            slow_peer_timeout=self.slow_peer_timeout,
            lane=self.lane,
            session_id=session_id,
        )
        self.live[session_id] = relay
        return relay

    def closed(self, session_id: str) -> None:
        # Both connections are closed: the session no longer counts against max_connections,
        # even while its bot runs on (post-call work) until the runtime reports.
        self.live.pop(session_id, None)

    def close_all(self, code: CloseCode, reason: str) -> None:
        """End every live session now (the drain deadline passed)."""
        for relay in list(self.live.values()):
            relay.drained = True
            relay.close_both(code, reason)


async def relay_session(
    relays: LiveRelays,
    recorder: Recorder,
    conn: GatewayConnection,
    accepted: UpgradeAccepted,
    lease: SessionLease,
    reply: UpstreamReply,
    *,
    client_pending: bytes,
    started: float,
) -> None:
    """Relay an upgraded session until both sides close and ``bot()`` has ended.

    Args:
        client_pending: what the client sent that the agent has not seen yet (replayed first).
        started: the session's ``time.perf_counter()`` when its upgrade request arrived.
    """
    recording = recorder.started(accepted, lease, started=started)
    conn.handed_off()
    relay = relays.open(accepted.session_id, conn.transport, reply.transport)
    try:
        relay.start(client_pending=client_pending, agent_pending=reply.trailing)
        stats = await relay.done
    except asyncio.CancelledError:
        relay.abort()
        raise
    finally:
        relays.closed(accepted.session_id)
    await recorder.ended(recording, lease, stats, drained=relay.drained, traffic=relay.traffic())
