"""Per-session capture in one process: what is captured, once, and where it goes."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from loguru import logger

from catflap.logs import SessionContext, bind_session, unbind_session
from catflap.runtime.botlogs import BotOutputCapture, SessionLogWriter, session_log_path

SID = "11111111-2222-4333-8444-555555555555"
CONTEXT = SessionContext(SID, "echo", "my-org")


def records(root: Path, session_id: str = SID) -> list[dict[str, str]]:
    path = session_log_path(root, "my-org", "echo", session_id)
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_paths_cannot_leave_the_log_folder(tmp_path: Path) -> None:
    assert session_log_path(tmp_path, "my-org", "echo", SID) == (
        tmp_path / "my-org" / "echo" / f"{SID}.jsonl"
    )
    escaped = session_log_path(tmp_path, "..", "a/b", "../../etc/passwd")
    assert escaped.parent.parent.parent == tmp_path and ".." not in escaped.parts


def test_only_bound_output_is_captured_each_line_once(tmp_path: Path) -> None:
    capture = BotOutputCapture(SessionLogWriter(tmp_path))
    capture.install()
    sink = logger.add(sys.stderr, format="{message}")  # a bot's own sink, added per session
    try:
        print("before the session")
        capture.session_started(CONTEXT)
        token = bind_session(CONTEXT)
        try:
            print("one", end="")
            print(" line")
            sys.stderr.write("two\nlines\nand a half")
            logging.getLogger("bot").warning("a record")
            logger.info("a loguru record")
        finally:
            unbind_session(token)
        print("after the session")
        capture.session_ended(CONTEXT)
    finally:
        logger.remove(sink)
        capture.uninstall()
    got = [(r["stream"], r["level"], r["line"]) for r in records(tmp_path)]
    stream, level, loguru_line = got.pop(4)
    assert (stream, level) == ("loguru", "INFO")
    assert loguru_line.startswith(f"{__name__}:test_only_bound_output_is_captured_each_line_once:")
    assert loguru_line.endswith(" - a loguru record")
    assert got == [
        ("stdout", "INFO", "one line"),
        ("stderr", "ERROR", "two"),
        ("stderr", "ERROR", "lines"),
        ("logging", "WARNING", "bot: a record"),
        ("stderr", "ERROR", "and a half"),  # the unfinished line, at the session's end
    ]
    assert {r["session_id"] for r in records(tmp_path)} == {SID}
    assert sys.stdout is not None and type(sys.stdout).__name__ != "_StreamTap"


def test_lines_after_the_end_still_append(tmp_path: Path) -> None:
    writer = SessionLogWriter(tmp_path)
    writer.start(CONTEXT)
    writer.write(CONTEXT, stream="logging", level="INFO", line="during", created=0.0)
    writer.end(SID)
    writer.write(CONTEXT, stream="logging", level="INFO", line="late", created=1.0)
    writer.close()
    got = records(tmp_path)
    assert [r["line"] for r in got] == ["during", "late"]
    assert got[0]["@timestamp"] == "1970-01-01T00:00:00.000Z"
