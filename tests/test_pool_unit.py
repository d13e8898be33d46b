"""The pool with a fake launcher and hand-driven time: no processes, no waits on the clock.

Each fake runtime is the far end of a ``socketpair`` control channel, so the pool reads real
lines through :class:`~catflap.contract.control.ControlChannel`; time moves only when a test
calls :meth:`FakeTime.advance`.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import signal
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from catflap.config import AgentSpec
from catflap.config.models import AgentConfig, ScalingConfig
from catflap.contract.control import ControlChannel, ParentCommand
from catflap.contract.errors import AgentNotReady, AtCapacity
from catflap.contract.names import parse_service_host
from catflap.pool.backoff import BACKOFF_MAX_S, StartBackoff
from catflap.pool.instance import Instance, InstanceState, SessionEnd
from catflap.pool.launcher import LaunchedProcess
from catflap.pool.pool import AgentPool, LocalPool
from catflap.pool.supervisor import idle_surplus

from .conftest import seconds

AGENT = "echo.my-org"
#: Loop turns a condition may take to come true: bounded, and no wall-clock time.
_TURNS = 2000


async def until(condition: Callable[[], object], what: str = "the condition") -> None:
    """Let the loop run until ``condition()`` holds (bounded by loop turns, not seconds)."""
    for _ in range(_TURNS):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{what} did not happen within {_TURNS} loop turns")


async def settle() -> None:
    """Let everything that is ready to run, run (a control line needs a few turns)."""
    for _ in range(50):
        await asyncio.sleep(0)


class FakeTime:
    """The pool's clock and sleep; time moves only in :meth:`advance`."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + seconds, next(self._order), future))
        await future

    async def advance(self, seconds: float) -> None:
        """Move time on, waking each sleeper at its own deadline, in order."""
        await settle()
        target = self.now + seconds
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, future = heapq.heappop(self._sleepers)
            if future.done():  # its sleeper was cancelled
                continue
            self.now = max(self.now, deadline)
            future.set_result(None)
            await settle()
        self.now = target
        await settle()


class FakeRuntime:
    """One "process": the runtime's end of the control channel, and an exit the test decides."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[int] = []
        self.commands: list[ParentCommand] = []
        self.answers_pings = True
        self.exits_on_shutdown = True
        self._exited: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._reader: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.channel: ControlChannel | None = None

    async def connect(self, sock: socket.socket) -> None:
        reader, self._writer = await asyncio.open_unix_connection(sock=sock)
        self.channel = ControlChannel(reader, self._writer)
        self._reader = asyncio.get_running_loop().create_task(self._obey())

    async def _obey(self) -> None:
        assert self.channel is not None
        with contextlib.suppress(ConnectionError):
            while (command := await self.channel.receive_command()) is not None:
                self.commands.append(command)
                if command["command"] == "ping" and self.answers_pings:
                    await self.channel.send({"event": "pong", "seq": command["seq"]})
                elif command["command"] == "shutdown" and self.exits_on_shutdown:
                    self.exit(0)
                    return

    # --- ProcessRef ---------------------------------------------------------------------------

    async def wait(self) -> int | None:
        return await asyncio.shield(self._exited)

    def signal(self, sig: int) -> None:
        self.signals.append(sig)
        if sig == signal.SIGKILL:
            self.exit(-signal.SIGKILL)

    # --- what the test makes the runtime do ---------------------------------------------------

    @property
    def killed(self) -> bool:
        return signal.SIGKILL in self.signals

    @property
    def exited(self) -> bool:
        return self._exited.done()

    def exit(self, code: int | None) -> None:
        """The process ends: its end of the channel closes, as the kernel would close it."""
        if self._exited.done():
            return
        self._exited.set_result(code)
        if self._writer is not None:
            self._writer.close()
        if self._reader is not None and self._reader is not asyncio.current_task():
            self._reader.cancel()

    async def send(self, event: dict[str, Any]) -> None:
        assert self.channel is not None
        await self.channel.send(event)

    async def send_raw(self, line: bytes) -> None:
        assert self._writer is not None
        self._writer.write(line)
        await self._writer.drain()

    async def ready(self) -> None:
        await self.send({"event": "ready", "address": f"unix:/i{self.pid}", "pid": self.pid})

    async def session_ended(self, session_id: str, *, error: str | None = None) -> None:
        await self.send(
            {
                "event": "session_ended",
                "session_id": session_id,
                "status": "completed" if error is None else "stopped",
                "error": error,
                "client_disconnected": False,
                "bot_seconds": 1.5,
            }
        )


class FakeLauncher:
    """Launches :class:`FakeRuntime` s; ``refuse`` makes the next launches raise."""

    def __init__(self) -> None:
        self.runtimes: list[FakeRuntime] = []
        self.refuse = 0
        self._pids = itertools.count(4000)

    async def prepare(self, agent: AgentSpec) -> None:
        pass

    async def launch(self, agent: AgentSpec, instance_id: int) -> LaunchedProcess:
        if self.refuse:
            self.refuse -= 1
            raise OSError("no more processes")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        runtime = FakeRuntime(next(self._pids))
        await runtime.connect(theirs)
        process = LaunchedProcess(runtime, await ControlChannel.from_socket(ours))
        self.runtimes.append(runtime)
        return process

    async def close(self) -> None:
        pass

    async def next_runtime(self, count: int) -> FakeRuntime:
        """The ``count``-th runtime launched (1-based), once it is."""
        await until(lambda: len(self.runtimes) >= count, f"launch number {count}")
        return self.runtimes[count - 1]


def agent_spec(**scaling: Any) -> AgentSpec:
    config = AgentConfig(path=Path("/nonexistent"), scaling=ScalingConfig(**scaling))
    return AgentSpec(parse_service_host(AGENT), config)


class Harness:
    def __init__(self, pool: AgentPool, launcher: FakeLauncher, time: FakeTime) -> None:
        self.pool = pool
        self.launcher = launcher
        self.time = time

    async def ready_instance(self, count: int = 1) -> tuple[Instance, FakeRuntime]:
        """The ``count``-th runtime, once it has reported ready."""
        runtime = await self.launcher.next_runtime(count)
        await until(lambda: any(i.pid == runtime.pid for i in self.pool.instances.values()))
        await runtime.ready()
        await until(lambda: self.instance_of(runtime).state is InstanceState.READY, "ready")
        return self.instance_of(runtime), runtime

    def instance_of(self, runtime: FakeRuntime) -> Instance:
        (instance,) = [i for i in self.pool.instances.values() if i.pid == runtime.pid]
        return instance


@contextlib.asynccontextmanager
async def running_pool(
    *,
    ready_timeout: float = 30.0,
    ping_interval: float = 5.0,
    ping_timeout: float = 20.0,
    **scaling: Any,
) -> AsyncIterator[Harness]:
    time = FakeTime()
    launcher = FakeLauncher()
    pool = AgentPool(
        agent_spec(**scaling),
        launcher,
        ready_timeout=ready_timeout,
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
        clock=time.clock,
        sleep=time.sleep,
    )
    pool.start()
    try:
        yield Harness(pool, launcher, time)
    finally:
        closing = asyncio.get_running_loop().create_task(pool.close())
        for _ in range(100):  # the stop grace runs on fake time too
            if closing.done():
                break
            await time.advance(1.0)
        await closing
        for runtime in launcher.runtimes:
            runtime.exit(None)
        await settle()


# --- starting and backoff ----------------------------------------------------------------------


async def test_min_agents_are_launched_and_turn_ready_when_the_runtime_says_so() -> None:
    async with running_pool(min_agents=2) as h:
        first, _ = await h.ready_instance(1)
        second, _ = await h.ready_instance(2)
        assert {first.state, second.state} == {InstanceState.READY}
        assert first.address is not None and first.address.startswith("unix:/i")
        assert h.pool.supervisor.backoff.failures == 0


async def test_a_failed_start_backs_off_doubling_and_logs_the_traceback_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="catflap.pool")
    async with running_pool(min_agents=1) as h:
        for attempt, delay in enumerate([0.5, 1.0, 2.0], start=1):
            runtime = await h.launcher.next_runtime(attempt)
            await runtime.send({"event": "start_failed", "error": "Traceback\nImportError: x"})
            runtime.exit(1)
            await until(lambda n=attempt: h.pool.supervisor.backoff.failures == n, "a failure")
            assert h.pool.live() == []
            # No launch before the backoff is over, and sessions are refused with 503 meanwhile.
            with pytest.raises(AgentNotReady, match=f"ImportError: x.*retrying in {delay:.1f} s"):
                await h.pool.acquire("s1")
            await h.time.advance(delay - 0.01)
            assert len(h.launcher.runtimes) == attempt
            await h.time.advance(0.01)
            await h.launcher.next_runtime(attempt + 1)
        await h.ready_instance(4)
        assert h.pool.supervisor.backoff.failures == 0
    tracebacks = [r for r in caplog.records if "Traceback" in r.getMessage()]
    assert len(tracebacks) == 1
    assert any("still failing to start (3 times)" in r.getMessage() for r in caplog.records)


async def test_a_launch_that_raises_counts_as_a_failed_start() -> None:
    async with running_pool(min_agents=0) as h:
        h.launcher.refuse = 1
        with pytest.raises(AgentNotReady, match="OSError: no more processes"):
            await h.pool.acquire("s1")
        assert h.pool.supervisor.backoff.failures == 1
        assert h.pool.live() == []


def test_the_backoff_doubles_up_to_its_cap_and_resets_on_success() -> None:
    backoff = StartBackoff()
    delays = [backoff.failed("boom", now=0.0).delay for _ in range(12)]
    assert delays[:4] == [0.5, 1.0, 2.0, 4.0]
    assert delays[-1] == BACKOFF_MAX_S
    assert backoff.remaining(now=BACKOFF_MAX_S - 1) == 1.0
    backoff.succeeded()
    assert backoff.remaining(now=0.0) == 0.0
    assert backoff.failed("boom", now=0.0).delay == 0.5


async def test_an_instance_not_ready_within_the_ready_timeout_is_killed() -> None:
    async with running_pool(min_agents=1, ready_timeout=30.0) as h:
        runtime = await h.launcher.next_runtime(1)
        await h.time.advance(29.0)
        assert not runtime.killed
        await h.time.advance(1.0)
        assert runtime.killed
        await until(lambda: h.pool.supervisor.backoff.failures == 1, "a failed start")


async def test_a_cold_start_that_is_not_ready_in_time_refuses_with_503_and_frees_the_slot() -> None:
    async with running_pool(min_agents=0, ready_timeout=30.0) as h:
        acquire = asyncio.get_running_loop().create_task(h.pool.acquire("s1"))
        runtime = await h.launcher.next_runtime(1)
        await h.time.advance(30.0)
        with pytest.raises(AgentNotReady, match="did not become ready within 30 s"):
            await acquire
        assert runtime.killed
        assert all(not i.leases for i in h.pool.instances.values())


async def test_a_cold_start_hands_out_the_slot_once_ready() -> None:
    async with running_pool(min_agents=0) as h:
        acquire = asyncio.get_running_loop().create_task(h.pool.acquire("s1"))
        await h.ready_instance(1)
        lease = await acquire
        assert lease.cold_start
        assert lease.address.startswith("unix:/i")


# --- slots -------------------------------------------------------------------------------------


async def test_a_slot_comes_back_only_when_the_runtime_reports_the_end() -> None:
    async with running_pool(min_agents=1, max_agents=1) as h:
        instance, runtime = await h.ready_instance()
        lease = await h.pool.acquire("s1")
        assert not lease.cold_start
        await runtime.send({"event": "session_started", "session_id": "s1"})
        await until(lambda: lease.started, "session_started")
        assert h.pool.at_capacity()
        with pytest.raises(AtCapacity):
            await h.pool.acquire("s2")
        await runtime.session_ended("s1")
        end = await lease.ended
        assert end == SessionEnd(status="completed", error=None, bot_seconds=1.5)
        assert instance.leases == {} and instance.idle_since == h.time.now
        assert (await h.pool.acquire("s2")).instance is instance


async def test_cancel_gives_back_a_reservation_that_never_started() -> None:
    async with running_pool(min_agents=1, max_agents=1) as h:
        instance, _ = await h.ready_instance()
        lease = await h.pool.acquire("s1")
        h.pool.cancel(lease)
        assert instance.leases == {} and lease.ended.cancelled()
        assert not h.pool.at_capacity()


async def test_acquire_avoids_the_instances_named_and_prefers_the_fullest() -> None:
    async with running_pool(min_agents=2, sessions_per_instance=2) as h:
        first, _ = await h.ready_instance(1)
        second, _ = await h.ready_instance(2)
        one = await h.pool.acquire("s1")
        assert (await h.pool.acquire("s2")).instance is one.instance  # the fullest first
        other = first if one.instance is second else second
        assert (await h.pool.acquire("s3", avoid=frozenset({one.instance_key}))).instance is other


async def test_instance_states_count_starting_idle_busy_and_draining() -> None:
    time = FakeTime()
    launcher = FakeLauncher()
    pool = LocalPool(
        [agent_spec(min_agents=0)], launcher, ready_timeout=30, clock=time.clock, sleep=time.sleep
    )
    assert pool.instance_states() == {
        (AGENT, "starting"): 0,
        (AGENT, "idle"): 0,
        (AGENT, "busy"): 0,
        (AGENT, "draining"): 0,
    }
    pool.start()
    acquire = asyncio.get_running_loop().create_task(pool.acquire(AGENT, "s1"))
    runtime = await launcher.next_runtime(1)
    assert pool.instance_states()[(AGENT, "starting")] == 1
    await runtime.ready()
    await acquire
    assert pool.instance_states()[(AGENT, "busy")] == 1
    runtime.exits_on_shutdown = False
    closing = asyncio.get_running_loop().create_task(pool.close())
    await until(lambda: pool.instance_states()[(AGENT, "draining")] == 1, "draining")
    runtime.exit(0)
    await closing


# --- supervision -------------------------------------------------------------------------------


async def test_idle_instances_above_min_agents_are_stopped_after_idle_timeout() -> None:
    async with running_pool(min_agents=0, idle_timeout=10.0) as h:
        acquire = asyncio.get_running_loop().create_task(h.pool.acquire("s1"))
        instance, runtime = await h.ready_instance()
        lease = await acquire
        await runtime.send({"event": "session_started", "session_id": "s1"})
        await h.time.advance(60.0)  # busy: never reaped
        assert instance.state is InstanceState.READY
        await runtime.session_ended(lease.session_id)
        await until(lambda: not instance.leases, "the end")
        await h.time.advance(9.0)
        assert instance.state is InstanceState.READY
        await h.time.advance(1.0)
        assert {"command": "shutdown"} in runtime.commands
        await until(lambda: h.pool.live() == [], "the reaped instance's death")
        assert instance.state is InstanceState.DEAD and len(h.launcher.runtimes) == 1


def _idle(instance_id: int, idle_since: float, *, leases: int = 0) -> Instance:
    instance = Instance(instance_id, AGENT, capacity=2, started_at=0.0, idle_since=idle_since)
    instance.set_state(InstanceState.READY)
    for n in range(leases):
        instance.reserve(f"s{n}")
    return instance


async def test_idle_surplus_stops_the_longest_idle_first_and_keeps_the_warm_count() -> None:
    old, older, busy = _idle(1, 50.0), _idle(2, 10.0), _idle(3, 0.0, leases=1)
    live = [old, older, busy]
    assert idle_surplus(live, keep=0, idle_timeout=30.0, now=100.0) == [older, old]
    assert idle_surplus(live, keep=2, idle_timeout=30.0, now=100.0) == [older]
    assert idle_surplus(live, keep=0, idle_timeout=60.0, now=100.0) == [older]
    assert idle_surplus(live, keep=3, idle_timeout=1.0, now=100.0) == []


async def test_a_runtime_that_stops_answering_pings_is_killed_and_replaced(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="catflap.pool")
    async with running_pool(min_agents=1, ping_interval=5.0, ping_timeout=20.0) as h:
        instance, runtime = await h.ready_instance()
        await h.time.advance(100.0)  # it answers: alive however long it runs
        assert not runtime.killed
        assert sum(c["command"] == "ping" for c in runtime.commands) == 20
        runtime.answers_pings = False
        await h.time.advance(20.0)
        assert not runtime.killed  # silent for 20 s: not yet past the timeout
        await h.time.advance(5.0)
        assert runtime.killed
        await until(lambda: instance.state is InstanceState.DEAD, "the hung instance's death")
        replacement, _ = await h.ready_instance(2)
        assert replacement is not instance
    assert any("answered no ping for 25 s" in r.getMessage() for r in caplog.records)


async def test_a_starting_instance_is_not_hung_however_long_bot_py_imports() -> None:
    async with running_pool(min_agents=1, ready_timeout=1000.0) as h:
        runtime = await h.launcher.next_runtime(1)
        runtime.answers_pings = False
        await h.time.advance(500.0)
        assert not runtime.killed


async def test_a_crash_ends_its_sessions_as_agent_crashed_and_the_instance_is_replaced() -> None:
    async with running_pool(min_agents=1) as h:
        instance, runtime = await h.ready_instance()
        lease = await h.pool.acquire("s1")
        await runtime.send({"event": "session_started", "session_id": "s1"})
        runtime.exit(-9)
        end = await lease.ended
        assert end.status == "agent_crashed"
        assert instance.state is InstanceState.DEAD
        await h.ready_instance(2)
        assert h.pool.supervisor.backoff.failures == 0  # a crash is not a failed start


async def test_a_bot_that_ignored_cancellation_gets_its_process_killed() -> None:
    async with running_pool(min_agents=1) as h:
        instance, runtime = await h.ready_instance()
        lease = await h.pool.acquire("s1")
        await runtime.send({"event": "session_started", "session_id": "s1"})
        await runtime.session_ended("s1", error="bot ignored cancellation")
        assert (await lease.ended).error == "bot ignored cancellation"
        await until(lambda: runtime.killed, "the kill")
        await h.ready_instance(2)


async def test_abandon_kills_and_replaces_the_instance() -> None:
    async with running_pool(min_agents=1) as h:
        instance, runtime = await h.ready_instance()
        lease = await h.pool.acquire("s1")
        h.pool.abandon(lease, "the runtime did not report the end of bot()")
        assert runtime.killed and instance.state is InstanceState.STOPPING
        assert (await lease.ended).status == "agent_crashed"
        await h.ready_instance(2)


async def test_stop_session_sends_the_command_to_the_instance_that_holds_it() -> None:
    async with running_pool(min_agents=1) as h:
        _, runtime = await h.ready_instance()
        await h.pool.acquire("s1")
        assert await h.pool.stop_session("s1")
        assert not await h.pool.stop_session("nobody")
        await until(lambda: {"command": "stop_session", "session_id": "s1"} in runtime.commands)


async def test_a_stopping_instance_that_lingers_is_killed_after_the_grace() -> None:
    async with running_pool(min_agents=1) as h:
        instance, runtime = await h.ready_instance()
        runtime.exits_on_shutdown = False
        h.pool.stop_instance(instance)
        await until(lambda: {"command": "shutdown"} in runtime.commands, "the shutdown")
        await h.time.advance(4.9)
        assert not runtime.killed and instance.state is InstanceState.STOPPING
        await h.time.advance(0.1)
        assert runtime.killed


# --- the control channel -----------------------------------------------------------------------


async def test_a_malformed_event_is_a_logged_protocol_error_and_the_next_one_counts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="catflap.pool")
    async with running_pool(min_agents=1) as h:
        instance, runtime = await h.ready_instance()
        lease = await h.pool.acquire("s1")
        await runtime.send_raw(b'{"event":"session_started"}\n')  # no session_id
        await runtime.send_raw(b"not json\n")
        await runtime.send({"event": "session_started", "session_id": "s1"})
        await until(lambda: lease.started, "the good event")
        assert instance.state is InstanceState.READY and not runtime.killed
        assert not lease.ended.done()
    errors = [r.getMessage() for r in caplog.records if "protocol error" in r.getMessage()]
    assert len(errors) == 2
    assert "session_id" in errors[0]


async def test_a_malformed_session_end_replaces_the_instance_and_frees_the_slot_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Its bot may still run, so the instance cannot be reused; waiting for the recorder's
    deadline would hold the slot for the whole session budget."""
    caplog.set_level(logging.ERROR, logger="catflap.pool")
    async with running_pool(min_agents=1) as h:
        instance, runtime = await h.ready_instance()
        lease = await h.pool.acquire("s1")
        await runtime.send({"event": "session_started", "session_id": "s1"})
        await until(lambda: lease.started, "the start")
        await runtime.send_raw(b'{"event":"session_ended","session_id":"s1"}\n')  # no status
        await until(lambda: runtime.killed, "the kill")
        end = await asyncio.wait_for(lease.ended, seconds(5))
        assert end.status == "agent_crashed"
    assert any("protocol error" in r.getMessage() for r in caplog.records)
