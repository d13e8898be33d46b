"""What the gateway shows and accepts (hardening issue, rows 9 and 11, /metrics, /docs).

- Row 9: ``?body=`` and ``/start``'s body are parsed with one strict JSON reader: ``1e999``
  (overflows to infinity), ``NaN`` and a lone surrogate escape are 400 ``invalid_body``, before
  any upgrade and with no session started.
- Row 11: a bot raising with a 500 KB message leaves a record whose error is cut to
  ``RECORD_ERROR_MAX_CHARS`` and marked, in every sessions API answer.
- ``/metrics``: loopback only by default (403 ``metrics_forbidden``), a bearer key
  (``metrics_key``, 401 without it), or a listener of its own (``metrics_listen``; the main port
  answers 404 ``not_found``), itself bounded.
- ``/docs`` and ``/redoc`` are 404 unless ``api_docs = true``, and no page the gateway serves
  by default loads a third-party script.

Attacks run over real sockets against real gateways (``catflap serve`` in its own process);
each checks afterwards that ordinary traffic still works. Unit tests of the loopback rule,
which no 127.0.0.1-only test can reach from another address, come last.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from catflap.api.metrics import is_loopback, metrics_refusal
from catflap.config import GatewaySettings, load_config
from catflap.contract import limits
from catflap.contract.errors import ConfigError

from ..conftest import PRIVATE_KEY, PUBLIC_KEY, ROOT, seconds
from .conftest import (
    OPEN_AGENT,
    ORG,
    TOKEN_AGENT,
    HostileGateway,
    assert_healthy,
    hostile_gateway,
    http_get,
)

pytestmark = pytest.mark.slow  # end to end: real gateways, agent processes

BIG_ERROR_AGENT = "bigerror"
BIG_ERROR_BOT = ROOT / "tests" / "bots" / "bigerror"
BIG_ERROR_TOML = (
    f"[organizations.{ORG}.agents.{BIG_ERROR_AGENT}]\n"
    f'path = "{BIG_ERROR_BOT}"\n'
    f"[organizations.{ORG}.agents.{BIG_ERROR_AGENT}.scaling]\n"
    "min_agents = 0\nmax_agents = 1\n"
)
#: A metrics key as an operator would make one (``openssl rand -hex 32``).
METRICS_KEY = "3f9a1c0e8b7d6a5f4e3d2c1b0a998877665544332211ffeeddccbbaa00112233"
AUTH_HEADER = f"Authorization: Bearer {PRIVATE_KEY}\r\n"

#: JSON texts Python's json module reads but strict JSON refuses (``\ud800`` is the six
#: characters of an escape, not a surrogate in this file).
NOT_STRICT = {
    "overflow": "1e999",
    "nan": "NaN",
    "lone-surrogate": '"\\ud800"',
}

#: A script, style sheet or font fetched from another origin: what a CDN-loading page has.
THIRD_PARTY_RE = re.compile(
    rb"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//|cdn\.|fonts\.googleapis|unpkg\.com""",
    re.IGNORECASE,
)


@pytest.fixture(scope="module")
def gateway() -> Iterator[HostileGateway]:
    """The default settings, plus the bot that raises with a 500 KB message."""
    with hostile_gateway(agents=BIG_ERROR_TOML) as gw:
        yield gw


# --- raw HTTP over 127.0.0.1 -------------------------------------------------------------------


def exchange(port: int, request: bytes, *, timeout: float = 10.0) -> tuple[int, bytes, bytes]:
    """Send ``request`` on a new connection and read until the server closes it:
    (status, head, body). A reset after the answer (bytes left unread) ends the read."""
    with socket.create_connection(("127.0.0.1", port), timeout=seconds(timeout)) as sock:
        sock.sendall(request)
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1."), data[:200]
    return int(head.split(b" ", 2)[1]), head, body


def assert_error(status: int, body: bytes, expected_status: int, code: str) -> dict[str, str]:
    """``body`` is catflap's JSON error with ``expected_status`` and ``code``."""
    assert status == expected_status, (status, body[:300])
    parsed: dict[str, str] = json.loads(body)
    assert set(parsed) == {"error", "code"} and parsed["error"], parsed
    assert parsed["code"] == code, parsed
    return parsed


def upgrade_request(target: str) -> bytes:
    return (
        f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def post_start(port: int, agent: str, payload: bytes) -> tuple[int, bytes]:
    request = (
        f"POST /v1/public/{agent}/start HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {PUBLIC_KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode() + payload
    status, _, body = exchange(port, request)
    return status, body


def sessions(gw: HostileGateway, agent: str) -> dict[str, Any]:
    status, body = http_get(gw.port, f"/v1/agents/{agent}/sessions", headers=AUTH_HEADER)
    assert status == 200, (status, body[:300])
    answer: dict[str, Any] = json.loads(body)
    return answer


def sessions_started(gw: HostileGateway) -> float:
    """Sum of ``catflap_sessions_started_total`` over every label set."""
    status, body = http_get(gw.port, "/metrics")
    assert status == 200, (status, body[:200])
    return sum(
        float(line.rsplit(b" ", 1)[1])
        for line in body.splitlines()
        if line.startswith(b"catflap_sessions_started_total{")
    )


def metrics_port(gw: HostileGateway) -> int:
    """The ``metrics_listen`` port, from the gateway's log line (it listens on port 0)."""
    match = re.search(r"metrics listening on 127\.0\.0\.1:(\d+)", gw.log_text())
    assert match, gw.log_text()[-2000:]
    return int(match.group(1))


# --- row 9: strict JSON in ?body= and in /start ------------------------------------------------


@pytest.mark.parametrize("text", NOT_STRICT.values(), ids=NOT_STRICT.keys())
def test_body_param_that_is_not_strict_json_is_400_before_the_upgrade(
    gateway: HostileGateway, text: str
) -> None:
    before = (sessions(gateway, OPEN_AGENT)["total_count"], sessions_started(gateway))
    raw = base64.b64encode(text.encode()).decode()
    status, _, body = exchange(
        gateway.port, upgrade_request(f"/ws/generic/{OPEN_AGENT}.{ORG}?body={raw}")
    )
    parsed = assert_error(status, body, 400, "invalid_body")
    assert "not valid JSON" in parsed["error"]
    after = (sessions(gateway, OPEN_AGENT)["total_count"], sessions_started(gateway))
    assert after == before  # no session record, no upgrade counted
    assert_healthy(gateway)


@pytest.mark.parametrize("text", NOT_STRICT.values(), ids=NOT_STRICT.keys())
def test_start_body_that_is_not_strict_json_is_400_invalid_body(
    gateway: HostileGateway, text: str
) -> None:
    payload = f'{{"transport": "websocket", "body": {{"caller": {text}}}}}'.encode()
    status, body = post_start(gateway.port, TOKEN_AGENT, payload)
    parsed = assert_error(status, body, 400, "invalid_body")
    assert "strict JSON" in parsed["error"]
    # The same request with an ordinary body is fine: only the strict rule refused it.
    status, body = post_start(
        gateway.port, TOKEN_AGENT, b'{"transport": "websocket", "body": {"caller": 1e300}}'
    )
    assert status == 200, body[:300]
    started = json.loads(body)
    assert json.loads(base64.b64decode(started["body"])) == {"caller": 1e300}
    assert_healthy(gateway)


# --- row 11: a 500 KB bot error ----------------------------------------------------------------


def test_huge_bot_error_is_cut_in_the_record(gateway: HostileGateway) -> None:
    async def session() -> None:
        async with asyncio.timeout(seconds(30)):
            async with connect(f"{gateway.ws}/ws/generic/{BIG_ERROR_AGENT}.{ORG}") as ws:
                assert await ws.recv() == "raising"
                with contextlib.suppress(ConnectionClosed):
                    await ws.recv()

    asyncio.run(session())
    deadline = time.monotonic() + seconds(30)
    while True:
        status, body = http_get(
            gateway.port, f"/v1/agents/{BIG_ERROR_AGENT}/sessions", headers=AUTH_HEADER
        )
        assert status == 200, body[:300]
        records = json.loads(body)["sessions"]
        if records and records[0]["completionStatus"] is not None:
            break
        assert time.monotonic() < deadline, records
        time.sleep(0.1)
    record = records[0]
    assert record["completionStatus"] == "bot_error"
    error = record["error"]
    assert len(error) <= limits.RECORD_ERROR_MAX_CHARS
    match = re.search(r"\u2026 \[truncated, (\d+) chars\]$", error)
    assert match, error[-100:]
    assert int(match.group(1)) > 500_000  # the bot's message, plus the exception's class name
    assert "RuntimeError" in error and "xxxx" in error
    assert len(body) < 3 * limits.RECORD_ERROR_MAX_CHARS  # the poll stays small
    status, one = http_get(
        gateway.port,
        f"/v1/agents/{BIG_ERROR_AGENT}/sessions/{record['sessionId']}",
        headers=AUTH_HEADER,
    )
    assert status == 200 and json.loads(one)["error"] == error
    assert_healthy(gateway)


# --- /metrics --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        "X-Forwarded-For: 203.0.113.7\r\n",
        "Forwarded: for=203.0.113.7\r\n",
        "X-Real-IP: 203.0.113.7\r\n",
    ],
    ids=["x-forwarded-for", "forwarded", "x-real-ip"],
)
def test_metrics_by_default_are_for_loopback_clients_only(
    gateway: HostileGateway, header: str
) -> None:
    # 127.0.0.1 relaying a request for someone else, as a reverse proxy on this host does: not
    # a loopback client. (No test can connect from another address: only 127.0.0.1 is used.)
    status, body = http_get(gateway.port, "/metrics", headers=header)
    parsed = assert_error(status, body, 403, "metrics_forbidden")
    assert "catflap_" not in parsed["error"]
    status, body = http_get(gateway.port, "/metrics")
    assert status == 200 and b"catflap_sessions_active" in body
    assert_healthy(gateway)


@pytest.fixture(scope="module")
def keyed() -> Iterator[HostileGateway]:
    """``metrics_key`` set, and the API docs switched on."""
    extra = f'[gateway]\nmetrics_key = "{METRICS_KEY}"\napi_docs = true\n'
    with hostile_gateway(extra=extra) as gw:
        yield gw


def test_metrics_key_is_required_when_set(keyed: HostileGateway) -> None:
    bodies: list[bytes] = []
    for header in (
        "",
        "Authorization: Bearer wrong-key-0000000000000000\r\n",
        f"Authorization: Bearer {METRICS_KEY[:-1]}\r\n",
        f"Authorization: Basic {METRICS_KEY}\r\n",
        f"Authorization: Bearer {METRICS_KEY}x\r\n",
        "Authorization: Bearer \xe9\xe9\xe9\r\n",
    ):
        status, head, body = exchange(
            keyed.port,
            f"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{header}\r\n".encode(
                "latin-1"
            ),
        )
        assert_error(status, body, 401, "401")
        assert b"www-authenticate: Bearer" in head
        bodies.append(head + body)
    right = f"Authorization: Bearer {METRICS_KEY}\r\n"
    status, body = http_get(keyed.port, "/metrics", headers=right)
    assert status == 200 and b"catflap_sessions_active" in body
    # The key decides, not the address: a proxied request with it is fine.
    status, body = http_get(keyed.port, "/metrics", headers=right + "X-Forwarded-For: 1.2.3.4\r\n")
    assert status == 200
    assert_healthy(keyed, metrics_headers=right)
    assert not any(METRICS_KEY.encode() in text for text in bodies)
    assert METRICS_KEY not in keyed.log_text()


@pytest.fixture(scope="module")
def split() -> Iterator[HostileGateway]:
    """``metrics_listen`` set: /metrics on a port of its own."""
    with hostile_gateway(extra='[gateway]\nmetrics_listen = "127.0.0.1:0"\n') as gw:
        yield gw


def test_metrics_listen_moves_metrics_off_the_main_port(split: HostileGateway) -> None:
    port = metrics_port(split)
    status, body = http_get(split.port, "/metrics")
    assert_error(status, body, 404, "not_found")
    status, body = http_get(port, "/metrics")
    assert status == 200 and b"catflap_sessions_active" in body
    status, body = http_get(port, "/metrics?name[]=x")  # a query string changes nothing
    assert status == 200
    # The listener serves /metrics and nothing else, with the same JSON errors.
    status, body = http_get(port, f"/v1/agents/{OPEN_AGENT}/sessions", headers=AUTH_HEADER)
    assert_error(status, body, 404, "not_found")
    status, head, body = exchange(
        port, b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    )
    assert_error(status, body, 405, "method_not_allowed")
    assert b"allow: GET" in head
    status, _, body = exchange(port, b"\x16\x03\x01\x02\x00garbage\r\n\r\n")
    assert_error(status, body, 400, "malformed_request")
    status, _, body = exchange(port, b"GET /" + b"a" * (limits.REQUEST_URL_MAX_BYTES + 10))
    assert_error(status, body, 414, "url_too_long")
    assert_healthy(split, metrics_port=port)


def test_metrics_listener_closes_with_the_gateway() -> None:
    with hostile_gateway(extra='[gateway]\nmetrics_listen = "127.0.0.1:0"\n') as gw:
        port = metrics_port(gw)
        assert http_get(port, "/metrics")[0] == 200
    # catflap_serve sent SIGTERM and waited for the exit: Gateway.shutdown closed it.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=seconds(5)).close()


def test_metrics_listener_holds_a_bounded_number_of_connections(split: HostileGateway) -> None:
    port = metrics_port(split)
    idle = [
        socket.create_connection(("127.0.0.1", port), timeout=seconds(10))
        for _ in range(limits.METRICS_MAX_CONNECTIONS)
    ]
    try:
        # Answered (200) until the listener has accepted every idle one, then refused.
        deadline = time.monotonic() + seconds(5)
        while True:
            status, _, body = exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            if status != 200 or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert_error(status, body, 503, "service_unavailable")
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + seconds(5)
    while (status := http_get(port, "/metrics")[0]) != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert status == 200
    assert_healthy(split, metrics_port=port)


# --- /docs, /redoc and third-party scripts ----------------------------------------------------


def test_api_docs_are_off_by_default_and_no_page_loads_third_party_scripts(
    gateway: HostileGateway,
) -> None:
    for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        status, body = http_get(gateway.port, path)
        assert_error(status, body, 404, "404")
    status, body = http_get(gateway.port, "/openapi.json")
    assert status == 200 and "/v1/public/{agent}/start" in json.loads(body)["paths"]
    pages = [
        ("/", ""),
        ("/docs", ""),
        ("/redoc", ""),
        ("/openapi.json", ""),
        ("/livez", ""),
        ("/readyz", ""),
        ("/metrics", ""),
        ("/dashboard", ""),
        (f"/v1/agents/{OPEN_AGENT}/sessions", AUTH_HEADER),
        (f"/ws/generic/{OPEN_AGENT}.{ORG}", ""),  # a plain GET: 426
    ]
    for path, headers in pages:
        status, body = http_get(gateway.port, path, headers=headers)
        assert status < 500, (path, status)
        assert not THIRD_PARTY_RE.search(body), (path, THIRD_PARTY_RE.search(body))
    assert_healthy(gateway)


def test_api_docs_when_switched_on_are_served(keyed: HostileGateway) -> None:
    for path in ("/docs", "/redoc"):
        status, body = http_get(keyed.port, path)
        assert status == 200
        # What the README warns about: these pages fetch scripts from a CDN.
        assert THIRD_PARTY_RE.search(body), body[:300]
    assert_healthy(keyed, metrics_headers=f"Authorization: Bearer {METRICS_KEY}\r\n")


@pytest.mark.parametrize(
    ("gateway_toml", "problem"),
    [
        ('metrics_key = "short"', "16 to 1024 printable ASCII"),
        (f'metrics_key = "{METRICS_KEY} with spaces"', "16 to 1024 printable ASCII"),
        ('metrics_listen = "9090"', "expected host:port"),
    ],
)
def test_bad_metrics_settings_stop_the_start_without_echoing_the_key(
    tmp_path: Path, gateway_toml: str, problem: str
) -> None:
    config = tmp_path / "catflap.toml"
    config.write_text(f"[gateway]\n{gateway_toml}\n")
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert problem in str(info.value) and info.value.key.startswith("gateway.metrics_")
    assert METRICS_KEY not in str(info.value) and "short" not in str(info.value)
    # A valid key is kept out of every repr of the config.
    config.write_text(f'[gateway]\nmetrics_key = "{METRICS_KEY}"\n')
    assert METRICS_KEY not in repr(load_config(config))


# --- the loopback rule, on addresses no 127.0.0.1-only test can connect from ------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.255.0.9", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.7", False),
        ("203.0.113.7", False),
        ("::ffff:10.0.0.7", False),
        ("2001:db8::1", False),
        ("fe80::1%eth0", False),
        ("0.0.0.0", False),
        ("localhost", False),  # a name, not an address
        ("", False),
        (None, False),  # a Unix socket peer
        ("127.0.0.1.evil", False),
    ],
)
def test_loopback_check(host: str | None, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_metrics_rule_for_every_setting() -> None:
    def refusal(settings: GatewaySettings, **request: Any) -> tuple[int, str] | None:
        args: dict[str, Any] = {
            "on_listener": False,
            "authorization": None,
            "client_host": "127.0.0.1",
            "proxied": False,
            **request,
        }
        found = metrics_refusal(settings, **args)
        return None if found is None else (found.status, found.to_body()["code"])

    default = GatewaySettings()
    assert refusal(default) is None
    assert refusal(default, client_host="::1") is None
    assert refusal(default, client_host="10.1.2.3") == (403, "metrics_forbidden")
    assert refusal(default, client_host=None) == (403, "metrics_forbidden")
    assert refusal(default, proxied=True) == (403, "metrics_forbidden")
    keyed = GatewaySettings(metrics_key=SecretStr(METRICS_KEY))
    assert refusal(keyed) == (401, "401")
    assert refusal(keyed, authorization=f"Bearer {METRICS_KEY}", client_host="10.1.2.3") is None
    assert refusal(keyed, authorization=f"bearer  {METRICS_KEY} ") is None
    assert refusal(keyed, authorization=f"Bearer {METRICS_KEY[1:]}") == (401, "401")
    split = GatewaySettings(metrics_listen="127.0.0.1:9090")
    assert refusal(split) == (404, "not_found")
    assert refusal(split, on_listener=True, client_host="10.1.2.3") is None
    both = GatewaySettings(metrics_listen="127.0.0.1:9090", metrics_key=SecretStr(METRICS_KEY))
    assert refusal(both, authorization=f"Bearer {METRICS_KEY}") == (404, "not_found")
    assert refusal(both, on_listener=True) == (401, "401")
    assert refusal(both, on_listener=True, authorization=f"Bearer {METRICS_KEY}") is None
    message = metrics_refusal(
        keyed, on_listener=False, authorization="Bearer x", client_host=None, proxied=False
    )
    assert message is not None and METRICS_KEY not in message.message
