"""Slot accounting for one agent: which instances count, who holds their slots, 429 or 503.

A slot is reserved before any await (so two handshakes can never take the same one) and comes
back only when the runtime reports that ``bot()`` has ended, or when the instance dies: an
instance is never reused while a bot may still run in it. Nothing here starts, pings or stops a
process; :mod:`catflap.pool.supervisor` does that and reports what the runtime says.
"""

from __future__ import annotations

from catflap.config import AgentSpec
from catflap.contract.errors import AgentNotReady, AtCapacity
from catflap.pool.backoff import StartBackoff
from catflap.pool.clock import Clock
from catflap.pool.instance import Instance, InstanceState, Lease, SessionEnd
from catflap.pool.interface import AgentReadiness
from catflap.pool.observer import PoolObserver

__all__ = ["INSTANCE_METRIC_STATES", "AgentSlots"]

#: The states ``catflap_pool_instances`` counts (``ready`` split by whether a session runs).
INSTANCE_METRIC_STATES = ("starting", "idle", "busy", "draining")


class AgentSlots:
    """The live instances of one agent and the sessions holding their slots."""

    def __init__(
        self, agent: AgentSpec, *, clock: Clock, observer: PoolObserver | None = None
    ) -> None:
        self.agent = agent
        self.observer = observer
        self._clock = clock
        #: Every instance not yet dead, by id (a dead one is dropped as it dies).
        self.instances: dict[int, Instance] = {}

    @property
    def max_agents(self) -> int:
        return self.agent.config.scaling.max_agents

    def live(self) -> list[Instance]:
        return [i for i in self.instances.values() if i.state is not InstanceState.DEAD]

    def at_capacity(self) -> bool:
        """Every instance is full and there are ``max_agents`` of them."""
        live = self.live()
        return not any(i.free_slots > 0 for i in live) and len(live) >= self.max_agents

    def place(
        self, backoff: StartBackoff, *, avoid: frozenset[str] = frozenset()
    ) -> Instance | None:
        """The instance a new session goes to, or ``None`` when one must be started for it.

        Ready instances before starting ones; among those the fullest, so that idle ones can be
        reaped. ``avoid`` names instances a retry must not land on again.

        Raises:
            AtCapacity: 429, every instance is full and there are ``max_agents`` of them.
            AgentNotReady: 503, the agent failed to start and is waiting out its backoff.
        """
        live = self.live()
        open_ = [i for i in live if i.free_slots > 0 and str(i.instance_id) not in avoid]
        if open_:
            return min(open_, key=lambda i: (i.state is not InstanceState.READY, -len(i.leases)))
        if len(live) >= self.max_agents:
            raise AtCapacity(
                f"agent {self.agent.key} is at max_agents={self.max_agents} and "
                "every instance is busy; retry shortly or raise max_agents"
            )
        wait = backoff.remaining(self._clock())
        if wait > 0:
            raise AgentNotReady(
                f"agent {self.agent.key} failed to start ({backoff.last_error_line()}); "
                f"retrying in {wait:.1f} s. The gateway log has the traceback."
            )
        return None

    def cancel(self, lease: Lease) -> None:
        """Give back a reservation whose session never reached ``bot()``."""
        instance = lease.instance
        if instance.leases.get(lease.session_id) is lease and not lease.started:
            instance.leases.pop(lease.session_id)
            lease.ended.cancel()
            if not instance.leases:
                instance.idle_since = self._clock()

    def session_started(self, instance: Instance, session_id: str) -> None:
        """The runtime runs ``bot()`` for ``session_id``: its slot is held until it ends."""
        lease = instance.leases.get(session_id)
        if lease is None:  # reserved elsewhere (a gateway, through Redis)
            lease = instance.leases[session_id] = Lease(session_id, instance)
        lease.started = True
        if self.observer:
            self.observer.session_started(instance, session_id)

    def session_ended(self, instance: Instance, session_id: str, end: SessionEnd) -> None:
        """``bot()`` has ended (or its instance died): the slot is free again."""
        lease = instance.leases.get(session_id)
        instance.release(session_id, end, now=self._clock())
        if self.observer and lease is not None and lease.started:
            self.observer.session_ended(instance, session_id, end)

    def add(self, instance: Instance) -> None:
        self.instances[instance.instance_id] = instance

    def remove(self, instance: Instance, *, error: str | None) -> None:
        """A dead instance stops counting; every session still on it ends as crashed."""
        self.instances.pop(instance.instance_id, None)
        for session_id in list(instance.leases):
            self.session_ended(
                instance, session_id, SessionEnd(status="agent_crashed", error=error)
            )

    def readiness(self, backoff: StartBackoff) -> AgentReadiness:
        """Whether a session would be placed now (see :meth:`place`), without placing one."""
        live = self.live()
        waiting = backoff.remaining(self._clock())
        return AgentReadiness(
            open_instances=sum(i.state is InstanceState.READY and i.free_slots > 0 for i in live),
            instances=self.state_counts(),
            can_start=len(live) < self.max_agents and waiting <= 0,
            problem=backoff.last_error_line() if waiting > 0 else None,
        )

    def state_counts(self) -> dict[str, int]:
        """How many live instances are in each of :data:`INSTANCE_METRIC_STATES`."""
        counts = dict.fromkeys(INSTANCE_METRIC_STATES, 0)
        for instance in self.live():
            if instance.state is InstanceState.STARTING:
                state = "starting"
            elif instance.state is InstanceState.STOPPING:
                state = "draining"
            else:
                state = "busy" if instance.leases else "idle"
            counts[state] += 1
        return counts
