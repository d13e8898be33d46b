"""The session's record: written when the 101 goes out, finished once ``bot()`` ended.

The first save runs off the handshake path; the final one waits for it. The end is the agent
runtime's report, bounded: a bot may run on after its connection closed (post-call work), but
never past the session's ``max_session_duration``; the runtime cancels it then, and kills its
process ``BOT_CANCEL_GRACE_S`` later. So the wait ends at the session's start plus its duration
plus the lease-end grace. A runtime that has not reported by then would hold the slot forever:
its instance is replaced instead and the session recorded ``agent_crashed``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from catflap.gateway.sessionlog import log
from catflap.gateway.upgrade import UpgradeAccepted
from catflap.logs import SessionLog, session_log
from catflap.metrics import GatewayMetrics
from catflap.pool.instance import SessionEnd
from catflap.pool.interface import SessionLease, SessionPool
from catflap.sessions.recent import RecentRecords
from catflap.sessions.record import RelayStats, SessionRecord
from catflap.sessions.store import SessionStore

__all__ = ["Recorder", "Recording"]


@dataclass(slots=True)
class Recording:
    """A started session's record, its logger and the first save still under way."""

    record: SessionRecord
    #: ``agent.org``, the metrics' label.
    agent_key: str
    slog: SessionLog
    first_save: asyncio.Task[None]
    #: ``time.perf_counter()`` by which the runtime must report the end of ``bot()``.
    deadline: float


class Recorder:
    """Records each session in memory, in the store and in the metrics."""

    def __init__(
        self,
        *,
        sessions: RecentRecords,
        store: SessionStore,
        metrics: GatewayMetrics,
        pool: SessionPool,
        clock: Callable[[], float],
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]],
        lease_end_timeout: float,
    ) -> None:
        """
        Args:
            clock: wall-clock seconds for the record's timestamps.
            spawn: runs a task held in the gateway's registry (the first save).
            lease_end_timeout: seconds past the session's time limit that the runtime may take
                to report the end of ``bot()``.
        """
        self.sessions = sessions
        self.store = store
        self.metrics = metrics
        self.pool = pool
        self.clock = clock
        self.spawn = spawn
        self.lease_end_timeout = lease_end_timeout

    def started(
        self,
        accepted: UpgradeAccepted,
        lease: SessionLease,
        *,
        started: float,
        transport: str | None = None,
    ) -> Recording:
        """Record a session whose 101 went out (or whose ``/bot`` call the runtime accepted);
        ``started`` is its ``time.perf_counter()``. ``transport`` names a session that is not a
        WebSocket one; by default the provider's name, else ``websocket``."""
        agent = accepted.known_agent()
        name, org = agent.service_host.agent, agent.service_host.org
        slog = session_log(log, accepted.session_id, agent=name, org=org)
        start_seconds = time.perf_counter() - started
        record = SessionRecord(
            session_id=accepted.session_id,
            agent=name,
            organization=org,
            created_at=self.clock(),
            transport=transport or (accepted.provider.name if accepted.provider else "websocket"),
            cold_start=lease.cold_start,
            bot_start_seconds=start_seconds,
        )
        self.sessions.started(record)
        metrics = self.metrics
        metrics.sessions_started.labels(agent.key, record.transport).inc()
        metrics.start_seconds.labels("cold" if lease.cold_start else "warm").observe(start_seconds)
        if lease.cold_start:
            metrics.cold_starts.labels(agent.key).inc()
        # Persist off the handshake path; the end-of-session save waits for this one.
        first_save = self.spawn(self._store(dataclasses.replace(record)))
        slog.info(
            "= %s session started on %s (%s start, %.1f ms)",
            record.transport,
            lease.instance_label,
            "cold" if lease.cold_start else "warm",
            start_seconds * 1000,
        )
        deadline = started + agent.config.max_session_duration + self.lease_end_timeout
        return Recording(record, agent.key, slog, first_save, deadline)

    async def ended(
        self,
        recording: Recording,
        lease: SessionLease,
        stats: RelayStats,
        *,
        drained: bool,
        traffic: dict[str, int],
    ) -> None:
        """Wait for the end of ``bot()`` (bounded), then finish and store the record."""
        record, slog = recording.record, recording.slog
        end = await self._bot_ended(lease, slog, deadline=recording.deadline)
        record.finish(end, stats, drained=drained, now=self.clock())
        self.sessions.ended_now(record)
        self.metrics.session_ended(recording.agent_key, str(record.completion_status), traffic)
        await asyncio.wait([recording.first_save])
        await self._store(record)
        slog.info(
            "= session ended: %s (client close %s, agent close %s, %d/%d frames in/out)",
            record.completion_status,
            stats.client_close_code,
            stats.agent_close_code,
            stats.frames_client_to_agent,
            stats.frames_agent_to_client,
        )

    async def _bot_ended(
        self, lease: SessionLease, slog: SessionLog, *, deadline: float
    ) -> SessionEnd:
        """The runtime's report that ``bot()`` ended, by ``deadline`` (``perf_counter``)."""
        try:
            return await asyncio.wait_for(
                asyncio.shield(lease.ended), max(deadline - time.perf_counter(), 0.0)
            )
        except TimeoutError:
            pass
        problem = (
            "the agent runtime did not report the end of bot() by the session's time limit "
            f"plus {self.lease_end_timeout:g} s"
        )
        slog.error("! %s on %s; replacing the instance", problem, lease.instance_label)
        self.pool.abandon(lease, problem)
        return SessionEnd(status="agent_crashed", error=problem)

    async def _store(self, record: SessionRecord) -> None:
        try:
            await self.store.save(record)
        except Exception:
            session_log(
                log, record.session_id, agent=record.agent, org=record.organization
            ).exception("! could not store the session record")
