"""The pool's time: a clock to read and a sleep to wait on, both injected so tests drive them.

Every wait in the pool (ping interval, start backoff, ready timeout, stop grace, reaping) goes
through a :data:`Sleep`, never ``asyncio.sleep`` or ``asyncio.wait_for`` directly, so a test
can move time by hand and nothing waits on the wall clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["Clock", "Sleep", "done_within"]

#: Seconds on a monotonic clock.
Clock = Callable[[], float]
#: Waits this many seconds (``asyncio.sleep`` in production).
Sleep = Callable[[float], Awaitable[None]]


async def done_within(future: asyncio.Future[Any], seconds: float, sleep: Sleep) -> bool:
    """Wait until ``future`` is done or ``seconds`` have passed on ``sleep``; True if it is done.

    ``future`` is never cancelled here, not even when the caller is (as with
    ``asyncio.shield``): its owner decides what becomes of it. Read its result afterwards.
    """
    if future.done():
        return True
    timer = asyncio.ensure_future(sleep(seconds))
    try:
        await asyncio.wait((future, timer), return_when=asyncio.FIRST_COMPLETED)
    finally:
        timer.cancel()
    return future.done()
