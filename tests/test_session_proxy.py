"""The session proxy end to end: ``/v1/public/{agent}/sessions/{id}/{path}`` through a real
gateway to the routes a real bot adds with ``from pipecatcloud_system import app``
(tests/bots/proxied), for ``/bot`` sessions and live WebSocket sessions, in-process, under
``catflap serve`` (the 5 MB stream, with the gateway's RSS measured) and in cluster mode (two
gateway processes and an agent host on the real Redis)."""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from catflap.api.proxy import PROXY_METHODS
from catflap.contract import limits
from tests.conftest import (
    BOTS,
    EXAMPLES,
    PRIVATE_KEY,
    PUBLIC_KEY,
    RunningGateway,
    catflap_serve,
    raw_request,
    running_gateway,
    seconds,
    write_config,
)
from tests.test_bot_sessions import ended_record

pytestmark = pytest.mark.slow  # end to end: agent processes

AGENT = "proxied"
AGENT_KEY = f"{AGENT}.my-org"
PROXIED = BOTS / "proxied"
AUTH = {"authorization": f"Bearer {PUBLIC_KEY}"}


def _agents(**scaling: int) -> dict[str, dict[str, Any]]:
    return {
        AGENT: {
            "path": PROXIED,
            "websocket_auth": "token",
            # Instances see only what pass_env names of the gateway's environment.
            "pass_env": ["PROXIED_BOT_IMPORT_GATE"],
            "scaling": {"min_agents": 1, **scaling},
        }
    }


@asynccontextmanager
async def proxied_gateway(
    *, timings: dict[str, float] | None = None, warm: bool = True, **scaling: int
) -> AsyncIterator[RunningGateway]:
    if not warm:
        scaling = {"min_agents": 0, **scaling}
    async with running_gateway(_agents(**scaling), timings=timings) as gw:
        if warm:
            await gw.wait_ready(AGENT_KEY)
        yield gw


def _url(session_id: str, path: str) -> str:
    return f"/v1/public/{AGENT}/sessions/{session_id}/{path}"


async def _start(base: str, agent: str = AGENT, key: str = PUBLIC_KEY) -> str:
    """Start a session without a transport (its ``bot()`` runs until released); its id."""
    async with httpx.AsyncClient(base_url=base, timeout=seconds(30)) as client:
        started = await client.post(
            f"/v1/public/{agent}/start", json={}, headers={"authorization": f"Bearer {key}"}
        )
    assert started.status_code == 200, started.text
    session_id: str = started.json()["sessionId"]
    return session_id


async def _proxy(
    base: str, method: str, session_id: str, path: str, agent: str = AGENT, **kwargs: Any
) -> httpx.Response:
    headers = {**AUTH, **kwargs.pop("headers", {})}
    async with httpx.AsyncClient(base_url=base, timeout=seconds(30)) as client:
        return await client.request(
            method,
            f"/v1/public/{agent}/sessions/{session_id}/{path}",
            headers=headers,
            **kwargs,
        )


async def _raw(gw_port: int, method: str, target: str, extra: str = "", body: bytes = b"") -> Any:
    head = (
        f"{method} {target} HTTP/1.1\r\nHost: gateway.test\r\n"
        f"Authorization: Bearer {PUBLIC_KEY}\r\n{extra}Connection: close\r\n"
    )
    if body:
        head += f"Content-Length: {len(body)}\r\n"
    return await raw_request(gw_port, head.encode("latin-1") + b"\r\n" + body, timeout=30)


def _error(response: Any) -> tuple[int, str]:
    code = response.json()["code"]
    return response.status_code if hasattr(response, "status_code") else response.status, code


# --- what the bot receives, what the client gets back ----------------------------------------


@pytest.mark.parametrize("method", PROXY_METHODS)
async def test_every_method_reaches_the_bot_with_its_query_body_and_exact_headers(
    method: str,
) -> None:
    async with proxied_gateway() as gw:
        session_id = await _start(gw.http)
        body = b"\x00binary\xff body" if method not in ("GET", "HEAD", "OPTIONS") else b""
        extra = (
            "Accept: application/json\r\n"
            "X-Multi: 1\r\n"
            "X-Daily-Session-Id: spoofed\r\n"
            "X-PCC-Max-Session-Seconds: 99999\r\n"
            "Keep-Alive: timeout=5\r\n"
            "X-Multi: 2\r\n"
            "Cookie: c=1\r\n"
        )
        target = _url(session_id, "echo/a%20b/c%2Fd?x=1&x=2&y=%C3%A9")
        got = await _raw(gw.port, method, target, extra, body)
        assert got.status == 200, got.body
        assert got.headers["x-bot"] == "echo"
        if method == "HEAD":
            assert got.body == b""
            assert int(got.headers["content-length"]) > 0  # the length GET's body would have
            return
        seen = got.json()
        assert seen["method"] == method
        assert seen["raw_path"] == "/echo/a%20b/c%2Fd"
        assert seen["path"] == "/echo/a b/c/d"
        assert seen["query"] == "x=1&x=2&y=%C3%A9"
        assert base64.b64decode(seen["body"]) == body
        # Names as the bot's server gives them (lower-case); order and repeats kept.
        expected = [
            ["host", "catflap-agent"],
            ["accept", "application/json"],
            ["x-multi", "1"],
            ["x-multi", "2"],
            ["cookie", "c=1"],
            ["x-daily-session-id", session_id],
        ]
        if body or method in ("POST", "PUT", "PATCH"):
            expected.append(["content-length", str(len(body))])
        assert seen["headers"] == expected


async def test_the_bots_status_headers_and_body_come_back_unchanged() -> None:
    async with proxied_gateway() as gw:
        session_id = await _start(gw.http)
        got = await _raw(gw.port, "GET", _url(session_id, "teapot"))
        assert got.status == 418
        assert got.body == b"short and stout"
        raw_head = (await _raw_head(gw.port, _url(session_id, "teapot"))).lower()
        assert raw_head.count("set-cookie:") == 2
        assert "set-cookie: a=1; path=/" in raw_head and "set-cookie: b=2; path=/" in raw_head
        assert raw_head.count("date:") == 1  # the bot's: the API writes none of its own
        assert got.headers["x-bot"] == "teapot"
        assert got.headers["content-type"] == "text/plain; charset=utf-8"
        assert got.headers["content-length"] == "15"
        assert got.headers["server"] == "uvicorn"  # the runtime's, passed on


async def _raw_head(port: int, target: str) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {PUBLIC_KEY}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        async with asyncio.timeout(seconds(10)):
            data = await reader.read()
    finally:
        writer.close()
    return data.partition(b"\r\n\r\n")[0].decode("latin-1")


async def test_a_pipecatcloud_system_route_and_the_webrtc_offer_path_are_reachable() -> None:
    async with proxied_gateway() as gw:
        session_id = await _start(gw.http)
        status = await _proxy(gw.http, "GET", session_id, "status")
        assert (status.status_code, status.json()) == (
            200,
            {"status": "running", "session_id": session_id},
        )
        # /api/offer is the runtime's own SmallWebRTC route (tests/test_webrtc.py), reached
        # with the session id the proxy adds: this session is not a WebRTC one.
        for method in ("POST", "PATCH"):
            offer = await _proxy(gw.http, method, session_id, "api/offer", json={"sdp": "v=0"})
            assert offer.status_code == 404, offer.text
            assert offer.json()["code"] == "session_not_found"
            assert f"no WebRTC session {session_id} runs on this agent" in offer.json()["error"]
        # An uppercase session id is the same session.
        upper = await _proxy(gw.http, "GET", session_id.upper(), "status")
        assert upper.json()["session_id"] == session_id


# --- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rest", "status", "code"),
    [
        ("bot", 404, "reserved_path"),
        ("ws", 404, "reserved_path"),
        ("readyz", 404, "reserved_path"),
        ("livez", 404, "reserved_path"),
        ("metrics", 404, "reserved_path"),
        ("bot/", 404, "reserved_path"),
        ("/bot", 404, "reserved_path"),
        ("%2Fmetrics", 404, "reserved_path"),
        ("%62ot", 404, "reserved_path"),
        ("%2562ot", 404, "reserved_path"),
        ("status/../bot", 400, "invalid_proxy_path"),
        ("%2e%2e/bot", 400, "invalid_proxy_path"),
        ("x/%2E%2E%2Fmetrics", 400, "invalid_proxy_path"),
    ],
    ids=[
        "bot",
        "ws",
        "readyz",
        "livez",
        "metrics",
        "trailing-slash",
        "double-slash",
        "encoded-slash",
        "encoded",
        "encoded-twice",
        "dotdot",
        "encoded-dotdot",
        "encoded-dotdot-slash",
    ],
)
async def test_the_runtimes_own_paths_cannot_be_reached(rest: str, status: int, code: str) -> None:
    async with proxied_gateway() as gw:
        session_id = await _start(gw.http)
        got = await _raw(gw.port, "GET", _url(session_id, rest))
        assert (got.status, got.json()["code"]) == (status, code), got.body
        # A %2F in the session id segment moves the router's split: refused, not forwarded.
        moved = await _raw(gw.port, "GET", f"/v1/public/{AGENT}/sessions/{session_id}%2Fbot")
        assert moved.status == 404
        assert session_id in gw.gateway.sessions.live  # nothing reached /bot


async def test_unknown_ended_and_other_sessions_are_404_and_bad_keys_401() -> None:
    async with proxied_gateway() as gw:
        unknown = await _proxy(gw.http, "GET", str(uuid.uuid4()), "status")
        assert _error(unknown) == (404, "session_not_found")
        malformed = await _proxy(gw.http, "GET", "not-a-session", "status")
        assert _error(malformed) == (400, "bad_request")
        session_id = await _start(gw.http)
        no_agent = await _proxy(gw.http, "GET", session_id, "status", agent="nobody")
        assert _error(no_agent) == (404, "404")
        for key in ("pk_not_a_key", PRIVATE_KEY):
            bad = await _proxy(
                gw.http, "GET", session_id, "status", headers={"authorization": f"Bearer {key}"}
            )
            assert _error(bad) == (401, "401")
        async with httpx.AsyncClient(base_url=gw.http) as client:
            keyless = await client.get(_url(session_id, "status"))
        assert _error(keyless) == (401, "401")
        released = await _proxy(gw.http, "POST", session_id, "release")
        assert released.json() == {"released": session_id}
        assert (await ended_record(gw, session_id)).completion_status == "completed"
        ended = await _proxy(gw.http, "GET", session_id, "status")
        assert _error(ended) == (404, "session_not_found")
        async with httpx.AsyncClient(base_url=gw.http) as client:
            spec = (await client.get("/openapi.json")).json()
        route = spec["paths"]["/v1/public/{agent}/sessions/{session_id}/{path}"]
        assert {method.upper() for method in route} == set(PROXY_METHODS)
        assert route["get"]["security"] == [{"public key": []}]
        assert spec["components"]["securitySchemes"]["public key"]["scheme"] == "bearer"
        assert {"401", "404", "413", "502", "503", "504"} <= set(route["get"]["responses"])


async def test_a_body_over_one_mebibyte_is_413_and_one_that_fits_passes_whole() -> None:
    async with proxied_gateway() as gw:
        session_id = await _start(gw.http)
        fits = bytes(range(256)) * (limits.SESSION_PROXY_BODY_MAX_BYTES // 256)
        assert len(fits) == limits.SESSION_PROXY_BODY_MAX_BYTES
        echoed = await _proxy(gw.http, "PUT", session_id, "echo/x", content=fits)
        assert echoed.status_code == 200, echoed.text
        assert base64.b64decode(echoed.json()["body"]) == fits
        over = await _proxy(gw.http, "PUT", session_id, "echo/x", content=fits + b"!")
        assert _error(over) == (413, "request_too_large")

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as it comes
            for _ in range(5):
                yield fits[: limits.SESSION_PROXY_BODY_MAX_BYTES // 4]

        streamed = await _proxy(gw.http, "POST", session_id, "echo/x", content=chunked())
        assert _error(streamed) == (413, "request_too_large")


async def test_a_bot_that_does_not_answer_in_time_is_504() -> None:
    async with proxied_gateway(timings={"proxy_timeout": 0.5}) as gw:
        session_id = await _start(gw.http)
        slow = await _proxy(gw.http, "GET", session_id, "slow")
        assert _error(slow) == (504, "session_proxy_timeout")
        assert (await _proxy(gw.http, "GET", session_id, "status")).status_code == 200


async def test_a_live_websocket_session_is_reached_and_one_still_starting_waits_then_503(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = tmp_path / "gate"
    monkeypatch.setenv("PROXIED_BOT_IMPORT_GATE", str(gate))  # instances wait in their import
    async with proxied_gateway(warm=False, timings={"proxy_start_wait": 1.0}) as gw:
        async with httpx.AsyncClient(base_url=gw.http) as client:
            started = await client.post(
                f"/v1/public/{AGENT}/start", json={"transport": "websocket"}, headers=AUTH
            )
        session_id, token = started.json()["sessionId"], started.json()["token"]
        url = f"{gw.ws}/ws/generic/{AGENT_KEY}/{token}"

        async def open_websocket() -> ClientConnection:
            return await connect(url, open_timeout=seconds(30))

        opening = asyncio.create_task(open_websocket())
        async with asyncio.timeout(seconds(10)):  # the upgrade holds a slot on a cold start
            while await gw.pool.locate(AGENT_KEY, session_id) is None:
                await asyncio.sleep(0.01)
        starting = await _proxy(gw.http, "GET", session_id, "status")
        assert _error(starting) == (503, "session_starting")
        assert starting.headers["retry-after"] == str(limits.RETRY_AFTER_NOT_READY_S)
        # A request while it starts waits for the bot, and reaches it once it runs.
        waiting = asyncio.create_task(_proxy(gw.http, "GET", session_id, "status"))
        await asyncio.sleep(0.2)
        gate.write_text("open")
        reached = await waiting
        assert reached.json() == {"status": "running", "session_id": session_id}
        async with await opening as ws:  # the upgrade completed once the bot ran
            assert await asyncio.wait_for(ws.recv(), seconds(10)) == "ready"
            await ws.send("hi")
            assert await asyncio.wait_for(ws.recv(), seconds(10)) == "hi"
            again = await _proxy(gw.http, "GET", session_id, "status")
            assert again.json()["session_id"] == session_id
        record = await ended_record(gw, session_id)
        assert record.transport == "websocket"
        gone = await _proxy(gw.http, "GET", session_id, "status")
        assert _error(gone) == (404, "session_not_found")


async def test_with_two_sessions_on_one_instance_the_proxy_routes_by_session_id() -> None:
    async with proxied_gateway(sessions_per_instance=2, max_agents=1) as gw:
        first, second = await _start(gw.http), await _start(gw.http)
        (instance,) = gw.pool.agents[AGENT_KEY].live()
        assert set(instance.leases) == {first, second}
        for session_id in (first, second):
            shown = await _proxy(gw.http, "GET", session_id, "status")
            assert shown.json()["session_id"] == session_id
        assert (await _proxy(gw.http, "POST", first, "release")).json() == {"released": first}
        assert (await ended_record(gw, first)).completion_status == "completed"
        assert second in gw.gateway.sessions.live
        assert (await _proxy(gw.http, "GET", second, "status")).status_code == 200
        assert _error(await _proxy(gw.http, "GET", first, "status"))[0] == 404


# --- 5 MB through catflap serve, with the gateway's memory measured --------------------------


def _reset_peak_rss(pid: int) -> None:
    """Writing 5 to ``clear_refs`` resets the process's ``VmHWM`` to its current RSS."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


async def test_a_5_mb_answer_streams_through_catflap_serve_without_growing_the_gateway(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, _agents())
    size = 5_000_000
    with catflap_serve(["--config", str(config), "--state-dir", str(tmp_path / "state")]) as (
        proc,
        port,
        _,
    ):
        base = f"http://127.0.0.1:{port}"
        async with asyncio.timeout(seconds(30)):
            while True:
                try:
                    session_id = await _start(base)
                    break
                except AssertionError:
                    await asyncio.sleep(0.1)  # the instance is still starting
        warm = await _proxy(base, "GET", session_id, "big?size=300000")
        assert len(warm.content) == 300_000  # every code path imported, buffers made
        # The gateway's peak RSS from here on.
        _reset_peak_rss(proc.pid)
        before = _rss_kib(proc.pid, "VmRSS")
        received = 0
        mismatch = False
        async with (
            httpx.AsyncClient(base_url=base, timeout=seconds(60)) as client,
            client.stream("GET", _url(session_id, "big"), headers=AUTH) as response,
        ):
            assert response.status_code == 200
            assert response.headers["content-type"] == "application/octet-stream"
            assert response.headers["transfer-encoding"] == "chunked"
            async for chunk in response.aiter_raw():
                expected = bytes((received + i) % 251 for i in range(len(chunk)))
                mismatch |= chunk != expected
                received += len(chunk)
                await asyncio.sleep(0.002)  # a slow reader: the gateway must not buffer ahead
        assert received == size and not mismatch
        peak = _rss_kib(proc.pid, "VmHWM")
        # Buffered whole, the body alone would add 5 MB (4,883 KiB) to the gateway.
        assert peak - before < 2048, f"gateway RSS grew {peak - before} KiB for a 5 MB answer"


# --- cluster mode: any gateway reaches any agent host -------------------------------------------


async def test_in_cluster_mode_any_gateway_proxies_to_the_agent_host() -> None:
    from tests.test_cluster import cluster

    async with cluster(gateways=2, hosts=1, slots=2, bot=PROXIED) as cl:
        session_id = await _start(cl.http(0), agent="echo", key="pk_test")
        for gateway in (0, 1):
            shown = await _proxy_cluster(cl.http(gateway), "GET", session_id, "status")
            assert shown.status_code == 200, shown.text
            assert shown.json() == {"status": "running", "session_id": session_id}
        echoed = await _proxy_cluster(
            cl.http(1), "POST", session_id, "echo/q?a=1", content=b"payload"
        )
        seen = echoed.json()
        assert (seen["query"], base64.b64decode(seen["body"])) == ("a=1", b"payload")
        assert ["x-daily-session-id", session_id] in seen["headers"]
        reserved = await _proxy_cluster(cl.http(1), "GET", session_id, "metrics")
        assert _error(reserved) == (404, "reserved_path")
        unknown = await _proxy_cluster(cl.http(1), "GET", str(uuid.uuid4()), "status")
        assert _error(unknown) == (404, "session_not_found")
        # A live WebSocket session admitted by gateway 0, reached through gateway 1.
        async with httpx.AsyncClient() as client:
            started = await client.post(
                f"{cl.http(0)}/v1/public/echo/start",
                json={"transport": "websocket"},
                headers={"authorization": "Bearer pk_test"},
            )
        ws_session, token = started.json()["sessionId"], started.json()["token"]
        async with connect(
            f"{cl.url(0)}/ws/generic/echo.my-org/{token}", open_timeout=seconds(20)
        ) as ws:
            assert await asyncio.wait_for(ws.recv(), seconds(10)) == "ready"
            shown = await _proxy_cluster(cl.http(1), "GET", ws_session, "status")
            assert shown.json() == {"status": "running", "session_id": ws_session}
        released = await _proxy_cluster(cl.http(1), "POST", session_id, "release")
        assert released.json() == {"released": session_id}
        async with asyncio.timeout(seconds(20)):
            while True:
                gone = await _proxy_cluster(cl.http(0), "GET", session_id, "status")
                if gone.status_code == 404:
                    break
                await asyncio.sleep(0.05)
        assert _error(gone) == (404, "session_not_found")


async def _proxy_cluster(
    base: str, method: str, session_id: str, path: str, **kwargs: Any
) -> httpx.Response:
    async with httpx.AsyncClient(base_url=base, timeout=seconds(30)) as client:
        return await client.request(
            method,
            f"/v1/public/echo/sessions/{session_id}/{path}",
            headers={"authorization": "Bearer pk_test"},
            **kwargs,
        )


# --- examples/pcc-session-api: the SDK starts it, the proxy reaches its route -----------------


async def test_the_pcc_session_api_example_is_started_by_the_sdk_and_reached_by_the_proxy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pipecatcloud = pytest.importorskip("pipecatcloud")
    agents = {"session-api": {"path": EXAMPLES / "pcc-session-api", "scaling": {"min_agents": 1}}}
    async with running_gateway(agents) as gw:
        await gw.wait_ready("session-api.my-org")
        monkeypatch.setenv("PIPECAT_API_HOST", gw.http)
        params = pipecatcloud.SessionParams(data={"user": "ada"})
        started = await pipecatcloud.Session("session-api", PUBLIC_KEY, params=params).start()
        session_id = started["sessionId"]
        async with asyncio.timeout(seconds(10)):  # /start answers as bot() begins
            while (
                status := await _proxy(gw.http, "GET", session_id, "status", "session-api")
            ).status_code != 200:
                await asyncio.sleep(0.02)
        shown = status.json()
        assert shown.pop("running_s") >= 0
        assert shown == {
            "session_id": session_id,
            "args": "PipecatSessionArguments",
            "body": {"user": "ada"},
        }
        async with httpx.AsyncClient(base_url=gw.http) as client:
            stopped = await client.delete(
                f"/v1/agents/session-api/sessions/{session_id}",
                headers={"authorization": f"Bearer {PRIVATE_KEY}"},
            )
        assert stopped.is_success, stopped.text
        assert (await ended_record(gw, session_id)).completion_status == "stopped"
        ended = await _proxy(gw.http, "GET", session_id, "status", "session-api")
        assert _error(ended) == (404, "session_not_found")
