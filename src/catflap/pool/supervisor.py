"""Supervision of one agent's runtime processes: launch, follow, ping, back off, reap, stop.

Theory of operation, per agent:

- At start, ``min_agents`` instances are launched and kept warm (:meth:`Supervisor.replenish`
  after every death).
- Each instance has one task (:meth:`Supervisor._run`) that launches the process, reads its
  control channel with :meth:`~catflap.contract.control.ControlChannel.receive_event` until end
  of file, and then waits for the process to exit. A malformed event is a logged protocol
  error and is skipped; it never ends the instance.
- Beside it, two watchers: one kills an instance not ready within ``ready_timeout``; one pings
  and kills an instance that has answered no ping for ``ping_timeout`` (a hung runtime).
- An instance that dies while starting counts as a failed start: the next launch waits out
  :class:`~catflap.pool.backoff.StartBackoff`. One that dies while ready is a crash: its
  sessions end as ``agent_crashed`` and it is replaced up to ``min_agents``.
- Idle instances above ``min_agents`` are stopped after ``idle_timeout`` seconds.

Every wait goes through the injected :data:`~catflap.pool.clock.Sleep` and every reading of
time through the injected :data:`~catflap.pool.clock.Clock`, so tests drive time by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from catflap.config import AgentSpec
from catflap.contract import limits
from catflap.contract.control import (
    BOT_IGNORED_CANCELLATION,
    ControlChannel,
    ControlProtocolError,
)
from catflap.contract.errors import AgentNotReady
from catflap.pool.backoff import StartBackoff
from catflap.pool.clock import Clock, Sleep, done_within
from catflap.pool.instance import Instance, InstanceState, SessionEnd
from catflap.pool.launcher import LaunchedProcess, Launcher
from catflap.pool.observer import PoolObserver
from catflap.pool.slots import AgentSlots
from catflap.tasks import TaskSet

__all__ = ["STOP_GRACE_S", "Exit", "Supervisor", "Timing", "idle_surplus"]

log = logging.getLogger("catflap.pool")

#: How long a stopping instance may take to exit before it is killed.
STOP_GRACE_S = 5.0


@dataclass(frozen=True, slots=True)
class Timing:
    """How long the supervisor waits for each thing (seconds)."""

    #: From launch to the runtime's ``ready``; past it the instance is killed.
    ready_timeout: float
    #: Between two pings.
    ping_interval: float = limits.AGENT_PING_INTERVAL_S
    #: Silence after which a ready runtime counts as hung and is killed.
    ping_timeout: float = limits.AGENT_PING_TIMEOUT_S
    #: From ``shutdown`` (or end of file) to the exit, before a kill.
    stop_grace: float = STOP_GRACE_S


@dataclass(frozen=True, slots=True)
class Exit:
    """How an instance's process ended."""

    #: What the runtime reported in ``start_failed``, or why it could not be launched.
    error: str | None
    #: Its exit code, when this process can know it.
    returncode: int | None


def idle_surplus(
    live: Iterable[Instance], *, keep: int, idle_timeout: float, now: float
) -> list[Instance]:
    """The instances to stop: ready, without sessions for ``idle_timeout``, above ``keep``.

    The longest idle go first, and never so many that fewer than ``keep`` remain.
    """
    instances = sorted(live, key=lambda i: i.idle_since)
    surplus = len(instances) - keep
    chosen: list[Instance] = []
    for instance in instances:
        if surplus <= 0:
            break
        idle = instance.state is InstanceState.READY and not instance.leases
        if idle and now - instance.idle_since >= idle_timeout:
            chosen.append(instance)
            surplus -= 1
    return chosen


class Supervisor:
    """Launches, watches, replaces and stops the instances of one agent."""

    def __init__(
        self,
        agent: AgentSpec,
        launcher: Launcher,
        slots: AgentSlots,
        *,
        timing: Timing,
        warm: Callable[[], int],
        clock: Clock,
        sleep: Sleep,
        observer: PoolObserver | None = None,
    ) -> None:
        """Args:
        agent: The agent whose instances these are.
        launcher: Starts one runtime process.
        slots: Where instances are counted and the runtime's session reports go.
        timing: The timeouts and intervals.
        warm: How many instances to keep running (``min_agents``, or an agent host's figure).
        clock: Monotonic seconds.
        sleep: Waits (``asyncio.sleep`` in production).
        observer: Told when an instance becomes ready and when it is gone.
        """
        self.agent = agent
        self.observer = observer
        self.backoff = StartBackoff()
        self._launcher = launcher
        self._slots = slots
        self._timing = timing
        self._warm = warm
        self._clock = clock
        self._sleep = sleep
        self._ids = itertools.count(1)
        self._tasks = TaskSet(f"pool {agent.key}")
        self._closing = False
        self._respawn: asyncio.Task[None] | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._tasks.spawn(self._prepare_then_replenish(), name=f"{self.agent.key} prepare")
        self._tasks.spawn(self._reap_forever(), name=f"{self.agent.key} reaper")

    async def close(self) -> None:
        """Stop every instance (each within the stop grace), then every task."""
        self._closing = True
        if self._respawn is not None:
            self._respawn.cancel()
        live = self._slots.live()
        await asyncio.gather(*(self.stop(i) for i in live), return_exceptions=True)
        await self._tasks.aclose()

    async def _prepare_then_replenish(self) -> None:
        try:
            await self._launcher.prepare(self.agent)
        except Exception:
            log.exception(
                "! %s: could not prepare fast starts; starting the slow way", self.agent.key
            )
        self.replenish()

    # --- starting ----------------------------------------------------------------------------

    def spawn(self) -> Instance:
        """Launch one more instance now (the caller checked ``max_agents`` and the backoff)."""
        instance = Instance(
            instance_id=next(self._ids),
            agent_key=self.agent.key,
            capacity=self.agent.config.scaling.sessions_per_instance,
            started_at=self._clock(),
        )
        # Nobody may be waiting when a start fails; retrieve the exception so asyncio stays quiet.
        instance.ready.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._slots.add(instance)
        self._tasks.spawn(
            self._run(instance), name=f"{self.agent.key} instance {instance.instance_id}"
        )
        return instance

    def spawn_one(self) -> None:
        """Launch one more instance if under ``max_agents`` and not backing off."""
        in_backoff = self.backoff.remaining(self._clock()) > 0
        room = len(self._slots.live()) < self._slots.max_agents
        if not self._closing and not in_backoff and room:
            self.spawn()

    def replenish(self) -> None:
        """Launch instances up to the warm count, once the start-failure backoff allows."""
        if self._closing:
            return
        missing = self._warm() - len(self._slots.live())
        if missing <= 0:
            return
        delay = self.backoff.remaining(self._clock())
        if delay > 0:
            if self._respawn is None:
                self._respawn = self._tasks.spawn(
                    self._replenish_after(delay), name=f"{self.agent.key} backoff"
                )
            return
        for _ in range(missing):
            self.spawn()

    async def _replenish_after(self, delay: float) -> None:
        await self._sleep(delay)
        self._respawn = None
        self.replenish()

    # --- one instance's life ------------------------------------------------------------------

    async def _run(self, instance: Instance) -> None:
        self._died(instance, await self._supervise(instance))

    async def _supervise(self, instance: Instance) -> Exit:
        """Launch the instance and follow it until its process is gone; how it ended."""
        try:
            process = await self._launcher.launch(self.agent, instance.instance_id)
        except Exception as exc:
            log.exception("! %s: could not launch an instance", self.agent.key)
            return Exit(error=f"{type(exc).__name__}: {exc}", returncode=None)
        instance.process = process
        key = f"{self.agent.key} instance {instance.instance_id}"
        watchers = [
            self._tasks.spawn(self._expire_start(instance), name=f"{key} ready timeout"),
            self._tasks.spawn(self._watch_liveness(instance, process), name=f"{key} pings"),
        ]
        try:
            try:
                error = await self._follow(instance, process)
            finally:
                for watcher in watchers:
                    watcher.cancel()
            returncode = await self._exit_code(process, wait_after_kill=True)
        finally:  # the pool closing cancels this task: the socket must not leak then either
            await process.channel.aclose()
        return Exit(error=error, returncode=returncode)

    async def _follow(self, instance: Instance, process: LaunchedProcess) -> str | None:
        """Act on the runtime's events until end of file; the ``start_failed`` error, if any."""
        error: str | None = None
        try:
            while True:
                try:
                    event = await process.channel.receive_event()
                except ControlProtocolError as exc:
                    log.error(
                        "! %s instance %d (pid %s): protocol error, event skipped: %s",
                        self.agent.key,
                        instance.instance_id,
                        instance.pid,
                        exc,
                    )
                    if exc.kind == "session_ended":
                        # A session's end we cannot read: whether its bot still runs is
                        # unknown, so the slot cannot be reused. Replace the instance; its
                        # sessions end as agent_crashed and their slots come back now, not at
                        # the recorder's deadline.
                        self.kill(instance, "its report of a session's end was malformed")
                    continue
                if event is None:
                    return error
                if event["event"] == "ready":
                    self._became_ready(instance, event["address"])
                elif event["event"] == "start_failed":
                    error = event["error"]
                elif event["event"] == "session_started":
                    self._slots.session_started(instance, event["session_id"])
                elif event["event"] == "pong":
                    instance.last_pong = self._clock()
                elif event["event"] == "session_ended":
                    if event["error"] == BOT_IGNORED_CANCELLATION:
                        self.kill(instance, "a bot ignored cancellation")
                    end = SessionEnd(
                        status=event["status"],
                        error=event["error"],
                        client_disconnected=event["client_disconnected"],
                        bot_seconds=event["bot_seconds"],
                        resources=event.get("resources"),
                    )
                    self._slots.session_ended(instance, event["session_id"], end)
        except Exception:
            log.exception(
                "! %s instance %d: control channel failed", self.agent.key, instance.instance_id
            )
            process.kill()
        return error

    def _became_ready(self, instance: Instance, address: str) -> None:
        instance.address = address
        instance.idle_since = self._clock()
        if instance.state is InstanceState.STARTING:
            instance.set_state(InstanceState.READY)
        self.backoff.succeeded()
        if not instance.ready.done():
            instance.ready.set_result(None)
        if self.observer:
            self.observer.instance_ready(instance)

    async def _expire_start(self, instance: Instance) -> None:
        await self._sleep(self._timing.ready_timeout)
        if instance.state is InstanceState.STARTING and instance.process is not None:
            log.warning(
                "! %s instance %d not ready after %g s; killing it",
                self.agent.key,
                instance.instance_id,
                self._timing.ready_timeout,
            )
            instance.process.kill()

    async def _watch_liveness(self, instance: Instance, process: LaunchedProcess) -> None:
        """A runtime that stops answering pings is hung: kill it, so that it is replaced."""
        silent = await self._ping_until_silent(instance, process.channel)
        if silent is not None:
            log.error(
                "! %s instance %d (pid %s) answered no ping for %.0f s; killing it",
                self.agent.key,
                instance.instance_id,
                instance.pid,
                silent,
            )
            process.kill()

    async def _ping_until_silent(self, instance: Instance, channel: ControlChannel) -> float | None:
        """Ping every interval; the silence once it passes ``ping_timeout`` (``None``: the
        channel closed first)."""
        instance.last_pong = self._clock()
        seq = 0
        while True:
            await self._sleep(self._timing.ping_interval)
            if instance.state is InstanceState.STARTING:
                instance.last_pong = self._clock()  # importing bot.py is not hanging
                continue
            silent = self._clock() - instance.last_pong
            if silent > self._timing.ping_timeout:
                return silent
            seq += 1
            try:
                await channel.send({"command": "ping", "seq": seq})
            except (ConnectionError, RuntimeError):
                return None

    async def _exit_code(self, process: LaunchedProcess, *, wait_after_kill: bool) -> int | None:
        """Give the process the stop grace to exit, then kill it; its exit code if waited for."""
        waiter = asyncio.ensure_future(process.wait())
        try:
            if not await done_within(waiter, self._timing.stop_grace, self._sleep):
                process.kill()
                if not wait_after_kill:
                    return None
            return await waiter
        finally:
            waiter.cancel()

    def _died(self, instance: Instance, exit: Exit) -> None:
        was = instance.state
        instance.set_state(InstanceState.DEAD)
        if was is InstanceState.STARTING:
            self._start_failed(instance, exit)
        elif was is InstanceState.READY:
            log.warning(
                "! %s instance %d (pid %s) died with code %s; replacing it",
                self.agent.key,
                instance.instance_id,
                instance.pid,
                exit.returncode,
            )
        self._slots.remove(instance, error=exit.error)
        if self.observer and was is not InstanceState.STARTING:
            self.observer.instance_gone(instance)
        self.replenish()

    def _start_failed(self, instance: Instance, exit: Exit) -> None:
        if self._closing:
            return
        text = exit.error or f"the runtime exited with code {exit.returncode} before it was ready"
        failure = self.backoff.failed(text, now=self._clock())
        if failure.repeated:
            log.error(
                "! %s still failing to start (%d times); next try in %.1f s",
                self.agent.key,
                failure.failures,
                failure.delay,
            )
        else:
            log.error("! %s failed to start:\n%s", self.agent.key, text.rstrip())
        if not instance.ready.done():
            instance.ready.set_exception(
                AgentNotReady(
                    f"agent {self.agent.key} failed to start ({self.backoff.last_error_line()}). "
                    "The gateway log has the traceback."
                )
            )

    # --- stopping ----------------------------------------------------------------------------

    def kill(self, instance: Instance, problem: str) -> None:
        """Kill an instance a bot may still run in; its death then ends its sessions."""
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

    def stop_soon(self, instance: Instance) -> None:
        """Stop one instance gracefully, in the background."""
        self._tasks.spawn(self.stop(instance), name=f"{self.agent.key} stop {instance.instance_id}")

    async def stop(self, instance: Instance) -> None:
        """Ask the runtime to shut down (sessions on it run to their end); kill it after the
        stop grace."""
        if instance.state is InstanceState.DEAD or instance.process is None:
            return
        if instance.state is not InstanceState.STOPPING:
            instance.set_state(InstanceState.STOPPING)
        process = instance.process
        with contextlib.suppress(ConnectionError, RuntimeError):
            await process.channel.send({"command": "shutdown"})
        await self._exit_code(process, wait_after_kill=False)

    async def _reap_forever(self) -> None:
        interval = min(1.0, self.agent.config.scaling.idle_timeout / 2)
        while True:
            await self._sleep(interval)
            self.reap_once()

    def reap_once(self) -> None:
        """Stop the idle instances above the warm count."""
        now = self._clock()
        idle_timeout = self.agent.config.scaling.idle_timeout
        for instance in idle_surplus(
            self._slots.live(), keep=self._warm(), idle_timeout=idle_timeout, now=now
        ):
            log.info(
                "x %s instance %d idle for %.0f s; stopping it",
                self.agent.key,
                instance.instance_id,
                now - instance.idle_since,
            )
            self.stop_soon(instance)
