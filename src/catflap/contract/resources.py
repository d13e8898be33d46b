"""A session's resource use: the bounded samples the runtime takes while ``bot()`` runs, and
their summary in Pipecat Cloud's ``resourceMetrics`` shape.

The runtime reads its own process (CPU seconds, resident memory) when the session starts and
every :data:`~catflap.contract.limits.RESOURCE_SAMPLE_INTERVAL_S` after, and once more when it
ends. Each reading after the first becomes one point ``{"t", "c", "m"}``: seconds since the
session started, CPU millicores over the interval that ends there, and resident bytes then.
Once :data:`~catflap.contract.limits.RESOURCE_SAMPLES_MAX` points are held, neighbours are
merged pairwise (mean CPU, the larger memory) and the interval doubles, so any session's
points span its whole length and never exceed the bound.

:func:`summarize` gives the percentiles the record keeps and the sessions API answers
(``cpuMillicoresP50`` ... ``memoryBytesP99``, ``sampleCount``, ``timeseries``): the same names
as PCC's ``SessionResponse.resourceMetrics``, so the ``pipecat cloud agent sessions --id``
panel renders them. The summary travels in ``session_ended`` (``contract/control.py``), so
it is validated there like every other field. No I/O here: ``runtime/resources.py`` reads the
process.
"""

from __future__ import annotations

import math
from typing import Annotated

from pydantic import Field
from typing_extensions import TypedDict  # pydantic needs it to validate TypedDicts on 3.11

from catflap.contract import limits

__all__ = ["ResourceMetrics", "ResourcePoint", "ResourceSamples", "summarize"]


#: One point of the timeseries: seconds since the session started, CPU millicores over the
#: interval ending at ``t``, resident memory bytes at ``t`` (PCC's ``{t, c, m}``).
class ResourcePoint(TypedDict):
    t: float
    c: int
    m: int


#: PCC's ``resourceMetrics``: percentiles over the points, their count, and the points.
class ResourceMetrics(TypedDict):
    cpuMillicoresP50: int
    cpuMillicoresP90: int
    cpuMillicoresP95: int
    cpuMillicoresP99: int
    memoryBytesP50: int
    memoryBytesP90: int
    memoryBytesP95: int
    memoryBytesP99: int
    sampleCount: int
    timeseries: Annotated[list[ResourcePoint], Field(max_length=limits.RESOURCE_SAMPLES_MAX)]


class ResourceSamples:
    """The bounded points of one session, fed with readings of the process.

    Args:
        interval: seconds between readings at first; doubles each time the points are merged.
        max_points: the most points held (at least 2).
    """

    def __init__(
        self,
        *,
        interval: float = limits.RESOURCE_SAMPLE_INTERVAL_S,
        max_points: int = limits.RESOURCE_SAMPLES_MAX,
    ) -> None:
        self.interval = interval
        self.max_points = max(2, max_points)
        self.points: list[ResourcePoint] = []
        self._last: tuple[float, float] | None = None

    def add(self, t: float, cpu_seconds: float, rss_bytes: int) -> None:
        """One reading at ``t`` seconds into the session; the first one only sets the base."""
        last, self._last = self._last, (t, cpu_seconds)
        if last is None or t <= last[0]:
            return
        if self.points and t - last[0] < self.interval / 4:
            # Too short to measure CPU (the reading at the end, just after a periodic one):
            # the shutdown's burst would pass for a whole interval's load.
            self._last = last
            return
        millicores = max(0.0, (cpu_seconds - last[1]) / (t - last[0]) * 1000)
        self.points.append({"t": round(t, 1), "c": round(millicores), "m": max(0, rss_bytes)})
        if len(self.points) >= self.max_points:
            self._merge()

    def _merge(self) -> None:
        """Halve the points: each pair becomes one at the later ``t``, with the pair's mean CPU
        (the intervals are equal) and its larger memory (peaks are what sizing needs)."""
        merged: list[ResourcePoint] = []
        for index in range(0, len(self.points) - 1, 2):
            first, second = self.points[index], self.points[index + 1]
            merged.append(
                {
                    "t": second["t"],
                    "c": round((first["c"] + second["c"]) / 2),
                    "m": max(first["m"], second["m"]),
                }
            )
        if len(self.points) % 2:
            merged.append(self.points[-1])
        self.points = merged
        self.interval *= 2


def _percentile(values: list[int], percent: int) -> int:
    """Nearest-rank percentile of non-empty ``values``."""
    ordered = sorted(values)
    rank = max(1, math.ceil(percent / 100 * len(ordered)))
    return ordered[rank - 1]


def summarize(points: list[ResourcePoint]) -> ResourceMetrics | None:
    """PCC's ``resourceMetrics`` of ``points``; ``None`` when there are none (a session shorter
    than one clock tick, or a platform where the process cannot be read)."""
    if not points:
        return None
    cpu = [point["c"] for point in points]
    memory = [point["m"] for point in points]
    return {
        "cpuMillicoresP50": _percentile(cpu, 50),
        "cpuMillicoresP90": _percentile(cpu, 90),
        "cpuMillicoresP95": _percentile(cpu, 95),
        "cpuMillicoresP99": _percentile(cpu, 99),
        "memoryBytesP50": _percentile(memory, 50),
        "memoryBytesP90": _percentile(memory, 90),
        "memoryBytesP95": _percentile(memory, 95),
        "memoryBytesP99": _percentile(memory, 99),
        "sampleCount": len(points),
        "timeseries": list(points),
    }
