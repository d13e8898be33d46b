"""Harness for attacks on a real gateway: ``catflap serve`` in its own process, its memory
read from ``/proc``, and a check that ordinary traffic still works afterwards.

The gateway runs as a subprocess so that its RSS is its own (the test process's allocations
would hide a leak or fake one). Every attack is bounded in time and count and talks only to
127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

from ..conftest import (
    ECHO,
    PRIVATE_KEY,
    PUBLIC_KEY,
    catflap_serve,
    seconds,
    upgrade_request,
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
        # test_serve_start.py finds the instances by this variable in their environment.
        'pass_env = ["ADVERSARIAL_TEST_START_MARKER"]\n'
        f"[organizations.{ORG}.agents.{OPEN_AGENT}.scaling]\n"
        "min_agents = 1\nmax_agents = 2\n"
        f"[organizations.{ORG}.agents.{TOKEN_AGENT}]\n"
        f'path = "{ECHO}"\nwebsocket_auth = "token"\n'
        'pass_env = ["ADVERSARIAL_TEST_START_MARKER"]\n'
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

    def wait_for_log(self, text: str, *, timeout: float = 5.0) -> str:
        """Bounded poll until ``text`` is in the log: lines arrive on a reader thread, so a line
        the gateway wrote just before answering may not have been read yet. Returns the log."""
        deadline = time.monotonic() + seconds(timeout)
        while text not in (logged := self.log_text()):
            assert time.monotonic() < deadline, f"{text!r} not logged: {logged[-2000:]}"
            time.sleep(0.02)
        return logged


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
        except Exception:  # not up yet: refused, reset, no greeting in time
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


def assert_healthy(
    gw: HostileGateway, *, metrics_port: int | None = None, metrics_headers: str = ""
) -> None:
    """After an attack: a normal session, /metrics and the sessions API all still work.
    ``metrics_port``/``metrics_headers``: for a gateway with ``metrics_listen``/``metrics_key``."""
    asyncio.run(echo_once(gw.port))
    status, body = http_get(metrics_port or gw.port, "/metrics", headers=metrics_headers)
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


def client_frame(
    opcode: int, payload: bytes, *, fin: bool = True, declared: int | None = None
) -> bytes:
    """A masked client frame; ``declared`` overrides the length field (an oversize header)."""
    n = len(payload) if declared is None else declared
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def open_upgrade(
    port: int, target: str, *, extra: str = ""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """Send a WebSocket upgrade and read the response head: (reader, writer, head)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(upgrade_request(target, extra=extra))
    await writer.drain()
    async with asyncio.timeout(seconds(10)):
        head = await reader.readuntil(b"\r\n\r\n")
    return reader, writer, head


def status_of(head: bytes) -> int:
    return int(head.split(b" ", 2)[1])


async def mint_token(port: int, agent: str, transport: str = "websocket") -> dict[str, Any]:
    """``POST /v1/public/{agent}/start`` with the public key: the /start answer."""
    body = json.dumps({"transport": transport}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"POST /v1/public/{agent}/start HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {PUBLIC_KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    data = await read_until_closed(reader, timeout=10)
    writer.close()
    head, _, payload = data.partition(b"\r\n\r\n")
    assert status_of(head) == 200, data[:300]
    result: dict[str, Any] = json.loads(payload)
    return result


class Flood:
    """A blocking client socket with a thread that sends ``frame`` in a loop (bounded in time
    and bytes) while the test reads what the gateway answers. Plain sockets, not asyncio:
    a reset after the gateway's close must not hide the close frame that came before it."""

    def __init__(self, sock: socket.socket, frame: bytes, *, seconds_max: float) -> None:
        self.sock = sock
        self.frame = frame
        self.seconds_max = seconds_max
        self.sent = 0
        self._thread = threading.Thread(target=self._pump, daemon=True)

    def _pump(self) -> None:
        deadline = time.monotonic() + self.seconds_max
        try:
            while time.monotonic() < deadline and self.sent < 1024 * MiB:
                self.sock.sendall(self.frame)
                self.sent += len(self.frame)
        except OSError:
            return  # the gateway closed: the flood is over

    def run(self) -> tuple[bytes, float]:
        """Flood until the gateway closes; (everything it sent, seconds until it closed)."""
        started = time.monotonic()
        self._thread.start()
        data = b""
        self.sock.settimeout(seconds(self.seconds_max + 5))
        try:
            while chunk := self.sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
        took = time.monotonic() - started
        self.sock.close()
        self._thread.join(timeout=seconds(self.seconds_max + 5))
        return data, took


def raw_upgrade(port: int, target: str, *, extra: str = "") -> tuple[socket.socket, bytes, bytes]:
    """A blocking upgrade: (socket, response head, bytes read past the head)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=seconds(10))
    sock.sendall(upgrade_request(target, extra=extra))
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return sock, head + b"\r\n\r\n", rest


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
