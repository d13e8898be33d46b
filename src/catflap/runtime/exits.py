"""Exit codes of the agent runtime process, for the pool and for whoever ran it by hand."""

from __future__ import annotations

__all__ = [
    "EXIT_BOT_IMPORT_FAILED",
    "EXIT_BOT_STUCK",
    "EXIT_CONFIG",
    "EXIT_LISTEN_FAILED",
    "EXIT_OK",
]

EXIT_OK = 0
#: Bad options (for example an unparsable ``--listen``).
EXIT_CONFIG = 2
#: ``bot.py`` failed to import or has no ``async def bot``; ``start_failed`` was sent.
EXIT_BOT_IMPORT_FAILED = 3
#: A cancelled bot kept running; the process exits without waiting for it.
EXIT_BOT_STUCK = 4
#: The listening socket could not be bound or served; ``start_failed`` was sent.
EXIT_LISTEN_FAILED = 5
