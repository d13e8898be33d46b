"""Logging with the session bound to every line.

Every line about a session goes through :func:`session_log`, which prefixes ``[session_id]``
and attaches ``session_id``, ``agent`` and ``org`` as record attributes for structured output.
Debug prefixes follow websockets' convention: ``>`` sent, ``<`` received, ``=`` state change,
``x`` shutdown, ``!`` error.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

__all__ = ["SessionLog", "configure_logging", "session_log"]

_FORMAT = "%(asctime)s %(levelname)-7s %(name)s %(message)s"


class SessionLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        extra = dict(self.extra or {})
        kwargs["extra"] = {**extra, **kwargs.get("extra", {})}
        return f"[{extra.get('session_id', '-')}] {msg}", kwargs


def session_log(
    logger: logging.Logger, session_id: str, *, agent: str = "", org: str = ""
) -> SessionLog:
    return SessionLog(logger, {"session_id": session_id, "agent": agent, "org": org})


def configure_logging(level: str = "info") -> None:
    """Plain-text logs on stderr; called once by the CLI, never at import time."""
    logging.basicConfig(level=level.upper(), format=_FORMAT)
