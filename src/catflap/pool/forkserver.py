"""Cold starts in milliseconds: fork instances from a runtime that has already imported.

A fresh runtime pays for an interpreter boot, FastAPI and uvicorn (about 0.5 s) and the bot's
imports (Pipecat: about 0.7 s) before it can take a session. :class:`ForkServerLauncher` keeps
one *fork server* per agent folder: a process that imported all of that once, holds no event
loop and no threads, and forks a new instance on request. The child runs ``catflap agent``'s
``main`` with the same options a fresh process gets; it imports ``bot.py`` again (its module
state is fresh, and its dependencies are already loaded), so every instance still starts from
a clean ``bot`` module.

Protocol over a ``SOCK_SEQPACKET`` socketpair: the launcher sends ``{"args": [...], "env":
{...}}``, the child's options and its whole environment, as JSON with the child's
control-channel fd attached (``SCM_RIGHTS``); the fork server answers ``{"pid": N}``. End of
file means the gateway is gone: the fork server exits (instances live on until their own
control channels close). The fork server ignores ``SIGCHLD`` so the kernel reaps
its children; the launcher watches them through ``pidfd``.

Environment: the fork server itself runs with the agent's environment *without* its secret set
(:func:`~catflap.pool.environment.instance_environment` with no secrets), so what it preloads
never sees a secret, and a changed set needs no new fork server. The child replaces
``os.environ`` with the environment it was sent (secrets included, read at this launch) before
it imports ``bot.py``; and the fork server forgets every module it imported from the bot's
folder, so that ``bot.py``'s sibling modules (a ``settings.py`` reading the environment at
import) are imported again in each child, with its secrets. Libraries from site-packages stay
preloaded: one that reads the environment at import time sees none of the secrets (PCC's pods
have them from the start); such a library is best imported inside ``bot()``, or started with
``fork_server = false``.

No bot code runs in the fork server: it reads ``bot.py`` and imports the modules it imports
(:func:`bot_dependencies`; the bot's own sibling modules excepted), so an instance starts from
a state that no bot code has touched, and ``bot.py`` and its siblings are imported afresh in
each instance. Memory (:mod:`catflap.runtime.memory`): before each fork the fork server
collects and freezes its objects, so that the children keep sharing them, it imports what the
runtime would import only once serving (uvicorn's protocols, FastAPI's lazy imports), and it
warms native libraries' process-wide state once; see ``docs/benchmarks.md`` for what each
saves.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import importlib
import importlib.util
import json
import logging
import os
import signal
import socket
import sys
import traceback
from pathlib import Path

from catflap.config import AgentSpec
from catflap.pool.launcher import ProcessRef, SubprocessLauncher
from catflap.runtime import memory

__all__ = [
    "FORK_MESSAGE_MAX_BYTES",
    "ForkServerLauncher",
    "ForkedRef",
    "bot_dependencies",
    "serve_forks",
]

log = logging.getLogger("catflap.pool")

#: The largest fork request: an instance's options and environment (a secret set is at most
#: ``SECRET_SET_MAX_BYTES``, 64 KiB). One datagram, under the kernel's default 208 KiB socket
#: buffer (``net.core.wmem_default``). A larger request starts that instance the slow way.
FORK_MESSAGE_MAX_BYTES = 192 * 1024


class ForkedRef:
    """An instance forked by a fork server: not our child, so it is watched by ``pidfd``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[None] = loop.create_future()
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:  # already gone
            self._pidfd = None
            self._exited.set_result(None)
            return
        loop.add_reader(self._pidfd, self._on_exit)

    def _on_exit(self) -> None:
        if self._pidfd is not None:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if not self._exited.done():
            self._exited.set_result(None)

    async def wait(self) -> int | None:
        await asyncio.shield(self._exited)
        return None  # the fork server reaped it; its exit code is not ours to read

    def signal(self, sig: int) -> None:
        if not self._exited.done():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)


class _ForkServer:
    """The launcher's handle on one fork server process."""

    def __init__(self, process: asyncio.subprocess.Process, sock: socket.socket) -> None:
        self.process = process
        self.sock = sock
        self.lock = asyncio.Lock()

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    async def fork(self, request: bytes, control: socket.socket) -> int:
        async with self.lock:
            loop = asyncio.get_running_loop()
            # One datagram within the socket buffer: the kernel takes it at once even on a
            # non-blocking socket.
            socket.send_fds(self.sock, [request], [control.fileno()])
            answer = await loop.sock_recv(self.sock, FORK_MESSAGE_MAX_BYTES)
        if not answer:
            raise ConnectionError("the fork server exited")
        return int(json.loads(answer)["pid"])

    async def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.process.wait(), 5)
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


class ForkServerLauncher(SubprocessLauncher):
    """Start instances by forking a pre-imported runtime (one fork server per agent)."""

    def __init__(self, socket_dir: Path, **options: object) -> None:
        super().__init__(socket_dir, **options)  # type: ignore[arg-type]
        self._servers: dict[str, _ForkServer] = {}
        self._starting = asyncio.Lock()

    async def prepare(self, agent: AgentSpec) -> None:
        """Start the agent's fork server now, so that even the first cold start is fast."""
        await self._server(agent)

    async def _server(self, agent: AgentSpec) -> _ForkServer:
        async with self._starting:
            server = self._servers.get(agent.key)
            if server is not None:
                if server.alive:
                    return server
                await server.close()  # it died: release its socket, start another
            return await self._spawn_server(agent)

    async def _spawn_server(self, agent: AgentSpec) -> _ForkServer:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "catflap.pool.forkserver",
                str(theirs.fileno()), str(agent.config.path),
                pass_fds=(theirs.fileno(),),
                cwd=str(agent.config.path),
                env=self.base_environment(agent),
                stdin=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        server = self._servers[agent.key] = _ForkServer(process, ours)
        return server

    async def _start(
        self, agent: AgentSpec, args: list[str], control: socket.socket, env: dict[str, str]
    ) -> ProcessRef:
        request = json.dumps({"args": args, "env": env}).encode()
        if len(request) > FORK_MESSAGE_MAX_BYTES:
            # Never the values: only how large the environment is.
            log.warning(
                "! %s: an environment of %d bytes is too large for the fork server; starting "
                "this instance as a fresh interpreter",
                agent.key,
                len(request),
            )
            return await super()._start(agent, args, control, env)
        server = await self._server(agent)
        try:
            pid = await server.fork(request, control)
        except (ConnectionError, OSError):
            # A dead fork server never blocks a start: this one starts the slow way.
            await server.close()
            self._servers.pop(agent.key, None)
            return await super()._start(agent, args, control, env)
        return ForkedRef(pid)

    async def close(self) -> None:
        await asyncio.gather(*(server.close() for server in self._servers.values()))
        self._servers.clear()


def bot_dependencies(bot_dir: Path) -> list[str]:
    """The modules ``bot_dir/bot.py`` imports at module level, in order, without running it.

    ``import a.b`` gives ``a.b``; ``from a.b import c`` gives ``a.b`` and, when ``a.b`` is a
    package, ``a.b.c`` (which may be a submodule). Imports under ``if __name__ ==
    "__main__":`` and inside functions are left out (they are not what an instance runs at
    start), as are relative imports and modules from the bot's folder (those are bot code).
    A ``bot.py`` that cannot be read or parsed gives ``[]``; the instance reports the error.
    """
    try:
        tree = ast.parse((bot_dir / "bot.py").read_bytes())
    except (OSError, SyntaxError, ValueError):
        return []
    found: list[str] = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                found.extend(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.append(node.module)
                found.extend(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.If) and not _is_main_guard(node.test):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)
            elif isinstance(node, ast.With):
                visit(node.body)

    visit(tree.body)
    bot_dir = bot_dir.resolve()
    return [name for name in dict.fromkeys(found) if not _in_folder(name, bot_dir)]


def _is_main_guard(test: ast.expr) -> bool:
    return (
        isinstance(test, ast.Compare)
        and isinstance(test.left, ast.Name)
        and test.left.id == "__name__"
        and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators)
    )


def _in_folder(name: str, folder: Path) -> bool:
    """Whether the top-level module of ``name`` is found in ``folder`` (a sibling of bot.py)."""
    try:
        spec = importlib.util.find_spec(name.partition(".")[0])
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    places = [spec.origin] if spec.origin else list(spec.submodule_search_locations or [])
    return any(Path(place).resolve().is_relative_to(folder) for place in places if place)


def _import_quietly(name: str) -> None:
    """Import ``name`` if it is a module; anything it raises only means a slower start."""
    parent, _, attr = name.rpartition(".")
    loaded = sys.modules.get(parent) if parent else None
    if loaded is not None and (hasattr(loaded, attr) or not hasattr(loaded, "__path__")):
        return  # ``from a.b import c`` where ``c`` is a name in ``a.b``, not a submodule
    with contextlib.suppress(Exception):
        importlib.import_module(name)


def _preload(bot_dir: Path) -> None:
    """Import what every instance needs; failures only mean a slower start, never an error."""
    import catflap.runtime.main  # noqa: F401 - FastAPI, uvicorn, the runtime
    import pipecatcloud_system  # noqa: F401 - bots add routes to its app in the instance
    from catflap.runtime.args import session_args_class
    from catflap.runtime.botloader import BotImportError, load_bot

    session_args_class()  # pipecatcloud / pipecat, when installed
    if memory.step_on("scan-imports"):
        for name in bot_dependencies(bot_dir):
            _import_quietly(name)
    else:  # as before the memory work: bot.py itself runs here (for measuring only)
        with contextlib.suppress(BotImportError):
            load_bot(bot_dir)
    if memory.step_on("preload-runtime"):
        _preload_runtime_lazy_imports()
    if memory.step_on("warm-native"):
        memory.warm_shared_state()
    # An import of bot.py (or of what it imports) may have added routes to
    # pipecatcloud_system.app, bound to this process's module state. Each child must build its
    # app from its own import of bot.py: left here, these stale routes would come first and
    # answer with state no bot() of the child sees.
    sys.modules.pop("pipecatcloud_system", None)
    _forget_modules_under(bot_dir.resolve())


#: Modules FastAPI imports only when an app is built or started: ``pydantic.v1`` to check each
#: route's annotations (``fastapi._compat``), its telemetry lifespan when uvicorn starts it.
_FASTAPI_LAZY_IMPORTS = ("pydantic.v1", "fastapi.telemetry._runtime")


def _preload_runtime_lazy_imports() -> None:
    """Import now what the runtime imports only once it starts serving (the memory step
    ``preload-runtime``): uvicorn's protocol and lifespan classes (``Config.load()``), uvloop
    and httptools, and FastAPI's lazy imports.

    Imported in each instance, they were private to it (about 45 modules, ``pydantic.v1`` the
    largest): measured with ``bench/bots/vad-echo`` (2 instances), an idle instance's USS went
    from 18.9 to 13.0 MiB with them imported here, and one with a live session from 35.2 to
    30.7 MiB. Nothing here is bot code or reads the environment at import.
    """
    from fastapi import FastAPI

    from catflap.runtime.process import make_server_config

    with contextlib.suppress(Exception):  # only a slower, larger instance if it fails
        make_server_config(FastAPI(), log_level="warning").load()
    for name in _FASTAPI_LAZY_IMPORTS:
        _import_quietly(name)


def _forget_modules_under(folder: Path) -> None:
    """Drop the modules imported from ``folder`` (bot.py's siblings): each child imports them
    again, after its environment (its secrets) is in place. An interpreter or virtualenv that
    lives inside the folder stays preloaded (its extension modules could not load twice)."""
    installed = {Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve()}
    for name, module in list(sys.modules.items()):
        origin = getattr(module, "__file__", None)
        if not origin:
            continue
        path = Path(origin).resolve()
        if path.is_relative_to(folder) and not any(path.is_relative_to(p) for p in installed):
            del sys.modules[name]


def serve_forks(fd: int, bot_dir: Path) -> None:
    """The fork server's loop (blocking, no event loop, no threads)."""
    sock = socket.socket(fileno=fd)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps our children
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the gateway decides when we stop
    if memory.step_on("mmap-threshold"):
        memory.fix_mmap_threshold()  # before the preload allocates (and frees)
    _preload(bot_dir)
    freeze = memory.step_on("freeze")
    while True:
        if freeze:
            memory.freeze_for_fork()  # before the wait: a fork request is answered at once
        payload, fds, _, _ = socket.recv_fds(sock, FORK_MESSAGE_MAX_BYTES, 1)
        if not payload:
            return
        request = json.loads(payload)
        args: list[str] = request["args"]
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                sock.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                # The instance's own environment, before anything imports bot.py.
                os.environ.clear()
                os.environ.update(request["env"])
                from catflap.runtime.main import main

                code = main([*args, "--control-fd", str(fds[0])])
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        for received in fds:
            os.close(received)
        sock.send(json.dumps({"pid": pid}).encode())


if __name__ == "__main__":
    serve_forks(int(sys.argv[1]), Path(sys.argv[2]))
