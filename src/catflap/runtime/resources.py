"""Sampling the runtime's own process while a session runs, for the record's ``resourceMetrics``.

The instance is this process: ``bot()`` runs on its event loop and its threads, so the
process's CPU time (:func:`time.process_time`, every thread, user and system) and resident
memory (``/proc/self/statm``; the peak from ``getrusage`` where there is no ``/proc``) are the
session's. With ``--sessions-per-instance`` above 1 the sessions running together share the
numbers, as they share the process. The points and their bound live in
:mod:`catflap.contract.resources`; this module only reads the process and keeps the time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from catflap.contract.resources import ResourceMetrics, ResourceSamples, summarize

__all__ = ["ProcessReading", "SessionSampler", "read_process"]

#: (CPU seconds, resident bytes) of this process.
ProcessReading = tuple[float, int]

_STATM = Path("/proc/self/statm")
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def read_process() -> ProcessReading:
    """This process's CPU seconds so far and its resident memory now, in bytes."""
    cpu = time.process_time()
    try:
        resident_pages = int(_STATM.read_text().split()[1])
    except (OSError, IndexError, ValueError):
        # No /proc (macOS): the peak resident size, in bytes there and KiB on Linux.
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return cpu, peak if sys.platform == "darwin" else peak * 1024
    return cpu, resident_pages * _PAGE_BYTES


class SessionSampler:
    """Reads the process from :meth:`start` to :meth:`stop`, in a task of its own.

    Args:
        read: the reading (injectable: tests feed fixed numbers).
        clock: monotonic seconds.
        sleep: waits between readings.
    """

    def __init__(
        self,
        *,
        read: Callable[[], ProcessReading] = read_process,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        samples: ResourceSamples | None = None,
    ) -> None:
        self._read = read
        self._clock = clock
        self._sleep = sleep
        self._samples = samples or ResourceSamples()
        self._started = 0.0
        self._task: asyncio.Task[None] | None = None

    def _reading(self) -> None:
        cpu, rss = self._read()
        self._samples.add(self._clock() - self._started, cpu, rss)

    async def _run(self) -> None:
        while True:
            await self._sleep(self._samples.interval)
            self._reading()

    def start(self) -> None:
        """Take the base reading and sample until :meth:`stop`."""
        self._started = self._clock()
        self._reading()
        self._task = asyncio.create_task(self._run(), name="resource-sampler")

    async def stop(self) -> ResourceMetrics | None:
        """Take the last reading; the summary of every point (``None`` when there is none)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._reading()
        return summarize(self._samples.points)
