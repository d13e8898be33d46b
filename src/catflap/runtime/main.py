"""``catflap agent``: run one agent's ``bot.py`` behind ``WS /ws``, as PCC's base image does.

Also runnable as ``python -m catflap.runtime.main --bot-dir DIR --listen ADDRESS``. With
``--log-dir DIR``, each session's bot output goes to ``DIR/<org>/<agent>/<session_id>.jsonl``
(:mod:`catflap.runtime.botlogs`); ``--log-format`` picks JSON lines or text on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import uvicorn
from fastapi import FastAPI

from catflap.contract import limits
from catflap.contract.control import ChildEvent, ControlChannel, ControlProtocolError
from catflap.contract.errors import ConfigError
from catflap.logs import LOG_FORMATS, LogFormat, configure_logging
from catflap.runtime.app import (
    BOT_CANCEL_GRACE_S,
    WS_MAX_SIZE_BYTES,
    WS_PER_MESSAGE_DEFLATE,
    WS_PING_INTERVAL_S,
    WS_PING_TIMEOUT_S,
    EventSink,
    Observers,
    SessionRegistry,
    create_app,
)
from catflap.runtime.args import session_args_class
from catflap.runtime.botloader import BotImportError, load_bot
from catflap.runtime.botlogs import BotOutputCapture, SessionLogWriter
from catflap.runtime.metrics import RuntimeMetrics

__all__ = [
    "EXIT_BOT_IMPORT_FAILED",
    "EXIT_BOT_STUCK",
    "EXIT_CONFIG",
    "EXIT_LISTEN_FAILED",
    "EXIT_OK",
    "ListenAddress",
    "main",
    "make_server_config",
    "parse_listen",
    "run_agent",
    "split_agent_name",
]

EXIT_OK = 0
#: Bad options (for example an unparsable ``--listen``).
EXIT_CONFIG = 2
#: ``bot.py`` failed to import or has no ``async def bot``; ``start_failed`` was sent.
EXIT_BOT_IMPORT_FAILED = 3
#: A cancelled bot kept running; the process exits without waiting for it.
EXIT_BOT_STUCK = 4
#: The listening socket could not be bound or served; ``start_failed`` was sent.
EXIT_LISTEN_FAILED = 5

_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
logger = logging.getLogger("catflap.runtime")


@dataclass(frozen=True)
class ListenAddress:
    """A parsed ``--listen``: ``unix:/path`` or ``tcp:host:port`` (port 0 = any free port)."""

    kind: Literal["unix", "tcp"]
    path: str = ""
    host: str = ""
    port: int = 0


def parse_listen(spec: str) -> ListenAddress:
    """Parse ``--listen``; a relative unix path is made absolute (the runtime changes dir).

    Raises:
        ConfigError: not ``unix:PATH`` or ``tcp:HOST:PORT``.
    """
    kind, _, rest = spec.partition(":")
    if kind == "unix" and rest:
        return ListenAddress("unix", path=os.path.abspath(rest))
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if host and port.isdigit() and int(port) <= 65535:
            return ListenAddress("tcp", host=host, port=int(port))
    raise ConfigError("--listen", spec, "expected unix:/path/to.sock or tcp:HOST:PORT")


def _bind(address: ListenAddress) -> tuple[socket.socket, str]:
    """Bind the listening socket; returns it and the address to report (real port)."""
    if address.kind == "unix":
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.stat(address.path).st_mode):
                os.unlink(address.path)  # left behind by a runtime that was killed
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(address.path)
        return sock, f"unix:{address.path}"
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address.host, address.port))
    host, port = sock.getsockname()[:2]
    return sock, f"tcp:[{host}]:{port}" if family == socket.AF_INET6 else f"tcp:{host}:{port}"


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
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
        loop="uvloop" if _loop_factory() is not None else "asyncio",
        http="httptools",
        ws=ws,
        ws_per_message_deflate=WS_PER_MESSAGE_DEFLATE,
        ws_ping_interval=WS_PING_INTERVAL_S,
        ws_ping_timeout=WS_PING_TIMEOUT_S,
        ws_max_size=WS_MAX_SIZE_BYTES,
        lifespan="auto",
        access_log=False,
        log_level=log_level,
        # uvicorn's own logging config would give its loggers text handlers of their own; left
        # alone, they propagate to the root handler and come out in --log-format.
        log_config=None,
        # SIGTERM: sessions get PCC's SHUTDOWN_TIMEOUT before uvicorn cancels them.
        timeout_graceful_shutdown=int(limits.DRAIN_TIMEOUT_S),
    )


def _make_emitter(channel: ControlChannel | None) -> EventSink:
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


async def _drain(server: uvicorn.Server, registry: SessionRegistry) -> None:
    """Let running sessions finish, then stop the server (which no longer accepts)."""
    logger.info("x shutdown requested: draining %d session(s)", len(registry))
    await registry.wait_idle()
    server.should_exit = True


async def _control_loop(
    channel: ControlChannel, server: uvicorn.Server, registry: SessionRegistry, emit: EventSink
) -> None:
    drain: asyncio.Task[None] | None = None
    while True:
        try:
            msg = await channel.receive()
        except ControlProtocolError as exc:
            logger.warning("! ignoring a bad control line: %s", exc)
            continue
        if msg is None:
            logger.warning("x control channel closed (the pool is gone): stopping all sessions")
            registry.stop_all()
            # Let the handlers close their sockets with "session stopped" before uvicorn's
            # shutdown closes whatever is left with 1012.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(BOT_CANCEL_GRACE_S + 1):
                    await registry.wait_idle()
            server.should_exit = True
            return
        command = msg.get("command")
        if command == "ping" and isinstance(msg.get("seq"), int):
            await emit({"event": "pong", "seq": msg["seq"]})
        elif command == "stop_session" and isinstance(msg.get("session_id"), str):
            if not registry.stop(msg["session_id"]):
                logger.info("stop_session: no running session %s", msg["session_id"])
        elif command == "shutdown":
            # Stop accepting now, before the next command is read: the pool may rely on it.
            for listener in getattr(server, "servers", []):
                listener.close()
            drain = drain or asyncio.create_task(_drain(server, registry))
        else:
            logger.warning("! ignoring unknown control message %.200s", msg)


def split_agent_name(agent_name: str | None) -> tuple[str, str]:
    """``my-agent.my-org`` -> ``("my-agent", "my-org")``; standalone runtimes are
    ``("agent", "local")`` unless named."""
    if not agent_name:
        return "agent", "local"
    agent, dot, org = agent_name.rpartition(".")
    return (agent, org) if dot and agent and org else (agent_name, "local")


async def run_agent(
    *,
    bot_dir: Path,
    listen: str,
    control_fd: int | None = None,
    agent_name: str | None = None,
    log_level: str = "info",
    log_dir: Path | None = None,
) -> int:
    """Import the bot, serve ``/ws`` until told to stop, and return the exit code.

    Args:
        bot_dir: The folder holding ``bot.py``.
        listen: ``unix:/path/to.sock`` or ``tcp:HOST:PORT``.
        control_fd: The child end of the pool's ``socketpair()``; ``None`` runs standalone.
        agent_name: ``agent.org``: names log lines, metrics and the session log files.
        log_level: uvicorn's log level name.
        log_dir: Write each session's bot output below this folder (absolute: the bot's
            import changes the working directory); ``None``: don't.

    Returns:
        :data:`EXIT_OK`, :data:`EXIT_BOT_IMPORT_FAILED`, :data:`EXIT_LISTEN_FAILED` or
        :data:`EXIT_BOT_STUCK`.

    Raises:
        ConfigError: ``listen`` cannot be parsed.
    """
    address = parse_listen(listen)
    channel = None
    if control_fd is not None:
        control_sock = socket.socket(fileno=control_fd)
        control_sock.set_inheritable(False)  # a bot's subprocess must not keep the pool's EOF away
        channel = await ControlChannel.from_socket(control_sock)
    emit = _make_emitter(channel)
    try:
        loaded = load_bot(bot_dir)
    except BotImportError as exc:
        return await _start_failed(emit, channel, str(exc), EXIT_BOT_IMPORT_FAILED)
    # Import pipecat now rather than on the first session (~1 s of import time).
    logger.info("%s: session arguments are %s", agent_name or "agent", session_args_class())
    try:
        sock, reported = _bind(address)
    except OSError as exc:
        error = f"cannot listen on {listen}: {exc}"
        return await _start_failed(emit, channel, error, EXIT_LISTEN_FAILED)
    registry = SessionRegistry()
    agent, org = split_agent_name(agent_name)
    capture = None
    if log_dir is not None:
        # After the import: a bot may reset loguru's sinks at import time.
        capture = BotOutputCapture(SessionLogWriter(log_dir))
        capture.install()
    observers = Observers(
        agent=agent, org=org, metrics=RuntimeMetrics(f"{agent}.{org}"), capture=capture
    )
    app = create_app(loaded, registry=registry, emit=emit, observers=observers)
    server = uvicorn.Server(make_server_config(app, log_level=log_level))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    control: asyncio.Task[None] | None = None
    try:
        # uvicorn exposes no "started" event, only the flag.
        while not server.started and not serving.done():
            await asyncio.wait({serving}, timeout=0.01)
        if server.started:
            logger.info("%s: listening on %s, pid %d", agent_name or "agent", reported, os.getpid())
            if channel is None:
                print(f"catflap agent listening on {reported}", flush=True)
            else:
                await emit({"event": "ready", "address": reported, "pid": os.getpid()})
                control = asyncio.create_task(_control_loop(channel, server, registry, emit))
        await serving
    finally:
        if control is not None:
            control.cancel()
        if channel is not None:
            await channel.aclose()
        if address.kind == "unix":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(address.path)
        if capture is not None and not registry.stuck:
            capture.uninstall()
    if registry.stuck:
        return EXIT_BOT_STUCK
    return EXIT_OK if server.started else EXIT_LISTEN_FAILED


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="catflap agent", description=__doc__)
    parser.add_argument("--bot-dir", type=Path, default=Path("."), help="folder with bot.py")
    parser.add_argument("--listen", required=True, help="unix:/path/to.sock or tcp:HOST:PORT")
    parser.add_argument("--control-fd", type=int, default=None, help="pool control socket fd")
    parser.add_argument("--agent-name", default=None, help="agent name, for log lines")
    parser.add_argument("--log-level", default="info", choices=_LOG_LEVELS)
    parser.add_argument(
        "--log-format", default=LOG_FORMATS[0], choices=LOG_FORMATS, help="stderr line format"
    )
    parser.add_argument(
        "--log-dir",
        type=Path,
        default=None,
        help="write each session's bot output to DIR/<org>/<agent>/<session_id>.jsonl",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse options, run the agent and return the process exit code."""
    options = _parser().parse_args(argv)
    level = options.log_level if options.log_level != "trace" else "debug"
    log_format: LogFormat = options.log_format
    configure_logging(level, log_format)
    runner = asyncio.Runner(loop_factory=_loop_factory())
    try:
        code = runner.run(
            run_agent(
                bot_dir=options.bot_dir,
                listen=options.listen,
                control_fd=options.control_fd,
                agent_name=options.agent_name,
                log_level=options.log_level,
                log_dir=options.log_dir.resolve() if options.log_dir else None,
            )
        )
    except ConfigError as exc:
        print(f"catflap agent: {exc}", file=sys.stderr)
        code = EXIT_CONFIG
    if code == EXIT_BOT_STUCK:
        # asyncio.Runner.close() would wait forever for the bot that ignores cancellation.
        logging.shutdown()
        os._exit(code)
    runner.close()
    return code


if __name__ == "__main__":
    raise SystemExit(main())
