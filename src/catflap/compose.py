"""The composition root: the one place a gateway is wired from its configuration.

``catflap serve``, ``catflap gateway --redis`` and the tests' ``running_gateway`` all call
:func:`build_gateway`, so the tests run the production wiring. What differs between them is an
:class:`Overrides` value: the cluster brings Redis's pool, replay store and session store; a
test brings an in-memory replay store, a clock it moves, shorter timings. Everything else
comes from :class:`~catflap.config.CatflapConfig`.

The request path it wires, each step taking only its own collaborators::

    Front (accept, read the head)  -> check_upgrade (pure)  -> StartRateLimiter (per source)
        -> Admission (replay store, pool, upstream)  -> LiveRelays (relay)  -> Recorder
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from catflap.api.deps import ApiDeps
from catflap.auth.replay import ReplayStore
from catflap.auth.sqlite_replay import SqliteReplayStore
from catflap.auth.tokens import KeyRing
from catflap.config import CatflapConfig, token_keyring
from catflap.contract import limits
from catflap.contract.errors import CatflapMisuse, StartupError, TooManyStarts
from catflap.directory import AgentDirectory
from catflap.gateway.admission import Admission
from catflap.gateway.apiconnections import ApiConnections
from catflap.gateway.botsession import BotSessions
from catflap.gateway.front import Front, FrontRoutes, GatewayConnection
from catflap.gateway.httphead import RequestHead
from catflap.gateway.listener import DrainState, Gateway, ManagedPool
from catflap.gateway.recorder import Recorder
from catflap.gateway.refusal import Refusals
from catflap.gateway.relaying import LiveRelays
from catflap.gateway.session import run_session
from catflap.gateway.sessionproxy import SessionProxy
from catflap.gateway.sourcelimit import StartRateLimiter
from catflap.gateway.steps import SessionSteps
from catflap.gateway.timings import Timings
from catflap.gateway.tls import Certificate, TlsListener
from catflap.logs import LogFormat
from catflap.logstore import FileLogSource, LogSource, LogStore
from catflap.metrics import GatewayMetrics, MetricSources
from catflap.pool.environment import SecretSource
from catflap.pool.pool import LocalPool
from catflap.secretsets.filestore import FileSecretStore
from catflap.secretsets.inject import AgentSecrets
from catflap.secretsets.store import SecretStore
from catflap.sessions.recent import RecentRecords
from catflap.sessions.store import SessionStore, open_store
from catflap.tasks import TaskSet

__all__ = ["REPLAY_FILE", "AgentLaunch", "Overrides", "build_gateway", "local_pool"]

#: Spent token ids of ``catflap serve``, in the state dir (catflap.auth.sqlite_replay).
REPLAY_FILE = "replay.sqlite3"


@dataclass(frozen=True, slots=True)
class AgentLaunch:
    """How this machine starts agent processes for a local pool (``catflap serve``)."""

    #: Where the agents' sockets (and the fork server's) go; the caller removes it.
    workdir: Path
    log_level: str = "info"
    log_format: LogFormat = "json"
    #: Seconds an instance may take to report ready; None: ``[gateway] agent_ready_timeout``.
    ready_timeout: float | None = None
    ping_interval: float = limits.AGENT_PING_INTERVAL_S
    ping_timeout: float = limits.AGENT_PING_TIMEOUT_S


@dataclass(frozen=True, slots=True)
class Overrides:
    """What a caller brings instead of what the configuration would make.

    A part given here stays the caller's to close, except the pool: the gateway starts and
    stops its pool whoever made it.
    """

    #: None: ``CATFLAP_TOKEN_KEYS`` (or a random key; :func:`~catflap.config.token_keyring`).
    keyring: KeyRing | None = None
    #: None: a local pool of agent processes (then :func:`build_gateway` needs ``launch``).
    pool: ManagedPool | None = None
    #: None: the configured ``database_url``, else SQLite in ``state_dir``.
    store: SessionStore | None = None
    #: None: spent tokens in SQLite, ``<state_dir>/replay.sqlite3``.
    replay: ReplayStore | None = None
    #: None: the encrypted file in ``state_dir`` (``catflap secrets``'s); the cluster's Redis.
    secrets: SecretStore | None = None
    #: None: the session log files in ``[logs] dir``; the cluster: what agent hosts ship to
    #: Redis.
    logs: LogSource | None = None
    #: Wall-clock seconds: token expiry and record timestamps.
    clock: Callable[[], float] = time.time
    #: None: :meth:`Timings.from_settings` of ``[gateway]``.
    timings: Timings | None = None
    #: What ``/readyz`` checks besides draining (``ApiDeps.dependencies``); None: nothing.
    dependencies: Callable[[], Awaitable[list[str]]] | None = None


def local_pool(
    config: CatflapConfig, launch: AgentLaunch, secrets: SecretSource | None = None
) -> LocalPool:
    """Every configured agent's instances as processes on this machine, each with its agent's
    secret set from ``secrets`` (read at each launch)."""
    from catflap.pool.forkserver import ForkServerLauncher
    from catflap.pool.launcher import SubprocessLauncher

    launcher_class = ForkServerLauncher if config.gateway.fork_server else SubprocessLauncher
    launcher = launcher_class(
        launch.workdir,
        log_level=launch.log_level,
        log_dir=config.log_dir,
        log_format=launch.log_format,
        secrets=secrets,
    )
    ready_timeout = launch.ready_timeout
    if ready_timeout is None:
        ready_timeout = config.gateway.agent_ready_timeout
    return LocalPool(
        config.agents(),
        launcher,
        ready_timeout=ready_timeout,
        ping_interval=launch.ping_interval,
        ping_timeout=launch.ping_timeout,
    )


def _open_replay(config: CatflapConfig) -> SqliteReplayStore:
    path = config.state_dir / REPLAY_FILE
    try:
        return SqliteReplayStore(path)
    except (sqlite3.Error, OSError) as exc:
        raise StartupError(
            f"cannot open the token store {path}: {exc}; check that the state_dir is writable "
            "(--state-dir DIR)"
        ) from None


async def build_gateway(
    config: CatflapConfig,
    overrides: Overrides = Overrides(),  # noqa: B008  frozen, so one shared default is safe
    *,
    launch: AgentLaunch | None = None,
) -> Gateway:
    """Wire a gateway: its stores, its pool and every step of a session, from ``config``.

    Nothing listens and no process starts until :meth:`Gateway.start`; after
    :meth:`Gateway.shutdown`, :meth:`Gateway.close` closes what was opened here.

    Raises:
        StartupError: the token store in ``state_dir`` cannot be opened.
        ConfigError: ``tls_cert``/``tls_key`` do not load (missing, unreadable, mismatched).
        CatflapMisuse: no pool given and no ``launch`` to make a local one.
    """
    # The key ring first: a bad CATFLAP_TOKEN_KEYS must fail before any store is opened; so
    # must a certificate that does not load.
    keyring = overrides.keyring if overrides.keyring is not None else token_keyring()[0]
    certificate = None
    if config.listen_tls is not None:
        assert config.tls_cert is not None and config.tls_key is not None  # check_tls()
        certificate = Certificate(config.tls_cert, config.tls_key)
    closers: list[Callable[[], Awaitable[None]]] = []
    secrets = overrides.secrets
    if secrets is None:
        secrets = FileSecretStore(config.state_dir)  # opens nothing until it is used
    if overrides.pool is not None:
        pool: ManagedPool = overrides.pool
    elif launch is not None:
        pool = local_pool(config, launch, AgentSecrets(secrets))
    else:
        raise CatflapMisuse("build_gateway needs a pool, or an AgentLaunch to make a local one")
    store = overrides.store
    if store is None:
        store = open_store(config.database_url, config.state_dir)
        closers.append(store.close)
    replay = overrides.replay
    if replay is None:
        try:
            own_replay = _open_replay(config)
        except StartupError:
            for close in closers:
                await close()
            raise
        closers.insert(0, own_replay.close)  # closed before the store, as it always was
        replay = own_replay
    return _wire(
        config,
        pool=pool,
        store=store,
        replay=replay,
        keyring=keyring,
        secrets=secrets,
        logs=overrides.logs or FileLogSource(LogStore(config.log_dir)),
        clock=overrides.clock,
        timings=overrides.timings or Timings.from_settings(config.gateway),
        certificate=certificate,
        closers=closers,
        dependencies=overrides.dependencies,
    )


def _wire(
    config: CatflapConfig,
    *,
    pool: ManagedPool,
    store: SessionStore,
    replay: ReplayStore,
    keyring: KeyRing,
    secrets: SecretStore,
    logs: LogSource,
    clock: Callable[[], float],
    timings: Timings,
    certificate: Certificate | None,
    closers: list[Callable[[], Awaitable[None]]],
    dependencies: Callable[[], Awaitable[list[str]]] | None = None,
) -> Gateway:
    directory = AgentDirectory(config)
    sessions = RecentRecords()
    drain = DrainState()
    tasks = TaskSet("gateway")
    relays = LiveRelays(close_wait=timings.close_wait, slow_peer_timeout=timings.slow_peer)
    instance_states = getattr(pool, "instance_states", None)  # a local pool's own
    metrics = GatewayMetrics(
        MetricSources(
            live_records=lambda: list(sessions.live.values()),
            relays=lambda: list(relays.live.values()),
            pool_states=instance_states if instance_states is not None else lambda: None,
            agent_keys=lambda: [agent.key for agent in directory],
        )
    )
    refusals = Refusals(metrics)
    # One set of buckets for every path that starts a bot: the WebSocket endpoints and /start.
    start_limit = StartRateLimiter.from_settings(config.gateway)

    def limit_api_start(client_host: str | None, what: str) -> None:
        try:
            start_limit.check(client_host)
        except TooManyStarts as rejected:
            refusals.refused_by_api(rejected, what)
            raise

    recorder = Recorder(
        sessions=sessions,
        store=store,
        metrics=metrics,
        pool=pool,
        clock=clock,
        spawn=tasks.spawn,
        lease_end_timeout=timings.lease_end,
    )
    api_deps = ApiDeps(
        config=config,
        agents=directory,
        keyring=keyring,
        clock=clock,
        pool=pool,
        sessions=sessions,
        store=store,
        metrics=metrics,
        draining=drain,
        relays=relays.live,
        secrets=secrets,
        bot_sessions=BotSessions(
            pool=pool,
            recorder=recorder,
            spawn=tasks.spawn,
            accept_timeout=timings.upstream_handshake,
        ),
        session_proxy=SessionProxy(
            pool=pool,
            start_wait=timings.proxy_start_wait,
            timeout=timings.proxy_timeout,
            send_timeout=timings.slow_peer,
        ),
        readiness=getattr(pool, "readiness", None),  # a local pool's own, as instance_states
        dependencies=dependencies,
        logs=logs,
        start_limit=limit_api_start,
    )
    api = ApiConnections(lambda: _control_api(api_deps), on_refusal=refusals.count)
    steps = SessionSteps(
        draining=drain,
        directory=directory,
        keyring=keyring,
        clock=clock,
        admission=Admission(
            replay=replay,
            pool=pool,
            upstream_timeout=timings.upstream_handshake,
            count_token=refusals.count_token,
        ),
        refusals=refusals,
        relays=relays,
        recorder=recorder,
        provider_handshake_timeout=timings.provider_handshake,
        start_limit=start_limit,
    )

    def upgrade(conn: GatewayConnection, head: RequestHead, trailing: bytes) -> None:
        tasks.spawn(run_session(steps, conn, head, trailing))

    front = Front(
        FrontRoutes(upgrade=upgrade, api_protocol=api.protocol, refusals=refusals),
        max_connections=config.gateway.max_connections,
        handed_off=lambda: len(api) + len(relays),
    )
    tls = None
    if certificate is not None:
        tls = TlsListener(front, certificate, refusals, handshake_timeout=timings.tls_handshake)
    return Gateway(
        config,
        front=front,
        api=api,
        relays=relays,
        tasks=tasks,
        drain=drain,
        timings=timings,
        pool=pool,
        sessions=sessions,
        store=store,
        replay=replay,
        metrics=metrics,
        tls=tls,
        closers=closers,
    )


def _control_api(deps: ApiDeps) -> Any:
    # Imported on first use: only a gateway that gets an API connection needs FastAPI's app.
    from catflap.api.app import create_api

    return create_api(deps)
