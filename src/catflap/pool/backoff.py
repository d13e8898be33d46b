"""Start-failure backoff for one agent: when it may launch again, and what went wrong last.

An instance that fails to start (say, an import error in bot.py) is retried with exponential
backoff, and its traceback is logged once, not in a loop. The pool refuses sessions with 503
while the backoff runs (:meth:`catflap.pool.slots.AgentSlots.place`).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BACKOFF_FIRST_S", "BACKOFF_MAX_S", "StartBackoff", "StartFailure"]

#: Backoff between failed starts: 0.5 s, 1 s, 2 s, ... capped at one minute.
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 60.0

_NO_ERROR = "exited before it was ready"


@dataclass(frozen=True, slots=True)
class StartFailure:
    """What one failed start means for the next."""

    #: Failed starts in a row, this one included.
    failures: int
    #: Seconds until the next launch.
    delay: float
    #: The same error text as the failure before: log a short line, not the traceback again.
    repeated: bool


class StartBackoff:
    """Failed starts in a row and when the next launch may happen (pool clock)."""

    def __init__(self) -> None:
        self.failures = 0
        self.retry_at = 0.0
        self.last_error: str | None = None

    def failed(self, error: str, *, now: float) -> StartFailure:
        """Count a failed start (``error`` is its traceback or reason) and set the next try."""
        self.failures += 1
        delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (self.failures - 1))
        self.retry_at = now + delay
        repeated = error == self.last_error
        self.last_error = error
        return StartFailure(failures=self.failures, delay=delay, repeated=repeated)

    def succeeded(self) -> None:
        """An instance became ready: the next failure starts the backoff from the beginning."""
        self.failures = 0
        self.last_error = None

    def remaining(self, now: float) -> float:
        """Seconds to wait before the next launch (0: launch now)."""
        return max(0.0, self.retry_at - now) if self.failures else 0.0

    def last_error_line(self) -> str:
        """The last line of the last error (a traceback's exception), for a 503's text."""
        lines = (self.last_error or _NO_ERROR).strip().splitlines()
        return lines[-1] if lines else _NO_ERROR
