"""One runtime session's lifecycle: build the arguments, await ``bot()`` under its budget, end
it the way its transport ends, and report the end.

A session is one ``/ws`` connection or one ``POST /bot`` request. From the request come the
session id, the body, the transport and the budget. :meth:`SessionRunner.run` (``/ws``) accepts
first; :meth:`SessionRunner.run_bot` (``/bot``) refuses a duplicate, a full or a closing runtime
before anything starts. Both then go through the same :meth:`SessionRunner._lifecycle`: call
``bot(args)`` as a task registered in :class:`~catflap.runtime.running.RunningBots` under the
session id, wait for it to finish, run out of budget or be stopped, end the transport (close
the socket; a ``/bot`` request gets its answer once the handler returns) and report
``session_ended`` (the table of endings is in :mod:`catflap.runtime`).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from catflap.contract import headers, limits
from catflap.contract.closecodes import CloseCode, assert_sendable
from catflap.contract.control import BOT_IGNORED_CANCELLATION, EventSink, SessionStatus
from catflap.contract.errors import (
    Draining,
    DuplicateSession,
    InstanceFull,
    cut_error,
)
from catflap.logs import SessionContext, bind_session, session_log, unbind_session
from catflap.runtime.args import (
    DailyRoom,
    decode_body_param,
    make_bot_session_args,
    make_session_args,
    make_webrtc_session_args,
)
from catflap.runtime.botloader import LoadedBot
from catflap.runtime.botlogs import BotOutputCapture
from catflap.runtime.metrics import RuntimeMetrics
from catflap.runtime.resources import SessionSampler
from catflap.runtime.running import RunningBots
from catflap.runtime.webrtc import OfferTimeout, WebRTCSessions

__all__ = [
    "BotSession",
    "SessionRunner",
    "close_quietly",
    "read_budget",
]

# The name these lines carried before the runtime was split into modules: operators' log
# queries and tests match "catflap.runtime.app: = session ended".
logger = logging.getLogger("catflap.runtime.app")

_Log = logging.LoggerAdapter[logging.Logger]


@dataclass(frozen=True)
class _Outcome:
    status: SessionStatus
    error: str | None
    close_code: CloseCode
    close_reason: str


@dataclass(frozen=True, kw_only=True)
class BotSession:
    """What one ``POST /bot`` request asks for, already read and checked."""

    session_id: str
    #: The request's JSON body as sent; ``None`` for an empty body.
    body: Any
    #: The session budget in seconds; ``None`` is no limit.
    budget: float | None
    #: Set when the request named a Daily room: the bot gets ``DailySessionArguments``.
    daily: DailyRoom | None = None
    #: ``x-daily-transport-type: webrtc``: wait for the client's offer, then
    #: ``SmallWebRTCSessionArguments`` (:mod:`~catflap.runtime.webrtc`).
    webrtc: bool = False


@dataclass(frozen=True, kw_only=True)
class SessionRunner:
    """What every session of one runtime shares; :meth:`run` serves one session."""

    #: The imported ``bot.py``.
    bot: LoadedBot
    #: Where running bots are registered, so that the control loop can stop them.
    running: RunningBots
    #: Gets ``session_started`` and ``session_ended``.
    emit: EventSink
    #: Counts sessions for ``GET /metrics``.
    metrics: RuntimeMetrics
    #: Who this runtime is, for log lines and the session log files.
    agent: str = "agent"
    org: str = "local"
    #: Writes each session's bot output to its own file (``--log-dir``); off when ``None``.
    capture: BotOutputCapture | None = None
    #: Measures ``bot_seconds``; injectable so tests need no wall clock.
    clock: Callable[[], float] = time.monotonic
    #: Waits out the session budget and the cancellation grace; injectable like ``clock``.
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    #: How long a cancelled ``bot()`` may take to unwind before it is reported as stuck.
    cancel_grace_s: float = limits.BOT_CANCEL_GRACE_S
    #: ``POST /bot`` is refused with 503 while this many sessions run; ``None`` is no limit.
    max_sessions: int | None = None
    #: The WebRTC sessions waiting for or holding a peer connection, and their signalling.
    webrtc: WebRTCSessions = field(default_factory=WebRTCSessions)
    #: Makes the sampler of one session's CPU and memory (``session_ended.resources``).
    sampler: Callable[[], SessionSampler] = SessionSampler
    #: Called after each session has been reported ended, to give its memory back
    #: (:func:`~catflap.runtime.memory.release_memory`; returns the seconds it took). ``None``
    #: releases nothing.
    release_memory: Callable[[], float] | None = None

    async def run(self, websocket: WebSocket) -> None:
        """Serve one ``/ws`` connection from the upgrade to ``session_ended``; never raises."""
        session_id = websocket.headers.get(headers.SESSION_ID_HEADER) or str(uuid.uuid4())
        context = SessionContext(session_id, self.agent, self.org)
        # Bound to this handler's task: bot() and every task it starts inherit it, so their
        # log lines (logging, loguru, print) are attributed to this session.
        token = bind_session(context)
        try:
            await self._serve(websocket, context)
        finally:
            unbind_session(token)

    async def _serve(self, websocket: WebSocket, context: SessionContext) -> None:
        session_id = context.session_id
        log = session_log(logger, session_id, agent=context.agent, org=context.org)
        body = decode_body_param(websocket.query_params.get(headers.QUERY_BODY), log)
        transport_type = (
            headers.TRANSPORT_TYPE_WEBSOCKET
            if websocket.headers.get(headers.TRANSPORT_TYPE_HEADER)
            == headers.TRANSPORT_TYPE_WEBSOCKET
            else None
        )
        budget = read_budget(websocket.headers.get(headers.MAX_SESSION_SECONDS_HEADER), log)
        try:
            await websocket.accept(subprotocol=_choose_subprotocol(self.bot, websocket, log))
        except (OSError, RuntimeError) as exc:  # the client left during the handshake
            log.info("x client gone before the session started: %r", exc)
            return
        if session_id in self.running:
            log.warning("! a session with this id is already running; refusing the duplicate")
            await close_quietly(websocket, CloseCode.POLICY_VIOLATION, "duplicate session id", log)
            return

        def make_args() -> Any:
            return make_session_args(
                session_id=session_id, websocket=websocket, body=body, transport_type=transport_type
            )

        async def close(outcome: _Outcome) -> bool:
            client_disconnected = websocket.client_state == WebSocketState.DISCONNECTED
            await close_quietly(websocket, outcome.close_code, outcome.close_reason, log)
            return client_disconnected

        await self._lifecycle(
            context, log, budget, make_args, close, describe=f"transport_type={transport_type}"
        )

    async def run_bot(
        self, request: BotSession, client_gone: Callable[[], Awaitable[bool]]
    ) -> SessionStatus:
        """Serve one ``POST /bot`` request from its admission to ``session_ended``.

        Args:
            request: The checked request.
            client_gone: Tells at the end whether the HTTP client left meanwhile (it does not
                stop the bot: as in PCC, only ``stop_session`` or the budget do).

        Returns:
            How the session ended.

        Raises:
            DuplicateSession: 409, the session id is running already.
            InstanceFull: 503, ``max_sessions`` sessions are running.
            Draining: 503, ``shutdown`` was received.
            WebRTCUnavailable: 501, a WebRTC session on a runtime without pipecat-ai[webrtc].
        """
        session_id = request.session_id
        if self.running.closing:
            raise Draining("this instance is shutting down; start the session elsewhere")
        if session_id in self.running:
            raise DuplicateSession(f"session {session_id} is already running on this instance")
        if self.max_sessions is not None and len(self.running) >= self.max_sessions:
            raise InstanceFull(f"this instance already runs {len(self.running)} session(s)")
        peer = self.webrtc.open(session_id, request.body) if request.webrtc else None
        context = SessionContext(session_id, self.agent, self.org)
        token = bind_session(context)
        try:
            log = session_log(logger, session_id, agent=context.agent, org=context.org)

            async def make_args() -> Any:
                if peer is None:
                    return make_bot_session_args(
                        session_id=session_id, body=request.body, daily=request.daily
                    )
                log.info("= waiting for the client's WebRTC offer")
                connection, request_data = await self.webrtc.wait_opened(peer, self.sleep)
                return make_webrtc_session_args(
                    session_id=session_id,
                    # PCC's base image: the offer's requestData, else the /bot body.
                    body=request_data or request.body,
                    connection=connection,
                )

            async def answer(outcome: _Outcome) -> bool:
                if peer is not None:
                    await self.webrtc.close(peer)
                return await client_gone()

            kind = "webrtc" if peer else "pipecat" if request.daily is None else "daily"
            return await self._lifecycle(
                context, log, request.budget, make_args, answer, describe=f"POST /bot, {kind}"
            )
        finally:
            unbind_session(token)
            if peer is not None:
                await self.webrtc.close(peer)

    async def _lifecycle(
        self,
        context: SessionContext,
        log: _Log,
        budget: float | None,
        make_args: Callable[[], Any],
        end_transport: Callable[[_Outcome], Awaitable[bool]],
        *,
        describe: str,
    ) -> SessionStatus:
        """Run ``bot(make_args())`` from ``session_started`` to ``session_ended``.

        The session is registered before the first ``await``, so that a duplicate checked just
        before cannot slip in. ``end_transport`` ends the client's side once the outcome is
        known and returns whether the client had gone already.
        """
        session_id = context.session_id

        async def call_bot() -> None:
            # Built inside the task: a session-arguments class that refuses these values ends
            # the session as bot_error, reported like any other failure, not as a dead handler.
            # (A WebRTC session's arguments wait for the offer, under the same budget and stop.)
            args = make_args()
            if inspect.isawaitable(args):
                args = await args
            await self.bot.bot(args)

        if self.capture is not None:
            self.capture.session_started(context)
        self.metrics.session_started()
        log.info("= session started (%s, budget=%s s)", describe, budget)
        started = self.clock()
        sampler = self.sampler()
        sampler.start()
        task = asyncio.create_task(call_bot(), name=f"bot[{session_id}]")
        stop = self.running.add(session_id, task)
        try:
            try:
                await self.emit({"event": "session_started", "session_id": session_id})
                outcome = await self._await_outcome(stop, task, budget, log)
            finally:
                if not task.done():
                    task.cancel()  # this handler itself was cancelled (forced server exit)
                resources = await sampler.stop()
            bot_seconds = self.clock() - started
            self.metrics.session_ended(outcome.status, bot_seconds)
            client_disconnected = await end_transport(outcome)
        finally:
            # Only once the transport is closed: a drain, or the pool's departure, waits for
            # no session to run and then has uvicorn close whatever is left with 1012, which
            # would beat this session's own close ("session stopped") under load.
            self.running.remove(session_id)
        log.info("= session ended: %s after %.3f s", outcome.status, bot_seconds)
        if self.capture is not None:
            # Before session_ended: once the gateway records the end, the file is complete.
            self.capture.session_ended(context)
        await self.emit(
            {
                "event": "session_ended",
                "session_id": session_id,
                "status": outcome.status,
                "error": outcome.error,
                "client_disconnected": client_disconnected,
                "bot_seconds": round(bot_seconds, 6),
                "resources": resources,
            }
        )
        if self.release_memory is not None:
            # After the report: the pool may route the next session here meanwhile; it waits
            # for the release (milliseconds) rather than the report waiting for it.
            log.debug("= memory released in %.1f ms", 1000 * self.release_memory())
        return outcome.status

    async def _await_outcome(
        self, stop: asyncio.Event, task: asyncio.Task[None], budget: float | None, log: _Log
    ) -> _Outcome:
        """Wait for ``bot()`` to finish, the budget to run out, or a stop request."""
        await _until_first(task, stop.wait(), *([] if budget is None else [self.sleep(budget)]))
        if task.done():
            return _finished_outcome(task, log)
        stopped = stop.is_set()
        log.info(
            "x %s: cancelling bot()", "stop requested" if stopped else "session budget ran out"
        )
        task.cancel()
        await _until_first(task, self.sleep(self.cancel_grace_s))
        done = task.done()
        if done and not task.cancelled() and task.exception() is not None:
            log.warning("bot() raised while being cancelled", exc_info=task.exception())
        error = None if done else BOT_IGNORED_CANCELLATION
        if not done:
            log.error(
                "! bot() still running %.0f s after cancel; the pool must kill this process",
                self.cancel_grace_s,
            )
        if stopped:
            return _Outcome("stopped", error, CloseCode.NORMAL, "session stopped")
        return _Outcome("time_limit", error, CloseCode.NORMAL, "session time limit reached")


async def _until_first(task: asyncio.Task[None], *waits: Awaitable[object]) -> None:
    """Return once ``task`` is done or any of ``waits`` is; the other waits are cancelled."""
    waiters = [asyncio.ensure_future(wait) for wait in waits]
    try:
        await asyncio.wait({task, *waiters}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def read_budget(raw: str | None, log: _Log) -> float | None:
    """The session budget in seconds; ``None`` (no limit) when absent, empty, <= 0 or bad."""
    if not raw:
        return None
    try:
        seconds = int(raw)
    except ValueError:
        log.warning("ignoring non-numeric %s: %r", headers.MAX_SESSION_SECONDS_HEADER, raw)
        return None
    return float(seconds) if seconds > 0 else None


def _choose_subprotocol(loaded: LoadedBot, websocket: WebSocket, log: _Log) -> str | None:
    offered = [str(p) for p in websocket.scope.get("subprotocols", [])]
    if loaded.select_subprotocol is None:
        return None  # PCC accepts with no subprotocol
    try:
        chosen = loaded.select_subprotocol(offered)
    except Exception:
        log.exception("select_subprotocol() raised; accepting with no subprotocol")
        return None
    if chosen is not None and chosen not in offered:
        log.warning("select_subprotocol() chose %r, which was not offered; ignoring", chosen)
        return None
    return chosen


def _error_text(exc: BaseException) -> str:
    message = str(exc)
    # Cut here too, not only in the record: the report travels on the control channel, whose
    # lines are bounded (CONTROL_LINE_MAX_BYTES), and a megabyte message would break it.
    return cut_error(f"{type(exc).__name__}: {message}" if message else type(exc).__name__)


def _finished_outcome(task: asyncio.Task[None], log: _Log) -> _Outcome:
    if task.cancelled():  # cancelled from inside, not by us
        log.error("bot() was cancelled by something other than the runtime")
        return _Outcome("bot_error", "CancelledError", CloseCode.INTERNAL_ERROR, "CancelledError")
    exc = task.exception()
    if exc is None:
        log.info("= bot() returned")
        return _Outcome("completed", None, CloseCode.NORMAL, "")
    if isinstance(exc, OfferTimeout):
        log.warning("x %s", exc)
        return _Outcome("agent_start_timeout", str(exc), CloseCode.NORMAL, "")
    log.error("! bot() raised", exc_info=exc)
    return _Outcome("bot_error", _error_text(exc), CloseCode.INTERNAL_ERROR, type(exc).__name__)


async def close_quietly(websocket: WebSocket, code: int, reason: str, log: _Log) -> None:
    """Close ``websocket`` unless either side already did; never raises for a gone peer."""
    assert_sendable(code)
    if WebSocketState.DISCONNECTED in (websocket.client_state, websocket.application_state):
        return
    reason = reason.encode()[: limits.CLOSE_REASON_MAX_BYTES].decode("utf-8", "ignore")
    try:
        await websocket.close(code=code, reason=reason)
    except (RuntimeError, WebSocketDisconnect, OSError) as exc:
        log.debug("close(%d) failed, the peer is gone: %r", code, exc)
    else:
        log.debug("> close %d %r", code, reason)
