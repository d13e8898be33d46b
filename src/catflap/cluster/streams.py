"""Session lifecycle events on Redis Streams: appended with a bound, read from a kept position.

Theory of operation:

- Two streams carry what pub/sub used to: ``{prefix}:ended`` (an agent host appends the outcome
  when ``bot()`` has ended; every gateway reads it, and the one relaying the session finishes
  its record) and ``{prefix}:stop`` (a gateway appends a ``DELETE``; every agent host reads it,
  and the one running the session cancels ``bot()``). Each append trims the stream to about
  :data:`~catflap.contract.limits.LIFECYCLE_STREAM_MAXLEN` entries.
- Both are fan-out: every reader must see every entry. A consumer group hands each entry to
  one consumer of the group, so fan-out would need a group per process, and groups are never
  removed by Redis: every SIGKILLed gateway or host would leave one behind, with its pending
  list. What a group would add, redelivery to a reader that crashed before acknowledging, is
  worth nothing here: what a reader does with an entry lives in its memory (a gateway's leases,
  a host's running bots) and dies with the process. So each reader is a :class:`StreamReader`:
  ``XREAD`` from the id of the last entry it handled, kept in memory across reconnects. A
  reader that loses Redis for a while retries with backoff and reads on from that id, so
  nothing appended meanwhile is lost, within the stream's bound.
- A reader starts at the stream's end (what was appended before it existed is not its
  business). After a reconnect it reads on from its kept id if that entry is still in the
  stream. If it is not, the stream is not the one it was reading (Redis restarted without
  persistence, or was replaced) or the bound trimmed it: the reader then reads the stream from
  its start. That may hand it events it already handled, which is harmless by design: a
  gateway resolves a session's lease once, and a stop of a session that already stopped finds
  nothing to stop. Only a trim past entries never read loses events; the log says so.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from catflap.contract.limits import LIFECYCLE_STREAM_MAXLEN, REDIS_SOCKET_TIMEOUT_S

__all__ = ["StreamReader", "append_event", "stream_id"]

log = logging.getLogger("catflap.cluster")

#: How long one ``XREAD`` blocks waiting for an entry: half the Redis client's socket timeout
#: (``REDIS_SOCKET_TIMEOUT_S``, :mod:`catflap.cluster.client`), which it must stay below, or
#: every quiet stretch would look like a lost connection; an entry arriving meanwhile ends the
#: wait at once.
READ_BLOCK_MS = int(REDIS_SOCKET_TIMEOUT_S * 1000 / 2)
#: Entries handled per ``XREAD``: a reader making up for an outage catches up in batches.
READ_BATCH = 500
#: Reconnect backoff, first and longest wait (as the hosts' queued updates use).
_BACKOFF_FIRST_S = 0.1
_BACKOFF_MAX_S = 5.0

Handler = Callable[[dict[str, Any]], Awaitable[None]]


def stream_id(raw: bytes | str) -> tuple[int, int]:
    """``b"1700000000000-3"`` as ``(1700000000000, 3)``, for comparing entry ids."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


async def append_event(client: aioredis.Redis, stream: str, event: dict[str, Any]) -> None:
    """Append ``event`` (one JSON document in the entry's ``data`` field) to ``stream``,
    trimming it to about :data:`LIFECYCLE_STREAM_MAXLEN` entries.

    Raises:
        RedisError, OSError: Redis could not be reached; the caller retries or reports 503.
    """
    await client.xadd(
        stream, {"data": json.dumps(event)}, maxlen=LIFECYCLE_STREAM_MAXLEN, approximate=True
    )


class StreamReader:
    """Follows one stream from a kept position, across reconnects, handing each event over."""

    def __init__(self, client: aioredis.Redis, stream: str, handle: Handler, *, what: str) -> None:
        """
        Args:
            handle: called with each entry's JSON document, in order; an exception it raises
                is logged and the entry skipped (one bad entry must not stop the reader).
            what: names the stream in log lines (``"ended events"``).
        """
        self._redis = client
        self._stream = stream
        self._handle = handle
        self._what = what
        #: Id of the last entry handled; None until the first successful read of the end.
        self.last_id: bytes | None = None

    async def run(self) -> None:
        """Read until cancelled; on a Redis error wait (backoff) and read on from ``last_id``."""
        delay = _BACKOFF_FIRST_S
        reconnected = False
        while True:
            try:
                if self.last_id is None:
                    self.last_id = await self._end()
                elif reconnected:
                    await self._check_continuity()
                reconnected = False
                delay = _BACKOFF_FIRST_S
                while True:
                    await self._read_once()
            except (RedisError, OSError) as exc:
                log.warning(
                    "! lost Redis while reading %s (%s); retrying in %.1f s, then reading on "
                    "from where it stopped",
                    self._what,
                    exc,
                    delay,
                )
                reconnected = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX_S)

    async def _end(self) -> bytes:
        """The id after which entries are new to this reader: the last entry's, or 0-0."""
        last: Any = await self._redis.xrevrange(self._stream, count=1)
        return _as_bytes(last[0][0]) if last else b"0-0"

    async def _check_continuity(self) -> None:
        """After a reconnect: read on from the kept id if its entry is still there, else from
        the start of what the stream holds (handlers take a repeated event calmly)."""
        assert self.last_id is not None
        if self.last_id == b"0-0" or await self._redis.xrange(
            self._stream, min=self.last_id, max=self.last_id, count=1
        ):
            return
        self.last_id = b"0-0"
        length = int(await self._redis.xlen(self._stream))
        if length < LIFECYCLE_STREAM_MAXLEN:
            log.warning(
                "! the %s stream in Redis is not the one read before (Redis restarted "
                "without persistence, or was replaced); reading it from its start",
                self._what,
            )
        else:
            log.error(
                "! the last of the %s read was trimmed from the stream meanwhile (the outage "
                "outlasted its %d entries): reading what is left from its start; events "
                "trimmed before they were read are lost, and their sessions' records with them",
                self._what,
                LIFECYCLE_STREAM_MAXLEN,
            )

    async def _read_once(self) -> None:
        assert self.last_id is not None
        # RESP2 (the client's default): [[stream, [(id, {field: value}), ...]]], or [] when the
        # block ran out.
        answer: Any = await self._redis.xread(
            {self._stream: self.last_id}, count=READ_BATCH, block=READ_BLOCK_MS
        )
        for _stream, entries in answer or []:
            for entry_id, fields in entries:
                await self._dispatch(fields)
                self.last_id = _as_bytes(entry_id)

    async def _dispatch(self, fields: dict[bytes, bytes]) -> None:
        try:
            event = json.loads(fields[b"data"])
            if not isinstance(event, dict):
                raise ValueError("the entry is not a JSON object")
            await self._handle(event)
        except RedisError:
            # A handler that talks to Redis: retry the entry after reconnecting. Not OSError:
            # a handler's own socket error (an instance's control channel) would retry the
            # same entry forever and stall every later one.
            raise
        except Exception:
            log.exception("! skipping an unreadable entry of %s", self._what)


def _as_bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()
