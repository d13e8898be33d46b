"""The bots running in this runtime process, by session id: sessions add and remove theirs,
the control loop asks them to stop.

Keyed by session id (the pool stops a session by its id, and a second session with the same
id is refused while the first runs), so this is a dict of its own rather than a
:class:`~catflap.tasks.TaskSet`.
"""

from __future__ import annotations

import asyncio

__all__ = ["RunningBots"]


class RunningBots:
    """Each running ``bot()`` task and the event that asks its session to stop."""

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stops: dict[str, asyncio.Event] = {}
        #: Bots that ignored cancellation: asyncio.run() would wait for them forever.
        self.stuck: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        #: Set by ``shutdown`` and at end of file: ``POST /bot`` starts no new session (``/ws``
        #: needs no flag, its listener is closed).
        self.closing = False

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._tasks

    def __len__(self) -> int:
        return len(self._tasks)

    def add(self, session_id: str, task: asyncio.Task[None]) -> asyncio.Event:
        """Register a running ``bot()``; returns the event that asks the session to stop."""
        self._tasks[session_id] = task
        stop = self._stops[session_id] = asyncio.Event()
        self._idle.clear()
        return stop

    def remove(self, session_id: str) -> None:
        """Forget a session whose end was reported; a bot still running is kept as stuck."""
        task = self._tasks.pop(session_id)
        del self._stops[session_id]
        if not task.done():
            self.stuck.add(task)
            task.add_done_callback(self._unstuck)
        if not self._tasks:
            self._idle.set()

    def _unstuck(self, task: asyncio.Task[None]) -> None:
        self.stuck.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved, so asyncio does not log it as "never retrieved"

    def stop(self, session_id: str) -> bool:
        """Ask one session to stop; ``False`` if no such session is running."""
        stop = self._stops.get(session_id)
        if stop is not None:
            stop.set()
        return stop is not None

    def refuse_new(self) -> None:
        """From now on no new ``POST /bot`` session may start here."""
        self.closing = True

    def stop_all(self) -> None:
        """Ask every running session to stop."""
        for stop in self._stops.values():
            stop.set()

    async def wait_idle(self) -> None:
        """Return once no session is running."""
        await self._idle.wait()
