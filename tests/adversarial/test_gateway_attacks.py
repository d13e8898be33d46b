"""Attacks on the gateway's upgrade and relay paths (issue 11 rows 1, 4, 5, 6, 10, 12, and the
connection budget), each over real sockets against ``catflap serve`` in its own process.

Each test asserts the exact status or close code, a time bound with a margin, the gateway's
RSS growth while the attack runs, and that ordinary traffic still works afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Iterator

import pytest
import websockets
from websockets.asyncio.client import connect

from catflap.config import GatewaySettings
from catflap.contract import limits

from ..conftest import ROOT, seconds
from .conftest import (
    OPEN_AGENT,
    ORG,
    PRIVATE_KEY,
    TOKEN_AGENT,
    Flood,
    HostileGateway,
    MiB,
    RssWatch,
    assert_healthy,
    client_frame,
    close_code_of,
    hostile_gateway,
    http_get,
    mint_token,
    open_upgrade,
    raw_upgrade,
    read_until_closed,
    status_of,
)

pytestmark = pytest.mark.slow  # end to end: real gateways, agent processes

OPEN = f"/ws/generic/{OPEN_AGENT}.{ORG}"
SLOW_AGENT = "slow"
SLOW_BOT = ROOT / "tests" / "bots" / "slow_start"


@pytest.fixture(scope="module", params=["lane", "event-loop"])
def relay_gateway(request: pytest.FixtureRequest) -> Iterator[HostileGateway]:
    """A gateway per relay mode: the fast lane's thread, and the event loop."""
    extra = "" if request.param == "lane" else "[gateway]\nnative_relay = false\n"
    with hostile_gateway(extra=extra) as gw:
        yield gw


def json_body(data: bytes) -> dict[str, str]:
    body: dict[str, str] = json.loads(data.partition(b"\r\n\r\n")[2])
    return body


async def refused(port: int, request: bytes) -> tuple[int, dict[str, str], float]:
    """Send raw bytes, read the answer to the close: (status, JSON body, seconds taken)."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await read_until_closed(reader, timeout=10)
    writer.close()
    return status_of(data), json_body(data), time.monotonic() - started


def upgrade(target: str, headers: str) -> bytes:
    return (
        f"GET {target} HTTP/1.1\r\n{headers}Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode("latin-1")


# --- row 1: a provider endpoint flooded before its 'start' ------------------------------------


def _twilio_flood(port: int, frame: bytes, *, seconds_max: float) -> tuple[int, float]:
    """Upgrade /ws/twilio (no serviceHost, no token) and stream ``frame`` until closed."""
    sock, head, rest = raw_upgrade(port, "/ws/twilio")
    assert status_of(head) == 101
    data, took = Flood(sock, frame, seconds_max=seconds_max).run()
    return close_code_of(rest + data), took


def test_twilio_ping_flood_is_refused_with_1002_in_bounded_memory(
    relay_gateway: HostileGateway,
) -> None:
    """Row 1: 60 KB pings before 'start' (once +311 MiB): close 1002 at the first one."""
    ping = client_frame(0x9, b"p" * 60_000)  # within PROVIDER_OPENING_FRAME_MAX_BYTES
    with RssWatch(relay_gateway.pid) as watch:
        code, took = _twilio_flood(relay_gateway.port, ping, seconds_max=3)
    assert code == 1002
    assert took < seconds(1.0)
    watch.assert_below(16 * MiB)
    assert_healthy(relay_gateway)


def test_a_huge_control_frame_before_start_is_refused_at_its_header(
    relay_gateway: HostileGateway,
) -> None:
    """A close frame declaring 16 MiB in the opening: 1002 from its first two bytes, not a
    wait for a payload (nor 1008 as an oversized opening message)."""
    bad = client_frame(0x8, b"\x03\xe8", declared=16 * 1024 * 1024)
    with RssWatch(relay_gateway.pid) as watch:
        code, took = _twilio_flood(relay_gateway.port, bad + b"\x00" * 60_000, seconds_max=3)
    assert code == 1002
    assert took < seconds(1.0)
    watch.assert_below(16 * MiB)


def test_twilio_opening_is_bounded_in_frames_and_bytes(relay_gateway: HostileGateway) -> None:
    """Row 1: small valid pings, or big text frames, never make a 'start': close 1008 once the
    opening passes its frame or byte bound, long before the handshake deadline."""
    small_ping = client_frame(0x9, b"p" * limits.CONTROL_FRAME_MAX_PAYLOAD_BYTES)
    code, took = _twilio_flood(relay_gateway.port, small_ping, seconds_max=3)
    assert code == 1008
    assert took < seconds(1.0)
    connected = json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})
    text = client_frame(0x1, connected.encode())
    big = client_frame(0x1, json.dumps({"event": "x", "pad": "a" * 60_000}).encode())
    with RssWatch(relay_gateway.pid) as watch:
        code, took = _twilio_flood(relay_gateway.port, text + big + big, seconds_max=3)
    assert code == 1008
    assert took < seconds(1.0)
    watch.assert_below(16 * MiB)
    assert_healthy(relay_gateway)


def _twilio_start(service_host: str, pad: int = 0) -> bytes:
    start = {
        "event": "start",
        "sequenceNumber": "1",
        "start": {
            "accountSid": "AC" + "1" * 32,
            "streamSid": "MZ" + "2" * 32,
            "callSid": "CA" + "3" * 32,
            "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            "customParameters": {"_pipecatCloudServiceHost": service_host, "pad": "p" * pad},
        },
        "streamSid": "MZ" + "2" * 32,
    }
    return client_frame(0x1, json.dumps(start).encode())


def _opening_verdict(port: int, opening: bytes) -> bytes:
    """Send a Twilio opening; return the first bytes the gateway sends back (a close frame
    when refused, else what the echo bot sends: the replayed opening, echoed)."""
    sock, head, rest = raw_upgrade(port, "/ws/twilio")
    try:
        assert status_of(head) == 101
        sock.sendall(opening)
        sock.settimeout(seconds(10))
        while len(rest) < 2:
            rest += sock.recv(65536)
        return rest
    finally:
        sock.close()


@pytest.mark.parametrize(
    "pings", [limits.PROVIDER_OPENING_MAX_FRAMES - 1, limits.PROVIDER_OPENING_MAX_FRAMES]
)
def test_provider_opening_frame_bound_is_exact(gateway: HostileGateway, pings: int) -> None:
    """``PROVIDER_OPENING_MAX_FRAMES`` frames, the 'start' included, are an opening; one more
    is closed with 1008."""
    ping = client_frame(0x9, b"p" * 10)
    answer = _opening_verdict(gateway.port, ping * pings + _twilio_start(f"{OPEN_AGENT}.{ORG}"))
    if pings < limits.PROVIDER_OPENING_MAX_FRAMES:
        assert answer[0] & 0x0F != 0x8, answer[:40]  # the session started
    else:
        assert close_code_of(answer) == 1008


def test_provider_opening_byte_bound_is_exact(gateway: HostileGateway) -> None:
    """An opening over ``PROVIDER_OPENING_MAX_BYTES`` is closed with 1008; a frame over
    ``PROVIDER_OPENING_FRAME_MAX_BYTES`` too; a big 'start' within both starts the session."""
    host = f"{OPEN_AGENT}.{ORG}"
    base = len(_twilio_start(host))
    fits = _twilio_start(host, pad=limits.PROVIDER_OPENING_MAX_BYTES - base - 8)
    assert len(fits) <= limits.PROVIDER_OPENING_MAX_BYTES
    assert _opening_verdict(gateway.port, fits)[0] & 0x0F != 0x8
    ping = client_frame(0x9, b"p" * 100)
    over = ping + _twilio_start(host, pad=limits.PROVIDER_OPENING_MAX_BYTES - base)
    assert close_code_of(_opening_verdict(gateway.port, over)) == 1008
    huge = _twilio_start(host, pad=limits.PROVIDER_OPENING_FRAME_MAX_BYTES + 1)
    assert close_code_of(_opening_verdict(gateway.port, huge)) == 1008
    assert_healthy(gateway)


# --- row 4: heads the agent's parser would choke on ---------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        "Host: 127.0.0.1\r\nCookie: " + "c" * 9 * 1024 + "\r\n",
        "Host: 127.0.0.1\r\n" + "X-Empty:\r\n" * 130,
    ],
    ids=["9k-cookie", "130-headers"],
)
def test_heads_the_agent_would_refuse_get_431_before_any_slot(
    relay_gateway: HostileGateway, headers: str
) -> None:
    """Row 4: once a 30 s stall with a slot held; now 431 at the gateway, at once."""
    with RssWatch(relay_gateway.pid) as watch:
        for _ in range(20):
            status, body, took = asyncio.run(refused(relay_gateway.port, upgrade(OPEN, headers)))
            assert (status, body["code"]) == (431, "headers_too_large")
            assert took < seconds(1.0)
    watch.assert_below(16 * MiB)
    assert_healthy(relay_gateway)


def test_a_refused_peer_that_keeps_sending_still_gets_its_answer_then_is_cut_off(
    relay_gateway: HostileGateway,
) -> None:
    """Lingering close: a head that never ends gets 431 (not a reset that could eat it), and
    a flood is cut once ``LINGERING_CLOSE_MAX_BYTES`` more came, long before the timer."""
    sock = socket.create_connection(("127.0.0.1", relay_gateway.port), timeout=seconds(10))
    sock.sendall(f"GET {OPEN} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode())
    line = b"X-Fill: " + b"f" * 1000 + b"\r\n"
    with RssWatch(relay_gateway.pid) as watch:
        data, took = Flood(sock, line * 64, seconds_max=limits.LINGERING_CLOSE_S + 5).run()
    assert status_of(data) == 431
    assert json_body(data)["code"] == "headers_too_large"
    assert took < limits.LINGERING_CLOSE_S / 2
    watch.assert_below(16 * MiB)
    assert_healthy(relay_gateway)


def test_a_refused_peer_that_trickles_is_cut_off_when_the_linger_time_ends(
    relay_gateway: HostileGateway,
) -> None:
    """A peer that goes on sending, slowly, after its refusal: cut ``LINGERING_CLOSE_S``
    after the answer, its 431 read first."""
    sock = socket.create_connection(("127.0.0.1", relay_gateway.port), timeout=seconds(10))
    sock.sendall(f"GET {OPEN} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode())
    sock.sendall((b"X-Fill: " + b"f" * 1000 + b"\r\n") * 40)  # over the head bound: 431
    answered = time.monotonic()
    data = b""
    sock.settimeout(0.1)
    deadline = answered + limits.LINGERING_CLOSE_S + seconds(3)
    eof = False
    while time.monotonic() < deadline:
        try:
            sock.send(b"x" * 100)  # 1 KB/s: far under the byte bound
            if eof:
                time.sleep(0.1)
                continue
            chunk = sock.recv(65536)
            eof = not chunk  # the gateway shut its side; it still reads (and drops) ours
            data += chunk
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            break  # cut off
    took = time.monotonic() - answered
    sock.close()
    assert status_of(data) == 431
    assert limits.LINGERING_CLOSE_S - 0.5 < took < limits.LINGERING_CLOSE_S + seconds(1.5)
    assert_healthy(relay_gateway)


def test_a_message_over_the_runtime_limit_is_refused_by_the_agent_not_buffered_here(
    gateway: HostileGateway,
) -> None:
    """The relay holds no message whole: a message of ``WS_MAX_SIZE_BYTES`` + 1 streams
    through in bounded memory and the agent runtime closes with 1009 (message too big)."""

    async def attack() -> int | None:
        async with connect(f"{gateway.ws}{OPEN}", max_size=None, close_timeout=2) as ws:
            await ws.recv()
            with contextlib.suppress(websockets.ConnectionClosed):
                await ws.send(b"\x00" * (limits.WS_MAX_SIZE_BYTES + 1))
                await ws.recv()
            await ws.wait_closed()
            return ws.close_code

    with RssWatch(gateway.pid) as watch:
        code = asyncio.run(attack())
    # The runtime (uvicorn's websockets-sansio) fails the connection at the frame's header
    # with 1009, then closes with the client's bytes unread: the reset that follows may
    # destroy its close frame before the gateway reads it, and the gateway then reports the
    # vanished agent with 1011. Either way the session ends at once and nothing is buffered.
    assert code in (1009, 1011)
    watch.assert_below(16 * MiB)
    assert_healthy(gateway)


# --- row 5: close frames and pings that declare too much ----------------------------------


def _bad_control_frame(port: int, bad: bytes) -> tuple[int, float, str]:
    """Open an echo session, then send ``bad`` and keep streaming junk (16 MiB at most)."""
    sock, head, rest = raw_upgrade(port, OPEN)
    assert status_of(head) == 101
    while len(rest) < 2 or len(rest) < 2 + (rest[1] & 0x7F):
        rest += sock.recv(65536)
    greeting_end = 2 + (rest[1] & 0x7F)
    session_id = json.loads(rest[2:greeting_end])["session_id"]
    sock.sendall(bad)
    data, took = Flood(sock, b"\x00" * 65536, seconds_max=3).run()
    return close_code_of(rest[greeting_end:] + data), took, session_id


@pytest.mark.parametrize(
    "bad",
    [
        client_frame(0x8, b"\x03\xe8", declared=16 * 1024 * 1024),
        client_frame(0x9, b"p" * 200),
        client_frame(0xA, b"p" * 10, fin=False),
    ],
    ids=["close-16MiB", "ping-200B", "fragmented-pong"],
)
def test_control_frame_over_125_bytes_ends_the_session_with_1002(
    relay_gateway: HostileGateway, bad: bytes
) -> None:
    """Row 5: once 1.8 s of event-loop CPU and 16 MiB held; now 1002 to the sender, 1001 to
    the bot, with nothing of the bad frame relayed."""
    with RssWatch(relay_gateway.pid) as watch:
        code, took, session_id = _bad_control_frame(relay_gateway.port, bad)
    assert code == 1002
    assert took < seconds(1.0)
    watch.assert_below(16 * MiB)
    record = _record(relay_gateway, OPEN_AGENT, session_id)
    assert record["gatewayCloseCode"] == 1002
    assert record["bytesClientToAgent"] == 0  # the bad frame and the junk were dropped
    assert_healthy(relay_gateway)


def _record(gw: HostileGateway, agent: str, session_id: str) -> dict[str, object]:
    """The session's record once it has ended (bounded poll of the sessions API)."""
    deadline = time.monotonic() + seconds(10)
    while True:
        status, body = http_get(
            gw.port,
            f"/v1/agents/{agent}/sessions/{session_id}",
            headers=f"Authorization: Bearer {PRIVATE_KEY}\r\n",
        )
        if status == 200:
            record: dict[str, object] = json.loads(body)
            if record.get("endedAt") is not None:
                return record
        assert time.monotonic() < deadline, (status, body[:300])
        time.sleep(0.05)


# --- row 10: Host and version -------------------------------------------------------------


@pytest.mark.parametrize(
    "request_bytes",
    [
        upgrade(OPEN, "Host: a\r\nHost: b\r\n"),
        upgrade(OPEN, ""),
        upgrade(OPEN, "Host: 127.0.0.1\r\n").replace(b"HTTP/1.1", b"HTTP/1.0", 1),
    ],
    ids=["two-hosts", "no-host", "http-1.0"],
)
def test_upgrades_without_exactly_one_host_or_http_1_1_get_400(
    relay_gateway: HostileGateway, request_bytes: bytes
) -> None:
    """Row 10 (RFC 7230 5.4, RFC 6455 4.1): once 101; now 400 before any bot."""
    with RssWatch(relay_gateway.pid) as watch:
        status, body, took = asyncio.run(refused(relay_gateway.port, request_bytes))
    assert (status, body["code"]) == (400, "invalid_handshake")
    assert took < seconds(1.0)
    watch.assert_below(16 * MiB)
    assert_healthy(relay_gateway)


# --- rows 6 and 12: refusals and departures do not spend tokens or hold slots -------------


def test_a_token_refused_for_capacity_works_after_retry_after(gateway: HostileGateway) -> None:
    """Row 6: once 403 token_replayed on the retry; now the same token gets its session."""

    async def attack() -> None:
        first = await mint_token(gateway.port, TOKEN_AGENT)
        second = await mint_token(gateway.port, TOKEN_AGENT)
        auth = "Authorization: Bearer {}\r\n"
        # The guarded agent has max_agents = 1 and one session per instance.
        reader, writer, head = await open_upgrade(
            gateway.port, f"/ws/generic/{TOKEN_AGENT}.{ORG}", extra=auth.format(first["token"])
        )
        assert status_of(head) == 101
        status, body, _ = await refused(
            gateway.port,
            upgrade(
                f"/ws/generic/{TOKEN_AGENT}.{ORG}",
                "Host: 127.0.0.1\r\n" + auth.format(second["token"]),
            ),
        )
        assert (status, body["code"]) == (429, "PCC-AGENT-AT-CAPACITY")
        writer.close()  # the first session ends; its slot comes back when bot() returns
        deadline = time.monotonic() + seconds(10)
        while True:
            await asyncio.sleep(limits.RETRY_AFTER_AT_CAPACITY_S / 10)
            reader, writer, head = await open_upgrade(
                gateway.port,
                f"/ws/generic/{TOKEN_AGENT}.{ORG}",
                extra=auth.format(second["token"]),
            )
            writer.close()
            if status_of(head) != 429 or time.monotonic() > deadline:
                break
        assert status_of(head) == 101, head

    with RssWatch(gateway.pid) as watch:
        asyncio.run(attack())
    watch.assert_below(16 * MiB)
    assert_healthy(gateway)


@pytest.fixture(scope="module")
def slow_gateway() -> Iterator[HostileGateway]:
    """A gateway with a token agent whose cold start takes 2 s."""
    agents = (
        f"[organizations.{ORG}.agents.{SLOW_AGENT}]\n"
        f'path = "{SLOW_BOT}"\nwebsocket_auth = "token"\n'
        f"[organizations.{ORG}.agents.{SLOW_AGENT}.scaling]\n"
        "min_agents = 0\nmax_agents = 1\nidle_timeout = 1\n"
    )
    with hostile_gateway(agents=agents) as gw:
        yield gw


def test_client_leaving_during_a_cold_start_gets_its_token_and_slot_back(
    slow_gateway: HostileGateway,
) -> None:
    """Row 12: once the token was spent and bot() ran for nobody; now admission is cancelled,
    no session is recorded, and the same token works afterwards."""
    gw = slow_gateway

    async def attack() -> tuple[str, bytes]:
        minted = await mint_token(gw.port, SLOW_AGENT)
        auth = f"Authorization: Bearer {minted['token']}\r\n"
        target = f"/ws/generic/{SLOW_AGENT}.{ORG}"
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(upgrade(target, "Host: 127.0.0.1\r\n" + auth))
        await writer.drain()
        await asyncio.sleep(0.3)  # the cold start (2 s) is under way
        writer.transport.abort()  # the client gives up
        await asyncio.sleep(0.1)
        # Same token, once the instance is up: the session starts (the jti came back).
        async with asyncio.timeout(seconds(20)):
            while True:
                reader, writer, head = await open_upgrade(gw.port, target, extra=auth)
                if status_of(head) == 101:
                    greeting = await reader.readexactly(2 + len("ready"))
                    writer.close()
                    return str(minted["sessionId"]), greeting
                writer.close()
                assert status_of(head) in (429, 503), head
                await asyncio.sleep(0.2)

    with RssWatch(gw.pid) as watch:
        session_id, greeting = asyncio.run(attack())
    watch.assert_below(16 * MiB)
    assert greeting[2:] == b"ready"
    gw.wait_for_log("client left before its session started")
    # One session for that id: the one that started, never one for the departed client.
    status, body = http_get(
        gw.port,
        f"/v1/agents/{SLOW_AGENT}/sessions",
        headers=f"Authorization: Bearer {PRIVATE_KEY}\r\n",
    )
    assert status == 200
    assert body.count(session_id.encode()) == 1
    assert_healthy(gw)


# --- connection budget --------------------------------------------------------------------


def test_connection_budget_drops_idle_connections_first_then_refuses() -> None:
    """Past ``max_connections``, the oldest connection without a head gets 503 and goes; with
    every connection busy, the newcomer gets 503 ``too_many_connections``."""
    assert GatewaySettings().max_connections == limits.MAX_CONNECTIONS_DEFAULT
    budget = 12
    with hostile_gateway(extra=f"[gateway]\nmax_connections = {budget}\n") as gw:
        with RssWatch(gw.pid) as watch:
            idle = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(budget)]
            try:
                time.sleep(0.2)
                newcomer = socket.create_connection(("127.0.0.1", gw.port))
                idle[0].settimeout(seconds(5))
                answer = _read_all(idle[0])
                assert status_of(answer) == 503
                assert json_body(answer)["code"] == "too_many_connections"
                # The newcomer was kept: it gets an ordinary answer.
                newcomer.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                newcomer.settimeout(seconds(5))
                assert status_of(_read_all(newcomer)) in (200, 404)
                newcomer.close()
            finally:
                for sock in idle:
                    sock.close()
            time.sleep(0.2)
            # Every connection has sent a head (kept alive in the API): the next one is refused.
            busy = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(budget)]
            try:
                for sock in busy:
                    sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
                    sock.settimeout(seconds(5))
                    sock.recv(65536)
                late = socket.create_connection(("127.0.0.1", gw.port))
                late.settimeout(seconds(5))
                answer = _read_all(late)
                assert status_of(answer) == 503
                assert json_body(answer)["code"] == "too_many_connections"
                late.close()
            finally:
                for sock in busy:
                    sock.close()
        watch.assert_below(16 * MiB)
        time.sleep(0.2)
        assert_healthy(gw)


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


@pytest.mark.parametrize(
    "headers",
    [
        "Host: 127.0.0.1\r\n" + "".join(f"X-H{i}: v\r\n" for i in range(123)),
        "Host: 127.0.0.1\r\nX-Forwarded-For: " + "1" * 8170 + "\r\n",
    ],
    ids=["123-headers", "long-x-forwarded-for"],
)
def test_heads_that_grow_past_the_agent_limits_when_forwarded_get_431(
    gateway: HostileGateway, headers: str
) -> None:
    """Within the gateway's own bounds, but over the agent's once the gateway adds its lines
    and merges X-Forwarded-For: refused here (431), never sent to an instance."""
    with RssWatch(gateway.pid) as watch:
        status, body, took = asyncio.run(refused(gateway.port, upgrade(OPEN, headers)))
    assert (status, body["code"]) == (431, "headers_too_large")
    assert took < seconds(1.0)
    watch.assert_below(16 * MiB)
    assert "attempt" not in gateway.log_text()  # no instance was tried
    assert_healthy(gateway)


def test_a_burst_of_refusals_is_logged_within_its_budget(gateway: HostileGateway) -> None:
    """200 refused upgrades in a burst: every one counted in the metrics, at most
    ``REFUSAL_LOG_LINES_PER_S`` a second written to the log, and the lines after a gap say
    how many were not."""
    bad = upgrade(OPEN, "")  # no Host: 400

    def refusals_counted() -> float:
        status, body = http_get(gateway.port, "/metrics")
        assert status == 200
        total = 0.0
        for line in body.decode().splitlines():
            if line.startswith("catflap_handshake_refusals_total{") and "invalid_handshake" in line:
                total += float(line.rsplit(" ", 1)[1])
        return total

    before_count, before_lines = refusals_counted(), len(gateway.log)
    started = time.monotonic()

    async def burst() -> None:
        for _ in range(200):
            status, body, _ = await refused(gateway.port, bad)
            assert (status, body["code"]) == (400, "invalid_handshake")

    with RssWatch(gateway.pid) as watch:
        asyncio.run(burst())
    took = time.monotonic() - started
    watch.assert_below(16 * MiB)
    assert refusals_counted() - before_count == 200
    time.sleep(0.3)  # let the log reader catch up
    lines = [line for line in gateway.log[before_lines:] if "-> 400 invalid_handshake" in line]
    assert len(lines) <= limits.REFUSAL_LOG_LINES_PER_S * (int(took) + 2)
    assert len(lines) < 200
    # The next refusal, a second later, reports what was not written.
    time.sleep(1.1)
    asyncio.run(refused(gateway.port, bad))
    time.sleep(0.3)
    assert any("more refusals not logged" in line for line in gateway.log[before_lines:])
    assert_healthy(gateway)
