"""Capture a bot's own output per session, as Pipecat Cloud's base image writes ``bot.jsonl``.

Theory of operation
-------------------

The runtime's ``/ws`` handler binds the session (:func:`catflap.logs.bind_session`) before it
starts ``bot()``; the bot's task, and every task or ``to_thread`` call it starts, inherits that
binding. Three taps read it:

- a :mod:`logging` handler on the root logger (the bot's ``logging`` calls and the runtime's
  own lines about the session);
- a :mod:`loguru` sink, when loguru is installed (Pipecat logs with it);
- ``sys.stdout`` and ``sys.stderr`` wrappers that still write everything through, and collect
  the text written while a session is bound (``print``), one record per line. Text written by
  a ``logging`` or ``loguru`` handler is skipped there: the record itself was already captured.

Each record becomes one JSON line in ``<log_dir>/<org>/<agent>/<session_id>.jsonl``::

    {"@timestamp": "2025-01-01T12:00:00.123Z", "stream": "loguru", "level": "INFO",
     "session_id": "...", "agent": "my-agent", "org": "my-org", "line": "bot:bot:12 - hi"}

``stream`` is ``stdout`` or ``stderr`` for text, ``logging`` or ``loguru`` for records. Output
from threads the bot starts with plain :class:`threading.Thread` (no context) and writes made
below Python (C extensions writing to fd 2) are not attributed to a session.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import IO, Any, TextIO, cast

from catflap.contract import limits
from catflap.logs import SessionContext, current_session, iso_timestamp

__all__ = ["BotOutputCapture", "SessionLogWriter", "session_log_path"]

#: How far up the stack a write to stdout/stderr is checked for a logging or loguru handler.
_STACK_DEPTH_MAX = 40
LINE_MAX_CHARS = limits.LOG_LINE_MAX_CHARS
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
#: The level given to text lines, by stream (log collectors' convention).
_TEXT_LEVELS = {"stdout": "INFO", "stderr": "ERROR"}


def _path_safe(name: str) -> str:
    # Agent and org names and session ids (UUIDs) pass unchanged; anything that could leave
    # the folder (a standalone runtime takes any x-daily-session-id) does not.
    return _UNSAFE.sub("_", name) or "_"


def session_log_path(root: Path, org: str, agent: str, session_id: str) -> Path:
    """Where one session's lines go: ``<root>/<org>/<agent>/<session_id>.jsonl``."""
    return root / _path_safe(org) / _path_safe(agent) / f"{_path_safe(session_id)}.jsonl"


class SessionLogWriter:
    """Appends JSON lines to one file per session; safe to call from any thread."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._files: dict[str, IO[str]] = {}
        self._lock = threading.Lock()

    def start(self, context: SessionContext) -> None:
        """Open the session's file (its folder is created as needed); never raises."""
        path = session_log_path(self.root, context.org, context.agent, context.session_id)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = path.open("a", encoding="utf-8")
        except OSError as exc:
            logging.getLogger("catflap.runtime").warning("! cannot write %s: %s", path, exc)
            return
        with self._lock:
            self._files[context.session_id] = handle

    def end(self, session_id: str) -> None:
        """Close the session's file; later lines (a bot outliving its session) still append."""
        with self._lock:
            handle = self._files.pop(session_id, None)
        if handle is not None:
            handle.close()

    def close(self) -> None:
        with self._lock:
            handles, self._files = list(self._files.values()), {}
        for handle in handles:
            handle.close()

    def write(
        self, context: SessionContext, *, stream: str, level: str, line: str, created: float
    ) -> None:
        """Append one record; never raises (a full disk must not break the bot)."""
        record = {
            "@timestamp": iso_timestamp(created),
            "stream": stream,
            "level": level,
            "session_id": context.session_id,
            "agent": context.agent,
            "org": context.org,
            "line": line[:LINE_MAX_CHARS],
        }
        text = json.dumps(record, ensure_ascii=False, default=str) + "\n"
        try:
            with self._lock:
                handle = self._files.get(context.session_id)
                if handle is not None:
                    handle.write(text)
                    handle.flush()
                    return
            path = session_log_path(self.root, context.org, context.agent, context.session_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as late:
                late.write(text)
        except OSError:
            pass


def _bound(record: logging.LogRecord) -> SessionContext | None:
    session_id = getattr(record, "session_id", None)
    if session_id:
        context = current_session.get()
        if context is not None and context.session_id == session_id:
            return context
        return SessionContext(
            session_id, getattr(record, "agent", "") or "", getattr(record, "org", "") or ""
        )
    return current_session.get()


class _LoggingTap(logging.Handler):
    def __init__(self, writer: SessionLogWriter) -> None:
        super().__init__()
        self._writer = writer
        self._format = logging.Formatter()

    def emit(self, record: logging.LogRecord) -> None:
        context = _bound(record)
        if context is None:
            return
        try:
            line = f"{record.name}: {record.getMessage()}"
            if record.exc_info:
                line += "\n" + self._format.formatException(record.exc_info)
            self._writer.write(
                context, stream="logging", level=record.levelname, line=line, created=record.created
            )
        except Exception:
            self.handleError(record)


def _in_log_handler(frame: FrameType | None) -> bool:
    """Whether this write comes from inside logging's or loguru's handler machinery."""
    for _ in range(_STACK_DEPTH_MAX):
        if frame is None:
            return False
        module = frame.f_globals.get("__name__", "")
        if module == "logging" or module.startswith("loguru."):
            return True
        frame = frame.f_back
    return False


class _StreamTap:
    """Writes through to the real stream; collects a bound session's text, line by line."""

    def __init__(self, real: TextIO, name: str, writer: SessionLogWriter) -> None:
        self._real = real
        self._name = name
        self._writer = writer
        self._partial: dict[str, str] = {}
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        written = self._real.write(text)
        context = current_session.get()
        if context is not None and text and not _in_log_handler(sys._getframe(1)):
            self._collect(context, text)
        return written

    def _collect(self, context: SessionContext, text: str) -> None:
        with self._lock:
            pending = self._partial.pop(context.session_id, "") + text
            *lines, rest = pending.split("\n")
            if rest:
                self._partial[context.session_id] = rest[-LINE_MAX_CHARS:]
        for line in lines:
            self._emit(context, line)

    def _emit(self, context: SessionContext, line: str) -> None:
        self._writer.write(
            context,
            stream=self._name,
            level=_TEXT_LEVELS[self._name],
            line=line.rstrip("\r"),
            created=time.time(),
        )

    def end(self, context: SessionContext) -> None:
        """Write out the session's unfinished line, if any."""
        with self._lock:
            rest = self._partial.pop(context.session_id, "")
        if rest:
            self._emit(context, rest)

    def flush(self) -> None:
        self._real.flush()

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding, buffer, ...
        return getattr(self._real, name)


class BotOutputCapture:
    """The three taps of one runtime process, installed together and removed together."""

    def __init__(self, writer: SessionLogWriter) -> None:
        self.writer = writer
        self._handler = _LoggingTap(writer)
        self._streams: list[tuple[str, _StreamTap, TextIO]] = []
        self._loguru_id: int | None = None
        self._root_level = logging.NOTSET

    def install(self) -> None:
        """Start capturing; call after ``bot.py`` is imported (it may reset loguru's sinks).

        Session files get INFO and above (DEBUG too at ``--log-level debug``) whatever the
        runtime's level: the root logger is lowered to INFO if needed, and the stderr handler
        keeps its own level.
        """
        root = logging.getLogger()
        self._root_level = root.level
        if root.level > logging.INFO:
            root.setLevel(logging.INFO)
        self._handler.setLevel(min(root.level, logging.INFO))
        root.addHandler(self._handler)
        for name in ("stdout", "stderr"):
            real = cast(TextIO, getattr(sys, name))
            tap = _StreamTap(real, name, self.writer)
            self._streams.append((name, tap, real))
            setattr(sys, name, tap)
        self._loguru_id = _add_loguru_sink(self.writer)

    def uninstall(self) -> None:
        root = logging.getLogger()
        root.removeHandler(self._handler)
        root.setLevel(self._root_level)
        for name, tap, real in reversed(self._streams):
            if getattr(sys, name) is tap:
                setattr(sys, name, real)
        self._streams.clear()
        if self._loguru_id is not None:
            _remove_loguru_sink(self._loguru_id)
            self._loguru_id = None
        self.writer.close()

    def session_started(self, context: SessionContext) -> None:
        self.writer.start(context)

    def session_ended(self, context: SessionContext) -> None:
        for _, tap, _ in self._streams:
            tap.end(context)
        self.writer.end(context.session_id)


def _add_loguru_sink(writer: SessionLogWriter) -> int | None:
    try:
        from loguru import logger
    except ImportError:
        return None

    def sink(message: Any) -> None:
        context = current_session.get()
        if context is None:
            return
        record = message.record
        line = f"{record['name']}:{record['function']}:{record['line']} - {record['message']}"
        if record["exception"] is not None:
            import traceback

            exc = record["exception"]
            line += "\n" + "".join(
                traceback.format_exception(exc.type, exc.value, exc.traceback)
            ).rstrip("\n")
        writer.write(
            context,
            stream="loguru",
            level=record["level"].name,
            line=line,
            created=record["time"].timestamp(),
        )

    # DEBUG: what loguru's own stderr sink shows by default, so what a bot author expects.
    return logger.add(sink, level="DEBUG", format="{message}", catch=True, diagnose=False)


def _remove_loguru_sink(sink_id: int) -> None:
    from loguru import logger

    with contextlib.suppress(ValueError):  # the bot already removed every sink
        logger.remove(sink_id)
