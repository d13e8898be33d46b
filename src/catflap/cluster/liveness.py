"""Gateway liveness: a gateway that dies does not leave its sessions' records open.

Each gateway (``catflap gateway``) keeps three things in Redis (names in
:class:`~catflap.cluster.keys.Keys`):

- ``gw:{id}``, its heartbeat: refreshed every :data:`GATEWAY_TTL_S` / 3, expiring after
  :data:`GATEWAY_TTL_S`. Its absence means the gateway is dead.
- ``gateways``, a sorted set of gateway id -> last heartbeat (ms), so that survivors find the
  dead and know when each was last alive.
- ``gw:{id}:sessions``, session id -> instance id of every session it relays, written when a
  slot is reserved and removed a little after the session ended (so a gateway dying between
  the end and the record's final save still has it reaped).

Every gateway looks for dead ones every half TTL. One survivor at a time claims a dead gateway
(:data:`CLAIM_LUA`: ``SET NX`` on ``gw:{id}:claim``, only while ``gw:{id}`` is missing) and
goes through its sessions:

- a session its agent host still runs (the instance's ``:active`` set holds it) is left alone:
  the survivor keeps the claim and, when the host's ``ended`` report arrives, finishes the record
  with that report (``completed``, ``client_closed``, ``stopped``...): the host saw the end, so
  its report wins;
- any other session whose record is still open is finished ``gateway_lost``, with ``endedAt``
  the dead gateway's last heartbeat (or, for a session seen running after that, the time its
  end was noticed);
- once none is left, the gateway's keys are deleted.

A gateway whose heartbeat lapsed only because it was cut off from Redis is not harmed: its
live sessions are in their hosts' ``:active`` sets, so they are left alone, and when it comes
back it writes its sessions again and finishes their records itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from catflap.cluster.keys import GATEWAY_TTL_S, Keys
from catflap.contract.status import CompletionStatus
from catflap.logs import session_log
from catflap.pool.instance import SessionEnd
from catflap.sessions.store import SessionStore
from catflap.tasks import TaskSet

__all__ = ["CLAIM_LUA", "FORGET_LUA", "GatewayLiveness"]

log = logging.getLogger("catflap.cluster")

#: KEYS[1]: the dead gateway's claim key, KEYS[2]: its heartbeat key. ARGV: this gateway's id,
#: claim TTL (ms). Takes (or renews) the claim only while the heartbeat is missing; 1 if this
#: gateway holds it now.
CLAIM_LUA = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

#: KEYS[1]: heartbeat, KEYS[2]: sessions hash, KEYS[3]: claim, KEYS[4]: the gateways set.
#: ARGV: this gateway's id, the dead gateway's id. Deletes a dead gateway's keys once it has no
#: session left, it is still dead and this gateway holds the claim.
FORGET_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if redis.call('HLEN', KEYS[2]) > 0 then return 0 end
if redis.call('GET', KEYS[3]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('ZREM', KEYS[4], ARGV[2])
return 1
"""


@dataclass(frozen=True, slots=True)
class _Adopted:
    """A dead gateway's session that its host still ran when last checked."""

    gateway_id: str
    instance_id: str
    #: Rounds that found it gone from the instance's ``:active`` set; see ``_finish_gateway``.
    missing: int = 0


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _status_of(end: SessionEnd) -> CompletionStatus:
    """The record's status from the host's report alone (no relay was there to add to it)."""
    if end.status == "completed" and end.client_disconnected:
        return "client_closed"
    return end.status


class GatewayLiveness:
    """This gateway's heartbeat and session list in Redis, and the reaper of dead gateways."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        store: SessionStore,
        *,
        ttl: float = GATEWAY_TTL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = client
        self._keys = keys
        self._store = store
        self._ttl = ttl
        self._clock = clock
        self.gateway_id = secrets.token_hex(4)
        self._claim = client.register_script(CLAIM_LUA)
        self._forget = client.register_script(FORGET_LUA)
        #: This gateway's sessions: id -> instance id.
        self._open: dict[str, str] = {}
        #: Writes to ``gw:{id}:sessions`` not yet in Redis: id -> instance id (HSET) or None
        #: (HDEL). Newer entries replace older ones, so the hash ends up as ``_open``.
        self._pending: dict[str, str | None] = {}
        self._wake = asyncio.Event()
        #: Dead gateways' sessions still running on a host, waiting for the host's report.
        self._adopted: dict[str, _Adopted] = {}
        #: Finishing a record is read, change, write: one at a time.
        self._finishing = asyncio.Lock()
        self._tasks = TaskSet("gateway liveness")

    # --- this gateway -------------------------------------------------------------------------

    def start(self) -> None:
        self._tasks.spawn(self._heartbeat(), name="gateway heartbeat")
        self._tasks.spawn(self._write_sessions(), name="gateway sessions")
        self._tasks.spawn(self._reap(), name="dead gateway reaper")

    async def close(self) -> None:
        """Stop; a gateway that shut down cleanly has nothing to reap, so its keys go."""
        await self._tasks.aclose()
        with contextlib.suppress(RedisError, OSError):  # else a survivor reaps them
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._keys.gateway(self.gateway_id))
                if not self._open:
                    pipe.delete(self._keys.gateway_sessions(self.gateway_id))
                    pipe.zrem(self._keys.gateways, self.gateway_id)
                await pipe.execute()

    def opened(self, session_id: str, instance_id: str) -> None:
        """A slot was reserved for the session on ``instance_id``: this gateway relays it."""
        self._open[session_id] = instance_id
        self._queue(session_id, instance_id)

    def closed(self, session_id: str) -> None:
        """The session's end is known here (or it never started); its record is finished
        right after. The Redis entry goes a TTL later: should this gateway die before the
        final save, the survivor still finds the session."""
        if self._open.pop(session_id, None) is None:
            return
        asyncio.get_running_loop().call_later(self._ttl, self._forget_later, session_id)

    def _forget_later(self, session_id: str) -> None:
        # A retry on another instance opens the same session id again (dispatch cancels the
        # first lease, then acquires): its entry must stay.
        if session_id not in self._open:
            self._queue(session_id, None)

    def _queue(self, session_id: str, instance_id: str | None) -> None:
        self._pending[session_id] = instance_id
        self._wake.set()

    async def _write_sessions(self) -> None:
        delay = 0.1
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, {}
            key = self._keys.gateway_sessions(self.gateway_id)
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for session_id, instance_id in batch.items():
                        if instance_id is None:
                            pipe.hdel(key, session_id)
                        else:
                            pipe.hset(key, session_id, instance_id)
                    await pipe.execute()
                delay = 0.1
            except (RedisError, OSError) as exc:
                for session_id, instance_id in batch.items():  # newer writes win
                    self._pending.setdefault(session_id, instance_id)
                log.warning("! could not list sessions in Redis (%s); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                self._wake.set()

    async def _heartbeat(self) -> None:
        key = self._keys.gateway(self.gateway_id)
        while True:
            now_ms = int(self._clock() * 1000)
            try:
                async with self._redis.pipeline(transaction=True) as pipe:
                    pipe.set(key, now_ms, px=int(self._ttl * 1000), get=True)
                    pipe.zadd(self._keys.gateways, {self.gateway_id: now_ms})
                    previous, _ = await pipe.execute()
                if previous is None and self._open:
                    # Our heartbeat lapsed (Redis restarted, or we were cut off): a survivor
                    # may have dropped sessions that ended meanwhile; list the live ones again.
                    log.warning("! this gateway's heartbeat had lapsed; listing its sessions again")
                    for session_id, instance_id in self._open.items():
                        self._pending.setdefault(session_id, instance_id)
                    self._wake.set()
            except (RedisError, OSError) as exc:
                log.warning("! gateway heartbeat failed (%s)", exc)
            await asyncio.sleep(self._ttl / 3)

    # --- dead gateways ------------------------------------------------------------------------

    def foreign_end(self, session_id: str, end: SessionEnd) -> None:
        """A host reported the end of a session this gateway does not relay: if it is a dead
        gateway's session we are watching, its record gets the host's report."""
        adopted = self._adopted.pop(session_id, None)
        if adopted is not None:
            self._tasks.spawn(
                self._finish_reported(session_id, adopted, end), name=f"finish {session_id}"
            )

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(self._ttl / 2)
            try:
                await self.reap_once()
            except (RedisError, OSError) as exc:
                log.warning("! could not look for dead gateways (%s)", exc)
            except Exception:  # the session store failed; try again at the next round
                log.exception("! could not finish a dead gateway's records")

    async def reap_once(self) -> None:
        """One round: claim each dead gateway nobody else handles and finish its records."""
        entries = await self._redis.zrange(self._keys.gateways, 0, -1, withscores=True)
        for entry in entries:
            raw_id, score = entry[0], entry[1]
            gateway_id = _text(raw_id)
            if gateway_id == self.gateway_id:
                continue
            claimed = await self._claim(
                keys=[self._keys.gateway_claim(gateway_id), self._keys.gateway(gateway_id)],
                args=[self.gateway_id, int(self._ttl * 2000)],
            )
            if not int(claimed):
                # Alive again, or another survivor has it: stop watching its sessions.
                for session_id in [
                    s for s, a in self._adopted.items() if a.gateway_id == gateway_id
                ]:
                    del self._adopted[session_id]
                continue
            await self._finish_gateway(gateway_id, last_beat=float(score) / 1000)

    async def _finish_gateway(self, gateway_id: str, *, last_beat: float) -> None:
        key = self._keys.gateway_sessions(gateway_id)
        sessions = {_text(s): _text(i) for s, i in (await self._redis.hgetall(key)).items()}
        for session_id, instance_id in sessions.items():
            if await self._redis.sismember(self._keys.active(instance_id), session_id):
                if session_id not in self._adopted:
                    session_log(log, session_id).info(
                        "= the session's gateway %s died but it still runs on %s; "
                        "waiting for its host's report",
                        gateway_id,
                        instance_id,
                    )
                self._adopted[session_id] = _Adopted(gateway_id, instance_id)
                continue
            adopted = self._adopted.get(session_id)
            if adopted is not None and adopted.missing == 0:
                # Seen running after the gateway died, gone now: its host leaves :active one
                # round trip before it appends the end, so give the report one more round.
                self._adopted[session_id] = dataclasses.replace(adopted, missing=1)
                continue
            # Seen running after the gateway died: it ended between two rounds, and its host's
            # report was missed. Else it ended with the gateway.
            seen_running = self._adopted.pop(session_id, None) is not None
            await self._finish_record(
                session_id,
                status="gateway_lost",
                ended_at=self._clock() if seen_running else last_beat,
                error=f"the gateway relaying this session ({gateway_id}) died",
            )
            await self._redis.hdel(key, session_id)
        if not any(a.gateway_id == gateway_id for a in self._adopted.values()):
            forgotten = await self._forget(
                keys=[
                    self._keys.gateway(gateway_id),
                    key,
                    self._keys.gateway_claim(gateway_id),
                    self._keys.gateways,
                ],
                args=[self.gateway_id, gateway_id],
            )
            if int(forgotten) and sessions:
                log.info(
                    "= finished the records of dead gateway %s (%d session(s))",
                    gateway_id,
                    len(sessions),
                )

    async def _finish_reported(self, session_id: str, adopted: _Adopted, end: SessionEnd) -> None:
        try:
            await self._finish_record(
                session_id,
                status=_status_of(end),
                ended_at=self._clock(),
                error=end.error,
                end=end,
            )
            await self._redis.hdel(self._keys.gateway_sessions(adopted.gateway_id), session_id)
        except Exception:  # the next round finishes it as gateway_lost instead
            session_log(log, session_id).exception("! could not finish the session's record")

    async def _finish_record(
        self,
        session_id: str,
        *,
        status: CompletionStatus,
        ended_at: float,
        error: str | None,
        end: SessionEnd | None = None,
    ) -> None:
        """Finish a record left open; one already finished (by its own gateway, or another
        round) is left as it is."""
        async with self._finishing:
            record = await self._store.get(session_id)
            if record is None or record.completion_status is not None:
                return
            record.ended_at = max(ended_at, record.created_at)
            record.completion_status = status
            record.error = error
            if end is not None:
                record.resource_metrics = end.resources
            await self._store.save(record)
        session_log(log, session_id, agent=record.agent, org=record.organization).info(
            "= session of a dead gateway recorded %s", status
        )
