"""The filters of a sessions listing (``GET /v1/agents/{agent}/sessions``), whatever the store."""

from __future__ import annotations

from typing import Literal

__all__ = ["SessionQuery", "StatusFilter"]

StatusFilter = Literal["active", "ended", "all"]


class SessionQuery:
    """Filters of ``GET /v1/agents/{agent}/sessions``: one agent's records, one page of them."""

    __slots__ = ("agent", "end_time", "limit", "offset", "org", "start_time", "status")

    def __init__(
        self,
        *,
        org: str,
        agent: str,
        status: StatusFilter = "all",
        limit: int = 10,
        offset: int = 0,
        start_time: float | None = None,
        end_time: float | None = None,
    ) -> None:
        self.org = org
        self.agent = agent
        self.status = status
        self.limit = limit
        self.offset = offset
        self.start_time = start_time
        self.end_time = end_time
