"""Single-use tokens that survive a restart: spent jtis in one SQLite file in the state dir.

``catflap serve`` uses this store, so a token used before a restart is still refused after it
(403 ``token_replayed``), as long as the key ring (``CATFLAP_TOKEN_KEYS``) is the same.

Speed. The check-and-mark is one autocommit upsert on the event loop's own connection: a median
of about 40 µs per consume, against about 150 µs for the same upsert through a worker thread
(10,000 consumes each way on uvloop, 2-vCPU VM), whose tail is several times longer too. Two
things could still stall the loop, and both are kept off it:

- fsync. In WAL mode with ``synchronous=NORMAL`` a commit does not fsync; a crash of the process
  loses nothing (the WAL is in the OS page cache; power loss may lose the last rows). What does
  fsync is the checkpoint, 20-30 ms each time SQLite's automatic one ran in the same benchmark,
  so the loop's connection has it switched off and a worker thread checkpoints every
  :data:`~catflap.contract.limits.REPLAY_MAINTENANCE_INTERVAL_S`, when it also deletes the jtis
  that have expired.
- Lock waits. The loop's connection never waits for a lock (busy timeout 0). When another
  connection holds the write lock (the worker's prune, or another gateway sharing this state
  dir), the consume is retried on the worker thread, which may wait
  :data:`~catflap.contract.limits.REPLAY_BUSY_TIMEOUT_S`.

Sharing. Gateways on one machine may share the file: SQLite's file locks make each upsert atomic
across processes, so a jti is spent once whichever gateway sees it. Gateways on different
machines cannot share it (WAL needs shared memory, and file locks over a network filesystem
are not reliable): they share Redis instead (``catflap gateway --redis``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from catflap.contract import limits
from catflap.contract.errors import ServiceUnavailable

__all__ = ["SqliteReplayStore"]

log = logging.getLogger("catflap.auth")

_T = TypeVar("_T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spent_tokens (
    jti TEXT PRIMARY KEY,
    exp INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS spent_tokens_by_exp ON spent_tokens (exp);
"""
# One statement, so check and mark are atomic, across processes too: a new jti is inserted; a
# row left behind by an expired token (not pruned yet) is taken over; a live one is left alone.
# changes() (cursor.rowcount) is 1 in the first two cases and 0 in the last.
_CONSUME = (
    "INSERT INTO spent_tokens (jti, exp) VALUES (?, ?) "
    "ON CONFLICT (jti) DO UPDATE SET exp = excluded.exp WHERE spent_tokens.exp <= ?"
)
_RELEASE = "DELETE FROM spent_tokens WHERE jti = ?"
_PRUNE = "DELETE FROM spent_tokens WHERE exp <= ?"
_COUNT = "SELECT COUNT(*) FROM spent_tokens WHERE exp > ?"
_LIVE = "SELECT 1 FROM spent_tokens WHERE jti = ? AND exp > ?"
#: Past this the WAL file is truncated when it restarts, so one burst does not keep it large.
_WAL_SIZE_LIMIT_BYTES = 4 * 1024 * 1024


def _connect(path: Path, busy_timeout_s: float) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, timeout=busy_timeout_s)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute(f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT_BYTES}")
    return db


def _is_busy(exc: sqlite3.Error) -> bool:
    # Extended codes (SQLITE_BUSY_SNAPSHOT, ...) keep the primary code in the low byte.
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _upsert(db: sqlite3.Connection, jti: str, exp: int, now: float) -> bool:
    return db.execute(_CONSUME, (jti, exp, now)).rowcount == 1


class SqliteReplayStore:
    """A :class:`~catflap.auth.replay.ReplayStore` in one SQLite file; see the module docs.

    Expired jtis are deleted every ``maintenance_interval`` (the task starts with the first
    :meth:`consume`) and are ignored before that, so a jti is never refused past its ``exp``.
    Call :meth:`close` at shutdown.
    """

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], float] = time.time,
        maintenance_interval: float = limits.REPLAY_MAINTENANCE_INTERVAL_S,
        busy_timeout: float = limits.REPLAY_BUSY_TIMEOUT_S,
    ) -> None:
        """Open (or create) the file; its folder is created when missing.

        Args:
            path: The SQLite file, ``<state_dir>/replay.sqlite3`` in ``catflap serve``.
            clock: Returns the current unix time in seconds; inject a fake one in tests.
            maintenance_interval: Seconds between prunes and checkpoints.
            busy_timeout: How long a write on the worker thread waits for a lock.

        Raises:
            sqlite3.Error: the file cannot be opened or is not a database (so is
                :class:`OSError` for the folder).
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._clock = clock
        self._interval = maintenance_interval
        self._busy_timeout = busy_timeout
        # Setup may wait for a lock like any writer (another gateway may be writing); after it
        # the loop's connection never waits, and never checkpoints (that fsyncs).
        self._db = _connect(path, busy_timeout)
        self._db.executescript(_SCHEMA)
        self._db.execute("PRAGMA wal_autocheckpoint=0")
        self._db.execute("PRAGMA busy_timeout=0")
        # One thread owns the second connection (sqlite3 objects stay on their thread).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="catflap-replay")
        self._worker_db: sqlite3.Connection | None = None
        self._maintenance: asyncio.Task[None] | None = None
        self._closed = False

    # --- the worker thread ---------------------------------------------------------------------

    def _worker(self) -> sqlite3.Connection:
        if self._worker_db is None:
            self._worker_db = _connect(self.path, self._busy_timeout)
        return self._worker_db

    async def _in_worker(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(self._worker()))

    def _maintain(self, db: sqlite3.Connection, now: float) -> int:
        pruned = db.execute(_PRUNE, (now,)).rowcount
        # PASSIVE: copies what it can without waiting for (or blocking) the loop's writes.
        db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        return pruned

    async def _maintain_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.prune()
            except sqlite3.Error as exc:
                log.warning("! could not prune spent tokens in %s (%s)", self.path, exc)

    # --- the store ---------------------------------------------------------------------------

    def _unavailable(self, doing: str, exc: sqlite3.Error) -> ServiceUnavailable:
        log.error("! token store %s failed while %s (%s)", self.path, doing, exc)
        return ServiceUnavailable("the token store failed; retry shortly")

    async def consume(self, jti: str, exp: int) -> bool:
        """Mark ``jti`` used until ``exp``; see :meth:`~catflap.auth.replay.ReplayStore.consume`.

        As in :class:`~catflap.auth.replay.MemoryReplayStore`, a jti still remembered is
        refused whatever ``exp`` is given, and a new one already past ``exp`` is accepted
        without being written down.

        Raises:
            ServiceUnavailable: 503, the file cannot be written (a token is never accepted
                blind).
        """
        now = self._clock()
        if exp <= now:
            # Nothing left to protect: not written down, but a jti still remembered (under
            # a later exp) stays refused.
            try:
                return self._db.execute(_LIVE, (jti, now)).fetchone() is None
            except sqlite3.Error as exc:
                raise self._unavailable("checking a token", exc) from None
        if self._maintenance is None and not self._closed:
            self._maintenance = asyncio.get_running_loop().create_task(
                self._maintain_forever(), name="replay store maintenance"
            )
        try:
            return _upsert(self._db, jti, exp, now)
        except sqlite3.Error as exc:
            if not _is_busy(exc):
                raise self._unavailable("spending a token", exc) from None
        # Someone else holds the write lock for a moment: wait for it off the loop.
        try:
            return await self._in_worker(lambda db: _upsert(db, jti, exp, now))
        except sqlite3.Error as exc:
            raise self._unavailable("spending a token", exc) from None

    async def release(self, jti: str) -> None:
        """Forget ``jti``; see :meth:`~catflap.auth.replay.ReplayStore.release`.

        A failure is logged, not raised: the token then stays spent until its ``exp``.
        """
        try:
            self._db.execute(_RELEASE, (jti,))
            return
        except sqlite3.Error as exc:
            if not _is_busy(exc):
                log.warning("! could not release a token in %s (%s)", self.path, exc)
                return
        try:
            await self._in_worker(lambda db: db.execute(_RELEASE, (jti,)))
        except sqlite3.Error as exc:
            log.warning("! could not release a token in %s (%s)", self.path, exc)

    async def prune(self) -> int:
        """Delete expired jtis and checkpoint the WAL, on the worker thread.

        Returns:
            How many jtis were deleted.
        """
        now = self._clock()
        return await self._in_worker(lambda db: self._maintain(db, now))

    def __len__(self) -> int:
        """Number of jtis currently remembered (expired rows not pruned yet do not count)."""
        (count,) = self._db.execute(_COUNT, (self._clock(),)).fetchone()
        return int(count)

    async def close(self) -> None:
        """Stop the maintenance, checkpoint and close both connections; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._maintenance is not None:
            self._maintenance.cancel()
            # Whatever it ended with, shutdown goes on (and the rows are safe in the file).
            await asyncio.gather(self._maintenance, return_exceptions=True)
        # The loop's connection closes first, so the worker's is the last one and SQLite's
        # final checkpoint (an fsync) runs on the worker thread.
        self._db.close()

        def close_worker(db: sqlite3.Connection) -> None:
            with contextlib.suppress(sqlite3.Error):
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            db.close()

        with contextlib.suppress(sqlite3.Error):
            await self._in_worker(close_worker)
        self._worker_db = None
        self._executor.shutdown(wait=True)
