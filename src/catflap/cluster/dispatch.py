"""The gateway's pool in cluster mode: reserve slots on instances registered in Redis.

:class:`RedisPool` implements :class:`~catflap.pool.interface.SessionPool`. Its one Redis round
trip per handshake is :data:`DISPATCH_LUA`, which prunes dead instances and expired
reservations, then reserves a slot on an instance drawn at random in proportion to its free
slots, so that load spreads across hosts. Lua runs atomically, so no two gateways can take
the same slot. With no free slot, the session joins the agent's waiting set in Redis, which
agent hosts with room answer by starting instances, and waits for one to register, woken by
the ``ready`` channel, up to ``agent_ready_timeout``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from catflap.cluster.keys import (
    HEARTBEAT_TTL_S,
    INSTANCE_PROBE_TIMEOUT_S,
    RESERVATION_TTL_S,
    WAIT_POLL_S,
    Keys,
)
from catflap.cluster.liveness import GatewayLiveness
from catflap.cluster.streams import StreamReader, append_event
from catflap.config import AgentSpec
from catflap.contract import limits
from catflap.contract.errors import (
    AgentNotFound,
    AgentNotReady,
    AtCapacity,
    RedisUnreachable,
    ServiceUnavailable,
)
from catflap.pool.instance import SessionEnd
from catflap.pool.interface import SessionLease, SessionPlace
from catflap.tasks import TaskSet

__all__ = ["DISPATCH_LUA", "LOCATE_LUA", "ClusterLease", "RedisPool"]

log = logging.getLogger("catflap.cluster")

#: KEYS[1]: the agent's instance set, KEYS[2]: its hosts' room hash, KEYS[3]: its waiting
#: sessions. ARGV: prefix, now_ms, session_id, reservation expiry (ms), a random integer in
#: [0, 2^30), max_agents, the expiry (ms) a wait for a cold start would have ('' to never
#: wait), '1' when this session already waits, the agent's ``sessions_per_instance``, then
#: instance ids to avoid (a retry after a failed connect).
#:
#: Each ready instance weighs its free slots, and one is drawn at random in proportion (the
#: capacity-weighted choice of LiveKit's dispatcher), so a burst spreads over hosts by their
#: room; a waiting session that gets a slot leaves the waiting set in the same step. With no
#: free slot: a session that waits goes on ``waiting``; else, when the slots of the instances
#: being started plus those the hosts may still start (within ``max_agents``) outnumber the
#: waiting sessions, it joins them (``requested``: hosts see it and start one); else ``full``
#: (429) when live instances plus the larger of starting instances and the instances the
#: waiting sessions fill reach ``max_agents``; else ``no_host`` (503): the hosts have no room.
#: Slots are instances times ``sessions_per_instance``: one start serves that many waiters.
#: Returns {instance_id, address, live, 'ok'} or {false, false, live, outcome}.
DISPATCH_LUA = """
local now = tonumber(ARGV[2])
local ids = redis.call('SMEMBERS', KEYS[1])
local avoid = {}
for i = 10, #ARGV do avoid[ARGV[i]] = true end
local live, total = 0, 0
local cands, weights = {}, {}
for _, id in ipairs(ids) do
  local ikey = ARGV[1] .. ':inst:' .. id
  if redis.call('EXISTS', ikey) == 0 then
    redis.call('SREM', KEYS[1], id)
  else
    live = live + 1
    if not avoid[id] and redis.call('HGET', ikey, 'state') == 'ready' then
      local rkey = ikey .. ':resv'
      redis.call('ZREMRANGEBYSCORE', rkey, '-inf', now)
      if redis.call('ZSCORE', rkey, ARGV[3]) then
        -- This session's own reservation: the script ran before, its answer was lost and the
        -- client sent it again. The same slot, not a second one held for nobody.
        if KEYS[3] ~= nil then redis.call('ZREM', KEYS[3], ARGV[3]) end
        return {id, redis.call('HGET', ikey, 'address'), live, 'ok'}
      end
      local free = tonumber(redis.call('HGET', ikey, 'capacity') or '0')
        - redis.call('SCARD', ikey .. ':active') - redis.call('ZCARD', rkey)
      if free > 0 then
        total = total + free
        cands[#cands + 1] = id
        weights[#weights + 1] = free
      end
    end
  end
end
if total > 0 then
  local pick = tonumber(ARGV[5]) % total
  for i, id in ipairs(cands) do
    pick = pick - weights[i]
    if pick < 0 then
      local ikey = ARGV[1] .. ':inst:' .. id
      redis.call('ZADD', ikey .. ':resv', ARGV[4], ARGV[3])
      redis.call('PEXPIREAT', ikey .. ':resv', ARGV[4])
      if KEYS[3] ~= nil then redis.call('ZREM', KEYS[3], ARGV[3]) end
      return {id, redis.call('HGET', ikey, 'address'), live, 'ok'}
    end
  end
end
if KEYS[3] == nil then return {false, false, live, 'no_host'} end
if ARGV[8] == '1' then
  -- Still waiting (added again should Redis have lost the set, so hosts keep counting it).
  redis.call('ZADD', KEYS[3], 'NX', ARGV[7], ARGV[3])
  return {false, false, live, 'waiting'}
end
local free, starting = 0, 0
local hosts = redis.call('HGETALL', KEYS[2])
for i = 1, #hosts, 2 do
  local f, st, exp = string.match(hosts[i + 1], '^(%d+) (%d+) (%d+)$')
  if f == nil or tonumber(exp) < now then
    redis.call('HDEL', KEYS[2], hosts[i])
  else
    free = free + tonumber(f)
    starting = starting + tonumber(st)
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local waiting = redis.call('ZCARD', KEYS[3])
local max_agents = tonumber(ARGV[6])
local per = tonumber(ARGV[9])
local room = math.max(math.min(free, max_agents - live - starting), 0)
if ARGV[7] ~= '' and (starting + room) * per - waiting > 0 then
  redis.call('ZADD', KEYS[3], ARGV[7], ARGV[3])
  local ttl = redis.call('PTTL', KEYS[3])
  if ttl < 0 or now + ttl < tonumber(ARGV[7]) then redis.call('PEXPIREAT', KEYS[3], ARGV[7]) end
  return {false, false, live, 'requested'}
end
if live + math.max(starting, math.ceil(waiting / per)) >= max_agents then
  return {false, false, live, 'full'}
end
return {false, false, live, 'no_host'}
"""

#: KEYS[1]: the agent's instance set. ARGV: prefix, session_id, now_ms. Finds the instance that
#: holds the session, whichever gateway admitted it: {address, 1} when its ``bot()`` runs (the
#: host moved it to the active set), {address, 0} while its reservation lasts, else nil. One
#: round trip, O(instances of the agent).
LOCATE_LUA = """
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local ikey = ARGV[1] .. ':inst:' .. id
  if redis.call('SISMEMBER', ikey .. ':active', ARGV[2]) == 1 then
    return {redis.call('HGET', ikey, 'address'), 1}
  end
  local expiry = redis.call('ZSCORE', ikey .. ':resv', ARGV[2])
  if expiry and tonumber(expiry) > tonumber(ARGV[3]) then
    return {redis.call('HGET', ikey, 'address'), 0}
  end
end
return nil
"""


@dataclass(eq=False)
class ClusterLease:
    """A slot reserved in Redis on one instance, for one session."""

    session_id: str
    instance_id: str
    instance_address: str
    cold_start: bool = False
    ended: asyncio.Future[SessionEnd] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    @property
    def address(self) -> str:
        return self.instance_address

    @property
    def instance_label(self) -> str:
        return f"instance {self.instance_id} ({self.instance_address})"

    @property
    def instance_key(self) -> str:
        return self.instance_id


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _unavailable(exc: Exception) -> RedisUnreachable:
    log.error("! Redis unreachable (%s); refusing new sessions until it is back", exc)
    return RedisUnreachable()


class RedisPool:
    """Cluster-wide dispatch for one gateway."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        agents: Iterable[AgentSpec],
        *,
        liveness: GatewayLiveness | None = None,
        ready_timeout: float = limits.AGENT_READY_TIMEOUT_S,
        rng: random.Random | None = None,
    ) -> None:
        """``liveness``: lists this gateway's sessions in Redis, so that a survivor finishes
        their records should this gateway die. ``ready_timeout``: how long a session waits
        for a cold start (``[gateway] agent_ready_timeout``). ``rng``: the weighted choice's
        randomness (tests seed it)."""
        self._redis = client
        self._liveness = liveness
        self._keys = keys
        self._agents = {agent.key: agent for agent in agents}
        self._ready_timeout = ready_timeout
        self._rng = rng or random.Random()
        self._dispatch = client.register_script(DISPATCH_LUA)
        self._locate = client.register_script(LOCATE_LUA)
        self._leases: dict[str, ClusterLease] = {}
        #: Consecutive checks that found an instance (by id) missing from Redis and unreachable.
        self._missing: dict[str, int] = {}
        #: Sessions waiting for a cold start, per agent, oldest first: a ``ready`` message
        #: wakes as many as the new instance has slots.
        self._waiters: dict[str, collections.deque[asyncio.Future[None]]] = {}
        self._tasks = TaskSet("cluster dispatch")

    def start(self) -> None:
        self._tasks.spawn(self._listen_for_endings(), name="ended events")
        self._tasks.spawn(self._watch_instances(), name="instance watch")
        self._tasks.spawn(self._listen_for_ready(), name="ready subscription")

    async def close(self) -> None:
        await self._tasks.aclose()

    def _agent(self, agent_key: str) -> AgentSpec:
        try:
            return self._agents[agent_key]
        except KeyError:
            raise AgentNotFound(f"no agent {agent_key!r}") from None

    async def _run_dispatch(
        self,
        agent: AgentSpec,
        session_id: str,
        avoid: frozenset[str],
        *,
        wait_until_ms: str = "",
        waiting: bool = False,
    ) -> tuple[Any, Any, int, str]:
        now_ms = int(time.time() * 1000)
        try:
            result = await self._dispatch(
                keys=[
                    self._keys.agent_instances(agent.key),
                    self._keys.agent_hosts(agent.key),
                    self._keys.waiting(agent.key),
                ],
                args=[
                    self._keys.prefix,
                    now_ms,
                    session_id,
                    now_ms + int(RESERVATION_TTL_S * 1000),
                    self._rng.randrange(1 << 30),
                    agent.config.scaling.max_agents,
                    wait_until_ms,
                    "1" if waiting else "",
                    agent.config.scaling.sessions_per_instance,
                    *sorted(avoid),
                ],
            )
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from None
        instance_id, address, live, outcome = result
        return instance_id, address, int(live), _text(outcome)

    async def at_capacity(self, agent_key: str) -> bool:
        """True when every registered instance is full and there are ``max_agents`` of them."""
        agent = self._agent(agent_key)
        try:
            ids = await self._redis.smembers(self._keys.agent_instances(agent_key))
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from None
        return len(ids) >= agent.config.scaling.max_agents and not await self._any_room(ids)

    async def _any_room(self, ids: Iterable[Any]) -> bool:
        now_ms = int(time.time() * 1000)
        for raw in ids:
            iid = raw.decode() if isinstance(raw, bytes) else str(raw)
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hget(self._keys.instance(iid), "capacity")
                pipe.scard(self._keys.active(iid))
                pipe.zcount(self._keys.reserved(iid), now_ms, "+inf")
                capacity, active, reserved = await pipe.execute()
            if capacity is not None and int(active) + int(reserved) < int(capacity):
                return True
        return False

    async def acquire(
        self, agent_key: str, session_id: str, *, avoid: frozenset[str] = frozenset()
    ) -> SessionLease:
        """Reserve a slot anywhere in the cluster; with none free, join the waiting sessions
        that agent hosts start instances for, and wait up to ``ready_timeout`` (cancellation,
        when the client leaves, takes the session out of the waiting set).

        Raises:
            AtCapacity: 429, no free slot, and the agent's live instances plus the starting
                ones or the waiting sessions (the larger) reach ``max_agents``.
            AgentNotReady: 503, no instance became free within ``ready_timeout``.
            ServiceUnavailable: 503, no agent host has room to start one, or Redis is
                unreachable.
        """
        agent = self._agent(agent_key)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._ready_timeout
        wait_until_ms = str(int((time.time() + self._ready_timeout) * 1000))
        waiting = False
        #: True while a dispatch call is in flight: cancelled then (the client left), the
        #: script may have added the session to the waiting set without this knowing.
        in_flight = False
        try:
            while True:
                in_flight = True
                instance_id, address, live, outcome = await self._run_dispatch(
                    agent, session_id, avoid, wait_until_ms=wait_until_ms, waiting=waiting
                )
                in_flight = False
                if instance_id:
                    break
                if outcome == "requested":
                    waiting = True
                    log.info(
                        "= %s: no free slot; waiting for an agent host to start one", agent.key
                    )
                elif outcome == "full":
                    raise AtCapacity(
                        f"agent {agent_key} is at max_agents={agent.config.scaling.max_agents} "
                        "across the cluster and every instance is busy; retry shortly"
                    )
                elif outcome != "waiting":
                    raise ServiceUnavailable(
                        f"no idle instance of {agent_key} and no agent host with a free slot "
                        f"({live} registered); retry shortly, or add agent hosts"
                    )
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise AgentNotReady(
                        f"no instance of {agent_key} became free within "
                        f"{self._ready_timeout:g} s (agent_ready_timeout); retry shortly"
                    )
                await self._wait_for_instance(
                    agent.key, min(remaining, WAIT_POLL_S * (0.5 + self._rng.random()))
                )
        except BaseException:
            if waiting or in_flight:  # served, it left the set in the dispatch itself
                self._tasks.spawn(self._stop_waiting(agent.key, session_id), name="stop waiting")
            raise
        lease = ClusterLease(
            session_id=session_id,
            instance_id=_text(instance_id),
            instance_address=_text(address),
            cold_start=waiting,
        )
        self._leases[session_id] = lease
        if self._liveness is not None:
            self._liveness.opened(session_id, lease.instance_id)
        return lease

    async def _wait_for_instance(self, agent_key: str, within: float) -> None:
        """Until a ``ready`` message wakes this waiter, or ``within`` seconds."""
        waiter = asyncio.get_running_loop().create_future()
        queue = self._waiters.setdefault(agent_key, collections.deque())
        queue.append(waiter)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter, within)
        finally:
            with contextlib.suppress(ValueError):
                queue.remove(waiter)

    def _wake(self, agent_key: str, count: int) -> None:
        queue = self._waiters.get(agent_key)
        while queue and count > 0:
            waiter = queue.popleft()
            if not waiter.done():
                waiter.set_result(None)
                count -= 1

    async def _stop_waiting(self, agent_key: str, session_id: str) -> None:
        """The session gave up or left: hosts must not start an instance for it."""
        with contextlib.suppress(RedisError, OSError):  # else it expires by itself
            await self._redis.zrem(self._keys.waiting(agent_key), session_id)

    async def _listen_for_ready(self) -> None:
        """Follow the ``ready`` channel and wake waiting sessions; reconnect with backoff."""
        delay = 0.1
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(self._keys.ready_channel)
                    delay = 0.1
                    async for message in pubsub.listen():
                        if message.get("type") != "message":
                            continue
                        try:
                            data = json.loads(message["data"])
                            agent, capacity = str(data["agent"]), int(data["capacity"])
                        except (ValueError, KeyError, TypeError):
                            log.warning("! ignoring a malformed ready message")
                            continue
                        self._wake(agent, max(capacity, 1))
            except (RedisError, OSError) as exc:
                log.warning("! lost the ready subscription (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def cancel(self, lease: SessionLease) -> None:
        """Give the reservation back (the session never reached ``bot()``)."""
        assert isinstance(lease, ClusterLease)
        self._forget(lease.session_id)
        if not lease.ended.done():
            lease.ended.cancel()
        self._tasks.spawn(self._unreserve(lease), name=f"unreserve {lease.session_id}")

    def abandon(self, lease: SessionLease, problem: str) -> None:
        """The host never reported the end: forget the lease here. The host's own pool
        bounds its instances (pings, cancellation grace) and frees the slot in Redis."""
        assert isinstance(lease, ClusterLease)
        self._forget(lease.session_id)
        log.warning("! %s: %s", lease.instance_label, problem)

    async def _unreserve(self, lease: ClusterLease) -> None:
        with contextlib.suppress(RedisError, OSError):  # else it expires by itself
            await self._redis.zrem(self._keys.reserved(lease.instance_id), lease.session_id)

    async def stop_session(self, session_id: str) -> bool:
        """Ask every agent host to stop the session; the one running it cancels ``bot()``.

        The request is appended to the stop stream, so a host that is reconnecting to Redis
        reads it once it is back. True once it is there: which host (if any) holds the session
        shows only when its ``ended`` event arrives.

        Raises:
            ServiceUnavailable: 503, Redis is unreachable.
        """
        try:
            await append_event(self._redis, self._keys.stop_stream, {"session_id": session_id})
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from None
        return True

    async def locate(self, agent_key: str, session_id: str) -> SessionPlace | None:
        """Where the session is in the cluster (see :meth:`SessionPool.locate`).

        Raises:
            ServiceUnavailable: 503, Redis is unreachable.
        """
        try:
            found = await self._locate(
                keys=[self._keys.agent_instances(agent_key)],
                args=[self._keys.prefix, session_id, int(time.time() * 1000)],
            )
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from None
        if not found or found[0] is None:
            lease = self._leases.get(session_id)
            if lease is None:
                return None
            # This gateway relays it, but Redis no longer lists its instance: the host was
            # cut off from Redis for more than a heartbeat TTL, and the session goes on (a
            # stop reaches it through the stream once the host is back).
            return SessionPlace(address=lease.instance_address, running=True)
        address, running = found
        return SessionPlace(
            address=address.decode() if isinstance(address, bytes) else str(address),
            running=bool(int(running)),
        )

    def _forget(self, session_id: str) -> ClusterLease | None:
        lease = self._leases.pop(session_id, None)
        if lease is not None and self._liveness is not None:
            self._liveness.closed(session_id)
        return lease

    def _resolve(self, session_id: str, end: SessionEnd) -> None:
        lease = self._forget(session_id)
        if lease is None:
            if self._liveness is not None:  # perhaps a dead gateway's session
                self._liveness.foreign_end(session_id, end)
        elif not lease.ended.done():
            lease.ended.set_result(end)

    async def _listen_for_endings(self) -> None:
        """Follow the ``ended`` stream from where this gateway got to, across reconnects."""
        await StreamReader(
            self._redis, self._keys.ended_stream, self._on_ended, what="ended events"
        ).run()

    async def _on_ended(self, data: dict[str, Any]) -> None:
        # Every gateway reads every event. Those of sessions relayed elsewhere (or already
        # resolved, when a host appends an event again) find no lease here; they still go to
        # _resolve, so that liveness can finish the record of a session a dead gateway relayed.
        self._resolve(
            str(data["session_id"]),
            SessionEnd(
                status=data["status"],
                error=data.get("error"),
                client_disconnected=bool(data.get("client_disconnected")),
                bot_seconds=data.get("bot_seconds"),
                resources=data.get("resources"),
            ),
        )

    async def _watch_instances(self) -> None:
        """A session whose instance died with its host ends as ``agent_crashed``.

        Missing from Redis is not enough: a host cut off from Redis (a partition) lets its
        instances' hashes expire while their sessions go on, relayed over the gateway's own TCP
        connections. So an instance must be missing from Redis *and* fail to answer
        ``GET /livez`` at its address, at three checks in a row (1.5 heartbeat TTLs; after a
        Redis restart, live hosts register again within a third of a TTL). A session whose
        instance answers is never ended early: its host reports the end once it reaches Redis
        again, or the recorder's own deadline ends it.
        """
        while True:
            await asyncio.sleep(HEARTBEAT_TTL_S / 2)
            by_instance: dict[str, list[ClusterLease]] = {}
            for lease in self._leases.values():
                by_instance.setdefault(lease.instance_id, []).append(lease)
            ids = list(by_instance)
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for instance_id in ids:
                        pipe.exists(self._keys.instance(instance_id))
                    present = await pipe.execute()
            except (RedisError, OSError):
                continue  # cannot tell; try again later
            gone = [iid for iid, alive in zip(ids, present, strict=True) if not alive]
            # Probed at once: a vanished node makes each probe wait for its timeout.
            answered = await asyncio.gather(
                *(_answers(by_instance[iid][0].instance_address) for iid in gone)
            )
            missing: dict[str, int] = {}
            for instance_id, answers in zip(gone, answered, strict=True):
                if answers:
                    continue
                misses = missing[instance_id] = self._missing.get(instance_id, 0) + 1
                if misses < 3:
                    continue
                del missing[instance_id]
                for lease in by_instance[instance_id]:
                    self._resolve(
                        lease.session_id,
                        SessionEnd(status="agent_crashed", error="agent host lost"),
                    )
            self._missing = missing


async def _answers(address: str) -> bool:
    """True when the runtime at ``tcp:host:port`` answers ``GET /livez`` with 200 in time."""
    kind, _, rest = address.partition(":")
    host, _, port = rest.rpartition(":")
    if kind != "tcp" or not port.isdigit():
        return False
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(INSTANCE_PROBE_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(host.strip("[]"), int(port))
            writer.write(b"GET /livez HTTP/1.1\r\nHost: catflap\r\nConnection: close\r\n\r\n")
            status_line = await reader.readline()
    except (OSError, TimeoutError):
        return False
    finally:
        if writer is not None:
            writer.close()
    return status_line.split(b" ", 2)[1:2] == [b"200"]
