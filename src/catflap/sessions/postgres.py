"""Session records in PostgreSQL (``database_url = "postgresql://..."``), through asyncpg.

One row per session in one table (``catflap_sessions`` unless told otherwise), with the same
columns as the SQLite store (:mod:`catflap.sessions.schema`), so several gateways can share one
history. The constructor does no I/O: the connection pool opens on first use, and the table and
its index are created then if they are missing. A table made by an older catflap gets the
record's newer columns added (with their defaults). All of this runs under a transaction-scoped
advisory lock, so gateways starting together do not trip over each other's
``CREATE TABLE IF NOT EXISTS``.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information

from catflap.sessions.query import SessionQuery
from catflap.sessions.record import SessionRecord
from catflap.sessions.schema import COLUMNS, POSTGRES, Statements, record_from_row, row_values

__all__ = ["DEFAULT_TABLE", "PostgresSessionStore"]

DEFAULT_TABLE = "catflap_sessions"
#: Connections per gateway: a save at start and at end of each session, plus API reads.
_POOL_MIN = 1
_POOL_MAX = 4
#: A database that does not answer must not hold a session's end (or a drain) for asyncpg's
#: default minute; the record is logged as not stored instead.
_CONNECT_TIMEOUT_S = 10.0
_COMMAND_TIMEOUT_S = 30.0
#: PostgreSQL truncates identifiers to 63 bytes; a longer name would silently alias another.
_TABLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class PostgresSessionStore:
    """Session records in one PostgreSQL table.

    Args:
        database_url: A ``postgresql://`` or ``postgres://`` URL, as libpq and asyncpg take it.
        table: The table's name: lower-case letters, digits and underscores, at most 63.

    Raises:
        ValueError: ``table`` is not a plain lower-case SQL identifier.
    """

    def __init__(self, database_url: str, *, table: str = DEFAULT_TABLE) -> None:
        if not _TABLE_NAME.fullmatch(table):
            raise ValueError(
                f"bad table name {table!r}: use lower-case letters, digits and underscores "
                "(at most 63, not starting with a digit)"
            )
        self.database_url = database_url
        self.table = table
        self._pool: Any = None  # asyncpg.Pool, once opened
        self._opening = asyncio.Lock()
        self._closed = False
        self._sql = Statements(table, POSTGRES)

    def __repr__(self) -> str:
        return f"PostgresSessionStore(table={self.table!r})"

    async def _connected(self) -> Any:
        """The connection pool, opened (and the schema created) on first use.

        Raises:
            RuntimeError: the store was closed.
            OSError, asyncpg.PostgresError: the database cannot be reached or refused us.
        """
        if self._closed:
            raise RuntimeError("the session store is closed")
        if self._pool is not None:
            return self._pool
        async with self._opening:
            if self._pool is None:
                pool = await asyncpg.create_pool(
                    self.database_url,
                    min_size=_POOL_MIN,
                    max_size=_POOL_MAX,
                    timeout=_CONNECT_TIMEOUT_S,
                    command_timeout=_COMMAND_TIMEOUT_S,
                )
                try:
                    async with pool.acquire() as conn, conn.transaction():
                        await _ensure_schema(conn, self._sql)
                except BaseException:
                    await pool.close()
                    raise
                self._pool = pool
        return self._pool

    async def save(self, record: SessionRecord) -> None:
        """Insert the record, or replace the row with the same session id."""
        pool = await self._connected()
        await pool.execute(self._sql.upsert, *row_values(record))

    async def get(self, session_id: str) -> SessionRecord | None:
        """The record of ``session_id``, or ``None``."""
        pool = await self._connected()
        row = await pool.fetchrow(self._sql.get, session_id)
        return None if row is None else record_from_row(row)

    async def query(self, query: SessionQuery) -> tuple[int, list[SessionRecord]]:
        """The total number of matching records, and one page of them, newest first."""
        pool = await self._connected()
        listing = self._sql.listing(query)
        # One snapshot for both statements, so the count matches the page.
        async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            total = await conn.fetchval(listing.count_sql, *listing.count_params)
            rows = await conn.fetch(listing.page_sql, *listing.page_params)
        return int(total), [record_from_row(row) for row in rows]

    async def close(self) -> None:
        """Close the connections. The store cannot be used afterwards; closing twice is fine."""
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()


async def _ensure_schema(conn: Any, sql: Statements) -> None:
    """Create the table and its index, and add columns that newer versions of the record have.

    Runs inside a transaction holding an advisory lock on the table's name, so gateways
    starting at the same moment take turns.
    """
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", sql.table)
    await conn.execute(sql.create_table)
    await conn.execute(sql.create_index)
    rows = await conn.fetch(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND table_name = $1",
        sql.table,
    )
    present = {row["column_name"] for row in rows}
    for column in COLUMNS:
        if column.name not in present:
            await conn.execute(sql.add_column(column))
