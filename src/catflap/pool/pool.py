"""The pools on this machine: one agent's instances (:class:`AgentPool`), and all of them.

:class:`LocalPool` implements :class:`~catflap.pool.interface.SessionPool`, the interface the
gateway uses (the cluster's ``RedisPool`` is the other). An :class:`AgentPool` is one agent's
instances: it composes slot accounting (:mod:`catflap.pool.slots`: reservations, releases, the
429 and 503 decisions) with supervision (:mod:`catflap.pool.supervisor`: launch, ping, backoff,
reap). ``acquire()`` reserves a slot on a ready instance with room; with none, it cold-starts a
new instance while the agent has fewer than ``max_agents``, and waits for it to be ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable

from catflap.config import AgentSpec, ScalingConfig
from catflap.contract import limits
from catflap.contract.errors import AgentNotFound, AgentNotReady
from catflap.pool.clock import Clock, Sleep, done_within
from catflap.pool.instance import Instance, InstanceState, Lease
from catflap.pool.interface import AgentReadiness, SessionLease, SessionPlace
from catflap.pool.launcher import Launcher
from catflap.pool.observer import PoolObserver
from catflap.pool.slots import AgentSlots
from catflap.pool.supervisor import Supervisor, Timing

__all__ = ["AgentPool", "LocalPool"]


class AgentPool:
    """The instances of one agent: slot accounting and supervision, composed."""

    def __init__(
        self,
        agent: AgentSpec,
        launcher: Launcher,
        *,
        ready_timeout: float,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        ping_interval: float = limits.AGENT_PING_INTERVAL_S,
        ping_timeout: float = limits.AGENT_PING_TIMEOUT_S,
        observer: PoolObserver | None = None,
        warm: Callable[[], int] | None = None,
    ) -> None:
        """``warm``: how many instances to keep running; default ``min_agents`` (an agent host
        passes its own figure, which follows its busy instances)."""
        self.agent = agent
        #: Set by an agent host when the cluster refused an instance (cluster max_agents).
        self._ready_timeout = ready_timeout
        self._sleep = sleep
        self.slots = AgentSlots(agent, clock=clock, observer=observer)
        self.supervisor = Supervisor(
            agent,
            launcher,
            self.slots,
            timing=Timing(
                ready_timeout=ready_timeout, ping_interval=ping_interval, ping_timeout=ping_timeout
            ),
            warm=warm or (lambda: self.min_agents),
            clock=clock,
            sleep=sleep,
            observer=observer,
        )

    # --- counts ------------------------------------------------------------------------------

    @property
    def scaling(self) -> ScalingConfig:
        return self.agent.config.scaling

    @property
    def min_agents(self) -> int:
        """Instances kept warm."""
        return self.scaling.min_agents

    @property
    def instances(self) -> dict[int, Instance]:
        return self.slots.instances

    def live(self) -> list[Instance]:
        return self.slots.live()

    def at_capacity(self) -> bool:
        return self.slots.at_capacity()

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self.supervisor.start()

    async def close(self) -> None:
        await self.supervisor.close()

    # --- sessions ----------------------------------------------------------------------------

    async def acquire(self, session_id: str, *, avoid: frozenset[str] = frozenset()) -> Lease:
        """Reserve a slot for ``session_id``, cold-starting an instance if needed.

        Raises:
            AtCapacity: 429, every instance is full and there are ``max_agents`` of them.
            AgentNotReady: 503, the agent cannot start (backoff) or did not become ready in
                time.
        """
        instance = self.slots.place(self.supervisor.backoff, avoid=avoid)
        if instance is None:
            instance = self.supervisor.spawn()
        lease = instance.reserve(session_id)
        if instance.state is InstanceState.READY:
            return lease
        lease.cold_start = True
        try:
            if not await done_within(instance.ready, self._ready_timeout, self._sleep):
                raise AgentNotReady(
                    f"agent {self.agent.key} did not become ready within {self._ready_timeout:g} s"
                )
            instance.ready.result()  # AgentNotReady when the start failed
        except BaseException:
            self.slots.cancel(lease)
            raise
        return lease

    def cancel(self, lease: Lease) -> None:
        """Give back a reservation whose session never reached ``bot()``."""
        self.slots.cancel(lease)

    def abandon(self, lease: Lease, problem: str) -> None:
        """See :meth:`SessionPool.abandon`: the instance is killed and replaced; its crash
        handling then ends every session on it (this one's end is already recorded)."""
        self.supervisor.kill(lease.instance, problem)

    def spawn_one(self) -> None:
        """Start one more instance if the agent is under ``max_agents`` (agent hosts grow)."""
        self.supervisor.spawn_one()

    def stop_instance(self, instance: Instance) -> None:
        """Stop one instance gracefully (sessions on it run to their end)."""
        self.supervisor.stop_soon(instance)

    async def stop_session(self, session_id: str) -> bool:
        for instance in self.live():
            if session_id in instance.leases and instance.process is not None:
                with contextlib.suppress(ConnectionError):
                    await instance.process.channel.send(
                        {"command": "stop_session", "session_id": session_id}
                    )
                return True
        return False

    def locate(self, session_id: str) -> SessionPlace | None:
        """Where ``session_id`` holds a slot (see :meth:`SessionPool.locate`)."""
        for instance in self.live():
            lease = instance.leases.get(session_id)
            if lease is not None:
                return SessionPlace(address=instance.address, running=lease.started)
        return None


class LocalPool:
    """All agents' pools in this process: catflap's single-machine mode."""

    def __init__(
        self,
        agents: Iterable[AgentSpec],
        launcher: Launcher,
        *,
        ready_timeout: float,
        ping_interval: float = limits.AGENT_PING_INTERVAL_S,
        ping_timeout: float = limits.AGENT_PING_TIMEOUT_S,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._launcher = launcher
        self.agents = {
            agent.key: AgentPool(
                agent,
                launcher,
                ready_timeout=ready_timeout,
                ping_interval=ping_interval,
                ping_timeout=ping_timeout,
                clock=clock,
                sleep=sleep,
            )
            for agent in agents
        }

    def _pool(self, agent_key: str) -> AgentPool:
        try:
            return self.agents[agent_key]
        except KeyError:
            raise AgentNotFound(f"no agent {agent_key!r}") from None

    def start(self) -> None:
        for pool in self.agents.values():
            pool.start()

    def instance_states(self) -> dict[tuple[str, str], int]:
        """``{(agent, state): count}`` with states starting, idle, busy and draining."""
        return {
            (key, state): count
            for key, pool in self.agents.items()
            for state, count in pool.slots.state_counts().items()
        }

    async def close(self) -> None:
        await asyncio.gather(*(pool.close() for pool in self.agents.values()))
        await self._launcher.close()

    async def at_capacity(self, agent_key: str) -> bool:
        return self._pool(agent_key).at_capacity()

    async def readiness(self, agent_key: str) -> AgentReadiness:
        """Whether the agent would take a session now (``GET .../services/{agent}``)."""
        pool = self._pool(agent_key)
        return pool.slots.readiness(pool.supervisor.backoff)

    async def acquire(
        self, agent_key: str, session_id: str, *, avoid: frozenset[str] = frozenset()
    ) -> Lease:
        return await self._pool(agent_key).acquire(session_id, avoid=avoid)

    def cancel(self, lease: SessionLease) -> None:
        assert isinstance(lease, Lease)
        self._pool(lease.instance.agent_key).cancel(lease)

    def abandon(self, lease: SessionLease, problem: str) -> None:
        assert isinstance(lease, Lease)
        self._pool(lease.instance.agent_key).abandon(lease, problem)

    async def stop_session(self, session_id: str) -> bool:
        for pool in self.agents.values():
            if await pool.stop_session(session_id):
                return True
        return False

    async def locate(self, agent_key: str, session_id: str) -> SessionPlace | None:
        pool = self.agents.get(agent_key)
        return pool.locate(session_id) if pool is not None else None
