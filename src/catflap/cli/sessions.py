"""``catflap sessions list|show|stop``: the sessions API of a running gateway, from a shell.

Each command makes one HTTP call with a private key (``--key`` or ``$CATFLAP_PRIVATE_KEY``) to
the gateway at ``--url`` (or ``$CATFLAP_URL``). ``--json`` prints the API's answer as it came.
An error from the API prints its message and exits 1 (:data:`EXIT_API`); a usage mistake
exits 2, as click does.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import click

from catflap.cli.apiclient import DEFAULT_URL, ApiError, api_options, call_api

__all__ = ["DEFAULT_URL", "ApiError", "format_record", "format_table", "sessions"]


def _session_path(agent: str, session_id: str | None = None) -> str:
    path = f"/v1/agents/{quote(agent, safe='')}/sessions"
    return path if session_id is None else f"{path}/{quote(session_id, safe='')}"


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2))


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _duration(record: dict[str, Any], now: float) -> str:
    seconds = (record.get("endedAt") or now) - record["createdAt"]
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _status(record: dict[str, Any]) -> str:
    return str(
        record.get("completionStatus") or ("active" if record.get("endedAt") is None else "-")
    )


def _codes(record: dict[str, Any]) -> str:
    names = ("clientCloseCode", "agentCloseCode", "gatewayCloseCode")
    return "/".join("-" if record.get(name) is None else str(record[name]) for name in names)


def format_table(answer: dict[str, Any], *, offset: int, now: float) -> str:
    """The list answer as a table, one session a line, and a count line."""
    rows = [("SESSION ID", "CREATED (UTC)", "STATUS", "DURATION", "CLOSE CLIENT/AGENT/GATEWAY")]
    for record in answer["sessions"]:
        rows.append(
            (
                record["sessionId"],
                _when(record["createdAt"]),
                _status(record),
                _duration(record, now),
                _codes(record),
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(width) if column == 3 else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    shown, total = len(answer["sessions"]), answer["total_count"]
    if shown:
        footer = f"sessions {offset + 1}-{offset + shown} of {total}"
        if offset + shown < total:
            footer += f"; --offset {offset + shown} for more"
    else:
        footer = f"no sessions here ({total} in all)" if total else "no sessions"
    return "\n".join([*(lines if shown else []), footer])


def format_record(record: dict[str, Any], *, now: float) -> str:
    """One record as ``name: value`` lines, times in UTC."""
    fields: list[tuple[str, Any]] = [
        ("status", _status(record)),
        ("duration", _duration(record, now)),
    ]
    for name, value in record.items():
        if name in ("createdAt", "endedAt") and value is not None:
            value = f"{_when(value)} UTC ({value:.3f})"
        elif value is None:
            value = "-"
        fields.append((name, value))
    width = max(len(name) for name, _ in fields)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in fields)


@click.group()
def sessions() -> None:
    """List, show and stop an agent's sessions through a gateway's API (private key)."""


@sessions.command("list")
@click.argument("agent")
@click.option(
    "--status",
    type=click.Choice(["active", "ended", "all"]),
    default="all",
    show_default=True,
    help="active: still running; ended: finished.",
)
@click.option(
    "--limit", type=click.IntRange(1, 1000), default=10, show_default=True, help="Page size."
)
@click.option(
    "--offset", type=click.IntRange(min=0), default=0, show_default=True, help="Skip this many."
)
@api_options
def list_sessions(
    agent: str, status: str, limit: int, offset: int, url: str, key: str, as_json: bool
) -> None:
    """List AGENT's sessions, newest first."""
    params = {"status": status, "limit": limit, "offset": offset}
    answer = call_api(url, key, "GET", _session_path(agent), params)
    if as_json:
        _print_json(answer)
    else:
        click.echo(format_table(answer, offset=offset, now=time.time()))


@sessions.command("show")
@click.argument("agent")
@click.argument("session_id")
@api_options
def show_session(agent: str, session_id: str, url: str, key: str, as_json: bool) -> None:
    """Show one session of AGENT: times, how it ended, close codes, bytes and frames."""
    record = call_api(url, key, "GET", _session_path(agent, session_id))
    if as_json:
        _print_json(record)
    else:
        click.echo(format_record(record, now=time.time()))


@sessions.command("stop")
@click.argument("agent")
@click.argument("session_id")
@api_options
def stop_session(agent: str, session_id: str, url: str, key: str, as_json: bool) -> None:
    """Stop a live session of AGENT: bot() is cancelled and the client gets close 1000."""
    answer = call_api(url, key, "DELETE", _session_path(agent, session_id))
    if as_json:
        _print_json(answer)
    else:
        click.echo(f"{answer['status']} {answer['session_id']}")
