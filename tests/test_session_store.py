"""Session stores, SQLite and PostgreSQL alike: round trips, upserts, queries, restarts."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, get_args

import pytest
import pytest_asyncio

from catflap.contract.errors import ConfigError
from catflap.contract.resources import summarize
from catflap.contract.status import END_STATES, EndState, statuses_ending_as
from catflap.sessions.postgres import PostgresSessionStore
from catflap.sessions.query import SessionQuery
from catflap.sessions.record import SessionRecord
from catflap.sessions.sqlite import SqliteSessionStore
from catflap.sessions.store import check_database_url, open_store

from .sessionstores import BACKENDS, DATABASE_URL, StoreFactory, store_factory

T0 = 1_700_000_000.25


@pytest_asyncio.fixture(params=BACKENDS)
async def stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreFactory]:
    async with store_factory(request.param, tmp_path) as factory:
        yield factory


def _value(field: dataclasses.Field[Any], index: int) -> Any:
    """A value for ``field`` that is not its default, different for every field."""
    base = str(field.type).removesuffix(" | None")
    if base == "bool":
        return True
    if base == "int":
        return 2**40 + index  # past 32 bits: BIGINT, not INTEGER
    if base == "float":
        return T0 + index / 3  # needs every bit of a double
    if base == "CompletionStatus":
        return "bot_error"
    if base == "ResourceMetrics":
        return summarize([{"t": 1.0, "c": 250, "m": 2**33 + index}, {"t": 2.0, "c": 750, "m": 9}])
    assert base == "str", f"add a test value for {field.name}: {field.type}"
    return f"{field.name}-value-é"


def full_record(session_id: str = "0b3e6c9e-1f7a-4c55-9d0e-5a1f2b3c4d5e") -> SessionRecord:
    """A record with every field set to something other than its default."""
    values = {f.name: _value(f, i) for i, f in enumerate(dataclasses.fields(SessionRecord))}
    values["session_id"] = session_id
    return SessionRecord(**values)


def record(
    session_id: str, *, at: float, agent: str = "echo", org: str = "my-org", ended: bool = False
) -> SessionRecord:
    rec = SessionRecord(session_id=session_id, agent=agent, organization=org, created_at=at)
    if ended:
        rec.ended_at = at + 1
        rec.completion_status = "completed"
    return rec


def query(**filters: Any) -> SessionQuery:
    return SessionQuery(org="my-org", agent="echo", **filters)


async def test_a_saved_record_comes_back_with_every_field_and_type(stores: StoreFactory) -> None:
    store = stores.open()
    saved = full_record()
    for field in dataclasses.fields(SessionRecord):
        assert getattr(saved, field.name) != field.default, field.name
    await store.save(saved)
    loaded = await store.get(saved.session_id)
    assert loaded == saved
    assert loaded is not None
    for field in dataclasses.fields(SessionRecord):
        value = getattr(loaded, field.name)
        assert type(value) is type(getattr(saved, field.name)), field.name


async def test_defaults_and_nulls_come_back_as_they_were(stores: StoreFactory) -> None:
    store = stores.open()
    active = SessionRecord(session_id="a", agent="echo", organization="my-org", created_at=T0)
    await store.save(active)
    assert await store.get("a") == active


async def test_an_unknown_session_is_none(stores: StoreFactory) -> None:
    assert await stores.open().get("no-such-session") is None


async def test_saving_again_replaces_the_row(stores: StoreFactory) -> None:
    store = stores.open()
    rec = record("s1", at=T0)
    await store.save(rec)
    rec.ended_at = T0 + 5
    rec.completion_status = "stopped"
    rec.client_close_code = 1000
    rec.frames_agent_to_client = 7
    await store.save(rec)
    assert await store.get("s1") == rec
    total, page = await store.query(query())
    assert (total, page) == (1, [rec])


async def test_status_filter_splits_active_from_ended(stores: StoreFactory) -> None:
    store = stores.open()
    for index in range(3):
        await store.save(record(f"ended-{index}", at=T0 + index, ended=True))
    for index in range(2):
        await store.save(record(f"active-{index}", at=T0 + 10 + index))
    await store.save(record("other-agent", at=T0, agent="other"))
    await store.save(record("other-org", at=T0, org="other-org"))

    total, page = await store.query(query(status="active"))
    assert (total, [r.session_id for r in page]) == (2, ["active-1", "active-0"])
    total, page = await store.query(query(status="ended"))
    assert (total, [r.session_id for r in page]) == (3, ["ended-2", "ended-1", "ended-0"])
    total, page = await store.query(query(status="all"))
    assert total == 5 and len(page) == 5


async def test_time_range_filters_created_at_inclusively(stores: StoreFactory) -> None:
    store = stores.open()
    for index in range(5):
        await store.save(record(f"s{index}", at=T0 + index * 10))
    total, page = await store.query(query(start_time=T0 + 10, end_time=T0 + 30))
    assert (total, [r.session_id for r in page]) == (3, ["s3", "s2", "s1"])
    total, _ = await store.query(query(start_time=T0 + 41))
    assert total == 0
    total, page = await store.query(query(end_time=T0))
    assert (total, [r.session_id for r in page]) == (1, ["s0"])


async def test_status_and_time_range_filter_together(stores: StoreFactory) -> None:
    store = stores.open()
    for index in range(4):
        await store.save(record(f"ended-{index}", at=T0 + index * 10, ended=True))
        await store.save(record(f"active-{index}", at=T0 + index * 10 + 1))
    between = {"start_time": T0 + 10, "end_time": T0 + 25}
    total, page = await store.query(query(status="ended", **between))
    assert (total, [r.session_id for r in page]) == (2, ["ended-2", "ended-1"])
    total, page = await store.query(query(status="active", limit=1, **between))
    assert (total, [r.session_id for r in page]) == (2, ["active-2"])


async def test_pages_run_newest_first_and_count_every_match(stores: StoreFactory) -> None:
    store = stores.open()
    for index in range(25):
        await store.save(record(f"s{index:02d}", at=T0 + index))
    total, first = await store.query(query(limit=10))
    assert total == 25
    assert [r.session_id for r in first] == [f"s{i:02d}" for i in range(24, 14, -1)]
    total, last = await store.query(query(limit=10, offset=20))
    assert (total, [r.session_id for r in last]) == (25, [f"s{i:02d}" for i in range(4, -1, -1)])
    total, past_the_end = await store.query(query(limit=10, offset=30))
    assert (total, past_the_end) == (25, [])


async def test_pages_do_not_overlap_when_sessions_start_in_the_same_tick(
    stores: StoreFactory,
) -> None:
    store = stores.open()
    for index in range(6):
        await store.save(record(f"s{index}", at=T0))
    seen = []
    for offset in range(0, 6, 2):
        _, page = await store.query(query(limit=2, offset=offset))
        seen += [r.session_id for r in page]
    assert seen == ["s5", "s4", "s3", "s2", "s1", "s0"]


async def test_records_survive_closing_and_reopening_the_store(stores: StoreFactory) -> None:
    first = stores.open()
    kept = full_record()
    await first.save(kept)
    await first.save(record("active", at=T0))
    await first.close()

    again = stores.open()
    assert await again.get(kept.session_id) == kept
    total, page = await again.query(
        SessionQuery(org=kept.organization, agent=kept.agent, status="ended")
    )
    assert (total, page) == (1, [kept])
    total, _ = await again.query(query(status="active"))
    assert total == 1


async def test_a_closed_store_refuses_work(stores: StoreFactory) -> None:
    store = stores.open()
    await store.save(record("s1", at=T0))
    await store.close()
    with pytest.raises(RuntimeError):
        await store.get("s1")


# --- choosing a backend, and the PostgreSQL backend on its own ----------------------------------


def test_open_store_picks_the_backend_from_the_url(tmp_path: Path) -> None:
    for url in ("postgresql://u@h/db", "postgres://u@h/db"):
        assert isinstance(open_store(url, tmp_path), PostgresSessionStore)
    sqlite = open_store(f"sqlite:///{tmp_path}/x.sqlite3", tmp_path)
    assert isinstance(sqlite, SqliteSessionStore)
    with pytest.raises(ConfigError) as refused:
        open_store("mysql://u@h/db", tmp_path)
    assert str(refused.value) == (
        "database_url: database_url: unsupported URL 'mysql': use postgresql://user@host/db "
        "or sqlite:///path/to/file"
    )


@pytest.mark.parametrize(
    "url", ["", "sqlite:///x.sqlite3", "postgresql://u@h/db", "postgres://u@h/db"]
)
def test_check_database_url_accepts_what_open_store_opens(url: str) -> None:
    check_database_url(url)


def test_check_database_url_names_the_source_and_the_scheme() -> None:
    with pytest.raises(ConfigError) as refused:
        check_database_url("sqlite://relative.db", source="--database-url")
    assert (refused.value.source, refused.value.key, refused.value.problem) == (
        "--database-url",
        "database_url",
        "unsupported URL 'sqlite': use postgresql://user@host/db or sqlite:///path/to/file",
    )


async def test_postgres_store_connects_on_first_use_not_at_construction() -> None:
    store = PostgresSessionStore("postgresql://postgres@127.0.0.1:1/postgres")  # nothing there
    with pytest.raises(OSError):
        await store.get("s1")
    await store.close()


@pytest.mark.parametrize("table", ["", "Sessions", "1st", "drop table x;--", "a" * 64])
def test_postgres_table_name_must_be_a_plain_identifier(table: str) -> None:
    with pytest.raises(ValueError, match="bad table name"):
        PostgresSessionStore(DATABASE_URL, table=table)


async def test_a_store_adds_the_columns_an_older_table_lacks(stores: StoreFactory) -> None:
    await stores.execute(
        f"CREATE TABLE {stores.table} (session_id TEXT PRIMARY KEY, agent TEXT NOT NULL,"
        " organization TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL)",
        f"INSERT INTO {stores.table} VALUES ('old', 'echo', 'my-org', {T0})",
    )
    store = stores.open()
    assert await store.get("old") == record("old", at=T0)
    await store.save(full_record())
    assert await store.get(full_record().session_id) == full_record()


async def test_start_type_filter_splits_cold_from_warm(stores: StoreFactory) -> None:
    store = stores.open()
    for index in range(3):
        rec = record(f"s{index}", at=T0 + index)
        rec.cold_start = index == 1
        await store.save(rec)
    total, page = await store.query(query(start_type="cold"))
    assert (total, [r.session_id for r in page]) == (1, ["s1"])
    total, page = await store.query(query(start_type="warm"))
    assert (total, [r.session_id for r in page]) == (2, ["s2", "s0"])
    assert (await store.query(query(start_type="all")))[0] == 3


async def test_end_state_filter_reads_the_one_mapping_backwards(stores: StoreFactory) -> None:
    store = stores.open()
    statuses = list(END_STATES)
    for index, status in enumerate(statuses):
        rec = record(status, at=T0 + index, ended=True)
        rec.completion_status = status
        await store.save(rec)
    await store.save(record("live", at=T0 + 100))
    for state in get_args(EndState):
        total, page = await store.query(query(end_state=state, limit=100))
        expected = ["live"] if state == "active" else statuses_ending_as(state)[::-1]
        assert (total, [r.session_id for r in page]) == (len(expected), expected), state
        assert all(r.end_state == state for r in page)
    combined = query(end_state="terminated", start_time=T0 + 5, status="ended")
    assert [r.session_id for r in (await store.query(combined))[1]] == ["drained", "time_limit"]
