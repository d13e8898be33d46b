"""One agent runtime process from start to exit: import the bot, bind, serve, report ``ready``,
hand the control channel to the control loop, and return the exit code.

Start-up failures (``bot.py`` does not import, the address cannot be bound) are reported once
on stderr and once to the pool as ``start_failed``; see :mod:`catflap.runtime.exits`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, field_validator

from catflap.contract import limits
from catflap.contract.control import ChildEvent, ControlChannel, EventSink
from catflap.logs import LOG_FORMATS, LogFormat
from catflap.runtime import memory
from catflap.runtime.app import check_bot_routes, create_app
from catflap.runtime.args import session_args_class
from catflap.runtime.botloader import BotImportError, load_bot
from catflap.runtime.botlogs import BotOutputCapture, SessionLogWriter
from catflap.runtime.control_loop import ControlLoop
from catflap.runtime.exits import (
    EXIT_BOT_IMPORT_FAILED,
    EXIT_BOT_STUCK,
    EXIT_LISTEN_FAILED,
    EXIT_OK,
)
from catflap.runtime.listen import bind_listener, parse_listen, remove_listener
from catflap.runtime.metrics import RuntimeMetrics
from catflap.runtime.running import RunningBots
from catflap.runtime.session import SessionRunner
from catflap.runtime.webrtc import WebRTCSessions
from catflap.tasks import TaskSet

__all__ = [
    "AgentOptions",
    "RuntimeLogLevel",
    "loop_factory",
    "make_server_config",
    "run_agent",
    "split_agent_name",
]

#: uvicorn's log levels; ``trace`` is uvicorn's own, below ``debug``.
RuntimeLogLevel = Literal["critical", "error", "warning", "info", "debug", "trace"]

logger = logging.getLogger("catflap.runtime")


class AgentOptions(BaseModel):
    """What one runtime is told to do; ``catflap agent`` builds its flags from these fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bot_dir: Path = Field(default=Path("."), description="Folder with bot.py.")
    listen: str = Field(
        description="unix:/path/to.sock or tcp:HOST:PORT (port 0 picks a free port)."
    )
    control_fd: int | None = Field(
        default=None,
        description="The runtime's end of the pool's control socketpair; without it the "
        "runtime runs standalone and prints its address.",
    )
    agent_name: str | None = Field(
        default=None, description="agent.org: names log lines, metrics and session log files."
    )
    log_level: RuntimeLogLevel = Field(default="info", description="uvicorn's log level.")
    log_format: LogFormat = Field(default=LOG_FORMATS[0], description="Log lines on stderr.")
    log_dir: Path | None = Field(
        default=None,
        description="Write each session's bot output to DIR/<org>/<agent>/<session_id>.jsonl.",
    )
    sessions_per_instance: int | None = Field(
        default=None,
        ge=1,
        description="Refuse POST /bot with 503 while this many sessions run (default: no limit).",
    )
    webrtc_offer_timeout: float = Field(
        default=limits.WEBRTC_OFFER_TIMEOUT_S,
        gt=0,
        description="Seconds a WebRTC session waits for the client's offer "
        "(then agent_start_timeout).",
    )

    @field_validator("log_dir")
    @classmethod
    def _log_dir_is_absolute(cls, value: Path | None) -> Path | None:
        # Importing the bot changes the working directory.
        return None if value is None else value.resolve()


def split_agent_name(agent_name: str | None) -> tuple[str, str]:
    """``my-agent.my-org`` -> ``("my-agent", "my-org")``; standalone runtimes are
    ``("agent", "local")`` unless named."""
    if not agent_name:
        return "agent", "local"
    agent, dot, org = agent_name.rpartition(".")
    return (agent, org) if dot and agent and org else (agent_name, "local")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when it is installed (a dependency on Linux and macOS), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def make_server_config(app: FastAPI, *, log_level: str) -> uvicorn.Config:
    """The runtime's uvicorn configuration; the caller binds the socket and passes it in."""
    # websockets-sansio (uvicorn >= 0.35) skips the legacy asyncio layer of websockets.
    ws = "websockets-sansio" if "websockets-sansio" in uvicorn.config.WS_PROTOCOLS else "websockets"
    return uvicorn.Config(
        app,
        loop="uvloop" if loop_factory() is not None else "asyncio",
        http="httptools",
        ws=ws,
        ws_per_message_deflate=limits.WS_PER_MESSAGE_DEFLATE,
        ws_ping_interval=limits.WS_PING_INTERVAL_S,
        ws_ping_timeout=limits.WS_PING_TIMEOUT_S,
        ws_max_size=limits.WS_MAX_SIZE_BYTES,
        lifespan="auto",
        access_log=False,
        log_level=log_level,
        # uvicorn's own logging config would give its loggers text handlers of their own; left
        # alone, they propagate to the root handler and come out in --log-format.
        log_config=None,
        # SIGTERM: sessions get PCC's SHUTDOWN_TIMEOUT before uvicorn cancels them.
        timeout_graceful_shutdown=int(limits.DRAIN_TIMEOUT_S),
    )


@dataclass(frozen=True)
class _UvicornServing:
    """The control loop's view of the uvicorn server."""

    server: uvicorn.Server

    def stop_accepting(self) -> None:
        for listener in getattr(self.server, "servers", []):
            listener.close()

    def exit(self) -> None:
        self.server.should_exit = True


def _event_sink(channel: ControlChannel | None) -> EventSink:
    async def emit(event: ChildEvent) -> None:
        if channel is None:
            logger.debug("event %s", event)
            return
        try:
            await channel.send(event)
        except OSError as exc:  # the pool is gone; the control loop will notice the EOF
            logger.debug("could not send %s: %r", event["event"], exc)

    return emit


async def _start_failed(
    emit: EventSink, channel: ControlChannel | None, error: str, code: int
) -> int:
    """Report a start-up failure once on stderr and once to the pool; return ``code``."""
    print(f"catflap agent: cannot start:\n{error}", file=sys.stderr, flush=True)
    await emit({"event": "start_failed", "error": error})
    if channel is not None:
        await channel.aclose()
    return code


async def run_agent(options: AgentOptions) -> int:
    """Import the bot, serve ``/ws`` and ``/bot`` until told to stop, and return the exit code.

    Returns:
        :data:`~catflap.runtime.exits.EXIT_OK`, ``EXIT_BOT_IMPORT_FAILED``,
        ``EXIT_LISTEN_FAILED`` or ``EXIT_BOT_STUCK``.

    Raises:
        ConfigError: ``options.listen`` cannot be parsed.
    """
    if memory.step_on("mmap-threshold"):
        memory.fix_mmap_threshold()  # before bot.py and its libraries allocate
    address = parse_listen(options.listen)
    channel = None
    if options.control_fd is not None:
        control_sock = socket.socket(fileno=options.control_fd)
        control_sock.set_inheritable(False)  # a bot's subprocess must not keep the pool's EOF away
        channel = await ControlChannel.from_socket(control_sock)
    emit = _event_sink(channel)
    name = options.agent_name or "agent"
    # Before the bot: PCC bots add routes at import time with `from pipecatcloud_system import
    # app`, and this is the app the runtime serves.
    from pipecatcloud_system import app

    try:
        loaded = load_bot(options.bot_dir)
        check_bot_routes(app)  # ReservedRouteError is a BotImportError
    except BotImportError as exc:
        return await _start_failed(emit, channel, str(exc), EXIT_BOT_IMPORT_FAILED)
    # Import pipecat now rather than on the first session (~1 s of import time).
    logger.info("%s: session arguments are %s", name, session_args_class())
    try:
        sock, reported = bind_listener(address)
    except OSError as exc:
        error = f"cannot listen on {options.listen}: {exc}"
        return await _start_failed(emit, channel, error, EXIT_LISTEN_FAILED)
    running = RunningBots()
    agent, org = split_agent_name(options.agent_name)
    capture = None
    if options.log_dir is not None:
        # After the import: a bot may reset loguru's sinks at import time.
        capture = BotOutputCapture(SessionLogWriter(options.log_dir))
        capture.install()
    sessions = SessionRunner(
        bot=loaded,
        running=running,
        emit=emit,
        metrics=RuntimeMetrics(f"{agent}.{org}"),
        agent=agent,
        org=org,
        capture=capture,
        max_sessions=options.sessions_per_instance,
        webrtc=WebRTCSessions(offer_timeout=options.webrtc_offer_timeout),
        release_memory=memory.release_memory if memory.step_on("release") else None,
    )
    server = uvicorn.Server(
        make_server_config(create_app(sessions, app), log_level=options.log_level)
    )
    background = TaskSet("agent runtime")
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        # uvicorn exposes no "started" event, only the flag.
        while not server.started and not serving.done():
            await asyncio.wait({serving}, timeout=0.01)
        if server.started:
            logger.info("%s: listening on %s, pid %d", name, reported, os.getpid())
            if channel is None:
                print(f"catflap agent listening on {reported}", flush=True)
            else:
                await emit({"event": "ready", "address": reported, "pid": os.getpid()})
                loop = ControlLoop(channel, _UvicornServing(server), running, emit)
                background.spawn(loop.run(), name="control loop")
        await serving
    finally:
        await background.aclose()
        if channel is not None:
            await channel.aclose()
        remove_listener(address)
        if capture is not None and not running.stuck:
            capture.uninstall()
    if running.stuck:
        return EXIT_BOT_STUCK
    return EXIT_OK if server.started else EXIT_LISTEN_FAILED
