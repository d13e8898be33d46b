"""Dispatch with retry: forward the upgrade to a leased instance, and lease another on failure.

An instance that cannot be reached, or that answers 503 (it is draining), is given up and
another one leased, up to ``DISPATCH_ATTEMPTS`` in all; any other answer is the agent's verdict
on this request and is not tried elsewhere (it would cold-start instances for a request every
agent refuses). A connected instance that stays silent is not retried either: the request may
be what stalls it.
"""

from __future__ import annotations

import dataclasses

from catflap.contract import limits
from catflap.contract.errors import CatflapMisuse, ServiceUnavailable
from catflap.gateway.sessionlog import accepted_log
from catflap.gateway.upgrade import UpgradeAccepted
from catflap.gateway.upstream import AgentSilent, UpstreamReply, open_upstream
from catflap.pool.interface import SessionLease, SessionPool

__all__ = ["Delivery", "connect_agent"]


@dataclasses.dataclass
class Delivery:
    """Whether a forwarded upgrade may have started a bot: written to an instance that has
    not answered it (yet). The token of such a session stays spent."""

    maybe_started: bool = False


async def connect_agent(
    pool: SessionPool,
    accepted: UpgradeAccepted,
    lease: SessionLease,
    request: bytes,
    *,
    timeout: float,  # noqa: ASYNC109  one bound per attempt, passed on to open_upstream
    delivery: Delivery | None = None,
) -> tuple[SessionLease, UpstreamReply]:
    """Forward the upgrade to the leased instance and wait for its 101.

    This function owns ``lease``: on failure it has been cancelled. ``delivery`` says, on
    failure, whether the last upgrade was written and never answered.

    Args:
        timeout: seconds each attempt may take to connect and read the answer.

    Returns:
        The lease that worked (perhaps not the one passed in) and the agent's reply.

    Raises:
        ServiceUnavailable: 503, no instance could be reached or switched protocols.
        AtCapacity: 429, no other instance was free for a retry.
    """
    tried: set[str] = set()
    delivery = delivery if delivery is not None else Delivery()

    def sent() -> None:
        delivery.maybe_started = True

    for attempt in range(1, limits.DISPATCH_ATTEMPTS + 1):
        tried.add(lease.instance_key)
        delivery.maybe_started = False
        try:
            reply = await open_upstream(lease.address, request, timeout=timeout, on_sent=sent)
            if reply.status == 101:
                return lease, reply
            delivery.maybe_started = False  # it answered, and refused: no bot started
            reply.transport.abort()
            problem = f"the agent refused the session with HTTP {reply.status}"
            final = reply.status != 503
        except AgentSilent:
            # Connected but no answer: the request may be what stalls it, so no retry.
            pool.cancel(lease)
            raise
        except ServiceUnavailable as unreachable:
            problem, final = unreachable.message, False
        except BaseException:
            pool.cancel(lease)
            raise
        pool.cancel(lease)
        accepted_log(accepted).warning(
            "! attempt %d: %s at %s", attempt, problem, lease.instance_label
        )
        if final or attempt == limits.DISPATCH_ATTEMPTS:
            raise ServiceUnavailable(f"{problem}; retry shortly")
        lease = await pool.acquire(
            accepted.known_agent().key, accepted.session_id, avoid=frozenset(tried)
        )
    raise CatflapMisuse("unreachable")
