"""The agent runtime's FastAPI app: ``WS /ws``, ``GET /livez`` and ``GET /readyz``.

One ``/ws`` connection is one session: read the session id, ``?body=``, the transport type and
the budget from the upgrade request, accept, call ``bot(args)`` as a task registered under the
session id, wait for it to finish, run out of budget or be stopped, close the socket with the
matching code, and report ``session_ended``. See :mod:`catflap.runtime` for the whole picture.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from catflap.contract import headers, limits
from catflap.contract.closecodes import CloseCode, assert_sendable
from catflap.contract.control import BOT_IGNORED_CANCELLATION, ChildEvent, SessionStatus
from catflap.contract.errors import cut_error
from catflap.logs import SessionContext, bind_session, session_log, unbind_session
from catflap.runtime.args import decode_body_param, make_session_args
from catflap.runtime.botloader import LoadedBot
from catflap.runtime.botlogs import BotOutputCapture
from catflap.runtime.metrics import RuntimeMetrics

__all__ = [
    "BOT_CANCEL_GRACE_S",
    "CLOSE_REASON_MAX_BYTES",
    "WS_MAX_SIZE_BYTES",
    "WS_PER_MESSAGE_DEFLATE",
    "WS_PING_INTERVAL_S",
    "WS_PING_TIMEOUT_S",
    "EventSink",
    "Observers",
    "SessionRegistry",
    "close_quietly",
    "create_app",
]

WS_PER_MESSAGE_DEFLATE = limits.WS_PER_MESSAGE_DEFLATE
WS_PING_INTERVAL_S = limits.WS_PING_INTERVAL_S
WS_PING_TIMEOUT_S = limits.WS_PING_TIMEOUT_S
WS_MAX_SIZE_BYTES = limits.WS_MAX_SIZE_BYTES
BOT_CANCEL_GRACE_S = limits.BOT_CANCEL_GRACE_S
CLOSE_REASON_MAX_BYTES = limits.CLOSE_REASON_MAX_BYTES

#: Where the runtime reports events (the control channel, or a log line when standalone).
EventSink = Callable[[ChildEvent], Awaitable[None]]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Observers:
    """Who this runtime is, for log lines, and what watches its sessions."""

    agent: str = "agent"
    org: str = "local"
    #: Counts sessions for ``GET /metrics``; a fresh one when not given.
    metrics: RuntimeMetrics | None = None
    #: Writes each session's bot output to its own file (``--log-dir``); off when ``None``.
    capture: BotOutputCapture | None = None


class SessionRegistry:
    """The running sessions of this process by id, so that the control loop can stop them."""

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stops: dict[str, asyncio.Event] = {}
        #: Bots that ignored cancellation: asyncio.run() would wait for them forever.
        self.stuck: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._tasks

    def __len__(self) -> int:
        return len(self._tasks)

    def add(self, session_id: str, task: asyncio.Task[None]) -> asyncio.Event:
        """Register a running ``bot()``; returns the event that asks the session to stop."""
        self._tasks[session_id] = task
        stop = self._stops[session_id] = asyncio.Event()
        self._idle.clear()
        return stop

    def remove(self, session_id: str) -> None:
        task = self._tasks.pop(session_id)
        del self._stops[session_id]
        if not task.done():
            self.stuck.add(task)
            task.add_done_callback(self._unstuck)
        if not self._tasks:
            self._idle.set()

    def _unstuck(self, task: asyncio.Task[None]) -> None:
        self.stuck.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved, so asyncio does not log it as "never retrieved"

    def stop(self, session_id: str) -> bool:
        """Ask one session to stop; ``False`` if no such session is running."""
        stop = self._stops.get(session_id)
        if stop is not None:
            stop.set()
        return stop is not None

    def stop_all(self) -> None:
        for stop in self._stops.values():
            stop.set()

    async def wait_idle(self) -> None:
        """Return once no session is running."""
        await self._idle.wait()


@dataclass(frozen=True)
class _Outcome:
    status: SessionStatus
    error: str | None
    close_code: CloseCode
    close_reason: str


def _read_budget(raw: str | None, log: logging.LoggerAdapter[logging.Logger]) -> float | None:
    """The session budget in seconds; ``None`` (no limit) when absent, empty, <= 0 or bad."""
    if not raw:
        return None
    try:
        seconds = int(raw)
    except ValueError:
        log.warning("ignoring non-numeric %s: %r", headers.MAX_SESSION_SECONDS_HEADER, raw)
        return None
    return float(seconds) if seconds > 0 else None


def _choose_subprotocol(
    loaded: LoadedBot, websocket: WebSocket, log: logging.LoggerAdapter[logging.Logger]
) -> str | None:
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


def _finished_outcome(
    task: asyncio.Task[None], log: logging.LoggerAdapter[logging.Logger]
) -> _Outcome:
    if task.cancelled():  # cancelled from inside, not by us
        log.error("bot() was cancelled by something other than the runtime")
        return _Outcome("bot_error", "CancelledError", CloseCode.INTERNAL_ERROR, "CancelledError")
    exc = task.exception()
    if exc is None:
        log.info("= bot() returned")
        return _Outcome("completed", None, CloseCode.NORMAL, "")
    log.error("! bot() raised", exc_info=exc)
    return _Outcome("bot_error", _error_text(exc), CloseCode.INTERNAL_ERROR, type(exc).__name__)


async def _await_outcome(
    session_stop: asyncio.Event,
    task: asyncio.Task[None],
    budget: float | None,
    log: logging.LoggerAdapter[logging.Logger],
) -> _Outcome:
    """Wait for ``bot()`` to finish, the budget to run out, or a stop request."""
    stop_wait = asyncio.create_task(session_stop.wait())
    try:
        await asyncio.wait({task, stop_wait}, timeout=budget, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop_wait.cancel()
    if task.done():
        return _finished_outcome(task, log)
    stopped = session_stop.is_set()
    log.info("x %s: cancelling bot()", "stop requested" if stopped else "session budget ran out")
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=BOT_CANCEL_GRACE_S)
    if done and not task.cancelled() and task.exception() is not None:
        log.warning("bot() raised while being cancelled", exc_info=task.exception())
    error = None if done else BOT_IGNORED_CANCELLATION
    if not done:
        log.error(
            "! bot() still running %.0f s after cancel; the pool must kill this process",
            BOT_CANCEL_GRACE_S,
        )
    if stopped:
        return _Outcome("stopped", error, CloseCode.NORMAL, "session stopped")
    return _Outcome("time_limit", error, CloseCode.NORMAL, "session time limit reached")


async def close_quietly(
    websocket: WebSocket, code: int, reason: str, log: logging.LoggerAdapter[logging.Logger]
) -> None:
    """Close ``websocket`` unless either side already did; never raises for a gone peer."""
    assert_sendable(code)
    if WebSocketState.DISCONNECTED in (websocket.client_state, websocket.application_state):
        return
    reason = reason.encode()[:CLOSE_REASON_MAX_BYTES].decode("utf-8", "ignore")
    try:
        await websocket.close(code=code, reason=reason)
    except (RuntimeError, WebSocketDisconnect, OSError) as exc:
        log.debug("close(%d) failed, the peer is gone: %r", code, exc)
    else:
        log.debug("> close %d %r", code, reason)


async def _run_session(
    websocket: WebSocket,
    loaded: LoadedBot,
    registry: SessionRegistry,
    emit: EventSink,
    observers: Observers,
    metrics: RuntimeMetrics,
) -> None:
    session_id = websocket.headers.get(headers.SESSION_ID_HEADER) or str(uuid.uuid4())
    context = SessionContext(session_id, observers.agent, observers.org)
    # Bound to this handler's task: bot() and every task it starts inherit it, so their log
    # lines (logging, loguru, print) are attributed to this session.
    token = bind_session(context)
    try:
        await _serve_session(websocket, loaded, registry, emit, observers, metrics, context)
    finally:
        unbind_session(token)


async def _serve_session(
    websocket: WebSocket,
    loaded: LoadedBot,
    registry: SessionRegistry,
    emit: EventSink,
    observers: Observers,
    metrics: RuntimeMetrics,
    context: SessionContext,
) -> None:
    session_id = context.session_id
    log = session_log(logger, session_id, agent=context.agent, org=context.org)
    body = decode_body_param(websocket.query_params.get(headers.QUERY_BODY), log)
    transport_type = (
        headers.TRANSPORT_TYPE_WEBSOCKET
        if websocket.headers.get(headers.TRANSPORT_TYPE_HEADER) == headers.TRANSPORT_TYPE_WEBSOCKET
        else None
    )
    budget = _read_budget(websocket.headers.get(headers.MAX_SESSION_SECONDS_HEADER), log)
    try:
        await websocket.accept(subprotocol=_choose_subprotocol(loaded, websocket, log))
    except (OSError, RuntimeError) as exc:  # the client left during the handshake
        log.info("x client gone before the session started: %r", exc)
        return
    if session_id in registry:
        log.warning("! a session with this id is already running; refusing the duplicate")
        await close_quietly(websocket, CloseCode.POLICY_VIOLATION, "duplicate session id", log)
        return

    async def call_bot() -> None:
        await loaded.bot(
            make_session_args(
                session_id=session_id, websocket=websocket, body=body, transport_type=transport_type
            )
        )

    capture = observers.capture
    if capture is not None:
        capture.session_started(context)
    await emit({"event": "session_started", "session_id": session_id})
    metrics.session_started()
    log.info("= session started (transport_type=%s, budget=%s s)", transport_type, budget)
    started = time.monotonic()
    task = asyncio.create_task(call_bot(), name=f"bot[{session_id}]")
    stop = registry.add(session_id, task)
    try:
        outcome = await _await_outcome(stop, task, budget, log)
    finally:
        registry.remove(session_id)
        if not task.done():
            task.cancel()  # this handler itself was cancelled (forced server exit)
    bot_seconds = time.monotonic() - started
    metrics.session_ended(outcome.status, bot_seconds)
    client_disconnected = websocket.client_state == WebSocketState.DISCONNECTED
    await close_quietly(websocket, outcome.close_code, outcome.close_reason, log)
    log.info("= session ended: %s after %.3f s", outcome.status, bot_seconds)
    if capture is not None:
        # Before session_ended: once the gateway records the end, the file is complete.
        capture.session_ended(context)
    await emit(
        {
            "event": "session_ended",
            "session_id": session_id,
            "status": outcome.status,
            "error": outcome.error,
            "client_disconnected": client_disconnected,
            "bot_seconds": round(bot_seconds, 6),
        }
    )


async def _check_ready(loaded: LoadedBot) -> bool:
    if loaded.readyz is None:
        return True
    try:
        result = loaded.readyz()
        if inspect.isawaitable(result):
            result = await result
    except Exception:
        logger.exception("! readyz() raised; reporting not ready")
        return False
    return bool(result.get("ready")) if isinstance(result, dict) else bool(result)


def create_app(
    loaded: LoadedBot,
    *,
    registry: SessionRegistry,
    emit: EventSink,
    observers: Observers | None = None,
) -> FastAPI:
    """Build the runtime's ASGI app around an imported bot.

    Args:
        loaded: The imported ``bot.py``.
        registry: Where running sessions are registered (the control loop stops them there).
        emit: Called with ``session_started`` / ``session_ended`` events; must not raise.
        observers: The agent's name for log lines, its metrics and the bot output capture.
    """
    observers = observers or Observers()
    metrics = observers.metrics or RuntimeMetrics(f"{observers.agent}.{observers.org}")
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    async def ws_endpoint(websocket: WebSocket) -> None:
        await _run_session(websocket, loaded, registry, emit, observers, metrics)

    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_PLAIN_0_0_4)

    async def livez() -> dict[str, str]:
        return {"status": "ok"}

    async def readyz() -> JSONResponse:
        if await _check_ready(loaded):
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "not ready"}, status_code=503)

    app.add_api_websocket_route(headers.AGENT_PATH, ws_endpoint)
    app.add_api_route("/livez", livez, methods=["GET"])
    app.add_api_route("/readyz", readyz, methods=["GET"])
    app.add_api_route("/metrics", metrics_endpoint, methods=["GET"])
    return app
