"""Exit codes of the CLI, and running a coroutine on the best event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

__all__ = ["EXIT_API", "EXIT_CONFIG", "EXIT_OK", "EXIT_STARTUP", "run_async"]

EXIT_OK = 0
#: ``catflap sessions``: the gateway refused the call or could not be reached.
EXIT_API = 1
#: The configuration is invalid; the message names the file, the key and the problem.
EXIT_CONFIG = 2
#: The gateway could not start (port in use, ...).
EXIT_STARTUP = 3


def run_async(coro: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop when it is installed (it is a dependency on Linux and macOS)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coro)
