"""Prometheus metrics of a gateway (``GET /metrics``), on a registry of its own.

The relay's hot path gains nothing: byte and frame counters are read from the live relays at
scrape time (plus the totals of ended sessions), not incremented per frame. Everything else is
counted once per handshake or per session. docs/operations.md lists every metric.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from catflap.sessions.record import SessionRecord

__all__ = ["CONTENT_TYPE", "GatewayMetrics", "MetricSources", "RelayTraffic"]

#: The text exposition format ``render()`` writes (``generate_latest`` writes 0.0.4; the
#: library's ``CONTENT_TYPE_LATEST`` names a newer format it does not write by default).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

#: Session start (upgrade request -> 101) buckets: warm starts take milliseconds, cold starts
#: seconds.
_START_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class RelayTraffic(Protocol):
    """A live relay, as a scrape reads it: bytes and frames so far, by direction."""

    def traffic(self) -> dict[str, int]: ...


def _no_records() -> Iterable[SessionRecord]:
    return ()


def _no_relays() -> Iterable[RelayTraffic]:
    return ()


def _no_agents() -> Iterable[str]:
    return ()


def _no_pool_states() -> dict[tuple[str, str], int] | None:
    return None


@dataclass(frozen=True, slots=True)
class MetricSources:
    """What a scrape reads live, each as a callable so the value is the one of that moment."""

    #: The session records relayed right now.
    live_records: Callable[[], Iterable[SessionRecord]] = _no_records
    #: The relays running right now.
    relays: Callable[[], Iterable[RelayTraffic]] = _no_relays
    #: ``{(agent, state): count}``; None when the pool lives elsewhere (cluster).
    pool_states: Callable[[], dict[tuple[str, str], int] | None] = _no_pool_states
    #: Every configured agent's key, so an idle agent still shows 0 active sessions.
    agent_keys: Callable[[], Iterable[str]] = _no_agents


class _LiveCollector(Collector):
    """Values read at scrape time: active sessions, relayed traffic, pool instances."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        sources = self._metrics.sources
        active = GaugeMetricFamily(
            "catflap_sessions_active", "Sessions relayed right now.", labels=["agent"]
        )
        per_agent: dict[str, int] = {}
        for record in sources.live_records():
            key = f"{record.agent}.{record.organization}"
            per_agent[key] = per_agent.get(key, 0) + 1
        for agent in sorted(sources.agent_keys()):
            active.add_metric([agent], per_agent.get(agent, 0))
        yield active

        totals = dict(self._metrics.ended_traffic)
        for relay in list(sources.relays()):
            for name, value in relay.traffic().items():
                totals[name] = totals.get(name, 0) + value
        relayed_bytes = CounterMetricFamily(
            "catflap_relayed_bytes", "Bytes relayed, by direction.", labels=["direction"]
        )
        relayed_frames = CounterMetricFamily(
            "catflap_relayed_frames",
            "WebSocket frames relayed, by direction.",
            labels=["direction"],
        )
        for direction in ("client_to_agent", "agent_to_client"):
            relayed_bytes.add_metric([direction], totals.get(f"bytes_{direction}", 0))
            relayed_frames.add_metric([direction], totals.get(f"frames_{direction}", 0))
        yield relayed_bytes
        yield relayed_frames

        states = sources.pool_states()
        if states is not None:
            instances = GaugeMetricFamily(
                "catflap_pool_instances", "Agent instances by state.", labels=["agent", "state"]
            )
            for (agent, state), count in sorted(states.items()):
                instances.add_metric([agent, state], count)
            yield instances


class GatewayMetrics:
    """The metrics of one gateway."""

    def __init__(self, sources: MetricSources | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.sources = sources if sources is not None else MetricSources()
        self.ended_traffic: dict[str, int] = {}
        self.sessions_started = Counter(
            "catflap_sessions_started",
            "Sessions started (upgraded), by agent and transport.",
            ["agent", "transport"],
            registry=self.registry,
        )
        self.refusals = Counter(
            "catflap_handshake_refusals",
            "Requests refused before or during the handshake, by status and reason.",
            ["status", "reason"],
            registry=self.registry,
        )
        self.completions = Counter(
            "catflap_sessions_completed",
            "Ended sessions, by agent and completion status.",
            ["agent", "status"],
            registry=self.registry,
        )
        self.start_seconds = Histogram(
            "catflap_session_start_seconds",
            "Upgrade request to 101, split by warm and cold start.",
            ["start"],
            buckets=_START_BUCKETS,
            registry=self.registry,
        )
        self.cold_starts = Counter(
            "catflap_cold_starts",
            "Sessions that had to wait for an instance to start.",
            ["agent"],
            registry=self.registry,
        )
        self.token_verifications = Counter(
            "catflap_token_verifications",
            "Session tokens checked, by result.",
            ["result"],
            registry=self.registry,
        )
        self.registry.register(_LiveCollector(self))

    def pool_states(self) -> dict[tuple[str, str], int] | None:
        """``{(agent, state): count}`` now; None when the pool lives elsewhere (cluster)."""
        return self.sources.pool_states()

    def session_ended(self, agent: str, status: str, traffic: dict[str, int]) -> None:
        self.completions.labels(agent, status).inc()
        for name, value in traffic.items():
            self.ended_traffic[name] = self.ended_traffic.get(name, 0) + value

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))
