"""The runtime's listening socket: ``--listen`` parsed, bound, and removed at exit."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from dataclasses import dataclass
from typing import Literal

from catflap.contract.errors import ConfigError

__all__ = ["ListenAddress", "bind_listener", "parse_listen", "remove_listener"]


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


def bind_listener(address: ListenAddress) -> tuple[socket.socket, str]:
    """Bind the listening socket; returns it and the address to report (the real port).

    Raises:
        OSError: the address cannot be bound.
    """
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


def remove_listener(address: ListenAddress) -> None:
    """Remove a unix socket's file, so that no stale path outlives the runtime."""
    if address.kind == "unix":
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address.path)
