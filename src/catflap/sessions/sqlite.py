"""Session records in one SQLite file (the default: ``<state_dir>/sessions.sqlite3``).

sqlite3 (stdlib) runs on one worker thread that owns the connection, so the event loop never
blocks on disk. A table made by an older catflap gets the record's newer columns added (with
their defaults), keeping its rows.
"""

from __future__ import annotations

import asyncio
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from catflap.sessions.query import SessionQuery
from catflap.sessions.record import SessionRecord
from catflap.sessions.schema import COLUMNS, SQLITE, Statements, record_from_row, row_values

__all__ = ["SqliteSessionStore"]

#: The SQLite store's table (PostgreSQL's is named by its constructor).
_SQLITE_TABLE = "sessions"
_SQL = Statements(_SQLITE_TABLE, SQLITE)


class SqliteSessionStore:
    """Session records in one SQLite file."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # One thread owns the connection: sqlite3 objects must stay on their thread.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="catflap-sqlite")
        self._db: sqlite3.Connection | None = None
        self._run_sync(self._open)

    def _open(self) -> None:
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SQL.create_table)
        self._db.execute(_SQL.create_index)
        # Records written by an older catflap lack newer columns: add them, keeping the rows.
        present = {row[1] for row in self._db.execute(f"PRAGMA table_info({_SQLITE_TABLE})")}
        for column in COLUMNS:
            if column.name not in present:
                self._db.execute(_SQL.add_column(column))

    def _run_sync(self, fn: Any, *args: Any) -> Any:
        return self._executor.submit(fn, *args).result()

    async def _run(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    def _save(self, values: list[Any]) -> None:
        assert self._db is not None
        self._db.execute(_SQL.upsert, values)

    async def save(self, record: SessionRecord) -> None:
        await self._run(self._save, row_values(record))

    def _get(self, session_id: str) -> SessionRecord | None:
        assert self._db is not None
        row = self._db.execute(_SQL.get, (session_id,)).fetchone()
        return record_from_row(row) if row else None

    async def get(self, session_id: str) -> SessionRecord | None:
        result: SessionRecord | None = await self._run(self._get, session_id)
        return result

    def _query(self, query: SessionQuery) -> tuple[int, list[SessionRecord]]:
        assert self._db is not None
        listing = _SQL.listing(query)
        # No write comes between the two: every statement runs on this one thread.
        (total,) = self._db.execute(listing.count_sql, listing.count_params).fetchone()
        rows = self._db.execute(listing.page_sql, listing.page_params).fetchall()
        return int(total), [record_from_row(row) for row in rows]

    async def query(self, query: SessionQuery) -> tuple[int, list[SessionRecord]]:
        result: tuple[int, list[SessionRecord]] = await self._run(self._query, query)
        return result

    async def close(self) -> None:
        if self._db is not None:
            await self._run(self._db.close)
            self._db = None
        self._executor.shutdown(wait=True)
