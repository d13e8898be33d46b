"""One agent instance (a runtime process): its states, the transitions between them, its slots.

States and the only transitions allowed (every change is logged with ``=`` and the pid)::

    STARTING ──ready──────────────────────────▶ READY
    STARTING ──start_failed / exit / timeout──▶ DEAD
    STARTING ──stop (the pool closes)─────────▶ STOPPING
    READY    ──stop (idle, refused, replaced)─▶ STOPPING
    READY    ──exit (a crash)─────────────────▶ DEAD
    STOPPING ──exit───────────────────────────▶ DEAD

:data:`_TRANSITIONS` is the table; :func:`render_transitions_markdown` renders it, with each
state's one-line meaning from :data:`STATE_MEANINGS`, for ``docs/architecture.md``.

An instance holds *slots*: a slot is taken when the gateway accepts a handshake (reservation),
and given back only when the runtime reports that ``bot()`` has ended, or when the process dies.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass, field

from catflap.contract.errors import CatflapMisuse
from catflap.contract.resources import ResourceMetrics
from catflap.contract.status import EndStatus
from catflap.pool.launcher import LaunchedProcess

__all__ = [
    "STATE_MEANINGS",
    "Instance",
    "InstanceState",
    "Lease",
    "SessionEnd",
    "render_transitions_markdown",
]

log = logging.getLogger("catflap.pool")


class InstanceState(enum.Enum):
    """Where an instance is in its life (each state's meaning: :data:`STATE_MEANINGS`)."""

    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    DEAD = "dead"


#: What each state means, one line each (the docs table's last column).
STATE_MEANINGS: dict[InstanceState, str] = {
    InstanceState.STARTING: "launched; the runtime is importing bot.py and has not reported ready",
    InstanceState.READY: "serving: takes new sessions while it has a free slot",
    InstanceState.STOPPING: "takes no new session; running ones finish, then the process exits",
    InstanceState.DEAD: "the process has exited; sessions still on it ended as agent_crashed",
}


_TRANSITIONS: dict[InstanceState, frozenset[InstanceState]] = {
    InstanceState.STARTING: frozenset(
        {InstanceState.READY, InstanceState.DEAD, InstanceState.STOPPING}
    ),
    InstanceState.READY: frozenset({InstanceState.STOPPING, InstanceState.DEAD}),
    InstanceState.STOPPING: frozenset({InstanceState.DEAD}),
    InstanceState.DEAD: frozenset(),
}


def render_transitions_markdown() -> str:
    """The transition table as a Markdown table (state, may become, what it means), from
    :data:`_TRANSITIONS` and :data:`STATE_MEANINGS` (for docs/architecture.md)."""
    lines = ["| state | may become | what it means |", "|---|---|---|"]
    for state in InstanceState:
        targets = ", ".join(f"`{t.name}`" for t in InstanceState if t in _TRANSITIONS[state])
        lines.append(f"| `{state.name}` | {targets or '(final)'} | {STATE_MEANINGS[state]} |")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class SessionEnd:
    status: EndStatus
    error: str | None = None
    client_disconnected: bool = False
    bot_seconds: float | None = None
    #: The runtime's samples of its process while the session ran (None: none reported).
    resources: ResourceMetrics | None = None


@dataclass(eq=False)
class Lease:
    """One reserved slot on one instance, for one session."""

    session_id: str
    instance: Instance
    #: Set once the runtime reported ``session_started`` (its ``bot()`` is running).
    started: bool = False
    #: True when the session had to wait for an instance to start.
    cold_start: bool = False
    ended: asyncio.Future[SessionEnd] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    @property
    def address(self) -> str:
        if self.instance.address is None:
            raise CatflapMisuse("lease address read before the instance was ready")
        return self.instance.address

    @property
    def instance_label(self) -> str:
        return f"instance {self.instance.instance_id} (pid {self.instance.pid})"

    @property
    def instance_key(self) -> str:
        return str(self.instance.instance_id)


@dataclass(eq=False)
class Instance:
    instance_id: int
    agent_key: str
    capacity: int
    started_at: float
    state: InstanceState = InstanceState.STARTING
    process: LaunchedProcess | None = None
    address: str | None = None
    leases: dict[str, Lease] = field(default_factory=dict)
    idle_since: float = 0.0
    #: When the runtime last answered a ping (pool clock).
    last_pong: float = 0.0
    ready: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def free_slots(self) -> int:
        if self.state in (InstanceState.STOPPING, InstanceState.DEAD):
            return 0
        return self.capacity - len(self.leases)

    def set_state(self, new: InstanceState) -> None:
        """The one place an instance changes state.

        Raises:
            CatflapMisuse: the transition is not in the table above.
        """
        if new is self.state:
            return
        if new not in _TRANSITIONS[self.state]:
            raise CatflapMisuse(f"instance {self.instance_id}: {self.state.value} -> {new.value}")
        log.info(
            "= %s instance %d pid %s: %s -> %s",
            self.agent_key,
            self.instance_id,
            self.pid,
            self.state.value,
            new.value,
        )
        self.state = new

    def reserve(self, session_id: str) -> Lease:
        if self.free_slots <= 0:
            raise CatflapMisuse(f"instance {self.instance_id} has no free slot")
        if session_id in self.leases:
            # Overwriting would orphan the first lease's future and double-book the slot.
            raise CatflapMisuse(f"instance {self.instance_id} already holds session {session_id}")
        lease = Lease(session_id=session_id, instance=self)
        self.leases[session_id] = lease
        return lease

    def release(self, session_id: str, end: SessionEnd, *, now: float) -> None:
        lease = self.leases.pop(session_id, None)
        if lease is not None and not lease.ended.done():
            lease.ended.set_result(end)
        if not self.leases:
            self.idle_since = now
