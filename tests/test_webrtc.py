"""SmallWebRTC sessions: ``/start`` with ``"transport": "webrtc"``, the runtime's wait for the
offer and its ``/api/offer`` (pipecat's ``SmallWebRTCRequestHandler``), ICE servers, and the
bounds on what a client signals.

Media only flows in the tests that run :mod:`tests.webrtc_driver` inside a network namespace
of their own (``unshare -n``, root only): an aiortc client sends a 440 Hz tone through
``/start`` and the session proxy's ``/api/offer`` to ``examples/pipecat-webrtc-echo`` and
checks the echoed track's frequency. The other tests signal without ever connecting media.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from catflap.config import CatflapConfig, IceServer, WebRTCConfig
from catflap.contract import limits
from catflap.contract.ice import ICE_CONFIG_URL_ENV, ice_config_data_url
from catflap.gateway.botsession import WEBRTC_TRANSPORT, bot_request
from catflap.runtime.botroute import offer_endpoint
from catflap.runtime.webrtc import OfferTimeout, WebRTCSessions, read_ice_servers
from tests.conftest import (
    EXAMPLES,
    PRIVATE_KEY,
    PUBLIC_KEY,
    ROOT,
    RunningGateway,
    running_gateway,
    seconds,
)

pytestmark = pytest.mark.slow

AGENT = "webrtc-echo"
AGENT_KEY = f"{AGENT}.my-org"
SECRET = "turn-secret-never-logged"
TURN = IceServer(urls=["turn:turn.example.test:3478"], username="alice", credential=SECRET)


# --- the runtime's signalling, on its own route (no media) -----------------------------------


@asynccontextmanager
async def offer_route(sessions: WebRTCSessions) -> AsyncIterator[httpx.AsyncClient]:
    """The runtime's ``/api/offer`` handler on an in-memory app."""
    endpoint = offer_endpoint(sessions)
    app = Starlette(routes=[Route("/api/offer", endpoint, methods=["POST", "PATCH"])])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://agent") as client:
        yield client


def _sid(session_id: str) -> dict[str, str]:
    return {"x-daily-session-id": session_id}


async def test_an_offer_without_a_session_id_or_for_an_unknown_session_is_refused() -> None:
    async with offer_route(WebRTCSessions()) as client:
        missing = await client.post("/api/offer", json={"sdp": "v=0", "type": "offer"})
        unknown = await client.post(
            "/api/offer", json={"sdp": "v=0", "type": "offer"}, headers=_sid("nope")
        )
    assert (missing.status_code, missing.json()["code"]) == (400, "missing_session_id")
    assert (unknown.status_code, unknown.json()["code"]) == (404, "session_not_found")


async def test_offer_and_patch_bodies_are_bounded_as_they_arrive() -> None:
    sessions = WebRTCSessions()
    peer = sessions.open("s-1", None)
    try:
        async with offer_route(sessions) as client:
            big_offer = await client.post(
                "/api/offer",
                content=b"x" * (limits.WEBRTC_OFFER_MAX_BYTES + 1),
                headers=_sid("s-1"),
            )
            big_patch = await client.patch(
                "/api/offer",
                content=b"x" * (limits.WEBRTC_PATCH_MAX_BYTES + 1),
                headers=_sid("s-1"),
            )
    finally:
        await sessions.close(peer)
    for response in (big_offer, big_patch):
        assert (response.status_code, response.json()["code"]) == (413, "request_too_large")


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"type": "offer"}',
        b'{"sdp": "v=0", "type": "answer"}',
        b'{"sdp": "v=0", "type": "offer", "pc_id": 7}',
    ],
    ids=["not-json", "not-object", "no-sdp", "not-offer", "pc-id-type"],
)
async def test_an_offer_that_is_not_the_clients_json_is_invalid_offer(body: bytes) -> None:
    sessions = WebRTCSessions(ice_servers=_no_ice)
    peer = sessions.open("s-1", None)
    try:
        async with offer_route(sessions) as client:
            response = await client.post("/api/offer", content=body, headers=_sid("s-1"))
        assert not peer.opened.done()  # no bot() starts on a refused offer
    finally:
        await sessions.close(peer)
    assert (response.status_code, response.json()["code"]) == (400, "invalid_offer")


async def _no_ice() -> list[dict[str, Any]]:
    return []


async def test_offers_per_session_are_bounded() -> None:
    """Past ``WEBRTC_OFFERS_MAX`` offers (the first and its renegotiations) a session refuses
    more negotiation in its bot's process, before pipecat sees the offer."""
    sessions = WebRTCSessions(ice_servers=_no_ice)
    peer = sessions.open("s-1", None)
    peer.offers = limits.WEBRTC_OFFERS_MAX  # as after that many answered offers
    try:
        async with offer_route(sessions) as client:
            response = await client.post(
                "/api/offer", json={"sdp": "v=0", "type": "offer"}, headers=_sid("s-1")
            )
        assert not peer.opened.done()
    finally:
        await sessions.close(peer)
    assert (response.status_code, response.json()["code"]) == (400, "webrtc_offer_conflict")


async def test_trickled_candidates_per_session_are_bounded() -> None:
    sessions = WebRTCSessions()
    peer = sessions.open("s-1", None)
    end = {"candidate": "", "sdp_mid": "0", "sdp_mline_index": 0}
    try:
        async with offer_route(sessions) as client:
            over = await client.patch(
                "/api/offer",
                json={"pc_id": "pc", "candidates": [end] * (limits.WEBRTC_CANDIDATES_MAX + 1)},
                headers=_sid("s-1"),
            )
            unknown = await client.patch(
                "/api/offer", json={"pc_id": "pc", "candidates": [end]}, headers=_sid("s-1")
            )
            malformed = await client.patch(
                "/api/offer", json={"candidates": []}, headers=_sid("s-1")
            )
    finally:
        await sessions.close(peer)
    assert (over.status_code, over.json()["code"]) == (413, "request_too_large")
    assert (unknown.status_code, unknown.json()["code"]) == (404, "peer_connection_not_found")
    assert (malformed.status_code, malformed.json()["code"]) == (400, "invalid_offer")


async def test_the_wait_for_the_offer_ends_as_offer_timeout() -> None:
    """PCC's base image waits 120 s; the wait is the injected sleep, so no clock runs here."""
    assert WebRTCSessions().offer_timeout == limits.WEBRTC_OFFER_TIMEOUT_S == 120.0
    slept: list[float] = []

    async def sleep(delay: float) -> None:
        slept.append(delay)

    sessions = WebRTCSessions()
    peer = sessions.open("s-1", {"k": 1})
    with pytest.raises(OfferTimeout, match="no WebRTC offer within 120 s"):
        await sessions.wait_opened(peer, sleep)
    await sessions.close(peer)
    assert slept == [limits.WEBRTC_OFFER_TIMEOUT_S]


# --- ICE servers: ICE_CONFIG_URL, as PCC's base image reads it ----------------------------


async def test_ice_config_url_as_a_data_url_gives_the_configured_servers() -> None:
    url = ice_config_data_url([TURN.to_wire()])
    assert SECRET not in url  # base64: not greppable in a process listing either
    servers = await read_ice_servers({ICE_CONFIG_URL_ENV: url})
    assert servers == [
        {"urls": ["turn:turn.example.test:3478"], "username": "alice", "credential": SECRET}
    ]
    assert await read_ice_servers({}) == []


async def test_ice_config_url_over_http_is_fetched_bounded_and_never_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    document = json.dumps({"iceConfig": {"iceServers": [{"urls": "stun:stun.test:3478"}]}}).encode()
    answers = [document, b"x" * (limits.ICE_CONFIG_MAX_BYTES + 1)]

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        body = answers.pop(0)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            + f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}/ice-servers?key={SECRET}"
    try:
        first = await read_ice_servers({ICE_CONFIG_URL_ENV: url})
        with caplog.at_level(logging.WARNING, logger="catflap.runtime.webrtc"):
            too_big = await read_ice_servers({ICE_CONFIG_URL_ENV: url})
            broken = await read_ice_servers({ICE_CONFIG_URL_ENV: "data:;base64,@@@" + SECRET})
    finally:
        server.close()
        await server.wait_closed()
    assert first == [{"urls": ["stun:stun.test:3478"], "username": None, "credential": None}]
    assert (too_big, broken) == ([], [])
    assert f"over {limits.ICE_CONFIG_MAX_BYTES} bytes" in caplog.text
    assert "host candidates only" in caplog.text
    assert SECRET not in caplog.text
    assert limits.ICE_CONFIG_FETCH_TIMEOUT_S <= limits.SESSION_PROXY_TIMEOUT_S


def test_ice_servers_come_from_the_top_level_webrtc_table_unless_the_agent_has_its_own() -> None:
    config = CatflapConfig.model_validate(
        {
            "webrtc": {"ice_servers": [{"urls": "stun:a.test", "credential": SECRET}]},
            "organizations": {
                "o": {
                    "agents": {
                        "inherits": {"path": "/tmp"},
                        "own": {"path": "/tmp", "webrtc": {"ice_servers": []}},
                    }
                }
            },
        }
    )
    agents = {spec.key: spec.config.webrtc for spec in config.agents()}
    assert [s.urls for s in agents["inherits.o"].ice_servers] == [["stun:a.test"]]
    assert agents["own.o"] == WebRTCConfig()
    assert SECRET not in repr(config)
    with pytest.raises(ValueError, match="urls"):
        IceServer.model_validate({"urls": ["http://not-ice"]})


def test_the_bot_request_of_a_webrtc_session_names_its_transport() -> None:
    (spec,) = CatflapConfig.model_validate(
        {"organizations": {"o": {"agents": {"a": {"path": "/tmp"}}}}}
    ).agents()
    head = bot_request(spec, "s-1", b"{}", webrtc=True).split(b"\r\n\r\n")[0].decode()
    assert "x-daily-transport-type: webrtc" in head.split("\r\n")
    assert "x-daily-transport-type" not in bot_request(spec, "s-1", b"{}").decode()


# --- /start with "transport": "webrtc", no media ---------------------------------------------


def _with_webrtc(**changes: Any) -> Callable[[CatflapConfig], CatflapConfig]:
    def adjust(config: CatflapConfig) -> CatflapConfig:
        org = config.organizations["my-org"]
        agent = org.agents[AGENT]
        webrtc = agent.webrtc.model_copy(update=changes)
        agent = agent.model_copy(update={"webrtc": webrtc})
        org = org.model_copy(update={"agents": {**org.agents, AGENT: agent}})
        return config.model_copy(update={"organizations": {"my-org": org}})

    return adjust


@asynccontextmanager
async def echo_gateway(**webrtc: Any) -> AsyncIterator[RunningGateway]:
    agents = {AGENT: {"path": EXAMPLES / "pipecat-webrtc-echo", "scaling": {"min_agents": 1}}}
    async with running_gateway(agents, adjust=_with_webrtc(**webrtc)) as gw:
        await gw.wait_ready(AGENT_KEY)
        yield gw


async def _start(gw: RunningGateway, payload: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=gw.http, timeout=seconds(30)) as client:
        return await client.post(
            f"/v1/public/{AGENT}/start",
            json={"transport": "webrtc", **payload},
            headers={"authorization": f"Bearer {PUBLIC_KEY}"},
        )


async def _ended(gw: RunningGateway, session_id: str, timeout: float = 20) -> Any:
    async with asyncio.timeout(seconds(timeout)):
        while (record := gw.gateway.sessions.ended.get(session_id)) is None:
            await asyncio.sleep(0.02)
    return record


async def test_start_answers_the_session_and_ice_servers_then_the_offer_wait_times_out() -> None:
    async with echo_gateway(ice_servers=[TURN], offer_timeout=1.0) as gw:
        asked = await _start(gw, {"enableDefaultIceServers": True, "body": {"hello": 1}})
        assert asked.status_code == 200, asked.text
        session_id = asked.json()["sessionId"]
        assert asked.json() == {
            "sessionId": session_id,
            "iceConfig": {"iceServers": [TURN.to_wire()]},
        }
        assert session_id in gw.gateway.sessions.live
        record = await _ended(gw, session_id)
        assert record.completion_status == "agent_start_timeout"
        assert record.transport == WEBRTC_TRANSPORT == "webrtc"
        assert "no WebRTC offer within 1 s" in (record.error or "")
        not_asked = await _start(gw, {})
        assert set(not_asked.json()) == {"sessionId"}
        await _ended(gw, not_asked.json()["sessionId"])


async def test_delete_stops_a_session_that_waits_for_its_offer() -> None:
    async with echo_gateway() as gw:
        session_id = (await _start(gw, {})).json()["sessionId"]
        async with httpx.AsyncClient(base_url=gw.http) as client:
            stopped = await client.delete(
                f"/v1/agents/{AGENT}/sessions/{session_id}",
                headers={"authorization": f"Bearer {PRIVATE_KEY}"},
            )
        assert stopped.status_code == 200, stopped.text
        assert (await _ended(gw, session_id)).completion_status == "stopped"


# --- media, inside a network namespace this test makes ----------------------------------------


def _namespace_problem() -> str | None:
    if os.geteuid() != 0:
        return "a network namespace of the test's own (unshare -n) needs root"
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs unshare (util-linux) and ip (iproute2)"
    return None


needs_namespace = pytest.mark.skipif(
    _namespace_problem() is not None, reason=str(_namespace_problem())
)


def in_namespace(module: str, *args: str, timeout: float = 120) -> dict[str, Any]:
    """Run ``python -m module args`` in a new network namespace: only ``lo``, up, with
    ``127.0.0.2/8`` added (aioice skips 127.0.0.1 for host candidates); its last stdout line
    as JSON."""
    setup = 'ip link set lo up && ip addr add 127.0.0.2/8 dev lo && exec "$@"'
    done = subprocess.run(
        ["unshare", "-n", "sh", "-c", setup, "sh", sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=seconds(timeout),
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@needs_namespace
def test_an_aiortc_client_hears_its_tone_echoed_through_start_and_the_session_proxy() -> None:
    seen = in_namespace("tests.webrtc_driver", "echo")
    assert seen["start"]["status"] == 200
    assert seen["start"]["body"]["iceConfig"] == {"iceServers": []}
    assert seen["offer"] == {"status": 200, "keys": ["pc_id", "sdp", "type"]}
    assert seen["patch"] == {"status": 200, "body": {"status": "success"}}
    assert seen["end_of_candidates"] == 200
    assert seen["patch_unknown"]["status"] == 404
    assert seen["patch_unknown"]["body"]["code"] == "peer_connection_not_found"
    assert seen["second_offer"]["status"] == 400
    assert seen["second_offer"]["body"]["code"] == "webrtc_offer_conflict"
    # The bot's track carries the client's 440 Hz tone, loud (the tone's RMS is ~11,600).
    assert abs(seen["hz"] - 440.0) <= 5.0, seen["hz"]
    assert seen["rms"] > 1000, seen["rms"]
    assert seen["renegotiate"] == {"status": 200, "same_pc_id": True}
    live, ended = seen["live"], seen["ended"]
    assert (live["status"], live["transport"], live["endedAt"]) == (200, "webrtc", None)
    # The client hung up: the echo bot's on_client_disconnected ended bot() at once.
    assert ended["completionStatus"] == "completed"
    assert seen["ended_after_hangup_s"] < 10


@needs_namespace
def test_delete_stops_a_webrtc_session_mid_call_and_its_offers_then_404() -> None:
    seen = in_namespace("tests.webrtc_driver", "stop")
    assert seen["delete"] == 200
    assert seen["ended"]["completionStatus"] == "stopped"
    assert seen["offer_after_end"]["status"] == 404
    assert seen["offer_after_end"]["body"]["code"] == "session_not_found"


@needs_namespace
def test_max_session_duration_ends_a_webrtc_call_as_time_limit() -> None:
    seen = in_namespace("tests.webrtc_driver", "duration")
    assert seen["ended"]["completionStatus"] == "time_limit"
    assert 1.5 < seen["seconds"] < 10


PAGE_DIR = ROOT / "tests" / "webrtc_page"
SCREENSHOT = ROOT / "docs" / "webrtc-browser.png"


def _bundle(out: Path) -> Path:
    """tests/webrtc_page/page.js with Pipecat's published JS client and SmallWebRTC transport,
    installed from npm's registry into tests/webrtc_page/node_modules (gitignored, kept
    between runs) and bundled by esbuild: nothing is fetched from a CDN."""
    npm = shutil.which("npm")
    assert npm is not None, "the browser test needs npm (Debian's nodejs and npm packages)"
    esbuild = PAGE_DIR / "node_modules" / ".bin" / "esbuild"
    if not esbuild.exists():
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"], cwd=PAGE_DIR, check=True, timeout=300
        )
    bundle = out / "page.bundle.js"
    subprocess.run(
        [str(esbuild), "page.js", "--bundle", "--format=iife", f"--outfile={bundle}"],
        cwd=PAGE_DIR,
        check=True,
        timeout=60,
    )
    return bundle


@needs_namespace
def test_pipecats_js_client_in_chromium_gets_ready_and_hears_the_bot(tmp_path: Path) -> None:
    """Headless Debian Chromium, fake microphone, loads a page bundled from
    ``@pipecat-ai/client-js`` and ``@pipecat-ai/small-webrtc-transport`` and calls catflap's
    ``/start``: the client reaches ``ready`` (the bot's RTVI ``bot-ready``), the bot's audio
    track carries the echoed fake microphone (not silence), and the client's disconnect ends
    ``bot()``. With ``CATFLAP_UPDATE_SCREENSHOT=1`` the page's screenshot replaces
    docs/webrtc-browser.png."""
    assert Path("/usr/bin/chromium").exists(), "Debian's chromium is missing: ./dev installs it"
    bundle = _bundle(tmp_path)
    shot = tmp_path / "webrtc-browser.png"
    seen = in_namespace("tests.webrtc_driver", "browser", str(bundle), str(shot))
    assert "error" not in seen, seen
    state = seen["state"]
    assert state["ready"] is True and state["error"] is None
    assert state["states"][-1] == "ready" and "connected" in state["states"]
    assert state["botAudio"] is True
    assert state["peakRms"] > 0.01, state  # Chromium's fake microphone beeps, echoed back
    assert seen["live_sessions"] == 1
    assert seen["ended"] == {"completionStatus": "completed", "transport": "webrtc"}
    assert seen["ended_after_hangup_s"] < 10
    if os.environ.get("CATFLAP_UPDATE_SCREENSHOT"):  # else a test run would edit the repo
        shutil.copyfile(shot, SCREENSHOT)
