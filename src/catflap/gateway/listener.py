"""The listening gateway: one port for ``/ws/...`` (relay) and ``/v1/...`` (control API).

It binds, starts what serves (the ``metrics_listen`` listener, the fast lane, the pool) and
shuts down in a fixed order (uvicorn's, with a drain): refuse new upgrades with 503, let live
sessions run until they end or the drain deadline passes, close the rest with 1012, stop
listening, then stop the pool. What it serves is wired by :func:`catflap.compose.build_gateway`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from catflap.auth.replay import ReplayStore
from catflap.config import CatflapConfig
from catflap.contract import limits
from catflap.contract.closecodes import CloseCode
from catflap.gateway import fastlane
from catflap.gateway.apiconnections import ApiConnections
from catflap.gateway.front import Front
from catflap.gateway.metricslistener import MetricsListener
from catflap.gateway.relay import Relay
from catflap.gateway.relaying import LiveRelays
from catflap.gateway.timings import Timings
from catflap.gateway.tls import TlsListener
from catflap.metrics import GatewayMetrics
from catflap.pool.interface import SessionPool
from catflap.sessions.recent import RecentRecords
from catflap.sessions.store import SessionStore
from catflap.tasks import TaskSet

__all__ = ["DrainState", "Gateway", "ManagedPool"]

log = logging.getLogger("catflap.gateway")


class ManagedPool(SessionPool, Protocol):
    """A pool the gateway starts once it listens and stops once it has shut down."""

    def start(self) -> None: ...

    async def close(self) -> None: ...


class DrainState:
    """Whether the gateway refuses new sessions, and whether to stop waiting for live ones.

    Called, it answers the first question: the upgrade path and ``/readyz`` read it so.
    """

    def __init__(self) -> None:
        self.draining = False
        #: Set by a second SIGTERM: close the live sessions now.
        self.cut_short = asyncio.Event()

    def __call__(self) -> bool:
        return self.draining


class Gateway:
    """The listening socket and what it serves: connections, relays, the API, the pool."""

    def __init__(
        self,
        config: CatflapConfig,
        *,
        front: Front,
        api: ApiConnections,
        relays: LiveRelays,
        tasks: TaskSet,
        drain: DrainState,
        timings: Timings,
        pool: ManagedPool,
        sessions: RecentRecords,
        store: SessionStore,
        replay: ReplayStore,
        metrics: GatewayMetrics,
        tls: TlsListener | None = None,
        closers: Sequence[Callable[[], Awaitable[None]]] = (),
    ) -> None:
        """
        Args:
            tls: the ``listen_tls`` listener, when there is one; :meth:`start` binds it.
            tasks: the registry every session task runs in (the drain waits for them).
            closers: what :meth:`close` closes after the pool: the parts the composition
                opened itself (a caller's own store or replay store stays the caller's).
        """
        self.config = config
        self.front = front
        self.api = api
        self.timings = timings
        self.pool = pool
        self.sessions = sessions
        self.store = store
        self.replay = replay
        self.metrics = metrics
        self._relays = relays
        self._tasks = tasks
        self._drain = drain
        self._closers = tuple(closers)
        self._pool_started = False
        self._server: asyncio.Server | None = None
        self.tls = tls
        self._tls_watch: asyncio.Task[None] | None = None
        #: The ``[gateway] metrics_listen`` server, from :meth:`start` to :meth:`shutdown`.
        self.metrics_listener: MetricsListener | None = None

    # --- what tests and the API observe ----------------------------------------------------

    @property
    def relays(self) -> dict[str, Relay]:
        """The live relays by session id."""
        return self._relays.live

    @property
    def lane(self) -> fastlane.FastLane | None:
        """The native relay thread, from :meth:`start` until :meth:`shutdown` ends."""
        return self._relays.lane

    @property
    def draining(self) -> bool:
        return self._drain.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self._drain.draining = value

    def open_connections(self) -> int:
        """Client connections open now: not yet handed off, in the API, or relayed."""
        return self.front.open_connections()

    @property
    def port(self) -> int:
        assert self._server is not None and self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def tls_port(self) -> int:
        """The ``listen_tls`` port (after :meth:`start`)."""
        assert self.tls is not None, "no listen_tls in the configuration"
        return self.tls.port

    def reload_tls(self) -> None:
        """SIGHUP: reload the TLS certificate (only a flag; the watcher reloads)."""
        if self.tls is None:
            log.info("= SIGHUP: no listen_tls, no certificate to reload")
            return
        self.tls.certificate.request_reload()

    # --- start -----------------------------------------------------------------------------

    async def start(self, host: str, port: int) -> None:
        """Listen on ``host:port``, then start the metrics listener, the lane and the pool.

        Raises:
            OSError: a port could not be taken; nothing is left started.
        """
        loop = asyncio.get_running_loop()
        # Bind first (and the metrics listener): a taken port must leave nothing started behind,
        # no lane thread and no agent process either. A handshake that comes in before the pool
        # started still works: acquire() cold-starts.
        self._server = await loop.create_server(
            self.front, host, port, reuse_address=True, backlog=2048
        )
        log.info("= gateway listening on %s:%d", host, self.port)
        tls_address = self.config.tls_host_port
        if self.tls is not None and tls_address is not None:
            try:
                self.tls.listen(*tls_address)
            except OSError:
                self._server.close()
                raise
            log.info(
                "= gateway listening for TLS on %s:%d (certificate %s)",
                tls_address[0],
                self.tls.port,
                self.tls.certificate.cert,
            )
        settings = self.config.gateway
        metrics_address = settings.metrics_host_port
        if metrics_address is not None:
            listener = MetricsListener(settings=settings, metrics=self.metrics)
            try:
                await listener.start(*metrics_address)
            except OSError:
                # Do not leave the main port open when catflap is about to exit with an error.
                self._server.close()
                if self.tls is not None:
                    self.tls.close()
                raise
            self.metrics_listener = listener
        if self.tls is not None:
            self._tls_watch = asyncio.create_task(
                self.tls.certificate.watch(), name="TLS certificate watch"
            )
        if settings.native_relay:
            if fastlane.available():
                self._relays.lane = fastlane.FastLane(
                    nice=settings.relay_thread_nice, slice_us=settings.relay_thread_slice_us
                )
            else:
                log.warning(
                    "the fast lane extension is not built, so sessions relay on the event loop "
                    "(more CPU per frame); reinstall catflap where a C compiler is available"
                )
        self.pool.start()
        self._pool_started = True

    # --- shutdown --------------------------------------------------------------------------

    async def shutdown(self, *, drain_timeout: float | None = None) -> None:
        """Drain, then stop: refuse new upgrades (503), let live sessions end by themselves
        until ``drain_timeout`` (default: the configured one), close the rest with 1012, stop
        listening.

        :meth:`drain_now` (a second SIGTERM) cuts the wait short.
        """
        drain_timeout = self.timings.drain if drain_timeout is None else drain_timeout
        self._drain.draining = True
        sessions = self._tasks.running()
        if sessions and not self._drain.cut_short.is_set():
            log.info(
                "x draining %d live session(s) for up to %g s", len(self._relays), drain_timeout
            )
            all_ended = asyncio.ensure_future(asyncio.wait(sessions))
            cut_short = asyncio.ensure_future(self._drain.cut_short.wait())
            await asyncio.wait(
                [all_ended, cut_short], timeout=drain_timeout, return_when=asyncio.FIRST_COMPLETED
            )
            all_ended.cancel()
            cut_short.cancel()
        self._relays.close_all(CloseCode.SERVICE_RESTART, "gateway shutting down")
        if self._server is not None:
            self._server.close()
        if self.tls is not None:
            self.tls.close()
        if self._tls_watch is not None:
            self._tls_watch.cancel()
        self.api.shutdown()
        if running := self._tasks.running():
            # Closed sessions still record themselves once their bot has ended.
            await asyncio.wait(running, timeout=self.timings.close_wait + 5)
        # Cancelled sessions unwind (a token given back, a lease cancelled); bounded, so a store
        # or Redis that stopped answering cannot hold the exit.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limits.CLOSE_WAIT_S):
                await self._tasks.aclose()
        if self._relays.lane is not None:
            self._relays.lane.close()
        if self.metrics_listener is not None:
            # Last: a drain stays observable (sessions_active falling) until it is over.
            self.metrics_listener.close()
        log.info("x gateway stopped")

    def drain_now(self) -> None:
        """Second SIGTERM: stop waiting for live sessions and close them with 1012 now."""
        self._drain.draining = True
        self._drain.cut_short.set()

    async def close(self) -> None:
        """After :meth:`shutdown` (or a failed :meth:`start`): stop the pool if it started,
        then close what the composition opened (replay store, session store)."""
        if self._pool_started:
            await self.pool.close()
        for close in self._closers:
            await close()
