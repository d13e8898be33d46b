"""Session records in Redis, for clusters without PostgreSQL, kept for a bounded time.

Each record is one JSON string that expires after :data:`SESSION_RETENTION_S`; a sorted set
per agent indexes them by creation time. Index entries whose record expired are pruned as
they are met.
"""

from __future__ import annotations

import dataclasses
import json
import time

import redis.asyncio as aioredis

from catflap.cluster.keys import SESSION_RETENTION_S, Keys
from catflap.sessions.query import SessionQuery
from catflap.sessions.record import SessionRecord

__all__ = ["RedisSessionStore"]


class RedisSessionStore:
    """A :class:`~catflap.sessions.store.SessionStore` on the cluster's Redis."""

    def __init__(
        self, client: aioredis.Redis, keys: Keys, *, retention_s: float = SESSION_RETENTION_S
    ) -> None:
        self._redis = client
        self._keys = keys
        self._retention_ms = int(retention_s * 1000)

    async def save(self, record: SessionRecord) -> None:
        index = self._keys.agent_sessions(record.organization, record.agent)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(
                self._keys.session(record.session_id),
                json.dumps(dataclasses.asdict(record)),
                px=self._retention_ms,
            )
            pipe.zadd(index, {record.session_id: record.created_at})
            # Entries older than the retention can go; their records are gone too.
            cutoff = time.time() - self._retention_ms / 1000
            pipe.zremrangebyscore(index, "-inf", cutoff)
            await pipe.execute()

    async def get(self, session_id: str) -> SessionRecord | None:
        raw = await self._redis.get(self._keys.session(session_id))
        return SessionRecord(**json.loads(raw)) if raw else None

    async def query(self, query: SessionQuery) -> tuple[int, list[SessionRecord]]:
        index = self._keys.agent_sessions(query.org, query.agent)
        low = "-inf" if query.start_time is None else query.start_time
        high = "+inf" if query.end_time is None else query.end_time
        ids = await self._redis.zrevrangebyscore(index, high, low)
        matched: list[SessionRecord] = []
        for chunk_start in range(0, len(ids), 500):
            chunk = ids[chunk_start : chunk_start + 500]
            raws = await self._redis.mget([self._keys.session(_text(i)) for i in chunk])
            for raw in raws:
                if raw is None:
                    continue
                record = SessionRecord(**json.loads(raw))
                if query.matches(record):
                    matched.append(record)
        return len(matched), matched[query.offset : query.offset + query.limit]

    async def close(self) -> None:
        """The Redis client belongs to the caller."""


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
