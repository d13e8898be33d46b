"""Where session records live: the store interface, and the backend a database URL names.

A record is written when the session starts (status ``None``: active) and again when it ends.
Without a URL, records go to SQLite under the state directory
(:mod:`catflap.sessions.sqlite`); ``postgresql://`` keeps them in PostgreSQL
(:mod:`catflap.sessions.postgres`). Both keep one row per session (the table of
:mod:`catflap.sessions.schema`), so ``GET /v1/agents/{agent}/sessions`` works the same after a
restart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from catflap.contract.errors import ConfigError
from catflap.sessions.query import SessionQuery
from catflap.sessions.record import SessionRecord
from catflap.sessions.sqlite import SqliteSessionStore

__all__ = ["SessionStore", "check_database_url", "open_store"]


class SessionStore(Protocol):
    """What the gateway and the sessions API need of a store, whichever backend it is."""

    async def save(self, record: SessionRecord) -> None: ...

    async def get(self, session_id: str) -> SessionRecord | None: ...

    async def query(self, query: SessionQuery) -> tuple[int, list[SessionRecord]]: ...

    async def close(self) -> None: ...


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
