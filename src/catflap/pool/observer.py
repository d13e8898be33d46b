"""What a pool tells the outside about its instances and sessions (an agent host: Redis)."""

from __future__ import annotations

from typing import Protocol

from catflap.pool.instance import Instance, SessionEnd

__all__ = ["PoolObserver"]


class PoolObserver(Protocol):
    """Told about instance and session changes (an agent host mirrors them into Redis)."""

    def instance_ready(self, instance: Instance) -> None: ...

    def instance_gone(self, instance: Instance) -> None: ...

    def session_started(self, instance: Instance, session_id: str) -> None: ...

    def session_ended(self, instance: Instance, session_id: str, end: SessionEnd) -> None: ...
