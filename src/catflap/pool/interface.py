"""The pool as the gateway sees it: a slot per session, local or cluster-wide.

:class:`SessionPool` is all the gateway needs from a pool, so that the cluster's Redis-backed
pool stands in for :class:`~catflap.pool.pool.LocalPool` and the gateway imports neither.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

from catflap.pool.instance import SessionEnd

__all__ = ["AgentReadiness", "SessionLease", "SessionPlace", "SessionPool"]


@dataclass(frozen=True, slots=True)
class SessionPlace:
    """Where a live session is, as the session proxy needs it (:meth:`SessionPool.locate`)."""

    #: ``unix:/path`` or ``tcp:host:port`` of its instance; None while the instance starts.
    address: str | None
    #: The runtime reported ``session_started``: ``bot()`` runs and can be reached.
    running: bool


@dataclass(frozen=True, slots=True)
class AgentReadiness:
    """Whether an agent can take a session now: what ``GET .../services/{agent}`` reports."""

    #: Ready instances with a free slot.
    open_instances: int
    #: Every live instance by state (starting, idle, busy, draining).
    instances: dict[str, int]
    #: A new instance may be started now: below ``max_agents`` and not backing off.
    can_start: bool
    #: The last start failure while the agent backs off from it (its exception line).
    problem: str | None = None

    @property
    def ready(self) -> bool:
        """A session would be placed now, on a ready instance or a new one."""
        return self.open_instances > 0 or self.can_start


class SessionLease(Protocol):
    """A reserved slot, as the gateway sees it (local or cluster-wide)."""

    session_id: str
    cold_start: bool
    #: Resolves when ``bot()`` has really ended (or the instance died).
    ended: asyncio.Future[SessionEnd]

    @property
    def address(self) -> str: ...

    @property
    def instance_label(self) -> str: ...

    @property
    def instance_key(self) -> str:
        """Identifies the instance, for ``acquire(avoid=...)``."""
        ...


class SessionPool(Protocol):
    """What the gateway needs from a pool."""

    async def at_capacity(self, agent_key: str) -> bool: ...

    async def acquire(
        self, agent_key: str, session_id: str, *, avoid: frozenset[str] = frozenset()
    ) -> SessionLease:
        """Reserve a slot, not on the instances named in ``avoid`` (a retry after a failure)."""
        ...

    def cancel(self, lease: SessionLease) -> None: ...

    def abandon(self, lease: SessionLease, problem: str) -> None:
        """The runtime never reported the end of this session: stop counting on it. A local
        pool replaces the instance (a bot may still run in it)."""
        ...

    async def stop_session(self, session_id: str) -> bool: ...

    async def locate(self, agent_key: str, session_id: str) -> SessionPlace | None:
        """Where the agent's session ``session_id`` is, whichever gateway admitted it; None
        when it is not live (unknown, or ended)."""
        ...
