"""Every Redis key, stream and TTL catflap uses, in one place (documented in docs/scaling.md)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "GATEWAY_TTL_S",
    "HEARTBEAT_TTL_S",
    "INSTANCE_PROBE_TIMEOUT_S",
    "HOST_ROOM_TTL_S",
    "RESERVATION_TTL_S",
    "SESSION_RETENTION_S",
    "START_POLL_S",
    "WAIT_POLL_S",
    "Keys",
]

#: An instance not heard from for this long stops receiving sessions. Hosts refresh it three
#: times per TTL, so one lost heartbeat does not drop a healthy instance.
HEARTBEAT_TTL_S = 5.0
#: A session's instance missing from Redis is asked ``GET /livez`` over TCP, as the relay reaches
#: it, and must answer within this time to count as alive (its host is only cut off from Redis).
#: A live runtime answers in milliseconds; a third of the TTL keeps a round of checks short.
INSTANCE_PROBE_TIMEOUT_S = HEARTBEAT_TTL_S / 3
#: A gateway not heard from for this long is dead: another gateway finishes the records of the
#: sessions it relayed (``gateway_lost``). Gateways refresh it three times per TTL, as hosts do.
#: Longer would leave a dead gateway's records open longer; shorter would risk reaping a
#: gateway whose event loop is merely slow (its live sessions are safe anyway: a session its
#: host still runs is never reaped).
GATEWAY_TTL_S = 5.0
#: A slot reserved by a gateway is held this long for the session to start. It covers the
#: upstream handshake bound (10 s) with margin; a gateway that dies mid-handshake frees its
#: reservations after this.
RESERVATION_TTL_S = 15.0
#: How often an agent host refreshes its room entry and checks whether sessions wait for a start:
#: it bounds how long a cold start waits before a host picks it up.
START_POLL_S = 0.1
#: A host's room entry counts this long after its last refresh (ten refreshes): a dead host's
#: slots stop drawing start requests within a second.
HOST_ROOM_TTL_S = 1.0
#: A session waiting for a cold start re-runs dispatch at least this often (jittered), in case
#: the ``ready`` message that should wake it was lost or a slot freed on a running instance.
WAIT_POLL_S = 0.5
#: Session records kept in Redis (when no PostgreSQL is configured): one week.
SESSION_RETENTION_S = 7 * 24 * 3600


@dataclass(frozen=True)
class Keys:
    """Key names under one prefix, so tests and deployments can share a Redis."""

    prefix: str = "catflap"

    def instance(self, instance_id: str) -> str:
        """Hash: agent, address, host, capacity, state. Expires with the heartbeat."""
        return f"{self.prefix}:inst:{instance_id}"

    def active(self, instance_id: str) -> str:
        """Set of session ids whose ``bot()`` runs on the instance. Expires with the heartbeat."""
        return f"{self.prefix}:inst:{instance_id}:active"

    def reserved(self, instance_id: str) -> str:
        """Sorted set: session id -> reservation expiry (ms since the epoch)."""
        return f"{self.prefix}:inst:{instance_id}:resv"

    def agent_instances(self, agent_key: str) -> str:
        """Set of the agent's registered instance ids (pruned when their hash is gone)."""
        return f"{self.prefix}:agent:{agent_key}:instances"

    def agent_hosts(self, agent_key: str) -> str:
        """Hash: host id -> ``"free starting expiry_ms"``, each host's room for cold starts
        (instances it may still start, instances it is starting and has not registered yet).
        Refreshed every :data:`START_POLL_S`; an entry past its expiry is ignored and removed."""
        return f"{self.prefix}:agent:{agent_key}:hosts"

    def waiting(self, agent_key: str) -> str:
        """Sorted set: session id -> expiry (ms), the sessions waiting for a cold start. A
        gateway adds its session when it finds no free slot, and removes it when the session
        is served, gives up or leaves; hosts start instances while there are more waiting
        sessions than starting instances."""
        return f"{self.prefix}:agent:{agent_key}:waiting"

    def jti(self, jti: str) -> str:
        """A spent token id; expires at the token's ``exp``."""
        return f"{self.prefix}:jti:{jti}"

    def session(self, session_id: str) -> str:
        """A session record (JSON); expires after :data:`SESSION_RETENTION_S`."""
        return f"{self.prefix}:session:{session_id}"

    def agent_sessions(self, org: str, agent: str) -> str:
        """Sorted set: session id -> created_at, the index for listing an agent's sessions."""
        return f"{self.prefix}:sessions:{org}:{agent}"

    def session_log(self, org: str, agent: str, session_id: str) -> str:
        """Stream: one session's log records (field ``r``, the ``.jsonl`` line), entry id
        ``0-<line number>``; trimmed to ``LOGSHIP_STREAM_MAXLEN``, expires
        ``LOGSHIP_RETENTION_S`` after its last line (:mod:`catflap.cluster.logship`)."""
        return f"{self.session_log_prefix(org, agent)}{session_id}"

    def session_log_prefix(self, org: str, agent: str) -> str:
        """What :meth:`session_log` puts before the session id (the shipping script's)."""
        return f"{self.prefix}:log:{org}:{agent}:"

    def agent_logs(self, org: str, agent: str) -> str:
        """Sorted set: session id -> its last shipped line (ms), the agent's sessions with
        lines in Redis; at most ``LOGSHIP_SESSIONS_PER_AGENT_MAX``."""
        return f"{self.prefix}:logs:{org}:{agent}"

    def secret_sets(self, org: str) -> str:
        """Hash: secret set name -> Fernet token of its JSON ``{name: value}``; no expiry."""
        return f"{self.prefix}:secrets:{org}"

    def gateway(self, gateway_id: str) -> str:
        """String: the gateway's last heartbeat (ms since the epoch); expires after
        :data:`GATEWAY_TTL_S`. Its absence means the gateway is dead."""
        return f"{self.prefix}:gw:{gateway_id}"

    def gateway_sessions(self, gateway_id: str) -> str:
        """Hash: session id -> instance id, the sessions the gateway relays now. No TTL: it
        must outlive its gateway, for the survivor that finishes their records."""
        return f"{self.prefix}:gw:{gateway_id}:sessions"

    def gateway_claim(self, gateway_id: str) -> str:
        """String: the id of the live gateway finishing a dead gateway's records (``SET NX``)."""
        return f"{self.prefix}:gw:{gateway_id}:claim"

    @property
    def gateways(self) -> str:
        """Sorted set: gateway id -> its last heartbeat (ms), so a survivor finds dead ones."""
        return f"{self.prefix}:gateways"

    @property
    def stop_stream(self) -> str:
        """Stream of ``{"session_id"}`` stop requests; the host holding the session stops it.
        About ``LIFECYCLE_STREAM_MAXLEN`` entries (:mod:`catflap.cluster.streams`)."""
        return f"{self.prefix}:stop"

    @property
    def ready_channel(self) -> str:
        """Pub/sub: ``{"agent", "capacity"}`` when an instance registered; wakes that many
        sessions waiting for a cold start of that agent."""
        return f"{self.prefix}:ready"

    @property
    def ended_stream(self) -> str:
        """Stream of ``{"session_id", "status", "error", ...}`` once ``bot()`` has ended.
        About ``LIFECYCLE_STREAM_MAXLEN`` entries (:mod:`catflap.cluster.streams`)."""
        return f"{self.prefix}:ended"
