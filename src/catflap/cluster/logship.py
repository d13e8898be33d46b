"""Session logs without a shared disk: agent hosts ship them to Redis, gateways read them there.

Theory of operation
-------------------

Agent runtimes write each session's lines to ``<log_dir>/<org>/<agent>/<session_id>.jsonl``
on their host (:mod:`catflap.runtime.botlogs`), as in ``catflap serve``. In cluster mode the
host's :class:`LogShipper` also copies them to Redis, unchanged:

- when a session starts, a task reads its file every
  :data:`~catflap.contract.limits.LOGSHIP_POLL_INTERVAL_S` from where it stopped, and adds each
  complete line to the session's stream (:meth:`~catflap.cluster.keys.Keys.session_log`) with
  the entry id ``0-<line number>``: line numbers are the file's, so a page at ``offset`` is the
  same lines in the file and in Redis, and ``catflap logs --follow`` keeps its place while the
  stream is trimmed;
- when the session ends, :meth:`LogShipper.finish` ships the rest before the host reports the
  end (the runtime completes the file before it reports it), so a follower that sees the
  session ended has every line;
- a failed shipment is retried from the same line, so Redis going away loses nothing that is
  still in the file; one script (:data:`SHIP_LUA`) adds only lines the stream does not hold yet,
  so a retry after a lost answer adds nothing twice.

Bounds (:mod:`catflap.contract.limits`, costs in docs/scaling.md): each stream keeps its newest
``LOGSHIP_STREAM_MAXLEN`` records of at most ``LOGSHIP_RECORD_MAX_BYTES`` each and expires
``LOGSHIP_RETENTION_S`` after its last line; each agent keeps the streams of its newest
``LOGSHIP_SESSIONS_PER_AGENT_MAX`` sessions (:meth:`~catflap.cluster.keys.Keys.agent_logs`
indexes them by last line), the older ones are deleted.

The gateways' logs API reads them through :class:`RedisLogSource`, the cluster's
:class:`~catflap.logstore.LogSource`: the same paging, order and byte bounds as the files
(:func:`~catflap.logstore.page_of`, :func:`~catflap.logstore.merge_recent`). What the records
say is what the bot wrote: catflap adds nothing to them (no key, no Redis address).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from catflap.cluster.keys import Keys
from catflap.contract import limits
from catflap.contract.errors import RedisUnreachable
from catflap.logs import session_log
from catflap.logstore import RECENT_SESSION_MAX_BYTES, LogPage, Order, merge_recent, page_of
from catflap.runtime.botlogs import session_log_path
from catflap.tasks import TaskSet

__all__ = ["SHIP_LUA", "LogShipper", "RedisLogSource", "fit_record"]

log = logging.getLogger("catflap.cluster")

#: KEYS[1]: the session's stream, KEYS[2]: the agent's index. ARGV: maxlen, ttl_ms, session
#: id, now_ms, the first record's line number, sessions kept per agent, the streams' key
#: prefix, then the records. Adds the records the stream does not hold yet (a retry after a
#: lost answer), refreshes both TTLs, and deletes the streams of the agent's sessions past the
#: bound. Returns the stream's last line number before the call.
SHIP_LUA = """
local last = 0
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #top > 0 then last = tonumber(string.match(top[1][1], '%-(%d+)$')) end
local first = tonumber(ARGV[5])
for i = 8, #ARGV do
  local n = first + i - 8
  if n > last then
    redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[1], '0-' .. n, 'r', ARGV[i])
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local now = tonumber(ARGV[4])
redis.call('ZADD', KEYS[2], now, ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[2]))
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[6])
if over > 0 then
  for _, sid in ipairs(redis.call('ZRANGE', KEYS[2], 0, over - 1)) do
    redis.call('DEL', ARGV[7] .. sid)
  end
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, over - 1)
end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return last
"""

#: Entries read from a stream per call while a page fills up.
_CHUNK = 256
_CUT_NOTE = " [cut in the cluster's copy; the agent host's session file has the whole line]"


def fit_record(raw: bytes, max_bytes: int = limits.LOGSHIP_RECORD_MAX_BYTES) -> bytes:
    """The record as shipped: unchanged when it fits ``max_bytes``, else with its ``line`` cut
    (and a note saying so) until it does."""
    if len(raw) <= max_bytes:
        return raw
    try:
        record = json.loads(raw)
    except ValueError:
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("line"), str):
        return raw[:max_bytes]  # not the runtime's record: its first bytes
    line: str = record["line"]
    while line:
        excess = len(_dump({**record, "line": line + _CUT_NOTE})) - max_bytes
        if excess <= 0:
            break
        encoded = line.encode()
        line = encoded[: max(0, len(encoded) - excess)].decode("utf-8", "ignore")
    fitted = _dump({**record, "line": line + _CUT_NOTE})
    return fitted if len(fitted) <= max_bytes else raw[:max_bytes]


def _dump(record: dict[str, Any]) -> bytes:
    return json.dumps(record, ensure_ascii=False, default=str).encode()


@dataclass(frozen=True, slots=True)
class _Batch:
    records: list[bytes]
    #: Bytes of the file the records span.
    size: int
    #: The read stopped at ``max_bytes``: more may be waiting.
    full: bool


def _read_batch(path: Path, offset: int, max_bytes: int) -> _Batch:
    """The complete lines after ``offset`` within ``max_bytes``."""
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            data = handle.read(max_bytes)
    except FileNotFoundError:  # no line yet
        return _Batch([], 0, False)
    full = len(data) >= max_bytes
    end = data.rfind(b"\n")
    if end < 0:
        if not full:
            return _Batch([], 0, False)  # a line still being written
        # A line longer than a batch (not one the runtime writes): ship this much of it.
        return _Batch([data], len(data), True)
    return _Batch(data[:end].split(b"\n"), end + 1, full)


@dataclass
class _Tail:
    """One session's file and how far it is shipped."""

    session_id: str
    path: Path
    offset: int = 0
    lines: int = 0
    done: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    task: asyncio.Task[None] | None = None


class LogShipper:
    """Copies one agent's session files on this host to Redis, while the sessions run."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        log_dir: Path,
        *,
        org: str,
        agent: str,
        poll_interval: float = limits.LOGSHIP_POLL_INTERVAL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``log_dir`` is the runtimes' ``--log-dir``; ``clock`` gives the index's scores."""
        self._keys = keys
        self._log_dir = log_dir
        self._org = org
        self._agent = agent
        self._interval = poll_interval
        self._clock = clock
        self._ship_script = client.register_script(SHIP_LUA)
        self._tails: dict[str, _Tail] = {}
        #: The followers, so that one that fails unexpectedly is logged, not lost.
        self._tasks = TaskSet("log shipping")

    def session_started(self, session_id: str) -> None:
        """Start shipping the session's lines as they are written."""
        if session_id in self._tails:
            return
        tail = self._tail(session_id)
        tail.task = self._tasks.spawn(self._follow(tail), name=f"log shipping {session_id}")

    async def finish(self, session_id: str) -> None:
        """Ship the session's remaining lines, then stop following its file.

        Raises:
            RedisError, OSError: Redis did not take them; call again (nothing is lost or
                shipped twice).
        """
        tail = self._tails.get(session_id) or self._tail(session_id)
        async with tail.lock:
            while await self._ship(tail):
                pass
            tail.done = True
        self._tails.pop(session_id, None)
        if tail.task is not None:
            tail.task.cancel()

    async def close(self) -> None:
        """Stop following every file (a host going down ships what :meth:`finish` got)."""
        self._tails.clear()
        await self._tasks.aclose()

    @property
    def following(self) -> int:
        """Sessions whose files are followed now."""
        return len(self._tails)

    def _tail(self, session_id: str) -> _Tail:
        path = session_log_path(self._log_dir, self._org, self._agent, session_id)
        tail = self._tails[session_id] = _Tail(session_id, path)
        return tail

    async def _follow(self, tail: _Tail) -> None:
        delay = self._interval
        while True:
            async with tail.lock:
                if tail.done:
                    return
                try:
                    more = await self._ship(tail)
                    delay = self._interval
                except (RedisError, OSError) as exc:
                    more = False
                    session_log(log, tail.session_id, agent=self._agent, org=self._org).warning(
                        "! could not ship the session's log lines (%s); retrying in %.1f s",
                        exc,
                        delay,
                    )
                    delay = min(delay * 2, 5.0)
            await asyncio.sleep(0 if more else delay)

    async def _ship(self, tail: _Tail) -> bool:
        """Ship one batch; True when the batch was full (more may be waiting)."""
        batch = await asyncio.to_thread(
            _read_batch, tail.path, tail.offset, limits.LOGSHIP_BATCH_MAX_BYTES
        )
        if not batch.records:
            return False
        await self._ship_script(
            keys=[
                self._keys.session_log(self._org, self._agent, tail.session_id),
                self._keys.agent_logs(self._org, self._agent),
            ],
            args=[
                limits.LOGSHIP_STREAM_MAXLEN,
                int(limits.LOGSHIP_RETENTION_S * 1000),
                tail.session_id,
                int(self._clock() * 1000),
                tail.lines + 1,
                limits.LOGSHIP_SESSIONS_PER_AGENT_MAX,
                self._keys.session_log_prefix(self._org, self._agent),
                *(fit_record(raw) for raw in batch.records),
            ],
        )
        tail.offset += batch.size
        tail.lines += len(batch.records)
        return batch.full


def _line_number(entry_id: bytes | str | None) -> int:
    """The line number in an entry id ``0-<n>``."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    return int(text.rpartition("-")[2])


class RedisLogSource:
    """The cluster's :class:`~catflap.logstore.LogSource`: the lines agent hosts shipped."""

    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self._redis = client
        self._keys = keys

    async def read_session(
        self, org: str, agent: str, session_id: str, *, limit: int, offset: int, order: Order
    ) -> LogPage | None:
        """Raises:
        RedisUnreachable: 503, as every cluster read while Redis is away."""
        key = self._keys.session_log(org, agent, session_id)
        try:
            return await self._page(
                key, session_id, limit, offset, order, limits.LOGS_PAGE_MAX_BYTES
            )
        except (RedisError, OSError) as exc:
            raise _unreachable(exc) from None

    async def read_recent(
        self, org: str, agent: str, *, limit: int, offset: int, order: Order
    ) -> LogPage:
        """Raises:
        RedisUnreachable: 503, as every cluster read while Redis is away."""
        index = self._keys.agent_logs(org, agent)
        try:
            ids = await self._redis.zrevrange(index, 0, limits.LOGS_RECENT_SESSIONS_MAX - 1)
            pages: list[LogPage] = []
            for raw_id in ids:
                sid = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
                key = self._keys.session_log(org, agent, sid)
                page = await self._page(
                    key, sid, offset + limit, 0, order, RECENT_SESSION_MAX_BYTES
                )
                if page is not None:
                    pages.append(page)
        except (RedisError, OSError) as exc:
            raise _unreachable(exc) from None
        return merge_recent(pages, limit=limit, offset=offset, order=order)

    async def _page(
        self, key: str, session_id: str, take: int, skip: int, order: Order, max_bytes: int
    ) -> LogPage | None:
        """Lines ``skip`` to ``skip + take`` of the stream in ``order``, by line number (the
        file's), read by chunks until the page is full or passes ``max_bytes``."""
        top = await self._redis.xrevrange(key, "+", "-", count=1)
        if not top:
            return None  # no line shipped, or expired
        total = _line_number(top[0][0])
        records: list[bytes] = []
        size = 0
        # The next line number to read, and the way: up from skip + 1 (line numbers start at
        # 1), or down from total - skip.
        step = 1 if order == "asc" else -1
        at = skip + 1 if order == "asc" else total - skip
        while len(records) < take and size <= max_bytes and 1 <= at <= total:
            count = min(_CHUNK, take - len(records))
            if order == "asc":
                chunk = await self._redis.xrange(key, f"0-{at}", "+", count=count)
            else:
                chunk = await self._redis.xrevrange(key, f"0-{at}", "-", count=count)
            if not chunk:
                break
            for entry_id, fields in chunk:
                raw = (fields or {}).get(b"r", b"")
                record = raw if isinstance(raw, bytes) else str(raw).encode()
                records.append(record)
                size += len(record)
                at = _line_number(entry_id) + step
        return page_of(total, records, session_id, max_bytes)


def _unreachable(exc: Exception) -> RedisUnreachable:
    log.error("! Redis unreachable while reading session logs (%s)", exc)
    return RedisUnreachable()
