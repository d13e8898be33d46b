"""The gateway's timeouts, as one value the composition root fills from the config.

Each has its reason beside its default in :mod:`catflap.contract.limits` (or the ``[gateway]``
setting); this value exists so that a test, or a deployment, can change one of them without
patching a default: ``catflap.compose.build_gateway`` hands each step the ones it uses.
"""

from __future__ import annotations

from dataclasses import dataclass

from catflap.config import GatewaySettings
from catflap.contract import limits

__all__ = ["Timings"]


@dataclass(frozen=True, slots=True)
class Timings:
    """Seconds; each bounds one wait of a session or of the gateway's shutdown."""

    #: Connect to an instance and read its answer to the forwarded upgrade.
    upstream_handshake: float = limits.UPSTREAM_HANDSHAKE_TIMEOUT_S
    #: Past a session's time limit, how long the runtime may take to report ``bot()`` ended.
    lease_end: float = limits.LEASE_END_TIMEOUT_S
    #: A side whose write buffer stays full this long ends the session with 1013.
    slow_peer: float = limits.SLOW_PEER_TIMEOUT_S
    #: A relay leg that lingers after the close handshake is aborted after this.
    close_wait: float = limits.CLOSE_WAIT_S
    #: A provider's opening messages (``[gateway] provider_handshake_timeout``).
    provider_handshake: float = limits.PROVIDER_HANDSHAKE_TIMEOUT_S
    #: A ``listen_tls`` connection's first byte and TLS handshake, from its accept.
    tls_handshake: float = limits.TLS_HANDSHAKE_TIMEOUT_S
    #: Live sessions may end by themselves this long after shutdown began (``drain_timeout``).
    drain: float = limits.DRAIN_TIMEOUT_S
    #: The session proxy waits this long for a session whose ``bot()`` is not running yet.
    proxy_start_wait: float = limits.SESSION_PROXY_START_WAIT_S
    #: The session proxy's bound on the bot's response head, and between two body reads.
    proxy_timeout: float = limits.SESSION_PROXY_TIMEOUT_S

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> Timings:
        """The defaults, with what ``[gateway]`` sets."""
        return cls(
            provider_handshake=settings.provider_handshake_timeout,
            drain=settings.drain_timeout,
        )
