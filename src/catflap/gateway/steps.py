"""The steps a session goes through, as one value the composition root builds once.

The orchestration (:mod:`catflap.gateway.session`, :mod:`catflap.gateway.telephony`) hands
each step only its own part: the upgrade check its directory, key ring and clock; the start
limit its buckets; admission its replay store and pool; the relay its registry; the recorder
its stores.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from catflap.auth.tokens import KeyRing
from catflap.gateway.admission import Admission
from catflap.gateway.recorder import Recorder
from catflap.gateway.refusal import Refusals
from catflap.gateway.relaying import LiveRelays
from catflap.gateway.sourcelimit import StartRateLimiter
from catflap.gateway.upgrade import Directory

__all__ = ["SessionSteps"]


@dataclass(frozen=True, slots=True)
class SessionSteps:
    #: True once the gateway refuses new sessions (shutdown began): 503.
    draining: Callable[[], bool]
    directory: Directory
    keyring: KeyRing
    #: Wall-clock seconds (``time.time``): token expiry, record timestamps.
    clock: Callable[[], float]
    admission: Admission
    refusals: Refusals
    relays: LiveRelays
    recorder: Recorder
    #: Seconds a provider's opening messages may take.
    provider_handshake_timeout: float
    #: Session starts per client address (``[gateway] session_starts_per_source``), shared
    #: with the control API's ``/start``: taken just before admission, 429 when empty.
    start_limit: StartRateLimiter
