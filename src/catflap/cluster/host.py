"""``catflap agent-host``: one agent's instances on this machine, registered in Redis.

The host runs an ordinary :class:`~catflap.pool.pool.AgentPool` (warm instances, crash
replacement, start backoff, reaping) whose instances listen on TCP at the advertised address,
and mirrors what happens into Redis as the :class:`~catflap.pool.observer.PoolObserver`:

==================  ===========================================================
pool event          Redis
==================  ===========================================================
instance ready      hash ``inst:{id}`` (address, capacity, state), added to the
                    agent's set if the cluster has fewer than ``max_agents``;
                    publish on ``ready`` (wakes sessions waiting for it)
heartbeat           every TTL/3: refresh the TTL of ``inst:{id}`` and its sets
session started     reservation -> active set (the slot is now held by a bot)
session ended       leave the active set; append to the ``ended`` stream
instance gone       delete its keys
every 0.1 s         this host's room (``CLAIM_LUA``); start an instance when more
                    sessions wait for one than instances are starting
==================  ===========================================================

The host keeps ``--warm`` instances idle on top of its busy ones (within ``--slots``); the
supervisor reaps idle ones above that after ``idle_timeout``.

Redis updates go through one ordered queue, so ``started`` never lands after ``ended``; while
Redis is away they wait and retry, and live sessions are not touched. Stop requests are read
from the ``stop`` stream (:mod:`catflap.cluster.streams`), so none is lost while reconnecting.
When Redis turns out to have lost this host's keys (a restart without persistence), the ended
events of the last ``ENDED_REPLAY_WINDOW_S`` are appended again: gateways ignore duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from catflap.cluster.keys import HEARTBEAT_TTL_S, HOST_ROOM_TTL_S, START_POLL_S, Keys
from catflap.cluster.logship import LogShipper
from catflap.cluster.streams import StreamReader, append_event
from catflap.config import AgentSpec
from catflap.contract.limits import ENDED_REPLAY_WINDOW_S, LIFECYCLE_STREAM_MAXLEN
from catflap.pool.instance import Instance, InstanceState, SessionEnd
from catflap.pool.launcher import Launcher
from catflap.pool.pool import AgentPool
from catflap.tasks import TaskSet

__all__ = ["CLAIM_LUA", "REGISTER_LUA", "AgentHost"]

log = logging.getLogger("catflap.cluster")

#: KEYS[1]: agent instance set, KEYS[2]: instance hash. ARGV: instance id, max_agents,
#: ttl_ms, key prefix, then field/value pairs. Registers only while the cluster is under
#: max_agents (an instance already registered may always refresh itself).
REGISTER_LUA = """
local members = redis.call('SMEMBERS', KEYS[1])
local live = 0
for _, id in ipairs(members) do
  if redis.call('EXISTS', ARGV[4] .. ':inst:' .. id) == 1 then live = live + 1
  else redis.call('SREM', KEYS[1], id) end
end
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 and live >= tonumber(ARGV[2]) then
  return 0
end
redis.call('HSET', KEYS[2], unpack(ARGV, 5))
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('SADD', KEYS[1], ARGV[1])
return 1
"""

#: KEYS[1]: the agent's hosts' room hash, KEYS[2]: its waiting sessions, KEYS[3]: its
#: instance set. ARGV: host id, now_ms, free, starting (see :meth:`Keys.agent_hosts`), the
#: entry's expiry (ms), max_agents, key prefix, sessions_per_instance. Writes this host's
#: entry; when more sessions wait than the instances starting across the cluster will hold
#: (each ``sessions_per_instance``), and this host has a free slot and the
#: cluster is under ``max_agents``, it counts one more start in the entry and returns 1: the
#: host then starts an instance. Atomic, so two hosts never start one instance for the same
#: waiting session, and a gateway never sees room already taken.
CLAIM_LUA = """
local now = tonumber(ARGV[2])
local free, starting = tonumber(ARGV[3]), tonumber(ARGV[4])
local per = tonumber(ARGV[8])
local start = 0
if free > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  local waiting = redis.call('ZCARD', KEYS[2])
  if waiting > starting * per then
    local total = starting
    local hosts = redis.call('HGETALL', KEYS[1])
    for i = 1, #hosts, 2 do
      if hosts[i] ~= ARGV[1] then
        local st, exp = string.match(hosts[i + 1], '^%d+ (%d+) (%d+)$')
        if st ~= nil and tonumber(exp) >= now then total = total + tonumber(st) end
      end
    end
    if waiting > total * per then
      -- Free slots on ready instances count too: a waiter whose instance just registered
      -- has not dispatched yet, and must not get a second start.
      local live, idle = 0, 0
      for _, id in ipairs(redis.call('SMEMBERS', KEYS[3])) do
        local ikey = ARGV[7] .. ':inst:' .. id
        if redis.call('EXISTS', ikey) == 1 then
          live = live + 1
          if redis.call('HGET', ikey, 'state') == 'ready' then
            local f = tonumber(redis.call('HGET', ikey, 'capacity') or '0')
              - redis.call('SCARD', ikey .. ':active')
              - redis.call('ZCOUNT', ikey .. ':resv', now, '+inf')
            if f > 0 then idle = idle + f end
          end
        end
      end
      if waiting > total * per + idle and live + total < tonumber(ARGV[6]) then
        start = 1
        free = free - 1
        starting = starting + 1
      end
    end
  end
end
redis.call('HSET', KEYS[1], ARGV[1], free .. ' ' .. starting .. ' ' .. ARGV[5])
return start
"""

#: Seconds a host that the cluster refused at ``max_agents`` starts no more than it has
#: registered: long enough not to loop start -> refused -> start, short enough to take room
#: freed elsewhere in the cluster.
CAPPED_S = 30.0

Op = Callable[[], Awaitable[Any]]


class AgentHost:
    """Runs one agent's instances and keeps Redis in step with them."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        agent: AgentSpec,
        launcher: Launcher,
        *,
        slots: int,
        warm: int,
        ready_timeout: float,
        heartbeat_ttl: float = HEARTBEAT_TTL_S,
        log_shipper: LogShipper | None = None,
    ) -> None:
        """``log_shipper``: copies the sessions' log lines to Redis (None: they stay in the
        files on this host)."""
        self._redis = client
        self._keys = keys
        self.agent = agent
        self.host_id = secrets.token_hex(4)
        self._slots = slots
        self._ttl = heartbeat_ttl
        scaling = agent.config.scaling.model_copy(
            update={"min_agents": min(warm, slots), "max_agents": slots}
        )
        local_agent = AgentSpec(
            agent.service_host, agent.config.model_copy(update={"scaling": scaling})
        )
        self._warm = min(warm, slots)
        self.pool = AgentPool(
            local_agent,
            launcher,
            ready_timeout=ready_timeout,
            observer=self,
            warm=self._warm_target,
        )
        self._launcher = launcher
        self._register = client.register_script(REGISTER_LUA)
        self._claim = client.register_script(CLAIM_LUA)
        #: Until when (monotonic) this host starts no more instances than it has registered:
        #: the cluster refused one at ``max_agents``, and retrying at once would loop.
        self._capped_until = 0.0
        self._ops: asyncio.Queue[Op] = asyncio.Queue()
        self._tasks = TaskSet("agent host")
        self._registered: set[str] = set()
        self._draining = False
        #: Set whenever the last running session on this host ends.
        self._idle = asyncio.Event()
        #: (monotonic time, event) of recent ends, appended again if Redis loses its data.
        self._recent_ended: deque[tuple[float, dict[str, Any]]] = deque(
            maxlen=LIFECYCLE_STREAM_MAXLEN
        )
        self._log_shipper = log_shipper

    def instance_key(self, instance: Instance) -> str:
        return f"{self.host_id}-{instance.instance_id}"

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._tasks.spawn(self._apply_ops(), name="redis updates")
        self._tasks.spawn(self._heartbeat(), name="heartbeat")
        self._tasks.spawn(self._listen_for_stops(), name="stop requests")
        self._tasks.spawn(self._offer_room(), name="start requests")
        self.pool.start()

    async def close(
        self, *, drain_timeout: float = 0.0, stop_now: asyncio.Event | None = None
    ) -> None:
        """Drain, then stop.

        Gateways stop dispatching here at once (the instances turn ``draining``); live
        sessions run until they end, ``drain_timeout`` passes or ``stop_now`` is set (a second
        SIGTERM); then the instances stop and are deregistered.
        """
        self._draining = True
        for instance in self.pool.live():
            self._ops.put_nowait(functools.partial(self._register_instance, instance))
        busy = [i for i in self.pool.live() if i.leases]
        if busy and drain_timeout > 0:
            log.info(
                "x draining %d session(s) for up to %g s",
                sum(len(i.leases) for i in busy),
                drain_timeout,
            )
            self._idle.clear()
            waits = [asyncio.ensure_future(self._idle.wait())]
            if stop_now is not None:
                waits.append(asyncio.ensure_future(stop_now.wait()))
            await asyncio.wait(waits, timeout=drain_timeout, return_when=asyncio.FIRST_COMPLETED)
            for wait in waits:
                wait.cancel()
        await self.pool.close()
        await self._launcher.close()
        # Let queued deregistrations reach Redis, briefly; the TTLs clean up otherwise.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await self._ops.join()
        if self._log_shipper is not None:
            await self._log_shipper.close()
        await self._tasks.aclose()
        with contextlib.suppress(RedisError, OSError):  # else it expires by itself
            await self._redis.hdel(self._keys.agent_hosts(self.agent.key), self.host_id)

    # --- PoolObserver -------------------------------------------------------------------------

    def instance_ready(self, instance: Instance) -> None:
        self._ops.put_nowait(lambda: self._register_instance(instance))

    def instance_gone(self, instance: Instance) -> None:
        iid = self.instance_key(instance)
        self._registered.discard(iid)

        async def deregister() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.srem(self._keys.agent_instances(self.agent.key), iid)
                pipe.delete(self._keys.instance(iid), self._keys.active(iid))
                await pipe.execute()

        self._ops.put_nowait(deregister)

    def session_started(self, instance: Instance, session_id: str) -> None:
        iid = self.instance_key(instance)

        async def started() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.zrem(self._keys.reserved(iid), session_id)
                pipe.sadd(self._keys.active(iid), session_id)
                pipe.pexpire(self._keys.active(iid), int(self._ttl * 1000))
                await pipe.execute()

        self._ops.put_nowait(started)
        if self._log_shipper is not None:
            self._log_shipper.session_started(session_id)
        self.pool.supervisor.replenish()  # the warm target follows the busy instances

    def session_ended(self, instance: Instance, session_id: str, end: SessionEnd) -> None:
        if self._log_shipper is not None:  # its last lines before the end: see logship
            self._ops.put_nowait(functools.partial(self._log_shipper.finish, session_id))
        iid = self.instance_key(instance)
        event = {
            "session_id": session_id,
            "status": end.status,
            "error": end.error,
            "client_disconnected": end.client_disconnected,
            "bot_seconds": end.bot_seconds,
            "resources": end.resources,
        }
        now = time.monotonic()
        self._recent_ended.append((now, event))
        self._forget_old_ends(now)

        async def ended() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.srem(self._keys.active(iid), session_id)
                pipe.zrem(self._keys.reserved(iid), session_id)
                await pipe.execute()
            # Only once the slot is free: whoever reads the end finds the session gone from
            # its instance (a retry after a failure repeats the idempotent removals).
            await append_event(self._redis, self._keys.ended_stream, event)

        self._ops.put_nowait(ended)
        if not any(i.leases for i in self.pool.live()):
            self._idle.set()

    # --- internals -----------------------------------------------------------------------------

    def _limit(self) -> int:
        """Instances this host may run now: ``--slots``, or what it has registered while the
        cluster is at ``max_agents``."""
        if time.monotonic() < self._capped_until:
            return min(self._slots, len(self._registered))
        return self._slots

    def _warm_target(self) -> int:
        """Instances to keep running: the busy ones and ``--warm`` idle ones on top (at least
        one once any is busy: PCC's buffer), within :meth:`_limit`. The supervisor starts up
        to it and reaps idle ones above it; instances started for waiting sessions come on
        top, and are reaped like any idle one once nobody took them."""
        if self._draining:
            return 0
        live = self.pool.live()
        busy = sum(1 for i in live if i.state is InstanceState.READY and i.free_slots <= 0)
        spare = max(self._warm, 1) if busy else self._warm
        return min(self._limit(), busy + spare)

    def _room(self) -> tuple[int, int]:
        """(instances it may still start, instances starting and not registered yet): what
        this host offers for cold starts."""
        if self._draining:
            return 0, 0
        live = self.pool.live()
        starting = sum(
            1
            for i in live
            if i.state is InstanceState.STARTING
            or (i.state is InstanceState.READY and self.instance_key(i) not in self._registered)
        )
        can_start = self.pool.slots.readiness(self.pool.supervisor.backoff).can_start
        free = max(0, self._limit() - len(live)) if can_start else 0
        return free, starting

    async def _offer_room(self) -> None:
        """Every :data:`START_POLL_S`, publish this host's room, and start an instance when
        :data:`CLAIM_LUA` says sessions wait for one; then check again at once."""
        while True:
            free, starting = self._room()
            now_ms = int(time.time() * 1000)
            try:
                start = await self._claim(
                    keys=[
                        self._keys.agent_hosts(self.agent.key),
                        self._keys.waiting(self.agent.key),
                        self._keys.agent_instances(self.agent.key),
                    ],
                    args=[
                        self.host_id,
                        now_ms,
                        free,
                        starting,
                        now_ms + int(HOST_ROOM_TTL_S * 1000),
                        self.agent.config.scaling.max_agents,
                        self._keys.prefix,
                        self.agent.config.scaling.sessions_per_instance,
                    ],
                )
            except (RedisError, OSError) as exc:
                log.debug("! could not offer room for starts (%s)", exc)
                start = 0
            if start:
                before = len(self.pool.live())
                self.pool.spawn_one()
                if len(self.pool.live()) > before:
                    log.info("= %s: starting an instance for a waiting session", self.agent.key)
                    continue
                # No start after all (backoff, closing): the next entry says so.
            await asyncio.sleep(START_POLL_S)

    async def _register_instance(self, instance: Instance) -> None:
        if instance.state is not InstanceState.READY or instance.address is None:
            return
        iid = self.instance_key(instance)
        fields = {
            "agent": self.agent.key,
            "address": instance.address,
            "host": self.host_id,
            "capacity": instance.capacity,
            "state": "draining" if self._draining else "ready",
            "pid": instance.pid or 0,
        }
        flat = [str(x) for pair in fields.items() for x in pair]
        running = [sid for sid, lease in instance.leases.items() if lease.started]
        # An instance with running sessions is registering again (Redis lost it, or this host
        # was cut off from Redis and dispatch pruned it meanwhile): it is no new instance, and
        # refusing it at max_agents would stop its live calls. So it always gets back in.
        max_agents = self.agent.config.scaling.max_agents if not running else 1 << 30
        ok = await self._register(
            keys=[self._keys.agent_instances(self.agent.key), self._keys.instance(iid)],
            args=[iid, max_agents, int(self._ttl * 1000), self._keys.prefix, *flat],
        )
        if ok:
            self._registered.add(iid)
            if not self._draining and instance.free_slots > 0:
                # Wakes sessions waiting for a cold start on any gateway.
                await self._redis.publish(
                    self._keys.ready_channel,
                    json.dumps({"agent": self.agent.key, "capacity": instance.free_slots}),
                )
            if running:
                # Redis may have lost the instance (it restarted): its running sessions must
                # hold their slots again, or a busy instance would take a second session.
                async with self._redis.pipeline(transaction=True) as pipe:
                    pipe.sadd(self._keys.active(iid), *running)
                    pipe.pexpire(self._keys.active(iid), int(self._ttl * 1000))
                    await pipe.execute()
            log.info("= %s registered %s at %s", self.agent.key, iid, instance.address)
        else:
            log.warning(
                "! %s is at max_agents across the cluster; stopping %s", self.agent.key, iid
            )
            self._capped_until = time.monotonic() + CAPPED_S
            self.pool.stop_instance(instance)

    async def _apply_ops(self) -> None:
        while True:
            op = await self._ops.get()
            delay = 0.1
            while True:
                try:
                    await op()
                    break
                except (RedisError, OSError) as exc:
                    log.warning("! Redis update failed (%s); retrying in %.1f s", exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
            self._ops.task_done()

    async def _heartbeat(self) -> None:
        ttl_ms = int(self._ttl * 1000)
        while True:
            await asyncio.sleep(self._ttl / 3)
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for instance in self.pool.live():
                        iid = self.instance_key(instance)
                        if iid not in self._registered:
                            continue
                        pipe.pexpire(self._keys.instance(iid), ttl_ms)
                        pipe.pexpire(self._keys.active(iid), ttl_ms)
                    results = await pipe.execute()
            except (RedisError, OSError) as exc:
                log.warning("! heartbeat failed (%s)", exc)
                continue
            if results and not all(results[0::2]):
                # Redis lost our keys (it restarted): register again, and append the recent
                # ends again, since one appended just before the restart may be lost with it.
                for instance in self.pool.live():
                    self._ops.put_nowait(functools.partial(self._register_instance, instance))
                self._ops.put_nowait(self._replay_ended)

    def _forget_old_ends(self, now: float) -> None:
        """Only the last ``ENDED_REPLAY_WINDOW_S`` are ever appended again: an event carries
        its session's resource time series (up to ~10 KB), so older ones go at once."""
        cutoff = now - ENDED_REPLAY_WINDOW_S
        while self._recent_ended and self._recent_ended[0][0] < cutoff:
            self._recent_ended.popleft()

    async def _replay_ended(self) -> None:
        self._forget_old_ends(time.monotonic())
        if not self._recent_ended:
            return
        log.info("= appending %d recent ended event(s) again", len(self._recent_ended))
        for _, event in list(self._recent_ended):
            await append_event(self._redis, self._keys.ended_stream, event)

    async def _listen_for_stops(self) -> None:
        """Follow the stop stream from where this host got to, across reconnects: a stop
        appended while this host was cut off from Redis still reaches its session."""
        await StreamReader(
            self._redis, self._keys.stop_stream, self._on_stop, what="stop requests"
        ).run()

    async def _on_stop(self, data: dict[str, Any]) -> None:
        # Every host reads every stop; the pool ignores sessions it does not run.
        await self.pool.stop_session(str(data["session_id"]))
