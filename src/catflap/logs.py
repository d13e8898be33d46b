"""Logging with the session bound to every line: JSON lines (default) or plain text.

Every line about a session carries ``session_id``, ``agent`` and ``org`` as record attributes:
the gateway and the API attach them with :func:`session_log`; the agent runtime binds them to
the running session's task with :func:`bind_session`, and :class:`SessionContextFilter` copies
them onto every record logged from that task (the bot's own ``logging`` calls included).

:class:`JsonFormatter` writes one JSON object a line::

    {"time": "2025-01-01T12:00:00.123Z", "level": "INFO", "logger": "catflap.gateway",
     "message": "= session started ...", "session_id": "...", "agent": "my-agent",
     "org": "my-org"}

plus ``exc_info`` (the formatted traceback) when there is one. :class:`TextFormatter` writes
``time level logger [session_id] message``. Debug prefixes follow websockets' convention:
``>`` sent, ``<`` received, ``=`` state change, ``x`` shutdown, ``!`` error.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, Literal, TextIO

from catflap.contract import limits

__all__ = [
    "LOG_FORMATS",
    "bind_session",
    "configure_logging",
    "current_session",
    "iso_timestamp",
    "not_logged",
    "refusal_log_budget",
    "session_log",
    "unbind_session",
    "JsonFormatter",
    "LogBudget",
    "LogFormat",
    "SessionContext",
    "SessionContextFilter",
    "SessionLog",
    "TextFormatter",
]

LogFormat = Literal["json", "text"]
#: The values of ``--log-format``, default first.
LOG_FORMATS: tuple[LogFormat, ...] = ("json", "text")

#: The record attributes that bind a line to a session.
_SESSION_FIELDS = ("session_id", "agent", "org")


@dataclass(frozen=True, slots=True)
class SessionContext:
    """The session a task (and every task it creates) works for."""

    session_id: str
    agent: str = ""
    org: str = ""


#: Set by the agent runtime in each session's handler task; tasks created from it (``bot()``
#: and everything the bot starts) inherit it, so their log records can be attributed.
current_session: contextvars.ContextVar[SessionContext | None] = contextvars.ContextVar(
    "catflap_session", default=None
)


def bind_session(context: SessionContext) -> contextvars.Token[SessionContext | None]:
    """Bind ``context`` to the current task; returns the token for :func:`unbind_session`."""
    return current_session.set(context)


def unbind_session(token: contextvars.Token[SessionContext | None]) -> None:
    current_session.reset(token)


class SessionLog(logging.LoggerAdapter[logging.Logger]):
    """A logger whose records carry ``session_id``, ``agent`` and ``org`` as attributes."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        kwargs["extra"] = {**(self.extra or {}), **kwargs.get("extra", {})}
        return msg, kwargs


def session_log(
    logger: logging.Logger, session_id: str, *, agent: str = "", org: str = ""
) -> SessionLog:
    return SessionLog(logger, {"session_id": session_id, "agent": agent, "org": org})


class SessionContextFilter(logging.Filter):
    """Adds the task's bound session (:data:`current_session`) to records that have none."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "session_id", None):
            return True
        context = current_session.get()
        if context is not None:
            record.session_id = context.session_id
            record.agent = context.agent
            record.org = context.org
        return True


def iso_timestamp(seconds: float) -> str:
    """``2025-01-01T12:00:00.123Z``: UTC, milliseconds, as PCC's log records have them."""
    whole = int(seconds)
    millis = min(999, int((seconds - whole) * 1000))
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object a line; session fields appear whenever the record is about a session."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": iso_timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if getattr(record, "session_id", None):
            for name in _SESSION_FIELDS:
                out[name] = getattr(record, name, "") or None
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc_info"] = record.exc_text
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``time level logger [session_id] message``, then any traceback."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s %(session_prefix)s%(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        session_id = getattr(record, "session_id", None)
        record.session_prefix = f"[{session_id}] " if session_id else ""
        return super().formatMessage(record)


def configure_logging(
    level: str = "info", fmt: LogFormat = "json", *, stream: TextIO | None = None
) -> None:
    """Log to stderr as JSON lines or plain text; called once by the CLI, never at import time.

    Args:
        level: The root level (``debug``, ``info``, ...).
        fmt: ``json`` (one object a line) or ``text``.
        stream: Where lines go; stderr by default.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    # On the handler too: the agent runtime lowers the root level to capture a session's INFO
    # lines in its file without printing them.
    handler.setLevel(level.upper())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(SessionContextFilter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


class LogBudget:
    """At most ``per_second`` lines a second for one kind of line; the rest are counted.

    Refusals are logged so that an operator sees them, but one peer can cause thousands a
    second: without a budget it would turn the log (and the disk behind it) into its amplifier.
    Metrics still count every refusal.
    """

    def __init__(self, per_second: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._per_second = per_second
        self._clock = clock
        self._window = -1.0
        self._used = 0
        self.suppressed = 0

    def take(self) -> int | None:
        """None: do not log this line. Else log it, saying how many were not logged before
        it (the returned number)."""
        now = self._clock()
        if now - self._window >= 1.0:
            self._window, self._used = now, 0
        if self._used >= self._per_second:
            self.suppressed += 1
            return None
        self._used += 1
        skipped, self.suppressed = self.suppressed, 0
        return skipped


def not_logged(skipped: int) -> str:
    """The tail of a refusal line that follows refusals the budget did not write."""
    return f" ({skipped} more refusals not logged)" if skipped else ""


#: The gateway's refusal lines (HTTP refusals, provider handshakes, protocol errors).
refusal_log_budget = LogBudget(limits.REFUSAL_LOG_LINES_PER_S)
