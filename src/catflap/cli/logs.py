"""``catflap logs AGENT --session ID [--follow]``: a session's log lines, through the logs API.

Without ``--follow`` it prints the last ``--limit`` lines, oldest first. With ``--follow`` it
then polls for new lines every ``--interval`` seconds until the sessions API shows the session
ended (after printing its last lines), or until Ctrl-C. ``--json`` prints each line as the API's
JSON object, one a line.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import click

from catflap.cli.apiclient import api_options, call_api
from catflap.contract import limits

__all__ = ["FOLLOW_INTERVAL_S", "format_line", "logs"]

#: How often ``--follow`` asks for new lines: fast enough to feel live, 2 requests a second.
FOLLOW_INTERVAL_S = 0.5


def format_line(entry: dict[str, Any], *, with_session: bool = False) -> str:
    """``timestamp LEVEL [session] line``, as ``catflap logs`` prints it."""
    parts = [str(entry.get("timestamp") or "-"), f"{entry.get('level') or '-':<7}"]
    if with_session:
        parts.append(f"[{entry.get('sessionId')}]")
    parts.append(str(entry.get("log", "")))
    return " ".join(parts)


def _logs_path(agent: str) -> str:
    return f"/v1/agents/{quote(agent, safe='')}/logs"


def _printer(as_json: bool, with_session: bool) -> Callable[[list[dict[str, Any]]], None]:
    def show(entries: list[dict[str, Any]]) -> None:
        for entry in entries:
            click.echo(
                json.dumps(entry) if as_json else format_line(entry, with_session=with_session)
            )

    return show


def _follow(
    url: str,
    key: str,
    agent: str,
    session_id: str,
    seen: int,
    show: Callable[[list[dict[str, Any]]], None],
    interval: float,
) -> None:
    """Print lines past the first ``seen`` until the session has ended and all are printed."""
    session_path = f"/v1/agents/{quote(agent, safe='')}/sessions/{quote(session_id, safe='')}"
    while True:
        # Ended first, lines second: lines written before the end are in this very read.
        ended = call_api(url, key, "GET", session_path).get("endedAt") is not None
        params = {
            "sessionId": session_id,
            "order": "asc",
            "offset": seen,
            "limit": limits.LOGS_LIMIT_MAX,
        }
        answer = call_api(url, key, "GET", _logs_path(agent), params)
        entries = answer["logs"]
        show(entries)
        seen += len(entries)
        if entries and seen < answer["total"]["value"]:
            continue  # a full page: more are waiting
        if ended:
            return
        time.sleep(interval)


@click.command("logs")
@click.argument("agent")
@click.option("--session", "session_id", help="The session's id; without it, recent sessions.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines until it ends.")
@click.option(
    "--limit",
    type=click.IntRange(1, limits.LOGS_LIMIT_MAX),
    default=limits.LOGS_LIMIT_DEFAULT,
    show_default=True,
    help="Print at most this many of the latest lines first.",
)
@click.option(
    "--interval",
    type=click.FloatRange(0.05, 60),
    default=FOLLOW_INTERVAL_S,
    show_default=True,
    help="--follow: seconds between polls.",
)
@api_options
def logs(
    agent: str,
    session_id: str | None,
    follow: bool,
    limit: int,
    interval: float,
    url: str,
    key: str,
    as_json: bool,
) -> None:
    """Print AGENT's log lines: one session's (--session), or its recent sessions'."""
    if follow and session_id is None:
        raise click.UsageError("--follow needs --session ID")
    params: dict[str, Any] = {"order": "desc", "limit": limit}
    if session_id is not None:
        params["sessionId"] = session_id
    answer = call_api(url, key, "GET", _logs_path(agent), params)
    show = _printer(as_json, with_session=session_id is None)
    show(list(reversed(answer["logs"])))
    if not follow or session_id is None:
        return
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends --follow quietly
        _follow(url, key, agent, session_id, answer["total"]["value"], show, interval)
