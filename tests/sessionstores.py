"""Session stores for tests: a SQLite file in a temporary folder, or a PostgreSQL table.

PostgreSQL runs for real (env ``CATFLAP_TEST_DATABASE_URL``, default the local server). Each
:class:`StoreFactory` uses its own table, ``catflap_test_<random>``, and drops it at the end; a
SQLite factory's table is the store's own, in a file of the test's temporary folder.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Literal
from uuid import uuid4

import asyncpg  # type: ignore[import-untyped]

from catflap.sessions.postgres import PostgresSessionStore
from catflap.sessions.sqlite import SqliteSessionStore
from catflap.sessions.store import SessionStore

__all__ = ["BACKENDS", "DATABASE_URL", "Backend", "StoreFactory", "store_factory"]

DATABASE_URL = os.environ.get(
    "CATFLAP_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
Backend = Literal["sqlite", "postgres"]
BACKENDS: list[Backend] = ["sqlite", "postgres"]


class StoreFactory:
    """Opens stores on one location, so a test can close one and reopen the same records."""

    def __init__(self, backend: Backend, directory: Path) -> None:
        self.backend = backend
        self.path = directory / "sessions.sqlite3"
        self.table = "sessions" if backend == "sqlite" else f"catflap_test_{uuid4().hex[:8]}"
        self.opened: list[SessionStore] = []

    def open(self) -> SessionStore:
        store: SessionStore
        if self.backend == "sqlite":
            store = SqliteSessionStore(self.path)
        else:
            store = PostgresSessionStore(DATABASE_URL, table=self.table)
        self.opened.append(store)
        return store

    async def execute(self, *statements: str) -> None:
        """Run SQL on the factory's database directly, as an older catflap would have."""
        if self.backend == "sqlite":
            with closing(sqlite3.connect(self.path, isolation_level=None)) as db:
                for statement in statements:
                    db.execute(statement)
            return
        conn = await asyncpg.connect(DATABASE_URL)
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    async def cleanup(self) -> None:
        for store in self.opened:
            await store.close()
        if self.backend == "postgres":
            conn = await asyncpg.connect(DATABASE_URL)
            try:
                await conn.execute(f"DROP TABLE IF EXISTS {self.table}")
            finally:
                await conn.close()


@asynccontextmanager
async def store_factory(backend: Backend, directory: Path) -> AsyncIterator[StoreFactory]:
    factory = StoreFactory(backend, directory)
    try:
        yield factory
    finally:
        await factory.cleanup()
