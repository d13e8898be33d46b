"""Where session records live: SQLite under the state directory by default, or PostgreSQL.

A record is written when the session starts (status ``None``: active) and again when it ends.
Both backends keep one row per session, so ``GET /v1/agents/{agent}/sessions`` works the same
after a restart. The SQLite backend runs sqlite3 (stdlib) on one worker thread, so the event
loop never blocks on disk.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal, Protocol

from catflap.contract.errors import ConfigError
from catflap.sessions.record import SessionRecord

__all__ = [
    "SessionQuery",
    "SessionStore",
    "SqliteSessionStore",
    "check_database_url",
    "open_store",
]

StatusFilter = Literal["active", "ended", "all"]

_COLUMNS = [f.name for f in fields(SessionRecord)]


class SessionQuery:
    """Filters of ``GET /v1/agents/{agent}/sessions``."""

    __slots__ = ("agent", "end_time", "limit", "offset", "org", "start_time", "status")

    def __init__(
        self,
        *,
        org: str,
        agent: str,
        status: StatusFilter = "all",
        limit: int = 10,
        offset: int = 0,
        start_time: float | None = None,
        end_time: float | None = None,
    ) -> None:
        self.org = org
        self.agent = agent
        self.status = status
        self.limit = limit
        self.offset = offset
        self.start_time = start_time
        self.end_time = end_time

    def where(self, placeholder: str) -> tuple[str, list[Any]]:
        """A SQL WHERE clause and its parameters (``placeholder`` is ``?`` or ``$``)."""
        clauses = ["organization = {}", "agent = {}"]
        params: list[Any] = [self.org, self.agent]
        if self.status == "active":
            clauses.append("ended_at IS NULL")
        elif self.status == "ended":
            clauses.append("ended_at IS NOT NULL")
        if self.start_time is not None:
            clauses.append("created_at >= {}")
            params.append(self.start_time)
        if self.end_time is not None:
            clauses.append("created_at <= {}")
            params.append(self.end_time)
        numbered = []
        for index, clause in enumerate(clauses, start=1):
            mark = f"${index}" if placeholder == "$" else "?"
            numbered.append(clause.format(mark))
        return " AND ".join(numbered), params


class SessionStore(Protocol):
    async def save(self, record: SessionRecord) -> None: ...

    async def get(self, session_id: str) -> SessionRecord | None: ...

    async def query(self, query: SessionQuery) -> tuple[int, list[SessionRecord]]: ...

    async def close(self) -> None: ...


def _row_values(record: SessionRecord) -> list[Any]:
    # Plain attribute reads: asdict() deep-copies, and this runs twice per session.
    return [getattr(record, name) for name in _COLUMNS]


def _from_row(row: Sequence[Any]) -> SessionRecord:
    return SessionRecord(**dict(zip(_COLUMNS, row, strict=True)))


def _sqlite_type(type_name: str) -> str:
    base = type_name.replace(" | None", "")
    return {"int": "INTEGER", "bool": "INTEGER", "float": "REAL"}.get(base, "TEXT")


_COLUMN_TYPES = ",\n    ".join(
    f"{f.name} {_sqlite_type(str(f.type))}" for f in fields(SessionRecord)[4:]
)
_SQLITE_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    agent TEXT NOT NULL,
    organization TEXT NOT NULL,
    created_at REAL NOT NULL,
    {_COLUMN_TYPES}
);
CREATE INDEX IF NOT EXISTS sessions_by_agent ON sessions (organization, agent, created_at);
"""


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
        self._db.executescript(_SQLITE_SCHEMA)
        # Records written by an older catflap lack newer columns: add them, keeping the rows.
        present = {row[1] for row in self._db.execute("PRAGMA table_info(sessions)")}
        for field in fields(SessionRecord):
            if field.name not in present:
                column = f"{field.name} {_sqlite_type(str(field.type))}"
                self._db.execute(f"ALTER TABLE sessions ADD COLUMN {column}")

    def _run_sync(self, fn: Any, *args: Any) -> Any:
        return self._executor.submit(fn, *args).result()

    async def _run(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    def _save(self, values: list[Any]) -> None:
        assert self._db is not None
        marks = ", ".join("?" for _ in _COLUMNS)
        self._db.execute(
            f"INSERT OR REPLACE INTO sessions ({', '.join(_COLUMNS)}) VALUES ({marks})", values
        )

    async def save(self, record: SessionRecord) -> None:
        await self._run(self._save, _row_values(record))

    def _get(self, session_id: str) -> SessionRecord | None:
        assert self._db is not None
        row = self._db.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM sessions WHERE session_id = ?", (session_id,)
        ).fetchone()
        return _from_row(_decode(row)) if row else None

    async def get(self, session_id: str) -> SessionRecord | None:
        result: SessionRecord | None = await self._run(self._get, session_id)
        return result

    def _query(self, query: SessionQuery) -> tuple[int, list[SessionRecord]]:
        assert self._db is not None
        where, params = query.where("?")
        (total,) = self._db.execute(
            f"SELECT COUNT(*) FROM sessions WHERE {where}", params
        ).fetchone()
        rows = self._db.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM sessions WHERE {where} "
            "ORDER BY created_at DESC, session_id DESC LIMIT ? OFFSET ?",
            [*params, query.limit, query.offset],
        ).fetchall()
        return int(total), [_from_row(_decode(row)) for row in rows]

    async def query(self, query: SessionQuery) -> tuple[int, list[SessionRecord]]:
        result: tuple[int, list[SessionRecord]] = await self._run(self._query, query)
        return result

    async def close(self) -> None:
        if self._db is not None:
            await self._run(self._db.close)
            self._db = None
        self._executor.shutdown(wait=True)


_INT_COLUMNS = {f.name for f in fields(SessionRecord) if f.type in ("int", "int | None")}
_BOOL_COLUMNS = {f.name for f in fields(SessionRecord) if f.type == "bool"}


def _decode(row: Sequence[Any]) -> list[Any]:
    """SQLite hands back REAL for every number; restore ints and bools."""
    out = []
    for name, value in zip(_COLUMNS, row, strict=True):
        if value is not None and name in _INT_COLUMNS:
            value = int(value)
        elif value is not None and name in _BOOL_COLUMNS:
            value = bool(value)
        out.append(value)
    return out


#: URL prefixes that :func:`open_store` opens.
_DATABASE_SCHEMES = ("sqlite:///", "postgresql://", "postgres://")


def check_database_url(url: str, *, source: str = "database_url") -> None:
    """Refuse a database URL that :func:`open_store` cannot open; an empty one means SQLite.

    Args:
        url: The ``database_url`` setting.
        source: Where the URL came from (``--database-url``, a config file), for the message.

    Raises:
        ConfigError: the scheme is neither ``sqlite:///`` nor ``postgresql://``.
    """
    if url and not url.startswith(_DATABASE_SCHEMES):
        raise ConfigError(
            source,
            "database_url",
            f"unsupported URL {url.split(':', 1)[0]!r}: use postgresql://user@host/db "
            "or sqlite:///path/to/file",
        )


def open_store(database_url: str | None, state_dir: Path) -> SessionStore:
    """The store for a database URL (``sqlite:///path`` or ``postgresql://...``).

    Without a URL, records go to ``<state_dir>/sessions.sqlite3``.

    Raises:
        ConfigError: the URL's scheme is not one catflap supports.
    """
    if not database_url:
        return SqliteSessionStore(state_dir / "sessions.sqlite3")
    check_database_url(database_url)
    if database_url.startswith("sqlite:///"):
        return SqliteSessionStore(Path(database_url.removeprefix("sqlite:///")))
    from catflap.sessions.postgres import PostgresSessionStore

    store: SessionStore = PostgresSessionStore(database_url)
    return store
