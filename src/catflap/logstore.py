"""Session log files on disk: reading them for the logs API, and keeping them bounded.

Agent runtimes write one file per session (:mod:`catflap.runtime.botlogs`)::

    <log_dir>/<org>/<agent>/<session_id>.jsonl

one JSON object a line, with Pipecat Cloud's ``bot.jsonl`` fields (``@timestamp``, ``stream``,
``level``, ``session_id``, ``line``) plus ``agent`` and ``org``. :class:`LogStore` reads pages of
those lines in either order without loading a whole file, and :meth:`LogStore.prune` deletes
files past the retention age, then the oldest ones while the total is over the size limit. A
page stops at :data:`~catflap.contract.limits.LOGS_PAGE_MAX_BYTES` of lines; ``total`` counts
them all.
:func:`prune_forever` runs that every minute; ``catflap serve`` and ``catflap agent-host``
start it. A line still being written (no newline yet) is never returned.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, Protocol, TypeVar

from catflap.contract import limits

__all__ = [
    "RECENT_SESSION_MAX_BYTES",
    "FileLogSource",
    "LogEntry",
    "LogPage",
    "LogSource",
    "LogStore",
    "Order",
    "PruneResult",
    "merge_recent",
    "page_of",
    "prune_forever",
]

log = logging.getLogger("catflap.logs")

Order = Literal["asc", "desc"]

#: Bytes read at a time when counting or scanning a file.
_BLOCK_BYTES = 1024 * 1024
_SUFFIX = ".jsonl"
#: Without a session id, each of the recent files contributes at most this many bytes of lines:
#: bounds memory (20 files), at the price of short pages deep into sessions of huge lines.
RECENT_SESSION_MAX_BYTES = limits.LOGS_PAGE_MAX_BYTES // 4

_Item = TypeVar("_Item")


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One line of a session's log, as the logs API returns it."""

    line: str
    timestamp: str | None
    session_id: str
    level: str | None = None
    stream: str | None = None

    def to_api(self) -> dict[str, Any]:
        return {
            "log": self.line,
            "timestamp": self.timestamp,
            "sessionId": self.session_id,
            "level": self.level,
            "stream": self.stream,
        }


@dataclass(frozen=True, slots=True)
class LogPage:
    """Lines matching a query: ``total`` of them in all, ``entries`` on this page."""

    total: int
    entries: list[LogEntry]


@dataclass(frozen=True, slots=True)
class PruneResult:
    files: int
    bytes: int


def _check_component(value: str) -> str:
    """A path component that cannot leave its folder.

    Raises:
        ValueError: empty, ``.``/``..``, or containing a separator or NUL.
    """
    if not value or value in (".", "..") or any(c in value for c in "/\\\0"):
        raise ValueError(f"not a valid name for a log path: {value[:64]!r}")
    return value


def _count_lines(handle: IO[bytes]) -> int:
    """Complete lines (ending with a newline) in the file."""
    handle.seek(0)
    count = 0
    while block := handle.read(_BLOCK_BYTES):
        count += block.count(b"\n")
    return count


def _lines_forward(handle: IO[bytes]) -> Iterator[bytes]:
    handle.seek(0)
    for line in handle:
        if not line.endswith(b"\n"):
            return  # still being written
        yield line[:-1]


def _lines_backward(handle: IO[bytes]) -> Iterator[bytes]:
    """Complete lines from the last one to the first, reading the file by blocks."""
    position = handle.seek(0, 2)
    carry = b""
    first = True
    while position > 0:
        size = min(_BLOCK_BYTES, position)
        position -= size
        handle.seek(position)
        parts = (handle.read(size) + carry).split(b"\n")
        carry = parts[0]
        for line in reversed(parts[1:]):
            if first:  # after the last newline: empty, or a line still being written
                first = False
                continue
            yield line
    if carry and not first:
        yield carry


def _entry(raw: bytes, session_id: str) -> LogEntry:
    text = raw.decode("utf-8", "replace")
    try:
        record = json.loads(text)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        return LogEntry(line=text, timestamp=None, session_id=session_id)

    def field(name: str) -> str | None:
        value = record.get(name)
        return value if isinstance(value, str) else None

    return LogEntry(
        line=field("line") or "",
        timestamp=field("@timestamp"),
        session_id=field("session_id") or session_id,
        level=field("level"),
        stream=field("stream"),
    )


def _read_file(
    path: Path,
    session_id: str,
    *,
    skip: int,
    take: int,
    order: Order,
    max_bytes: int | None = None,
) -> LogPage:
    """Lines ``skip`` to ``skip + take`` in ``order``, cut once they pass ``max_bytes``
    (default :data:`~catflap.contract.limits.LOGS_PAGE_MAX_BYTES`)."""
    budget = limits.LOGS_PAGE_MAX_BYTES if max_bytes is None else max_bytes
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        return LogPage(0, [])
    with handle:
        total = _count_lines(handle)
        lines = _lines_forward(handle) if order == "asc" else _lines_backward(handle)
        return page_of(total, itertools.islice(lines, skip, skip + take), session_id, budget)


def page_of(total: int, records: Iterable[bytes], session_id: str, max_bytes: int) -> LogPage:
    """The page of one session's raw ``.jsonl`` records (already skipped to the first wanted
    one, in the page's order), cut once they pass ``max_bytes``: what every
    :class:`LogSource` returns for one session."""
    return LogPage(total, [_entry(raw, session_id) for raw in _within(records, len, max_bytes)])


def merge_recent(pages: Iterable[LogPage], *, limit: int, offset: int, order: Order) -> LogPage:
    """Several sessions' pages (each of their first ``offset + limit`` lines in ``order``)
    merged by timestamp into one page: the answer without a session id, for every
    :class:`LogSource`."""
    total = 0
    entries: list[list[LogEntry]] = []
    for page in pages:
        total += page.total
        entries.append(page.entries)

    def key(entry: LogEntry) -> str:
        return entry.timestamp or ""

    merged = heapq.merge(*entries, key=key, reverse=order == "desc")
    wanted = itertools.islice(merged, offset, offset + limit)
    return LogPage(total, list(_within(wanted, _line_size, limits.LOGS_PAGE_MAX_BYTES)))


def _within(
    items: Iterable[_Item], size: Callable[[_Item], int], max_bytes: int
) -> Iterator[_Item]:
    """Items until their sizes add up past ``max_bytes``; the first always, however large."""
    total = 0
    for index, item in enumerate(items):
        total += size(item)
        if index and total > max_bytes:
            return
        yield item


def _line_size(entry: LogEntry) -> int:
    return len(entry.line)


class LogStore:
    """The session log files below one folder."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def session_file(self, org: str, agent: str, session_id: str) -> Path:
        """The file of one session (which may not exist).

        Raises:
            ValueError: a name that could reach outside the log folder.
        """
        parts = (_check_component(org), _check_component(agent), _check_component(session_id))
        return self.root / parts[0] / parts[1] / f"{parts[2]}{_SUFFIX}"

    def has_session(self, org: str, agent: str, session_id: str) -> bool:
        return self.session_file(org, agent, session_id).is_file()

    def read_session(
        self,
        org: str,
        agent: str,
        session_id: str,
        *,
        limit: int = limits.LOGS_LIMIT_DEFAULT,
        offset: int = 0,
        order: Order = "asc",
    ) -> LogPage:
        """One page of a session's lines: oldest first (``asc``) or newest first (``desc``).

        Raises:
            ValueError: a name that could reach outside the log folder.
        """
        path = self.session_file(org, agent, session_id)
        return _read_file(path, session_id, skip=offset, take=limit, order=order)

    def recent_sessions(self, org: str, agent: str, count: int) -> list[Path]:
        """The agent's ``count`` most recently written session files, newest first."""
        folder = self.root / _check_component(org) / _check_component(agent)
        found: list[tuple[float, Path]] = []
        for path in folder.glob(f"*{_SUFFIX}"):
            try:
                found.append((path.stat().st_mtime, path))
            except FileNotFoundError:  # pruned meanwhile
                continue
        return [path for _, path in heapq.nlargest(count, found)]

    def read_recent(
        self,
        org: str,
        agent: str,
        *,
        limit: int = limits.LOGS_LIMIT_DEFAULT,
        offset: int = 0,
        order: Order = "desc",
        sessions: int = limits.LOGS_RECENT_SESSIONS_MAX,
    ) -> LogPage:
        """A page of lines across the agent's most recent ``sessions`` files, by timestamp.

        Raises:
            ValueError: a name that could reach outside the log folder.
        """
        pages = [
            _read_file(
                path,
                path.stem,
                skip=0,
                take=offset + limit,
                order=order,
                max_bytes=RECENT_SESSION_MAX_BYTES,
            )
            for path in self.recent_sessions(org, agent, sessions)
        ]
        return merge_recent(pages, limit=limit, offset=offset, order=order)

    def prune(self, *, now: float, max_age_s: float, max_total_bytes: int) -> PruneResult:
        """Delete files last written more than ``max_age_s`` ago, then the oldest files until
        the rest fit in ``max_total_bytes``. Folders stay (one per agent)."""
        files: list[tuple[float, int, Path]] = []
        for path in self.root.glob(f"*/*/*{_SUFFIX}"):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            files.append((stat.st_mtime, stat.st_size, path))
        files.sort()
        total = sum(size for _, size, _ in files)
        removed_files = removed_bytes = 0
        for mtime, size, path in files:
            if now - mtime <= max_age_s and total <= max_total_bytes:
                break  # sorted oldest first: every later file is newer and fits
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("! could not delete %s: %s", path, exc)
                continue
            total -= size
            removed_files += 1
            removed_bytes += size
        return PruneResult(removed_files, removed_bytes)


class LogSource(Protocol):
    """Where the logs API reads session lines: files on this machine (:class:`FileLogSource`)
    or, in cluster mode, what agent hosts shipped to Redis
    (:class:`~catflap.cluster.logship.RedisLogSource`). Both answer with :func:`page_of` and
    :func:`merge_recent`, so paging, order and the byte bounds are the same.

    Raises (both methods):
        ValueError: a name that could reach outside the log folder (files only).
        OSError: the lines could not be read (the API answers 500).
    """

    async def read_session(
        self, org: str, agent: str, session_id: str, *, limit: int, offset: int, order: Order
    ) -> LogPage | None:
        """One page of a session's lines; None when the source has no line of it."""
        ...

    async def read_recent(
        self, org: str, agent: str, *, limit: int, offset: int, order: Order
    ) -> LogPage:
        """A page across the agent's most recent sessions, merged by timestamp."""
        ...


class FileLogSource:
    """A :class:`LogSource` on the session log files below one folder (``catflap serve``)."""

    def __init__(self, store: LogStore) -> None:
        self.store = store

    async def read_session(
        self, org: str, agent: str, session_id: str, *, limit: int, offset: int, order: Order
    ) -> LogPage | None:
        def read() -> LogPage | None:
            if not self.store.has_session(org, agent, session_id):
                return None
            return self.store.read_session(
                org, agent, session_id, limit=limit, offset=offset, order=order
            )

        return await asyncio.to_thread(read)

    async def read_recent(
        self, org: str, agent: str, *, limit: int, offset: int, order: Order
    ) -> LogPage:
        return await asyncio.to_thread(
            self.store.read_recent, org, agent, limit=limit, offset=offset, order=order
        )


async def prune_forever(
    store: LogStore,
    *,
    retention_days: float,
    max_total_mb: float,
    interval: float = limits.LOG_PRUNE_INTERVAL_S,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Enforce the retention limits now and every ``interval`` seconds, until cancelled.

    ``clock`` and ``sleep`` are the wall clock and the wait between rounds (tests pass their own).
    """
    max_age_s = retention_days * 86400
    max_total_bytes = int(max_total_mb * 1024 * 1024)
    while True:
        try:
            result = await asyncio.to_thread(
                store.prune, now=clock(), max_age_s=max_age_s, max_total_bytes=max_total_bytes
            )
        except OSError as exc:
            log.warning("! could not prune the session logs in %s: %s", store.root, exc)
        else:
            if result.files:
                log.info(
                    "x pruned %d session log file(s), %d bytes, from %s",
                    result.files,
                    result.bytes,
                    store.root,
                )
        await sleep(interval)
