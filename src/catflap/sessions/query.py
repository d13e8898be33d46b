"""The filters of a sessions listing (``GET /v1/agents/{agent}/sessions``), whatever the store."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from catflap.contract.status import ACTIVE_END_STATE, end_state

if TYPE_CHECKING:
    from catflap.sessions.record import SessionRecord

__all__ = ["SessionQuery", "StartTypeFilter", "StatusFilter"]

StatusFilter = Literal["active", "ended", "all"]
#: ``cold``: the session waited for a new instance (``coldStart``); ``warm``: it did not.
StartTypeFilter = Literal["cold", "warm", "all"]


class SessionQuery:
    """Filters of ``GET /v1/agents/{agent}/sessions``: one agent's records, one page of them.

    ``end_state`` is PCC's ``endState`` (``contract.status.END_STATES``); a store turns it into
    the completion statuses that map to it.
    """

    __slots__ = (
        "agent",
        "end_state",
        "end_time",
        "limit",
        "offset",
        "org",
        "start_time",
        "start_type",
        "status",
    )

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
        start_type: StartTypeFilter = "all",
        end_state: str | None = None,
    ) -> None:
        self.org = org
        self.agent = agent
        self.status = status
        self.limit = limit
        self.offset = offset
        self.start_time = start_time
        self.end_time = end_time
        self.start_type = start_type
        self.end_state = end_state

    def matches(self, record: SessionRecord) -> bool:
        """Whether ``record`` passes every filter (for stores that filter in Python; the SQL
        stores say the same in their WHERE clause, ``sessions/schema.py``)."""
        if (record.organization, record.agent) != (self.org, self.agent):
            return False
        ended = record.ended_at is not None
        if self.status != "all" and (self.status == "ended") != ended:
            return False
        if self.start_time is not None and record.created_at < self.start_time:
            return False
        if self.end_time is not None and record.created_at > self.end_time:
            return False
        if self.start_type != "all" and record.cold_start != (self.start_type == "cold"):
            return False
        if self.end_state is not None:
            state = ACTIVE_END_STATE if not ended else end_state(record.completion_status)
            return state == self.end_state
        return True
