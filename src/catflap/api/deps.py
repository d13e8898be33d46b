"""What the control API needs from the running gateway, as one small value.

``create_api(deps)`` takes this instead of the gateway object: each router reads only the
fields it uses, the composition root (``catflap.compose``) fills them in, and a test can build
one from parts. Live state that changes while the API runs (draining, live relays) is passed as
a callable or a read-only view, never copied.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from catflap.auth.tokens import KeyRing
    from catflap.config import CatflapConfig
    from catflap.directory import AgentDirectory
    from catflap.gateway.botsession import BotSessions
    from catflap.gateway.sessionproxy import SessionProxy
    from catflap.logstore import LogSource
    from catflap.metrics import GatewayMetrics, RelayTraffic
    from catflap.pool.interface import AgentReadiness, SessionPool
    from catflap.secretsets.store import SecretStore
    from catflap.sessions.recent import RecentRecords
    from catflap.sessions.store import SessionStore

__all__ = ["ApiDeps"]


@dataclass(frozen=True, slots=True)
class ApiDeps:
    """The gateway's parts the control API reads; :func:`catflap.api.app.create_api` hands
    each router the fields it uses."""

    config: CatflapConfig
    agents: AgentDirectory
    keyring: KeyRing
    #: Wall-clock seconds (``time.time``), injectable for tests.
    clock: Callable[[], float]
    pool: SessionPool
    #: Live and recently ended session records, in memory.
    sessions: RecentRecords
    store: SessionStore
    metrics: GatewayMetrics
    #: True once the gateway refuses new sessions (shutdown began).
    draining: Callable[[], bool]
    #: Live relays by session id.
    relays: Mapping[str, RelayTraffic]
    #: The organisations' secret sets (names and keys to list, sets to put and delete). None
    #: (an API built from parts, in a test): no secret store.
    secrets: SecretStore | None = None
    #: Starts sessions without a transport (``POST /bot`` on an instance). None (an API built
    #: from parts, in a test): such a ``/start`` is refused with 503.
    bot_sessions: BotSessions | None = None
    #: Takes one session start from a client address (the gateway's
    #: :class:`~catflap.gateway.sourcelimit.StartRateLimiter`, shared with the WebSocket
    #: endpoints), with what the request is for the log; raises 429 ``too_many_starts``. None
    #: (an API built from parts, in a test): no limit.
    start_limit: Callable[[str | None, str], None] | None = None
    #: Forwards ``/v1/public/{agent}/sessions/{id}/{path}`` to the session's instance. None (an
    #: API built from parts, in a test): the proxy answers 503.
    session_proxy: SessionProxy | None = None
    #: Whether an agent would take a session now, by ``agent.org`` (a local pool's
    #: ``readiness``). None (cluster mode, where instances live on agent hosts): an agent counts
    #: as ready while the pool is not at capacity.
    readiness: Callable[[str], Awaitable[AgentReadiness]] | None = None
    #: The services new sessions need beyond this process (cluster mode: Redis, and the
    #: records' PostgreSQL), as ``/readyz`` checks them: the names of those that do not
    #: answer, empty when all do. None (``catflap serve``): nothing to check.
    dependencies: Callable[[], Awaitable[list[str]]] | None = None
    #: Where the logs API reads session lines. None (an API built from parts, in a test): the
    #: files in ``config.log_dir``.
    logs: LogSource | None = None
