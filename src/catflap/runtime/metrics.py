"""Prometheus metrics of one agent runtime (``GET /metrics`` on the runtime's own socket).

Counted once per session, never per frame: sessions started, active and ended (by status),
bot errors, and the time spent in ``bot()``. docs/operations.md lists every metric.
"""

from __future__ import annotations

from typing import get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from catflap.contract.control import SessionStatus
from catflap.contract.status import BotStatus

__all__ = ["BOT_SECONDS_BUCKETS", "RuntimeMetrics"]

#: Time in ``bot()``: from a test's sub-second session to PCC's 4 h maximum.
BOT_SECONDS_BUCKETS = (0.1, 1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400)


class RuntimeMetrics:
    """The metrics of one runtime process, on a registry of its own."""

    def __init__(self, agent: str) -> None:
        self.agent = agent
        self.registry = CollectorRegistry(auto_describe=True)
        self.sessions_started = Counter(
            "catflap_runtime_sessions_started",
            "Sessions this runtime accepted and started bot() for.",
            ["agent"],
            registry=self.registry,
        )
        self.sessions_active = Gauge(
            "catflap_runtime_sessions_active",
            "Sessions whose bot() is running in this runtime now.",
            ["agent"],
            registry=self.registry,
        )
        self.sessions_ended = Counter(
            "catflap_runtime_sessions_ended",
            "Sessions ended, by the runtime's status (completed, bot_error, time_limit, ...).",
            ["agent", "status"],
            registry=self.registry,
        )
        self.bot_errors = Counter(
            "catflap_runtime_bot_errors",
            "Sessions whose bot() raised.",
            ["agent"],
            registry=self.registry,
        )
        self.bot_seconds = Histogram(
            "catflap_runtime_bot_seconds",
            "Time from calling bot() to its end (return, raise or cancellation).",
            ["agent"],
            buckets=BOT_SECONDS_BUCKETS,
            registry=self.registry,
        )
        # Every series exists from the start, so a rate() sees the first session.
        self.sessions_started.labels(agent)
        self.sessions_active.labels(agent).set(0)
        self.bot_errors.labels(agent)
        self.bot_seconds.labels(agent)
        for status in get_args(BotStatus):
            self.sessions_ended.labels(agent, status)

    def session_started(self) -> None:
        self.sessions_started.labels(self.agent).inc()
        self.sessions_active.labels(self.agent).inc()

    def session_ended(self, status: SessionStatus, bot_seconds: float) -> None:
        self.sessions_active.labels(self.agent).dec()
        self.sessions_ended.labels(self.agent, status).inc()
        if status == "bot_error":
            self.bot_errors.labels(self.agent).inc()
        self.bot_seconds.labels(self.agent).observe(bot_seconds)

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))
