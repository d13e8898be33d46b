"""The sessions table in SQL: one column description, and each dialect's statements built from it.

The columns are the fields of :class:`~catflap.sessions.record.SessionRecord`, in order: a field
added there becomes a column of every SQL store (and is added to tables an older catflap made).
What differs between SQLite and PostgreSQL (type names, parameter marks) is a
:class:`Dialect`; the statements themselves are written once, in :class:`Statements`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import MISSING, Field, dataclass, fields
from typing import Any, Literal, NamedTuple

from catflap.contract.status import ACTIVE_END_STATE, statuses_ending_as
from catflap.sessions.query import SessionQuery
from catflap.sessions.record import SessionRecord

__all__ = [
    "COLUMNS",
    "POSTGRES",
    "SQLITE",
    "Column",
    "Dialect",
    "Listing",
    "Statements",
    "record_from_row",
    "row_values",
]

#: ``json``: a structured field (``resourceMetrics``), kept as its JSON text.
ColumnKind = Literal["text", "integer", "real", "boolean", "json"]

#: Kind of each Python annotation of :class:`SessionRecord` (annotations are strings there).
_KINDS: dict[str, ColumnKind] = {
    "str": "text",
    "CompletionStatus": "text",
    "float": "real",
    "int": "integer",
    "bool": "boolean",
    "ResourceMetrics": "json",
}


@dataclass(frozen=True, slots=True)
class Column:
    """One column of the sessions table, described once for every dialect."""

    name: str
    kind: ColumnKind
    nullable: bool
    #: The value rows written before the column existed get; None: no default (NULL).
    default: str | int | float | bool | None
    primary_key: bool


def _column(field: Field[Any]) -> Column:
    """The column of one field of :class:`SessionRecord`.

    Raises:
        TypeError: the field's annotation has no SQL type (add it to ``_KINDS``).
    """
    annotation = str(field.type)
    base, _, optional = annotation.partition(" | ")
    nullable = optional == "None"
    if base not in _KINDS or (optional and not nullable):
        raise TypeError(f"SessionRecord.{field.name}: no SQL type for {annotation!r}")
    return Column(
        name=field.name,
        kind=_KINDS[base],
        nullable=nullable,
        default=None if field.default is MISSING else field.default,
        primary_key=field.name == "session_id",
    )


COLUMNS: tuple[Column, ...] = tuple(_column(field) for field in fields(SessionRecord))
_NAMES = [column.name for column in COLUMNS]
_INTEGERS = frozenset(column.name for column in COLUMNS if column.kind == "integer")
_BOOLEANS = frozenset(column.name for column in COLUMNS if column.kind == "boolean")
_JSON = frozenset(column.name for column in COLUMNS if column.kind == "json")


@dataclass(frozen=True, slots=True)
class Dialect:
    """What one SQL engine spells its own way."""

    name: str
    types: dict[ColumnKind, str]
    #: ``$1, $2...`` (PostgreSQL) rather than ``?`` (SQLite).
    numbered_parameters: bool

    def mark(self, index: int) -> str:
        """The placeholder of the ``index``-th parameter (from 1)."""
        return f"${index}" if self.numbered_parameters else "?"

    def column_sql(self, column: Column) -> str:
        """``name TYPE [NOT NULL] [DEFAULT ...] [PRIMARY KEY]``, for CREATE and ALTER TABLE."""
        sql = f"{column.name} {self.types[column.kind]}"
        if not column.nullable:
            sql += " NOT NULL"
        if column.default is not None:
            sql += f" DEFAULT {_literal(column.default)}"
        if column.primary_key:
            sql += " PRIMARY KEY"
        return sql


SQLITE = Dialect(
    name="sqlite",
    types={
        "text": "TEXT",
        "integer": "INTEGER",
        "real": "REAL",
        "boolean": "INTEGER",
        "json": "TEXT",
    },
    numbered_parameters=False,
)
#: 64-bit integers (byte counts pass 2**31) and doubles, as Python's int and float hold them.
POSTGRES = Dialect(
    name="postgres",
    types={
        "text": "TEXT",
        "integer": "BIGINT",
        "real": "DOUBLE PRECISION",
        "boolean": "BOOLEAN",
        "json": "TEXT",
    },
    numbered_parameters=True,
)


def _literal(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int | float):
        return repr(value)
    return "'" + value.replace("'", "''") + "'"


class Listing(NamedTuple):
    """The two statements of one sessions listing, run in one snapshot so that they agree."""

    count_sql: str
    count_params: list[Any]
    page_sql: str
    page_params: list[Any]


class Statements:
    """The SQL one store runs on its table, in its dialect.

    Args:
        table: The table's name, already checked to be a plain identifier.
        dialect: :data:`SQLITE` or :data:`POSTGRES`.
    """

    def __init__(self, table: str, dialect: Dialect) -> None:
        self.table = table
        self.dialect = dialect
        columns = ",\n    ".join(dialect.column_sql(column) for column in COLUMNS)
        self.create_table = f"CREATE TABLE IF NOT EXISTS {table} (\n    {columns}\n)"
        self.create_index = (
            f"CREATE INDEX IF NOT EXISTS {table}_by_agent "
            f"ON {table} (organization, agent, created_at)"
        )
        marks = ", ".join(dialect.mark(index) for index in range(1, len(_NAMES) + 1))
        updates = ", ".join(f"{name} = excluded.{name}" for name in _NAMES[1:])
        self.upsert = (
            f"INSERT INTO {table} ({', '.join(_NAMES)}) VALUES ({marks}) "
            f"ON CONFLICT (session_id) DO UPDATE SET {updates}"
        )
        self.select = f"SELECT {', '.join(_NAMES)} FROM {table}"
        self.get = f"{self.select} WHERE session_id = {dialect.mark(1)}"

    def add_column(self, column: Column) -> str:
        """The ALTER TABLE that gives a table made by an older catflap this column."""
        return f"ALTER TABLE {self.table} ADD COLUMN {self.dialect.column_sql(column)}"

    def listing(self, query: SessionQuery) -> Listing:
        """How many records match, and one page of them, newest first."""
        mark = self.dialect.mark
        clauses = [f"organization = {mark(1)}", f"agent = {mark(2)}"]
        params: list[Any] = [query.org, query.agent]
        if query.status == "active":
            clauses.append("ended_at IS NULL")
        elif query.status == "ended":
            clauses.append("ended_at IS NOT NULL")
        # Marks count parameters, not clauses: the status clauses take none.
        if query.start_time is not None:
            params.append(query.start_time)
            clauses.append(f"created_at >= {mark(len(params))}")
        if query.end_time is not None:
            params.append(query.end_time)
            clauses.append(f"created_at <= {mark(len(params))}")
        if query.start_type != "all":
            params.append(query.start_type == "cold")
            clauses.append(f"cold_start = {mark(len(params))}")
        if query.end_state == ACTIVE_END_STATE:
            clauses.append("ended_at IS NULL")
        elif query.end_state is not None:
            # The one mapping (contract/status.py) read backwards: the statuses of this state.
            statuses = statuses_ending_as(query.end_state)
            params.extend(statuses)
            first = len(params) - len(statuses) + 1
            marks = ", ".join(mark(index) for index in range(first, len(params) + 1))
            clauses.append(f"completion_status IN ({marks})" if statuses else "1 = 0")
        where = " AND ".join(clauses)
        count = f"SELECT COUNT(*) FROM {self.table} WHERE {where}"
        page = (
            f"{self.select} WHERE {where} ORDER BY created_at DESC, session_id DESC "
            f"LIMIT {mark(len(params) + 1)} OFFSET {mark(len(params) + 2)}"
        )
        return Listing(count, params, page, [*params, query.limit, query.offset])


def row_values(record: SessionRecord) -> list[Any]:
    """The record's values in column order."""
    # Plain attribute reads: asdict() deep-copies, and this runs twice per session.
    values = [getattr(record, name) for name in _NAMES]
    for index, name in enumerate(_NAMES):
        if name in _JSON and values[index] is not None:
            values[index] = json.dumps(values[index], separators=(",", ":"))
    return values


def record_from_row(row: Sequence[Any]) -> SessionRecord:
    """The record of a row selected in column order (:attr:`Statements.select`)."""
    values: dict[str, Any] = {}
    for name, value in zip(_NAMES, row, strict=True):
        # SQLite keeps booleans as integers, and a column an older table declared REAL hands
        # back floats: give every field its own type back.
        if value is not None and name in _INTEGERS:
            value = int(value)
        elif value is not None and name in _BOOLEANS:
            value = bool(value)
        elif value is not None and name in _JSON:
            value = json.loads(value)
        values[name] = value
    return SessionRecord(**values)
