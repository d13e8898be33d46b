"""The sessions table's one column description, and the SQL each dialect gets from it."""

from __future__ import annotations

import dataclasses

import pytest

from catflap.sessions.query import SessionQuery
from catflap.sessions.record import SessionRecord
from catflap.sessions.schema import (
    COLUMNS,
    POSTGRES,
    SQLITE,
    Column,
    Dialect,
    Statements,
    record_from_row,
    row_values,
)


def test_there_is_one_column_per_record_field_in_order() -> None:
    names = [field.name for field in dataclasses.fields(SessionRecord)]
    assert [column.name for column in COLUMNS] == names
    assert [column.name for column in COLUMNS if column.primary_key] == ["session_id"]


@pytest.mark.parametrize(
    ("dialect", "expected"),
    [
        (SQLITE, "cold_start INTEGER NOT NULL DEFAULT FALSE"),
        (POSTGRES, "cold_start BOOLEAN NOT NULL DEFAULT FALSE"),
    ],
)
def test_a_column_is_spelled_in_each_dialect_from_one_description(
    dialect: Dialect, expected: str
) -> None:
    (cold_start,) = [column for column in COLUMNS if column.name == "cold_start"]
    assert dialect.column_sql(cold_start) == expected


@pytest.mark.parametrize(
    ("column", "sqlite", "postgres"),
    [
        (Column("a", "text", False, None, True), "a TEXT NOT NULL PRIMARY KEY", None),
        (Column("b", "integer", True, None, False), "b INTEGER", "b BIGINT"),
        (Column("c", "real", False, 0.5, False), "c REAL NOT NULL DEFAULT 0.5", None),
        (Column("d", "text", False, "it's", False), "d TEXT NOT NULL DEFAULT 'it''s'", None),
    ],
)
def test_types_nulls_defaults_and_keys(column: Column, sqlite: str, postgres: str | None) -> None:
    assert SQLITE.column_sql(column) == sqlite
    expected = postgres or sqlite.replace("REAL", "DOUBLE PRECISION")
    assert POSTGRES.column_sql(column) == expected


def test_every_kind_has_a_type_in_every_dialect() -> None:
    for dialect in (SQLITE, POSTGRES):
        assert set(dialect.types) == {"text", "integer", "real", "boolean", "json"}


@pytest.mark.parametrize(
    ("dialect", "where", "page"),
    [
        (SQLITE, "created_at >= ? AND created_at <= ?", "LIMIT ? OFFSET ?"),
        (POSTGRES, "created_at >= $3 AND created_at <= $4", "LIMIT $5 OFFSET $6"),
    ],
)
def test_listing_marks_count_parameters_not_clauses(
    dialect: Dialect, where: str, page: str
) -> None:
    query = SessionQuery(org="o", agent="a", status="ended", start_time=1.0, end_time=2.0)
    listing = Statements("t", dialect).listing(query)
    assert listing.count_sql.endswith(f"ended_at IS NOT NULL AND {where}")
    assert listing.page_sql.endswith(f"{where} ORDER BY created_at DESC, session_id DESC {page}")
    assert listing.count_params == ["o", "a", 1.0, 2.0]
    assert listing.page_params == ["o", "a", 1.0, 2.0, 10, 0]


def test_a_row_read_back_gets_each_field_its_type() -> None:
    record = SessionRecord(session_id="s", agent="a", organization="o", created_at=1.0)
    record.cold_start = True
    record.bytes_client_to_agent = 7
    # As SQLite hands them back: a boolean as 1, an integer from a REAL column as 7.0.
    row = [1 if value is True else value for value in row_values(record)]
    row[[column.name for column in COLUMNS].index("bytes_client_to_agent")] = 7.0
    loaded = record_from_row(row)
    assert loaded == record
    assert type(loaded.cold_start) is bool and type(loaded.bytes_client_to_agent) is int
