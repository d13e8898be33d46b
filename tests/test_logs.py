"""Structured log lines: the formatters, and `catflap serve` binding every session line."""

from __future__ import annotations

import io
import json
import logging
import re
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

from catflap.contract import limits
from catflap.logs import (
    JsonFormatter,
    LogBudget,
    SessionContext,
    bind_session,
    configure_logging,
    not_logged,
    session_log,
    unbind_session,
)

from .conftest import ECHO, catflap_serve, seconds

pytestmark = pytest.mark.slow  # end to end: real gateways, agent processes

SID = "11111111-2222-4333-8444-555555555555"


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """Root logging into a buffer, as the CLI configures it; restored afterwards."""
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    buffer = io.StringIO()
    yield buffer
    root.handlers[:] = saved[1]
    root.setLevel(saved[0])


def test_json_lines_carry_the_session_agent_and_org(captured: io.StringIO) -> None:
    configure_logging("info", "json", stream=captured)
    log = logging.getLogger("catflap.test")
    session_log(log, SID, agent="echo", org="my-org").info("= started %d", 1)
    log.warning("no session here")
    try:
        raise ValueError("boom")
    except ValueError:
        session_log(log, SID, agent="echo", org="my-org").exception("! failed")
    log.debug("below the level")
    first, second, third = (json.loads(line) for line in captured.getvalue().splitlines())
    assert set(first) == {"time", "level", "logger", "message", "session_id", "agent", "org"}
    assert (first["level"], first["logger"], first["message"]) == (
        "INFO",
        "catflap.test",
        "= started 1",
    )
    assert (first["session_id"], first["agent"], first["org"]) == (SID, "echo", "my-org")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert "session_id" not in second and second["message"] == "no session here"
    assert third["level"] == "ERROR" and "ValueError: boom" in third["exc_info"]


def test_a_bound_task_context_reaches_records_without_extra(captured: io.StringIO) -> None:
    configure_logging("info", "json", stream=captured)
    token = bind_session(SessionContext(SID, "echo", "my-org"))
    try:
        logging.getLogger("bot").info("from the bot")
    finally:
        unbind_session(token)
    logging.getLogger("bot").info("after the session")
    bound, unbound = (json.loads(line) for line in captured.getvalue().splitlines())
    assert (bound["session_id"], bound["agent"], bound["org"]) == (SID, "echo", "my-org")
    assert "session_id" not in unbound


def test_text_lines_put_the_session_id_before_the_message(captured: io.StringIO) -> None:
    configure_logging("info", "text", stream=captured)
    session_log(logging.getLogger("catflap.test"), SID, agent="echo").info("= started")
    logging.getLogger("catflap.test").info("plain")
    with_session, plain = captured.getvalue().splitlines()
    assert with_session.endswith(f"INFO    catflap.test [{SID}] = started")
    assert plain.endswith("INFO    catflap.test plain")


def test_json_formatter_keeps_non_ascii_and_odd_arguments() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "é %s", (object,), None)
    assert json.loads(JsonFormatter().format(record))["message"].startswith("é <class")


@contextmanager
def serve(tmp_path: Path, *args: str) -> Iterator[tuple[subprocess.Popen[str], int, list[str]]]:
    """`catflap serve examples/echo` with its state in ``tmp_path``; stderr lines collected."""
    with catflap_serve(
        [
            *(str(ECHO), "--org", "my-org", "--private-key", "sk_test_123"),
            *("--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "state"), *args),
        ],
        env={"CATFLAP_TOKEN_KEYS": "k1:secret"},
    ) as running:
        yield running


def one_session(port: int) -> str:
    with connect(
        f"ws://127.0.0.1:{port}/ws/generic/my-agent.my-org", open_timeout=seconds(30)
    ) as ws:
        sid = str(json.loads(ws.recv(timeout=seconds(10)))["session_id"])
        ws.send("hi")
        assert ws.recv(timeout=seconds(5)) == "hi"
    return sid


def wait_logged(port: int, sid: str) -> list[dict[str, object]]:
    """The session's lines through the logs API, once it has ended."""
    headers = {"Authorization": "Bearer sk_test_123"}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=seconds(10)) as client:
        for _ in range(int(seconds(10) / 0.05)):
            record = client.get(f"/v1/agents/my-agent/sessions/{sid}", headers=headers).json()
            if record.get("endedAt") is not None:
                break
            threading.Event().wait(0.05)
        params = {"sessionId": sid, "order": "asc"}
        answer = client.get("/v1/agents/my-agent/logs", params=params, headers=headers).json()
    logs: list[dict[str, object]] = answer["logs"]
    return logs


def test_serve_writes_json_lines_with_the_session_on_every_session_line(tmp_path: Path) -> None:
    with serve(tmp_path) as (proc, port, lines):
        sid = one_session(port)
        logged = wait_logged(port, sid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=seconds(15)) == 0
    # The runtime wrote the session's file below --state-dir, and the API read it back.
    assert (tmp_path / "state" / "logs" / "my-org" / "my-agent" / f"{sid}.jsonl").is_file()
    assert str(logged[-1]["log"]).startswith("catflap.runtime.app: = session ended: completed")
    records = []
    for line in lines:
        if line.startswith("{"):
            records.append(json.loads(line))
        else:  # only what Pipecat's import prints with loguru's own sink
            assert "Pipecat" in line, line
    about = [r for r in records if sid in json.dumps(r)]
    assert about, "no line about the session"
    for record in about:
        assert (record["session_id"], record["agent"], record["org"]) == (
            sid,
            "my-agent",
            "my-org",
        ), record
    said = [(r["logger"], r["message"]) for r in about]
    for logger, start in [
        ("catflap.gateway", "= websocket session started"),
        ("catflap.runtime.app", "= session started"),
        ("catflap.runtime.app", "= session ended: completed"),
        ("catflap.gateway", "= session ended: client_closed"),
    ]:
        assert any(name == logger and text.startswith(start) for name, text in said), start


def test_serve_log_format_text(tmp_path: Path) -> None:
    with serve(tmp_path, "--log-format", "text") as (_, port, lines):
        sid = one_session(port)
        wait_logged(port, sid)
    about = [line for line in lines if sid in line]
    assert about and all(f"[{sid}]" in line for line in about)
    assert not any(line.startswith("{") for line in lines)


def test_a_log_budget_writes_its_lines_per_second_then_counts_the_rest() -> None:
    now = [100.0]
    budget = LogBudget(limits.REFUSAL_LOG_LINES_PER_S, clock=lambda: now[0])
    taken = [budget.take() for _ in range(limits.REFUSAL_LOG_LINES_PER_S + 30)]
    assert taken[: limits.REFUSAL_LOG_LINES_PER_S] == [0] * limits.REFUSAL_LOG_LINES_PER_S
    assert taken[limits.REFUSAL_LOG_LINES_PER_S :] == [None] * 30
    now[0] += 1.0  # the next second: the first line says how many were not written
    assert budget.take() == 30
    assert budget.take() == 0
    assert not_logged(30) == " (30 more refusals not logged)" and not_logged(0) == ""
