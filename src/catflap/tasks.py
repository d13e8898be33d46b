"""Background tasks an owner must neither lose nor leak: one helper for every registry.

The gateway (one task per session), the pool (launch, ping, reap), the cluster host and the
dispatcher each start tasks that outlive the call that made them. ``asyncio`` keeps only a weak
reference to a task, so an unreferenced task can be collected mid-flight; and a task that fails
with nobody awaiting it loses its exception to a "never retrieved" warning at exit.

:class:`TaskSet` holds each task until it ends, logs an unexpected exception at once with the
owner's name, and stops them all on :meth:`TaskSet.aclose`. It is not an
:class:`asyncio.TaskGroup` because the owners' lifetimes are not one ``async with`` block and
because one session's failure must never cancel the sessions beside it; what it keeps from
TaskGroup is the guarantee that no task outlives its owner's close.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

__all__ = ["TaskSet"]

log = logging.getLogger("catflap")

_T = TypeVar("_T")


class TaskSet:
    """Strong references to running tasks, dropped as each task ends."""

    def __init__(self, owner: str) -> None:
        #: Names the owner in the log line of a task that failed.
        self.owner = owner
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, _T], *, name: str | None = None) -> asyncio.Task[_T]:
        """Run ``coro`` as a task held here until it ends."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()  # retrieved here, so asyncio never warns about it
        if exc is not None:
            log.error("! %s: task %s failed", self.owner, task.get_name(), exc_info=exc)

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(list(self._tasks))

    def running(self) -> list[asyncio.Task[Any]]:
        """The tasks not yet done, as a list (safe to hold while tasks end)."""
        return [task for task in self._tasks if not task.done()]

    async def wait_all(self) -> None:
        """Return once every task running now has ended (bound it with ``asyncio.timeout``)."""
        if tasks := self.running():
            await asyncio.wait(tasks)

    async def aclose(self) -> None:
        """Cancel every task still running and wait for each to finish unwinding."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
