"""Attacks on the control API's HTTP handling (hardening issue, rows 2, 3 and 8).

- Row 2: a kept-alive connection's later requests get the first request's head limits (431,
  414), with flat memory while the attacker keeps sending.
- Row 3: every request has a head deadline and a body deadline (408), and an idle kept-alive
  connection is closed.
- Row 8: the sessions and logs APIs answer 400 ``bad_request`` to huge or negative integers.

The attacks run over real sockets against one real gateway (``catflap serve`` in its own
process); each checks afterwards that ordinary traffic still works. Unit tests of
:class:`~catflap.gateway.apiprotocol.BoundedHttpToolsProtocol` on a fake transport, with short
clocks, come last.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from uvicorn.server import ServerState

from catflap.contract import limits
from catflap.contract.errors import RequestRejected
from catflap.gateway.apiprotocol import BoundedHttpToolsProtocol

from ..conftest import PRIVATE_KEY, PUBLIC_KEY, seconds
from .conftest import OPEN_AGENT, HostileGateway, MiB, RssWatch, assert_healthy, http_get

pytestmark = pytest.mark.slow  # end to end: real gateways, agent processes

#: How late a deadline may be seen to pass (scheduling, a loaded machine).
MARGIN_S = 3.0
#: How early: the clock starts at the server's first read of the request, slightly after our
#: send, so an answer may only come a little before the limit as measured here.
EARLY_S = 0.5

LIVEZ = b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


# --- a blocking HTTP/1.1 client that keeps its connection ----------------------------------
#
# Blocking sockets, not asyncio streams: after the gateway refuses a request it closes with
# the attacker's bytes unread, so the kernel answers with RST. recv() still returns the
# refusal that arrived before it; asyncio's StreamReader would raise instead.


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def assert_refusal(response: Response, status: int, code: str) -> None:
    """``response`` is catflap's JSON error with ``status`` and ``code``."""
    assert response.status == status, (response.status, response.body[:300])
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["code"] == code, body
    assert set(body) == {"error", "code"} and body["error"]


class Client:
    """One kept-alive connection to the gateway."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=seconds(30))
        self._buffer = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> bool:
        """Send ``data``; False once the gateway has closed the connection."""
        try:
            self.sock.sendall(data)
        except OSError:
            return False
        return True

    def _fill(self) -> bool:
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        self._buffer += chunk
        return bool(chunk)

    def response(self, *, timeout: float = 10.0) -> Response:
        """The next whole response (Content-Length framed, as catflap's all are)."""
        self.sock.settimeout(seconds(timeout))
        while b"\r\n\r\n" not in self._buffer:
            if not self._fill():
                raise AssertionError(f"connection closed before a response: {self._buffer!r}")
        head, _, self._buffer = self._buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(self._buffer) < length:
            if not self._fill():
                raise AssertionError("connection closed inside a response body")
        body, self._buffer = self._buffer[:length], self._buffer[length:]
        return Response(int(lines[0].split(" ")[1]), headers, body)

    def closed_within(self, timeout: float) -> bool:
        """Whether the gateway closes the connection within ``timeout`` (sending nothing)."""
        self.sock.settimeout(seconds(timeout))
        try:
            return not self._fill() and not self._buffer
        except TimeoutError:
            return False

    def kept_alive(self) -> None:
        """One ordinary request on this connection, answered and kept open."""
        assert self.send(LIVEZ)
        response = self.response()
        assert response.status == 200 and response.json() == {"status": "ok"}
        assert response.headers.get("connection") != "close"


def kept_alive_client(port: int) -> Client:
    client = Client(port)
    client.kept_alive()
    return client


def assert_no_tracebacks(gw: HostileGateway, since: int) -> None:
    """No gateway log line since line ``since`` says the API crashed."""
    text = "\n".join(gw.log[since:])
    assert "Traceback" not in text and "Exception in ASGI application" not in text, text[-3000:]


# --- row 2: later requests get the first request's head limits -----------------------------


def test_a_huge_head_on_a_kept_alive_connection_is_431_with_flat_memory(
    gateway: HostileGateway,
) -> None:
    client = kept_alive_client(gateway.port)
    filler = b"a" * 8000
    total = 40 * MiB
    sent = [0]

    def attack() -> None:
        if not client.send(b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\n"):
            return
        index = 0
        while sent[0] < total:
            batch = b"".join(b"X-Filler-%05d: %s\r\n" % (index + i, filler) for i in range(8))
            index += 8
            if not client.send(batch):
                return
            sent[0] += len(batch)

    started = time.monotonic()
    with RssWatch(gateway.pid) as rss:
        sender = threading.Thread(target=attack, daemon=True)
        sender.start()
        response = client.response(timeout=10)
        elapsed = time.monotonic() - started
        assert client.closed_within(5)
        sender.join(seconds(10))
        assert not sender.is_alive()
    client.close()
    assert_refusal(response, 431, "headers_too_large")
    assert elapsed < seconds(MARGIN_S)
    rss.assert_below(16 * MiB)
    assert_healthy(gateway)


def _lines(count: int) -> bytes:
    return b"".join(b"X-Line-%03d: v\r\n" % i for i in range(count))


@pytest.mark.parametrize(
    ("head", "status", "code"),
    [
        (
            b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\n" + _lines(128) + b"\r\n",
            431,
            "headers_too_large",
        ),  # 129 lines with Host
        (
            b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n",
            431,
            "headers_too_large",
        ),
        (
            b"GET /livez?q=" + b"a" * limits.REQUEST_URL_MAX_BYTES + b" HTTP/1.1\r\n"
            b"Host: 127.0.0.1\r\n\r\n",
            414,
            "url_too_long",
        ),
    ],
    ids=["129-header-lines", "9-KB-header-line", "long-url"],
)
def test_a_second_request_past_a_head_limit_is_refused_and_closed(
    gateway: HostileGateway, head: bytes, status: int, code: str
) -> None:
    client = kept_alive_client(gateway.port)
    started = time.monotonic()
    client.send(head)
    response = client.response(timeout=10)
    elapsed = time.monotonic() - started
    assert client.closed_within(5)
    client.close()
    assert_refusal(response, status, code)
    assert elapsed < seconds(MARGIN_S)
    assert_healthy(gateway)


def test_the_limits_themselves_are_accepted_on_a_second_request(gateway: HostileGateway) -> None:
    client = kept_alive_client(gateway.port)
    line_value = b"v" * (limits.REQUEST_HEADER_LINE_MAX_BYTES - len(b"X-Long: \r\n"))
    heads = [
        b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\n" + _lines(127) + b"\r\n",  # 128 lines
        b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Long: " + line_value + b"\r\n\r\n",
    ]
    started = time.monotonic()
    for head in heads:
        assert client.send(head)
        assert client.response().status == 200
    assert time.monotonic() - started < seconds(MARGIN_S)
    client.close()
    assert_healthy(gateway)


# --- row 3: deadlines on every request, bounded idle keep-alive ----------------------------


def _answer_after(client: Client, send_first: bytes) -> tuple[Response, float, bool]:
    """Send ``send_first``, wait for the answer: (answer, seconds it took, closed after)."""
    assert client.send(send_first)
    started = time.monotonic()
    response = client.response(timeout=limits.REQUEST_HEAD_TIMEOUT_S + MARGIN_S)
    elapsed = time.monotonic() - started
    return response, elapsed, client.closed_within(5)


def _head_stall(port: int, first_bytes: bytes) -> tuple[Response, float, bool]:
    client = kept_alive_client(port)
    try:
        return _answer_after(client, first_bytes)
    finally:
        client.close()


def _start_head(body_length: int) -> bytes:
    return (
        f"POST /v1/public/{OPEN_AGENT}/start HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {PUBLIC_KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {body_length}\r\n\r\n"
    ).encode()


def _body_dribble(port: int, *, second: bool) -> tuple[Response, float, bool]:
    """A /start whose body comes at 1 byte per second; on a fresh or a kept-alive connection."""
    client = kept_alive_client(port) if second else Client(port)
    body = b'{"transport": "websocket", "pad": "' + b"x" * 40 + b'"}'
    try:
        assert client.send(_start_head(len(body)))
        started = time.monotonic()
        client.sock.settimeout(1.0)
        for byte in body:
            if time.monotonic() - started > seconds(limits.REQUEST_BODY_TIMEOUT_S + MARGIN_S):
                break
            try:
                if client._fill():
                    break  # the answer is arriving
            except TimeoutError:
                if not client.send(bytes([byte])):
                    break
        response = client.response(timeout=MARGIN_S)
        elapsed = time.monotonic() - started
        return response, elapsed, client.closed_within(5)
    finally:
        client.close()


def _idle(port: int) -> tuple[float, bool]:
    client = kept_alive_client(port)
    try:
        started = time.monotonic()
        closed = client.closed_within(limits.KEEPALIVE_IDLE_TIMEOUT_S + MARGIN_S)
        return time.monotonic() - started, closed
    finally:
        client.close()


def test_stalled_heads_bodies_and_idle_connections_are_closed_in_time(
    gateway: HostileGateway,
) -> None:
    # All at once, so the module waits one deadline rather than one per attack; several of
    # each, since the attack is to hold many connections.
    jobs: dict[str, Callable[[], Any]] = {}
    for i in range(5):
        jobs[f"one byte {i}"] = lambda: _head_stall(gateway.port, b"G")
    jobs["half a head"] = lambda: _head_stall(gateway.port, b"GET /livez HTTP/1.1\r\nHost: x")
    jobs["a stray CRLF"] = lambda: _head_stall(gateway.port, b"\r\n")
    jobs["/start body at 1 B/s, first request"] = lambda: _body_dribble(gateway.port, second=False)
    jobs["/start body at 1 B/s, second request"] = lambda: _body_dribble(gateway.port, second=True)
    for i in range(3):
        jobs[f"idle {i}"] = lambda: _idle(gateway.port)
    since = len(gateway.log)
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
        results = {name: future.result(timeout=seconds(60)) for name, future in futures.items()}

    for name, result in results.items():
        if name.startswith("idle"):
            elapsed, closed = result
            assert closed, name
            assert (
                limits.KEEPALIVE_IDLE_TIMEOUT_S - EARLY_S
                < elapsed
                < limits.KEEPALIVE_IDLE_TIMEOUT_S + seconds(MARGIN_S)
            ), (name, elapsed)
            continue
        response, elapsed, closed = result
        assert_refusal(response, 408, "request_timeout")
        assert closed, name
        limit = limits.REQUEST_BODY_TIMEOUT_S if "body" in name else limits.REQUEST_HEAD_TIMEOUT_S
        assert limit - EARLY_S < elapsed < limit + seconds(MARGIN_S), (name, elapsed)
    assert_no_tracebacks(gateway, since)
    status, metrics = http_get(gateway.port, "/metrics")
    assert status == 200
    counted = [
        line
        for line in metrics.decode().splitlines()
        if line.startswith("catflap_handshake_refusals_total{")
        and 'reason="request_timeout"' in line
        and 'status="408"' in line
    ]
    assert counted and float(counted[0].rsplit(" ", 1)[1]) >= len(jobs) - 3, counted
    assert_healthy(gateway)


# --- row 8: bounded integers in the API ----------------------------------------------------

_BAD_INTS = ["9" * 30, "-1", "-" + "9" * 30, "1e30", str(limits.API_OFFSET_MAX + 1)]


def test_huge_and_negative_integers_are_400_in_the_sessions_and_logs_apis(
    gateway: HostileGateway,
) -> None:
    auth = f"Authorization: Bearer {PRIVATE_KEY}\r\n"
    since = len(gateway.log)
    started = time.monotonic()
    cases = 0
    for api in ("sessions", "logs"):
        for param in ("offset", "limit"):
            for value in _BAD_INTS:
                path = f"/v1/agents/{OPEN_AGENT}/{api}?{param}={value}"
                status, body = http_get(gateway.port, path, headers=auth)
                answer = json.loads(body)
                assert status == 400, (path, status, body[:300])
                assert answer["code"] == "bad_request" and param in answer["error"], answer
                cases += 1
        # The bound itself is a valid (empty) page.
        path = f"/v1/agents/{OPEN_AGENT}/{api}?offset={limits.API_OFFSET_MAX}"
        status, body = http_get(gateway.port, path, headers=auth)
        assert status == 200, (path, body[:300])
    assert cases == 2 * 2 * len(_BAD_INTS)
    assert time.monotonic() - started < seconds(10)
    assert_no_tracebacks(gateway, since)
    assert_healthy(gateway)


# --- unit tests: BoundedHttpToolsProtocol on a fake transport ------------------------------


class FakeTransport:
    """Records what the protocol writes; close() and abort() report connection_lost like
    asyncio; ``done`` once the protocol has shut the write side or closed."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closing = False
        self.eof = False
        self.aborted = False
        self.paused = False
        self.protocol: BoundedHttpToolsProtocol | None = None

    @property
    def done(self) -> bool:
        return self.closing or self.eof

    def write(self, data: bytes) -> None:
        assert not self.eof and not self.closing, "write after the write side was shut"
        self.written += data

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            if self.protocol is not None:
                asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.aborted = True
        self.close()

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Reads the whole body, answers 200 ``ok``; ``/stream`` starts its answer at once and
    waits for the disconnect; ``/slow`` takes 0.3 s."""
    assert scope["type"] == "http"
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        while (await receive())["type"] != "http.disconnect":
            pass
        return
    if scope["path"] == "/slow":
        await asyncio.sleep(0.3)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        if not message.get("more_body"):
            break
    headers = [(b"content-length", b"2"), (b"content-type", b"text/plain")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"ok"})


@dataclass
class Harness:
    protocol: BoundedHttpToolsProtocol
    transport: FakeTransport
    refusals: list[RequestRejected] = field(default_factory=list)

    def feed(self, *reads: bytes) -> None:
        for data in reads:
            self.protocol.data_received(data)

    def responses(self) -> list[Response]:
        out: list[Response] = []
        data = bytes(self.transport.written)
        while b"\r\n\r\n" in data:
            head, _, data = data.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            out.append(Response(int(lines[0].split(" ")[1]), headers, data[:length]))
            data = data[length:]
        return out


@pytest.fixture
async def harness() -> AsyncIterator[Callable[[], Harness]]:
    config = uvicorn.Config(
        _app, http="httptools", ws="none", lifespan="off", log_config=None, access_log=False
    )
    config.load()
    made: list[Harness] = []

    def make() -> Harness:
        transport = FakeTransport()
        refusals: list[RequestRejected] = []
        protocol = BoundedHttpToolsProtocol(
            config=config, server_state=ServerState(), app_state={}, on_refusal=refusals.append
        )
        transport.protocol = protocol
        protocol.connection_made(transport)
        made.append(Harness(protocol, transport, refusals))
        return made[-1]

    yield make
    for each in made:  # what a test left open: end its app task and timer
        if not each.transport.closing:
            each.transport.closing = True
            each.protocol.connection_lost(None)
    this = asyncio.current_task()
    await _until(lambda: all(task is this for task in asyncio.all_tasks()))


async def _until(condition: Callable[[], bool], *, timeout: float = 5.0) -> None:
    """Let the loop run (the app's tasks, the protocol's callbacks) until ``condition()``."""
    async with asyncio.timeout(seconds(timeout)):
        while not condition():
            await asyncio.sleep(0.001)


async def _answered(h: Harness, count: int) -> None:
    """Wait (bounded) until ``h`` has written ``count`` answers."""
    await _until(lambda: len(h.responses()) >= count)


def _split(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


_GET = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"
_BIG_HEADS = {
    "url": (b"GET /?" + b"a" * limits.REQUEST_URL_MAX_BYTES + b" HTTP/1.1\r\n\r\n", 414),
    "lines": (b"GET / HTTP/1.1\r\n" + _lines(limits.REQUEST_HEADER_LINES_MAX + 1) + b"\r\n", 431),
    "line": (
        b"GET / HTTP/1.1\r\nX: " + b"a" * limits.REQUEST_HEADER_LINE_MAX_BYTES + b"\r\n\r\n",
        431,
    ),
    "head": (
        b"GET / HTTP/1.1\r\n"
        + b"".join(b"X-%03d: %s\r\n" % (i, b"a" * 1000) for i in range(40))
        + b"\r\n",
        431,
    ),
    "unfinished": (b"GET / HTTP/1.1\r\nX: " + b"a" * (4 * limits.REQUEST_HEAD_MAX_BYTES), 431),
}


@pytest.mark.parametrize("which", sorted(_BIG_HEADS))
@pytest.mark.parametrize("read_size", [1 << 20, 1024], ids=["one-read", "1-KiB-reads"])
@pytest.mark.parametrize("second", [False, True], ids=["first", "second"])
async def test_unit_every_request_gets_the_head_limits(
    harness: Callable[[], Harness], which: str, read_size: int, second: bool
) -> None:
    h = harness()
    if second:
        h.feed(_GET)
        await _answered(h, 1)
        assert [r.status for r in h.responses()] == [200]
    head, status = _BIG_HEADS[which]
    h.feed(*_split(head, read_size))
    await _until(lambda: h.transport.done)
    answers = h.responses()
    assert [r.status for r in answers] == [200] * second + [status]
    assert json.loads(answers[-1].body)["code"] == (
        "url_too_long" if status == 414 else "headers_too_large"
    )
    assert h.transport.done
    assert [r.status for r in h.refusals] == [status]


async def test_unit_heads_at_the_limits_pass_in_any_reads(harness: Callable[[], Harness]) -> None:
    line = b"X: " + b"a" * (limits.REQUEST_HEADER_LINE_MAX_BYTES - 5) + b"\r\n"  # 8 KiB, CRLF in
    heads = [
        b"GET /?" + b"a" * (limits.REQUEST_URL_MAX_BYTES - 2) + b" HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + _lines(limits.REQUEST_HEADER_LINES_MAX) + b"\r\n",
        b"GET / HTTP/1.1\r\n" + line * 3 + b"\r\n",  # about 24 KiB
    ]
    for read_size in (1 << 20, 1000, 7):
        h = harness()
        for head in heads:
            h.feed(*_split(head, read_size))
            await asyncio.sleep(0)  # the app may answer between two heads, or after both
        await _answered(h, len(heads))
        assert [r.status for r in h.responses()] == [200] * len(heads), read_size
        assert not h.refusals and not h.transport.done


async def test_unit_a_pipelined_head_after_a_big_body_is_not_counted_with_it(
    harness: Callable[[], Harness],
) -> None:
    # One read ends a 60 KiB body and begins the next head: only that head's own bytes count.
    body = b"b" * 60_000
    first = b"POST / HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    second = b"GET / HTTP/1.1\r\nHost: t\r\nX-Pad: " + b"p" * 4000 + b"\r\n\r\n"
    h = harness()
    h.feed(first + second[:100], second[100:])
    await _answered(h, 2)
    assert [r.status for r in h.responses()] == [200, 200]
    assert not h.refusals


async def test_unit_chunked_trailers_are_bounded(harness: Callable[[], Harness]) -> None:
    start = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-T: "
    h = harness()
    h.feed(start, *_split(b"a" * (2 * limits.REQUEST_HEAD_MAX_BYTES), 4096))
    await _until(lambda: h.transport.done)
    [answer] = h.responses()
    assert_refusal(answer, 431, "headers_too_large")
    # A long chunked body in small reads is no trailer: it passes.
    h = harness()
    h.feed(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(200):
        h.feed(b"400\r\n", b"x" * 1024 + b"\r\n")
    h.feed(b"0\r\nX-Done: 1\r\n\r\n")
    await _answered(h, 1)
    assert [r.status for r in h.responses()] == [200]


async def test_unit_malformed_bytes_are_a_json_400(harness: Callable[[], Harness]) -> None:
    h = harness()
    h.feed(_GET)
    await _answered(h, 1)
    h.feed(b"GARBAGE\r\n\r\n")
    await _until(lambda: h.transport.done)
    answers = h.responses()
    assert [r.status for r in answers] == [200, 400]
    assert_refusal(answers[1], 400, "malformed_request")
    assert h.transport.done


@pytest.fixture
def short_clocks(monkeypatch: pytest.MonkeyPatch) -> float:
    """Head and body deadlines of 0.1 s (the protocol reads them from limits at run time)."""
    monkeypatch.setattr(limits, "REQUEST_HEAD_TIMEOUT_S", 0.1)
    monkeypatch.setattr(limits, "REQUEST_BODY_TIMEOUT_S", 0.1)
    return 0.1


@pytest.mark.parametrize(
    "stall",
    [
        b"G",
        b"\r\n",
        b"GET / HTTP/1.1\r\nHost: t\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 9\r\n\r\nab",
    ],
    ids=["one-byte", "crlf", "half-head", "half-body"],
)
async def test_unit_a_stalled_head_or_body_is_408_at_its_deadline(
    harness: Callable[[], Harness], short_clocks: float, stall: bytes
) -> None:
    h = harness()
    h.feed(_GET)
    await _answered(h, 1)
    h.feed(stall)
    await asyncio.sleep(short_clocks / 2)  # before the deadline: nothing yet
    assert len(h.responses()) == 1 and not h.transport.done
    await _until(lambda: h.transport.done)
    answers = h.responses()
    assert [r.status for r in answers] == [200, 408]
    assert_refusal(answers[1], 408, "request_timeout")
    assert h.transport.done


async def test_unit_a_request_in_one_read_arms_no_timer(
    harness: Callable[[], Harness], short_clocks: float
) -> None:
    h = harness()
    h.feed(_GET + _GET)
    assert h.protocol._timer is None
    h.feed(b"GET / HTTP/1.1\r\n")
    assert h.protocol._timer is not None
    h.feed(b"\r\n")
    assert h.protocol._timer is None
    await asyncio.sleep(2 * short_clocks)  # past any deadline: still no 408
    assert [r.status for r in h.responses()] == [200, 200, 200]


async def test_unit_a_body_stall_after_the_answer_began_only_closes(
    harness: Callable[[], Harness], short_clocks: float
) -> None:
    h = harness()
    h.feed(b"POST /stream HTTP/1.1\r\nContent-Length: 9\r\n\r\nab")
    await _until(lambda: h.transport.done)
    assert h.transport.written.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"408" not in h.transport.written and b"request_timeout" not in h.transport.written


async def test_unit_no_clock_runs_out_while_the_server_is_the_one_waiting(
    harness: Callable[[], Harness], short_clocks: float
) -> None:
    # uvicorn paused reading (as for a pipelined request, or a body the app has not taken):
    # /slow takes 0.3 s before it reads the body, and reading resumes when it does.
    h = harness()
    h.feed(b"POST /slow HTTP/1.1\r\nContent-Length: 9\r\n\r\nab")
    h.protocol.flow.pause_reading()
    await asyncio.sleep(0.25)  # past the body deadline, while /slow has not read yet
    assert not h.transport.done
    await _until(lambda: h.transport.done)
    [answer] = h.responses()
    assert_refusal(answer, 408, "request_timeout")
    # The answer to an earlier request is still owed: no 408 that could be read as it.
    h = harness()
    h.feed(b"GET /slow HTTP/1.1\r\n\r\nG")
    await asyncio.sleep(0.2)  # past the head deadline, while /slow has not answered
    assert not h.responses() and not h.transport.done
    await _until(lambda: h.transport.done)
    assert [r.status for r in h.responses()] == [200, 408]


async def test_unit_a_closed_connection_cancels_its_timer(
    harness: Callable[[], Harness], short_clocks: float
) -> None:
    h = harness()
    h.feed(b"GET / HTTP/1.1\r\n")
    timer = h.protocol._timer
    assert timer is not None
    h.protocol.connection_lost(None)
    assert timer.cancelled() and h.protocol._timer is None


async def test_unit_a_refusal_lingers_then_aborts(
    harness: Callable[[], Harness], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The answer goes out, the write side is shut, the peer's further bytes are dropped
    # unparsed, and the connection is aborted LINGERING_CLOSE_S later if the peer stays.
    monkeypatch.setattr(limits, "LINGERING_CLOSE_S", 0.1)
    h = harness()
    h.feed(b"GET / HTTP/1.1\r\n" + _lines(limits.REQUEST_HEADER_LINES_MAX + 1) + b"\r\n")
    h.feed(_GET, b"X" * 1000)
    await _until(lambda: h.transport.eof)
    assert [r.status for r in h.responses()] == [431]
    assert not h.transport.closing
    await _until(lambda: h.transport.aborted)
    # A peer that floods past LINGERING_CLOSE_MAX_BYTES meanwhile is cut at once.
    h = harness()
    h.feed(b"GET / HTTP/1.1\r\n" + _lines(limits.REQUEST_HEADER_LINES_MAX + 1) + b"\r\n")
    h.feed(b"X" * limits.LINGERING_CLOSE_MAX_BYTES)
    assert h.transport.eof and not h.transport.aborted
    h.feed(b"X")
    assert h.transport.aborted
    # A peer that closes first ends it at once (uvicorn's eof_received closes).
    h = harness()
    h.feed(b"GARBAGE\r\n\r\n")
    assert h.transport.eof
    h.protocol.connection_lost(None)
    assert h.protocol._timer is None


def test_two_faults_in_one_read_are_refused_once(gateway: HostileGateway) -> None:
    """A line over the limit and a malformed line in the same read: one 431, no second
    answer written after the write side was shut (that raised inside data_received)."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=seconds(10)) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while b"\r\n\r\n" not in first:
            first += sock.recv(65536)
        head, _, body = first.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        while len(body) < length:
            body += sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 ")
        long_line = b"X: " + b"v" * limits.REQUEST_HEADER_LINE_MAX_BYTES + b"\r\n"
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n" + long_line + b"Y: b\r\nbad\x01\r\n\r\n")
        data = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                data += chunk
    assert data.count(b"HTTP/1.1 ") == 1, data[:500]
    assert data.startswith(b"HTTP/1.1 431 ")
    assert "Cannot call write() after write_eof()" not in gateway.log_text()
    assert_healthy(gateway)
