"""Harness for attacks on a real gateway: ``catflap serve`` in its own process, its memory
read from ``/proc``, and a check that ordinary traffic still works afterwards.

The gateway runs as a subprocess so that its RSS is its own (the test process's allocations
would hide a leak or fake one). Every attack is bounded in time and count and talks only to
127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from ..conftest import (
    ECHO,
    PRIVATE_KEY,
    PUBLIC_KEY,
    catflap_serve,
    seconds,
)

#: The agents every hostile gateway serves: an open echo agent and a token agent.
OPEN_AGENT = "echo"
TOKEN_AGENT = "guarded"
ORG = "my-org"
#: A fixed key ring, so a test may restart the gateway and keep its tokens valid.
TOKEN_KEYS = "k1:adversarial-secret-0123456789abcdef"


def hostile_config(directory: Path, *, extra: str = "", agents: str = "") -> Path:
    """A catflap.toml with the two agents; ``extra`` is appended at the top level (before the
    tables), ``agents`` after them."""
    text = (
        'listen = "127.0.0.1:0"\n'
        'public_url = "ws://127.0.0.1:8080"\n'
        f'state_dir = "{directory / "state"}"\n'
        f"{extra}\n"
        f"[organizations.{ORG}]\n"
        f'public_keys = ["{PUBLIC_KEY}"]\nprivate_keys = ["{PRIVATE_KEY}"]\n'
        f"[organizations.{ORG}.agents.{OPEN_AGENT}]\n"
        f'path = "{ECHO}"\n'
        f"[organizations.{ORG}.agents.{OPEN_AGENT}.scaling]\n"
        "min_agents = 1\nmax_agents = 2\n"
        f"[organizations.{ORG}.agents.{TOKEN_AGENT}]\n"
        f'path = "{ECHO}"\nwebsocket_auth = "token"\n'
        f"[organizations.{ORG}.agents.{TOKEN_AGENT}.scaling]\n"
        "min_agents = 0\nmax_agents = 1\n"
        f"{agents}"
    )
    path = directory / "catflap.toml"
    path.write_text(text)
    return path


@dataclass
class HostileGateway:
    """A running ``catflap serve`` under attack."""

    pid: int
    port: int
    directory: Path
    log: list[str] = field(default_factory=list)

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def rss(self) -> int:
        """The gateway process's resident set, in bytes."""
        return rss_of(self.pid)

    def log_text(self) -> str:
        return "\n".join(self.log)


def rss_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


class RssWatch:
    """Samples a process's RSS every 10 ms on a thread; ``growth`` is peak minus baseline."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.baseline = rss_of(pid)
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, rss_of(self.pid))
            except (OSError, AssertionError):
                return
            self._stop.wait(0.01)

    def __enter__(self) -> RssWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_of(self.pid))

    @property
    def growth(self) -> int:
        return self.peak - self.baseline

    def assert_below(self, limit: int) -> None:
        assert self.growth < limit, (
            f"gateway RSS grew {self.growth / 2**20:.1f} MiB (limit {limit / 2**20:.0f} MiB)"
        )


MiB = 1024 * 1024


@contextmanager
def hostile_gateway(
    *,
    extra: str = "",
    agents: str = "",
    args: list[str] | None = None,
    directory: Path | None = None,
) -> Iterator[HostileGateway]:
    """``catflap serve --config`` on 127.0.0.1:0 with :func:`hostile_config`; waits until the
    open agent has a ready instance. ``directory`` keeps state across restarts."""
    own = directory is None
    workdir = Path(tempfile.mkdtemp(prefix="cfadv")) if directory is None else directory
    try:
        config = hostile_config(workdir, extra=extra, agents=agents)
        with catflap_serve(
            ["--config", str(config), *(args or [])], env={"CATFLAP_TOKEN_KEYS": TOKEN_KEYS}
        ) as (proc, port, lines):
            gw = HostileGateway(proc.pid, port, workdir, lines)
            wait_until_serving(gw)
            yield gw
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)


def wait_until_serving(gw: HostileGateway) -> None:
    """Bounded poll until an echo session works (the warm instance is up)."""
    deadline = time.monotonic() + seconds(30)
    while True:
        try:
            asyncio.run(echo_once(gw.port))
            return
        except (OSError, AssertionError, TimeoutError, Exception):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


async def echo_once(port: int, *, timeout: float = 10.0) -> None:
    """One ordinary session on the open agent: greeting, then an exact echo."""
    async with asyncio.timeout(seconds(timeout)):
        async with connect(f"ws://127.0.0.1:{port}/ws/generic/{OPEN_AGENT}.{ORG}") as ws:
            greeting = json.loads(await ws.recv())
            assert "session_id" in greeting
            await ws.send(b"\x00\x01ping")
            assert await ws.recv() == b"\x00\x01ping"


def http_get(
    port: int, path: str, *, headers: str = "", timeout: float = 10.0
) -> tuple[int, bytes]:
    """A one-shot HTTP/1.1 GET with ``Connection: close``: (status, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=seconds(timeout)) as sock:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{headers}\r\n".encode()
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def assert_healthy(gw: HostileGateway) -> None:
    """After an attack: a normal session, /metrics and the sessions API all still work."""
    asyncio.run(echo_once(gw.port))
    status, body = http_get(gw.port, "/metrics")
    assert status == 200 and b"catflap_" in body, (status, body[:200])
    status, body = http_get(
        gw.port,
        f"/v1/agents/{OPEN_AGENT}/sessions",
        headers=f"Authorization: Bearer {PRIVATE_KEY}\r\n",
    )
    assert status == 200, (status, body[:300])
    assert isinstance(json.loads(body), dict | list)


@pytest.fixture(scope="module")
def gateway() -> Iterator[HostileGateway]:
    """One hostile gateway shared by a module's attacks (each attack checks health after)."""
    with hostile_gateway() as gw:
        yield gw


def close_code_of(frame: bytes) -> int:
    """The code of an unmasked server close frame (first frame in ``frame``)."""
    assert frame[0] & 0x0F == 0x8, f"not a close frame: {frame[:16]!r}"
    return int.from_bytes(frame[2:4], "big")


async def read_until_closed(reader: asyncio.StreamReader, *, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (bounded in time)."""
    data = b""
    async with asyncio.timeout(seconds(timeout)):
        while chunk := await reader.read(65536):
            data += chunk
    return data
