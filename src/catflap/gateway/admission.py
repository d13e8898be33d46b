"""Admission: spend the token, reserve a pool slot, reach the instance; give back on failure.

The token is spent first, so that a replay racing its first use is refused without touching
the pool; if the pool then refuses (429, 503) or the client leaves, the jti is released, so
that the client can retry with the same token after ``Retry-After``. Once the upgrade was
written to an instance that never answered, a bot may have started: that token stays spent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from catflap.auth.replay import ReplayStore, consume_or_reject
from catflap.gateway.dispatch import Delivery, connect_agent
from catflap.gateway.sessionlog import accepted_log
from catflap.gateway.upgrade import UpgradeAccepted
from catflap.gateway.upstream import UpstreamReply
from catflap.pool.interface import SessionLease, SessionPool

__all__ = ["Admission"]


@dataclass(frozen=True, slots=True)
class Admission:
    """What admitting a session uses: the spent-token store, the pool and the upstream bound."""

    replay: ReplayStore
    pool: SessionPool
    #: Seconds each attempt to reach an instance may take (connect and 101).
    upstream_timeout: float
    #: Counts a token check by result (``ok`` once a session with a token was admitted).
    count_token: Callable[[str], None]

    async def admit(self, accepted: UpgradeAccepted) -> SessionLease:
        """Spend the token and reserve a slot; a refusal or cancellation gives the token back.

        Raises:
            TokenRejected: 403, the token was used before.
            AtCapacity: 429.
            AgentNotReady: 503.
        """
        if accepted.claims is not None:
            try:
                await consume_or_reject(self.replay, accepted.claims)
            except asyncio.CancelledError:
                # The client left while the store was answering: the jti may be spent.
                await self.give_token_back(accepted)
                raise
        try:
            lease = await self.pool.acquire(accepted.known_agent().key, accepted.session_id)
        except BaseException:
            await self.give_token_back(accepted)
            raise
        if accepted.claims is not None:
            self.count_token("ok")
        return lease

    async def give_token_back(self, accepted: UpgradeAccepted) -> None:
        """Forget a spent jti whose session never reached the agent; never raises."""
        if accepted.claims is None:
            return
        try:
            await self.replay.release(accepted.claims.jti)
        except Exception:
            # The token then stays spent: the client mints another one.
            accepted_log(accepted).exception("! could not give the token back")

    async def reach_agent(
        self, accepted: UpgradeAccepted, lease: SessionLease, request: bytes
    ) -> tuple[SessionLease, UpstreamReply]:
        """:func:`~catflap.gateway.dispatch.connect_agent`; on failure the token is given back,
        unless the upgrade may have reached an agent that started ``bot()`` (no answer came:
        silent, or the client left).

        Raises:
            RequestRejected: as :func:`~catflap.gateway.dispatch.connect_agent`.
        """
        delivery = Delivery()
        try:
            return await connect_agent(
                self.pool,
                accepted,
                lease,
                request,
                timeout=self.upstream_timeout,
                delivery=delivery,
            )
        except BaseException:
            if not delivery.maybe_started:
                await self.give_token_back(accepted)
            raise

    async def start_on_agent(
        self, accepted: UpgradeAccepted, request: bytes
    ) -> tuple[SessionLease, UpstreamReply]:
        """:meth:`admit`, then :meth:`reach_agent`; on any failure, and on cancellation, the
        slot and the token are given back.

        Raises:
            RequestRejected: 403, 429 or 503, as :meth:`admit` and :meth:`reach_agent`.
        """
        lease = await self.admit(accepted)
        return await self.reach_agent(accepted, lease, request)
