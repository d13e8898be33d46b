"""Every Redis key, stream and TTL catflap uses, in one place (documented in docs/scaling.md)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "HEARTBEAT_TTL_S",
    "RESERVATION_TTL_S",
    "SESSION_RETENTION_S",
    "Keys",
]

#: An instance not heard from for this long stops receiving sessions. Hosts refresh it three
#: times per TTL, so one lost heartbeat does not drop a healthy instance.
HEARTBEAT_TTL_S = 5.0
#: A slot reserved by a gateway is held this long for the session to start. It covers the
#: upstream handshake bound (10 s) with margin; a gateway that dies mid-handshake frees its
#: reservations after this.
RESERVATION_TTL_S = 15.0
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

    def jti(self, jti: str) -> str:
        """A spent token id; expires at the token's ``exp``."""
        return f"{self.prefix}:jti:{jti}"

    def session(self, session_id: str) -> str:
        """A session record (JSON); expires after :data:`SESSION_RETENTION_S`."""
        return f"{self.prefix}:session:{session_id}"

    def agent_sessions(self, org: str, agent: str) -> str:
        """Sorted set: session id -> created_at, the index for listing an agent's sessions."""
        return f"{self.prefix}:sessions:{org}:{agent}"

    def secret_sets(self, org: str) -> str:
        """Hash: secret set name -> Fernet token of its JSON ``{name: value}``; no expiry."""
        return f"{self.prefix}:secrets:{org}"

    @property
    def stop_stream(self) -> str:
        """Stream of ``{"session_id"}`` stop requests; the host holding the session stops it.
        About ``LIFECYCLE_STREAM_MAXLEN`` entries (:mod:`catflap.cluster.streams`)."""
        return f"{self.prefix}:stop"

    @property
    def ended_stream(self) -> str:
        """Stream of ``{"session_id", "status", "error", ...}`` once ``bot()`` has ended.
        About ``LIFECYCLE_STREAM_MAXLEN`` entries (:mod:`catflap.cluster.streams`)."""
        return f"{self.prefix}:ended"
