"""Session records in memory: the live ones, and the most recently ended ones."""

from __future__ import annotations

from collections import OrderedDict

from catflap.sessions.record import SessionRecord

__all__ = ["RecentRecords"]

#: Ended records kept in memory (a persistent store keeps them all).
_RECENT_MAX = 10_000


class RecentRecords:
    """The records the API and the dashboard read without touching the store."""

    def __init__(self) -> None:
        self.live: dict[str, SessionRecord] = {}
        self.ended: OrderedDict[str, SessionRecord] = OrderedDict()
        #: Sessions ever started (upgraded) through this gateway.
        self.started_total = 0

    def started(self, record: SessionRecord) -> None:
        self.started_total += 1
        self.live[record.session_id] = record

    def ended_now(self, record: SessionRecord) -> None:
        self.live.pop(record.session_id, None)
        self.ended[record.session_id] = record
        while len(self.ended) > _RECENT_MAX:
            self.ended.popitem(last=False)

    def get(self, session_id: str) -> SessionRecord | None:
        return self.live.get(session_id) or self.ended.get(session_id)
