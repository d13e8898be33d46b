"""The gateway process: one port for ``/ws/...`` (relay) and ``/v1/...`` (control API).

Shutdown runs in a fixed order (uvicorn's, with a drain): refuse new upgrades with 503, let
live sessions run until they end or the drain deadline passes, close the rest with 1012, stop
listening, then stop the pool.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from catflap.api.metrics import MetricsListener
from catflap.auth.replay import ReplayStore
from catflap.auth.tokens import KeyRing
from catflap.config import AgentSpec, CatflapConfig
from catflap.contract import limits
from catflap.contract.closecodes import CloseCode
from catflap.contract.names import ServiceHost
from catflap.gateway import fastlane
from catflap.gateway.front import GatewayConnection
from catflap.gateway.relay import Relay
from catflap.metrics import GatewayMetrics
from catflap.pool.pool import SessionPool
from catflap.sessions.registry import SessionRegistry
from catflap.sessions.store import SessionStore

__all__ = ["Gateway"]

log = logging.getLogger("catflap.gateway")


class Gateway:
    """Everything a gateway connection needs, and the listening socket."""

    def __init__(
        self,
        config: CatflapConfig,
        *,
        keyring: KeyRing,
        replay: ReplayStore,
        pool: SessionPool,
        store: SessionStore,
        clock: Callable[[], float] = time.time,
        upstream_timeout: float = limits.UPSTREAM_HANDSHAKE_TIMEOUT_S,
        lease_end_timeout: float = limits.LEASE_END_TIMEOUT_S,
    ) -> None:
        self.config = config
        self.keyring = keyring
        self.replay = replay
        self.pool = pool
        self.store = store
        self.clock = clock
        self.upstream_timeout = upstream_timeout
        self.lease_end_timeout = lease_end_timeout
        #: Client connections open now (``[gateway] max_connections`` bounds it).
        #: In opening order, so the oldest idle one is found first.
        self.connections: dict[GatewayConnection, None] = {}
        self.sessions = SessionRegistry()
        self.metrics = GatewayMetrics()
        self.metrics.gateway = self
        instance_states = getattr(pool, "instance_states", None)
        if instance_states is not None:
            self.metrics.pool_states = instance_states
        self.relays: dict[str, Relay] = {}
        #: The native relay thread, from :meth:`start` until :meth:`shutdown` ends.
        self.lane: fastlane.FastLane | None = None
        self.draining = False
        self._drain_now = asyncio.Event()
        self._agents = {agent.key: agent for agent in config.agents()}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        #: The ``[gateway] metrics_listen`` server, from :meth:`start` to :meth:`shutdown`.
        self.metrics_listener: MetricsListener | None = None
        self._http_state = ServerState()
        self._http_config: uvicorn.Config | None = None

    # --- lookups ---------------------------------------------------------------------------

    def directory(self, service_host: ServiceHost) -> AgentSpec | None:
        return self._agents.get(str(service_host))

    def agent_by_name(self, org: str, agent: str) -> AgentSpec | None:
        return self._agents.get(f"{agent}.{org}")

    def org_for_public_key(self, key: str) -> str | None:
        for org, org_cfg in self.config.organizations.items():
            if key in org_cfg.public_keys:
                return org
        return None

    def open_connections(self) -> int:
        """Client connections open now: not yet handed off, in the API, or relayed."""
        return len(self.connections) + len(self._http_state.connections) + len(self.relays)

    # --- plumbing ------------------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``coro`` as a task held in the registry, so it is neither lost nor leaked."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def make_http_protocol(self) -> asyncio.Protocol:
        """The protocol that serves a control-API connection after front.py's hand-off.

        uvicorn's httptools protocol, bounded on every request of the connection (head size,
        head and body deadlines, idle keep-alive): see :mod:`catflap.gateway.apiprotocol`.
        """
        # Imported on first use, like create_api below: only API connections need them.
        from catflap.gateway.apiprotocol import BoundedHttpToolsProtocol
        from catflap.gateway.session import count_refusal

        if self._http_config is None:
            from catflap.api.app import create_api

            self._http_config = uvicorn.Config(
                create_api(self),
                http="httptools",
                ws="none",
                lifespan="off",
                access_log=False,
                log_level="warning",
                server_header=False,
                log_config=None,  # catflap's logging setup (JSON or text) applies
                # Annotated int by uvicorn, but only ever passed to loop.call_later.
                timeout_keep_alive=limits.KEEPALIVE_IDLE_TIMEOUT_S,  # type: ignore[arg-type]
            )
            self._http_config.load()
        protocol: HttpToolsProtocol = BoundedHttpToolsProtocol(
            config=self._http_config,
            server_state=self._http_state,
            app_state={},
            on_refusal=lambda rejected: count_refusal(self, str(rejected.status), rejected),
        )
        return protocol

    @property
    def port(self) -> int:
        assert self._server is not None and self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        # Bind first (and the metrics listener): a taken port must leave nothing started behind,
        # no lane thread either.
        self._server = await loop.create_server(
            lambda: GatewayConnection(self), host, port, reuse_address=True, backlog=2048
        )
        log.info("= gateway listening on %s:%d", host, self.port)
        metrics_address = self.config.gateway.metrics_host_port
        if metrics_address is not None:
            listener = MetricsListener(self)
            try:
                await listener.start(*metrics_address)
            except OSError:
                # Do not leave the main port open when catflap is about to exit with an error.
                self._server.close()
                raise
            self.metrics_listener = listener
        if self.config.gateway.native_relay:
            if fastlane.available():
                self.lane = fastlane.FastLane()
            else:
                log.warning(
                    "the fast lane extension is not built, so sessions relay on the event loop "
                    "(more CPU per frame); reinstall catflap where a C compiler is available"
                )

    # --- shutdown ------------------------------------------------------------------------------

    async def shutdown(self, *, drain_timeout: float) -> None:
        """Drain, then stop: refuse new upgrades (503), let live sessions end by themselves
        until ``drain_timeout``, close the rest with 1012, stop listening.

        :meth:`drain_now` (a second SIGTERM) cuts the wait short.
        """
        self.draining = True
        sessions = [t for t in self._tasks if not t.done()]
        if sessions and not self._drain_now.is_set():
            log.info(
                "x draining %d live session(s) for up to %g s", len(self.relays), drain_timeout
            )
            all_ended = asyncio.ensure_future(asyncio.wait(sessions))
            cut_short = asyncio.ensure_future(self._drain_now.wait())
            await asyncio.wait(
                [all_ended, cut_short], timeout=drain_timeout, return_when=asyncio.FIRST_COMPLETED
            )
            all_ended.cancel()
            cut_short.cancel()
        for relay in list(self.relays.values()):
            relay.drained = True
            relay.close_both(CloseCode.SERVICE_RESTART, "gateway shutting down")
        if self._server is not None:
            self._server.close()
        for connection in list(self._http_state.connections):
            connection.shutdown()
        if self._tasks:
            # Closed sessions still record themselves once their bot has ended.
            await asyncio.wait(list(self._tasks), timeout=limits.CLOSE_WAIT_S + 5)
        for task in list(self._tasks):
            task.cancel()
        if self.lane is not None:
            self.lane.close()
        if self.metrics_listener is not None:
            # Last: a drain stays observable (sessions_active falling) until it is over.
            self.metrics_listener.close()
        log.info("x gateway stopped")

    def drain_now(self) -> None:
        """Second SIGTERM: stop waiting for live sessions and close them with 1012 now."""
        self.draining = True
        self._drain_now.set()
