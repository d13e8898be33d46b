"""The warm pool: keeps each agent's instances running and hands out slots to sessions.

Theory of operation, per agent:

- At start, ``min_agents`` instances are spawned and kept warm.
- ``acquire()`` reserves a slot on a ready instance with room. With none, it cold-starts a new
  instance while the agent has fewer than ``max_agents``; past that it refuses with 429. The
  reservation is made before any await, so two handshakes can never take the same slot.
- A slot comes back only when the runtime reports that ``bot()`` has ended (or the process
  died): an instance is never reused while a bot may still be running in it.
- A crashed instance fails its sessions with ``agent_crashed`` and is replaced up to
  ``min_agents``. An instance that fails to start (say, an import error in bot.py) is retried
  with exponential backoff, and the traceback is logged once, not in a loop.
- Idle instances above ``min_agents`` are stopped after ``idle_timeout`` seconds.

:class:`SessionPool` is the small interface the gateway uses, so that a Redis-backed pool for
many gateways can stand in for :class:`LocalPool`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from catflap.config import AgentSpec
from catflap.contract import limits
from catflap.contract.control import BOT_IGNORED_CANCELLATION
from catflap.contract.errors import AgentNotFound, AgentNotReady, AtCapacity
from catflap.pool.instance import Instance, InstanceState, Lease, SessionEnd
from catflap.pool.launcher import Launcher

__all__ = ["AgentPool", "LocalPool", "PoolObserver", "SessionLease", "SessionPool"]

log = logging.getLogger("catflap.pool")

#: Backoff between failed starts: 0.5 s, 1 s, 2 s, ... capped at one minute.
_BACKOFF_FIRST_S = 0.5
_BACKOFF_MAX_S = 60.0
#: How long a stopping instance may take to exit before it is killed.
_STOP_GRACE_S = 5.0


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


class PoolObserver(Protocol):
    """Told about instance and session changes (an agent host mirrors them into Redis)."""

    def instance_ready(self, instance: Instance) -> None: ...

    def instance_gone(self, instance: Instance) -> None: ...

    def session_started(self, instance: Instance, session_id: str) -> None: ...

    def session_ended(self, instance: Instance, session_id: str, end: SessionEnd) -> None: ...


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


class AgentPool:
    """The instances of one agent."""

    def __init__(
        self,
        agent: AgentSpec,
        launcher: Launcher,
        *,
        ready_timeout: float,
        clock: Callable[[], float] = time.monotonic,
        ping_interval: float = limits.AGENT_PING_INTERVAL_S,
        ping_timeout: float = limits.AGENT_PING_TIMEOUT_S,
        observer: PoolObserver | None = None,
    ) -> None:
        self.agent = agent
        self.observer = observer
        #: Set by an agent host when the cluster refused an instance (cluster max_agents).
        self.min_override: int | None = None
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._launcher = launcher
        self._ready_timeout = ready_timeout
        self._clock = clock
        self._ids = itertools.count(1)
        self.instances: dict[int, Instance] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._failures = 0
        self._retry_at = 0.0
        self._last_error: str | None = None
        self._respawn_handle: asyncio.TimerHandle | None = None

    # --- counts ------------------------------------------------------------------------------

    @property
    def scaling(self) -> Any:
        return self.agent.config.scaling

    @property
    def min_agents(self) -> int:
        """Instances kept warm: ``min_agents``, unless an agent host lowered it."""
        return self.scaling.min_agents if self.min_override is None else self.min_override

    def live(self) -> list[Instance]:
        return [i for i in self.instances.values() if i.state is not InstanceState.DEAD]

    def counting(self) -> list[Instance]:
        """Instances that count against ``max_agents``: all but the dead."""
        return self.live()

    def at_capacity(self) -> bool:
        has_room = any(i.free_slots > 0 for i in self.live())
        return not has_room and len(self.counting()) >= self.scaling.max_agents

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._spawn_task(self._prepare_then_replenish())
        self._spawn_task(self._reap_forever())

    async def _prepare_then_replenish(self) -> None:
        try:
            await self._launcher.prepare(self.agent)
        except Exception:
            log.exception(
                "! %s: could not prepare fast starts; starting the slow way", self.agent.key
            )
        self._replenish()

    async def close(self) -> None:
        self._closing = True
        if self._respawn_handle:
            self._respawn_handle.cancel()
        await asyncio.gather(*(self._stop(i) for i in self.live()), return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- sessions ----------------------------------------------------------------------------

    async def acquire(self, session_id: str, *, avoid: frozenset[str] = frozenset()) -> Lease:
        """Reserve a slot for ``session_id``, cold-starting an instance if needed.

        Raises:
            AtCapacity: 429, every instance is full and there are ``max_agents`` of them.
            AgentNotReady: 503, the agent cannot start (backoff) or did not become ready in
                time.
        """
        instance = self._pick(avoid)
        if instance is None:
            if len(self.counting()) >= self.scaling.max_agents:
                raise AtCapacity(
                    f"agent {self.agent.key} is at max_agents={self.scaling.max_agents} and "
                    "every instance is busy; retry shortly or raise max_agents"
                )
            self._check_backoff()
            instance = self._spawn()
        lease = instance.reserve(session_id)
        if instance.state is InstanceState.READY:
            return lease
        lease.cold_start = True
        try:
            await asyncio.wait_for(asyncio.shield(instance.ready), self._ready_timeout)
        except TimeoutError:
            self.cancel(lease)
            raise AgentNotReady(
                f"agent {self.agent.key} did not become ready within {self._ready_timeout:g} s"
            ) from None
        except AgentNotReady:
            self.cancel(lease)
            raise
        except BaseException:
            self.cancel(lease)
            raise
        return lease

    def cancel(self, lease: Lease) -> None:
        """Give back a reservation whose session never reached ``bot()``."""
        instance = lease.instance
        if instance.leases.get(lease.session_id) is lease and not lease.started:
            instance.leases.pop(lease.session_id)
            lease.ended.cancel()
            if not instance.leases:
                instance.idle_since = self._clock()

    def abandon(self, lease: Lease, problem: str) -> None:
        """See :meth:`SessionPool.abandon`: the instance is killed and replaced; its crash
        handling then ends every session on it (this one's end is already recorded)."""
        instance = lease.instance
        log.error(
            "! %s instance %d (pid %s): %s; replacing the process",
            self.agent.key,
            instance.instance_id,
            instance.pid,
            problem,
        )
        if instance.state is InstanceState.READY:
            instance.set_state(InstanceState.STOPPING)
        if instance.process is not None:
            instance.process.kill()

    def spawn_one(self) -> None:
        """Start one more instance if the agent is under ``max_agents`` (agent hosts grow)."""
        in_backoff = self._failures and self._retry_at > self._clock()
        if not self._closing and not in_backoff and len(self.counting()) < self.scaling.max_agents:
            self._spawn()

    def stop_instance(self, instance: Instance) -> None:
        """Stop one instance gracefully (sessions on it run to their end)."""
        self._spawn_task(self._stop(instance))

    async def stop_session(self, session_id: str) -> bool:
        for instance in self.live():
            if session_id in instance.leases and instance.process is not None:
                with contextlib.suppress(ConnectionError):
                    await instance.process.channel.send(
                        {"command": "stop_session", "session_id": session_id}
                    )
                return True
        return False

    # --- internals ---------------------------------------------------------------------------

    def _pick(self, avoid: frozenset[str] = frozenset()) -> Instance | None:
        ready = [i for i in self.live() if i.free_slots > 0 and str(i.instance_id) not in avoid]
        # Ready before starting; among ready ones the fullest, so idle ones can be reaped.
        ready.sort(key=lambda i: (i.state is not InstanceState.READY, -len(i.leases)))
        return ready[0] if ready else None

    def _check_backoff(self) -> None:
        wait = self._retry_at - self._clock()
        if self._failures and wait > 0:
            raise AgentNotReady(
                f"agent {self.agent.key} failed to start ({self._last_error_line()}); "
                f"retrying in {wait:.1f} s. The gateway log has the traceback."
            )

    def _last_error_line(self) -> str:
        lines = (self._last_error or "exited before it was ready").strip().splitlines()
        return lines[-1] if lines else "exited before it was ready"

    def _spawn_task(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _spawn(self) -> Instance:
        instance = Instance(
            instance_id=next(self._ids),
            agent_key=self.agent.key,
            capacity=self.scaling.sessions_per_instance,
            started_at=self._clock(),
        )
        # Nobody may be waiting when a start fails; retrieve the exception so asyncio stays quiet.
        instance.ready.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.instances[instance.instance_id] = instance
        self._spawn_task(self._run(instance))
        return instance

    def _replenish(self) -> None:
        """Spawn instances up to ``min_agents``, respecting the start-failure backoff."""
        if self._closing:
            return
        missing = self.min_agents - len(self.live())
        if missing <= 0:
            return
        delay = self._retry_at - self._clock() if self._failures else 0.0
        if delay > 0:
            if self._respawn_handle is None:
                loop = asyncio.get_running_loop()
                self._respawn_handle = loop.call_later(delay, self._respawn_after_backoff)
            return
        for _ in range(missing):
            self._spawn()

    def _respawn_after_backoff(self) -> None:
        self._respawn_handle = None
        self._replenish()

    async def _run(self, instance: Instance) -> None:
        """Launch one instance and follow its control channel until the process is gone."""
        error: str | None = None
        try:
            process = await self._launcher.launch(self.agent, instance.instance_id)
        except Exception as exc:
            log.exception("! %s: could not launch an instance", self.agent.key)
            error = f"{type(exc).__name__}: {exc}"
            self._on_death(instance, error=error, returncode=None)
            return
        instance.process = process
        timer = asyncio.get_running_loop().call_later(
            self._ready_timeout, self._ready_timed_out, instance
        )
        pinger = self._spawn_task(self._ping_forever(instance))
        try:
            while (msg := await process.channel.receive()) is not None:
                event = msg.get("event")
                if event == "ready":
                    timer.cancel()
                    self._on_ready(instance, str(msg["address"]))
                elif event == "start_failed":
                    error = str(msg.get("error") or "")
                elif event == "session_started":
                    session_id = str(msg["session_id"])
                    lease = instance.leases.get(session_id)
                    if lease is None:  # reserved elsewhere (a gateway, through Redis)
                        lease = instance.leases[session_id] = Lease(session_id, instance)
                    lease.started = True
                    if self.observer:
                        self.observer.session_started(instance, session_id)
                elif event == "pong":
                    instance.last_pong = self._clock()
                elif event == "session_ended":
                    if msg.get("error") == BOT_IGNORED_CANCELLATION:
                        self._kill_stuck(instance)
                    end = SessionEnd(
                        status=msg["status"],
                        error=msg.get("error"),
                        client_disconnected=bool(msg.get("client_disconnected")),
                        bot_seconds=msg.get("bot_seconds"),
                    )
                    self._release(instance, str(msg["session_id"]), end)
        except Exception:
            log.exception(
                "! %s instance %d: control channel failed", self.agent.key, instance.instance_id
            )
            process.kill()
        finally:
            timer.cancel()
            pinger.cancel()
        try:
            returncode = await asyncio.wait_for(process.wait(), _STOP_GRACE_S)
        except TimeoutError:
            process.kill()
            returncode = await process.wait()
        await process.channel.aclose()
        self._on_death(instance, error=error, returncode=returncode)

    async def _ping_forever(self, instance: Instance) -> None:
        """Liveness: a runtime that stops answering pings is hung; kill it to replace it."""
        assert instance.process is not None
        channel = instance.process.channel
        instance.last_pong = self._clock()
        for seq in itertools.count(1):
            await asyncio.sleep(self._ping_interval)
            if instance.state is InstanceState.STARTING:
                instance.last_pong = self._clock()  # importing bot.py is not hanging
                continue
            silent = self._clock() - instance.last_pong
            if silent > self._ping_timeout:
                log.error(
                    "! %s instance %d (pid %s) answered no ping for %.0f s; killing it",
                    self.agent.key,
                    instance.instance_id,
                    instance.pid,
                    silent,
                )
                instance.process.kill()
                return
            try:
                await channel.send({"command": "ping", "seq": seq})
            except (ConnectionError, RuntimeError):
                return

    def _kill_stuck(self, instance: Instance) -> None:
        log.error(
            "! %s instance %d (pid %s): a bot ignored cancellation; replacing the process",
            self.agent.key,
            instance.instance_id,
            instance.pid,
        )
        if instance.state is InstanceState.READY:
            instance.set_state(InstanceState.STOPPING)
        if instance.process is not None:
            instance.process.kill()

    def _ready_timed_out(self, instance: Instance) -> None:
        if instance.state is InstanceState.STARTING and instance.process is not None:
            log.warning(
                "! %s instance %d not ready after %g s; killing it",
                self.agent.key,
                instance.instance_id,
                self._ready_timeout,
            )
            instance.process.kill()

    def _on_ready(self, instance: Instance, address: str) -> None:
        instance.address = address
        instance.idle_since = self._clock()
        if instance.state is InstanceState.STARTING:
            instance.set_state(InstanceState.READY)
        self._failures = 0
        self._last_error = None
        if not instance.ready.done():
            instance.ready.set_result(None)
        if self.observer:
            self.observer.instance_ready(instance)

    def _on_death(self, instance: Instance, *, error: str | None, returncode: int | None) -> None:
        was = instance.state
        instance.set_state(InstanceState.DEAD)
        self.instances.pop(instance.instance_id, None)
        if was is InstanceState.STARTING:
            self._on_start_failure(instance, error, returncode)
        elif was is InstanceState.READY:
            log.warning(
                "! %s instance %d (pid %s) died with code %s; replacing it",
                self.agent.key,
                instance.instance_id,
                instance.pid,
                returncode,
            )
        for session_id in list(instance.leases):
            self._release(instance, session_id, SessionEnd(status="agent_crashed", error=error))
        if self.observer and was is not InstanceState.STARTING:
            self.observer.instance_gone(instance)
        self._replenish()

    def _release(self, instance: Instance, session_id: str, end: SessionEnd) -> None:
        lease = instance.leases.get(session_id)
        instance.release(session_id, end, now=self._clock())
        if self.observer and lease is not None and lease.started:
            self.observer.session_ended(instance, session_id, end)

    def _on_start_failure(self, instance: Instance, error: str | None, code: int | None) -> None:
        if self._closing:
            return
        self._failures += 1
        delay = min(_BACKOFF_MAX_S, _BACKOFF_FIRST_S * 2 ** (self._failures - 1))
        self._retry_at = self._clock() + delay
        text = error or f"the runtime exited with code {code} before it was ready"
        if text != self._last_error:
            log.error("! %s failed to start:\n%s", self.agent.key, text.rstrip())
        else:
            log.error(
                "! %s still failing to start (%d times); next try in %.1f s",
                self.agent.key,
                self._failures,
                delay,
            )
        self._last_error = text
        if not instance.ready.done():
            instance.ready.set_exception(
                AgentNotReady(
                    f"agent {self.agent.key} failed to start ({self._last_error_line()}). "
                    "The gateway log has the traceback."
                )
            )

    async def _stop(self, instance: Instance) -> None:
        if instance.state is InstanceState.DEAD or instance.process is None:
            return
        if instance.state is not InstanceState.STOPPING:
            instance.set_state(InstanceState.STOPPING)
        process = instance.process
        with contextlib.suppress(ConnectionError, RuntimeError):
            await process.channel.send({"command": "shutdown"})
        try:
            await asyncio.wait_for(asyncio.shield(process.wait()), _STOP_GRACE_S)
        except TimeoutError:
            process.kill()

    async def _reap_forever(self) -> None:
        interval = min(1.0, self.scaling.idle_timeout / 2)
        while True:
            await asyncio.sleep(interval)
            self._reap_once()

    def _reap_once(self) -> None:
        now = self._clock()
        surplus = len(self.live()) - self.min_agents
        for instance in sorted(self.live(), key=lambda i: i.idle_since):
            if surplus <= 0:
                break
            idle = instance.state is InstanceState.READY and not instance.leases
            if idle and now - instance.idle_since >= self.scaling.idle_timeout:
                log.info(
                    "x %s instance %d idle for %.0f s; stopping it",
                    self.agent.key,
                    instance.instance_id,
                    now - instance.idle_since,
                )
                surplus -= 1
                self._spawn_task(self._stop(instance))


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
    ) -> None:
        self._launcher = launcher
        self.agents = {
            agent.key: AgentPool(
                agent,
                launcher,
                ready_timeout=ready_timeout,
                ping_interval=ping_interval,
                ping_timeout=ping_timeout,
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
        counts: dict[tuple[str, str], int] = {}
        for key, pool in self.agents.items():
            for state in ("starting", "idle", "busy", "draining"):
                counts[(key, state)] = 0
            for instance in pool.live():
                if instance.state is InstanceState.STARTING:
                    state = "starting"
                elif instance.state is InstanceState.STOPPING:
                    state = "draining"
                else:
                    state = "busy" if instance.leases else "idle"
                counts[(key, state)] += 1
        return counts

    async def close(self) -> None:
        await asyncio.gather(*(pool.close() for pool in self.agents.values()))
        await self._launcher.close()

    async def at_capacity(self, agent_key: str) -> bool:
        return self._pool(agent_key).at_capacity()

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
