"""The session proxy's parts (gateway/sessionproxy.py): the path check, the headers each way,
the wait for a starting session, and the hop's 502 and 504 against small local servers."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from catflap.contract import headers, limits
from catflap.contract.errors import (
    InvalidProxyPath,
    ReservedPath,
    SessionNotFound,
    SessionProxyTimeout,
    SessionStarting,
    SessionUnreachable,
)
from catflap.gateway.sessionproxy import (
    AGENT_HOST,
    ProxiedAnswer,
    SessionProxy,
    forwarded_headers,
    proxied_target,
    raw_rest,
    returned_headers,
)
from catflap.pool.interface import SessionPlace

SID = "123e4567-e89b-42d3-a456-426614174000"


# --- the path ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rest", "query", "target"),
    [
        ("status", b"", b"/status"),
        ("", b"", b"/"),
        ("api/offer", b"", b"/api/offer"),
        ("a%20b/c%2Fd", b"x=1&x=2&y=%C3%A9", b"/a%20b/c%2Fd?x=1&x=2&y=%C3%A9"),
        ("botany", b"", b"/botany"),  # starts like /bot, is not below it
        ("wsx/y", b"", b"/wsx/y"),
        ("status/", b"q", b"/status/?q"),
        ("a//b", b"", b"/a//b"),
    ],
    ids=["route", "root", "webrtc-offer", "encoded", "botany", "wsx", "trailing-slash", "double"],
)
def test_a_bot_route_is_forwarded_as_the_client_wrote_it(
    rest: str, query: bytes, target: bytes
) -> None:
    assert proxied_target(rest, query) == target


@pytest.mark.parametrize("reserved", headers.RUNTIME_PATHS)
@pytest.mark.parametrize(
    "spelling",
    [
        "{p}",
        "{p}/",
        "{p}/below",
        "/{p}",  # //bot
        "{p}//",
        "%2F{p}",  # /%2Fbot: the runtime decodes it to //bot
        "{P}",  # percent-encoded letters
        "{PP}",  # encoded twice
        "\\{p}",
        "%5C{p}",
    ],
    ids=[
        "plain",
        "slash",
        "below",
        "leading-double-slash",
        "trailing-double-slash",
        "encoded-slash",
        "encoded",
        "encoded-twice",
        "backslash",
        "encoded-backslash",
    ],
)
def test_the_runtimes_own_paths_are_refused_in_every_spelling(reserved: str, spelling: str) -> None:
    name = reserved.lstrip("/")
    once = "".join(f"%{ord(c):02X}" for c in name)
    twice = "".join(f"%25{ord(c):02X}" for c in name)
    rest = spelling.format(p=name, P=once, PP=twice)
    with pytest.raises(ReservedPath) as refused:
        proxied_target(rest, b"")
    assert (refused.value.status, refused.value.code) == (404, "reserved_path")
    assert reserved in refused.value.message


@pytest.mark.parametrize(
    "rest",
    ["x/../bot", "..", ".", "a/./b", "%2e%2e/bot", "%2E%2E%2Fbot", "x/%252e%252e/metrics", "a/.."],
    ids=["dotdot", "only-dotdot", "only-dot", "dot", "encoded", "encoded-upper", "twice", "end"],
)
def test_dot_segments_are_refused_in_every_spelling(rest: str) -> None:
    with pytest.raises(InvalidProxyPath) as refused:
        proxied_target(rest, b"")
    assert (refused.value.status, refused.value.code) == (400, "invalid_proxy_path")


def test_the_raw_rest_is_the_target_after_the_session_id_as_written() -> None:
    raw = f"/v1/public/my-agent/sessions/{SID}/a%2Fb/%62ot".encode()
    assert raw_rest(raw, "my-agent", SID) == "a%2Fb/%62ot"
    assert raw_rest(f"/v1/public/my-%61gent/sessions/{SID}/x".encode(), "my-agent", SID) == "x"
    assert raw_rest(f"/v1/public/my-agent/sessions/{SID}/".encode(), "my-agent", SID) == ""
    # A %2F inside the session id segment: the router split the decoded path elsewhere.
    moved = f"/v1/public/my-agent/sessions/{SID}%2Fbot".encode()
    assert raw_rest(moved, "my-agent", SID) is None


# --- the headers -------------------------------------------------------------------------------


def test_the_bot_gets_the_clients_headers_less_the_hop_and_the_key_plus_the_session_id() -> None:
    client = [
        (b"Host", b"gateway.example"),
        (b"Authorization", b"Bearer pk_123"),
        (b"Content-Length", b"5"),
        (b"Connection", b"keep-alive, X-Hop"),
        (b"X-Hop", b"dropped: named by Connection"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Transfer-Encoding", b"chunked"),
        (b"TE", b"trailers"),
        (b"Upgrade", b"websocket"),
        (b"Proxy-Authorization", b"Basic eA=="),
        (b"Expect", b"100-continue"),
        (b"X-Daily-Session-Id", b"spoofed"),
        (b"x-pcc-max-session-seconds", b"99999"),
        (b"X-Catflap-Transport-Type", b"websocket"),
        (b"Accept", b"application/json"),
        (b"X-Multi", b"1"),
        (b"Cookie", b"c=1"),
        (b"X-Multi", b"2"),
        (b"X-Forwarded-For", b"203.0.113.9"),
    ]
    assert forwarded_headers(client, SID) == [
        (b"host", AGENT_HOST.encode()),
        (b"Accept", b"application/json"),
        (b"X-Multi", b"1"),
        (b"Cookie", b"c=1"),
        (b"X-Multi", b"2"),
        (b"X-Forwarded-For", b"203.0.113.9"),
        (b"x-daily-session-id", SID.encode()),
    ]


def test_the_client_gets_the_bots_headers_less_the_hop_by_hop_ones() -> None:
    upstream = [
        (b"Date", b"Wed, 02 Dec 2026 08:00:00 GMT"),
        (b"Server", b"uvicorn"),
        (b"Content-Length", b"15"),
        (b"Content-Type", b"text/plain"),
        (b"Set-Cookie", b"a=1"),
        (b"Connection", b"close, X-Private"),
        (b"X-Private", b"1"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Set-Cookie", b"b=2"),
    ]
    assert returned_headers(upstream) == [
        (b"date", b"Wed, 02 Dec 2026 08:00:00 GMT"),
        (b"server", b"uvicorn"),
        (b"content-length", b"15"),
        (b"content-type", b"text/plain"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
    ]


# --- where the session is -------------------------------------------------------------------


@dataclass
class _Pool:
    """``SessionPool.locate`` as a test sets it: one answer after another (the last repeats)."""

    places: list[SessionPlace | None] = field(default_factory=list)
    asked: list[tuple[str, str]] = field(default_factory=list)

    async def locate(self, agent_key: str, session_id: str) -> SessionPlace | None:
        self.asked.append((agent_key, session_id))
        return self.places.pop(0) if len(self.places) > 1 else self.places[0]


async def test_a_running_session_is_found_at_its_instance() -> None:
    pool = _Pool([SessionPlace("unix:/run/a.sock", running=True)])
    proxy = SessionProxy(pool=pool)  # type: ignore[arg-type]
    assert await proxy.place("a.org", SID) == "unix:/run/a.sock"
    assert pool.asked == [("a.org", SID)]


async def test_an_unknown_or_ended_session_is_404() -> None:
    proxy = SessionProxy(pool=_Pool([None]))  # type: ignore[arg-type]
    with pytest.raises(SessionNotFound) as refused:
        await proxy.place("a.org", SID)
    assert (refused.value.status, refused.value.code) == (404, "session_not_found")


async def test_a_starting_session_is_waited_for() -> None:
    starting = SessionPlace(None, running=False)
    reserved = SessionPlace("tcp:10.0.0.2:4000", running=False)
    running = SessionPlace("tcp:10.0.0.2:4000", running=True)
    pool = _Pool([starting, starting, reserved, running])
    assert await SessionProxy(pool=pool).place("a.org", SID) == "tcp:10.0.0.2:4000"  # type: ignore[arg-type]
    assert len(pool.asked) == 4


async def test_a_session_still_starting_after_the_wait_is_503_and_one_that_ended_404() -> None:
    proxy = SessionProxy(pool=_Pool([SessionPlace(None, running=False)]), start_wait=0.05)  # type: ignore[arg-type]
    started = asyncio.get_running_loop().time()
    with pytest.raises(SessionStarting) as refused:
        await proxy.place("a.org", SID)
    assert asyncio.get_running_loop().time() - started >= 0.05
    assert (refused.value.status, refused.value.code) == (503, "session_starting")
    assert ("retry-after", str(limits.RETRY_AFTER_NOT_READY_S)) in refused.value.headers
    ends = _Pool([SessionPlace(None, running=False), None])
    with pytest.raises(SessionNotFound):
        await SessionProxy(pool=ends).place("a.org", SID)  # type: ignore[arg-type]


# --- the hop: 502 and 504 --------------------------------------------------------------------


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def _unix_server(handler: Handler) -> AsyncIterator[str]:
    with tempfile.TemporaryDirectory(prefix="cfpx") as workdir:
        path = str(Path(workdir) / "agent.sock")
        server = await asyncio.start_unix_server(handler, path)
        try:
            yield f"unix:{path}"
        finally:
            server.close()
            await server.wait_closed()


async def _forward(proxy: SessionProxy, address: str) -> ProxiedAnswer:
    return await proxy.forward(
        address, "GET", b"/status", [(b"host", b"catflap-agent")], b"", session_id=SID
    )


async def test_an_instance_that_cannot_be_reached_is_502() -> None:
    with tempfile.TemporaryDirectory(prefix="cfpx") as workdir:
        proxy = SessionProxy(pool=_Pool([None]))  # type: ignore[arg-type]
        with pytest.raises(SessionUnreachable) as refused:
            await _forward(proxy, f"unix:{workdir}/gone.sock")
    assert (refused.value.status, refused.value.code) == (502, "session_unreachable")


async def test_a_bot_that_sends_no_response_head_in_time_is_504() -> None:
    held: list[asyncio.StreamWriter] = []

    async def silent(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # reads nothing, answers nothing

    async with _unix_server(silent) as address:
        proxy = SessionProxy(pool=_Pool([None]), timeout=0.2)  # type: ignore[arg-type]
        with pytest.raises(SessionProxyTimeout) as refused:
            await _forward(proxy, address)
        for writer in held:
            writer.close()
    assert (refused.value.status, refused.value.code) == (504, "session_proxy_timeout")


async def test_a_bot_that_closes_without_an_answer_is_502() -> None:
    async def rude(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async with _unix_server(rude) as address:
        proxy = SessionProxy(pool=_Pool([None]))  # type: ignore[arg-type]
        with pytest.raises(SessionUnreachable):
            await _forward(proxy, address)


async def test_the_bots_answer_streams_and_a_broken_one_says_so() -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nDate: x\r\nTransfer-Encoding: chunked\r\nX-Bot: 1\r\n\r\n"
            b"5\r\nhello\r\n"
        )
        await writer.drain()
        writer.close()  # before the last chunk: the answer broke off

    async with _unix_server(answer) as address:
        proxy = SessionProxy(pool=_Pool([None]))  # type: ignore[arg-type]
        got = await _forward(proxy, address)
        try:
            assert (got.status, got.headers) == (200, [(b"date", b"x"), (b"x-bot", b"1")])
            chunks = []
            with pytest.raises(ConnectionError, match="broke off"):
                async for chunk in got.chunks():
                    chunks.append(chunk)
            assert b"".join(chunks) == b"hello"
        finally:
            await got.aclose()


async def test_the_defaults_are_the_contracts_bounds_and_wait_for_a_quick_start() -> None:
    """The gateway's wiring (Timings) and a bare proxy carry the bounds of contract/limits.py;
    a session that starts well within ``SESSION_PROXY_START_WAIT_S`` is waited for."""
    from catflap.gateway.timings import Timings

    timings = Timings()
    assert timings.proxy_start_wait == limits.SESSION_PROXY_START_WAIT_S
    assert timings.proxy_timeout == limits.SESSION_PROXY_TIMEOUT_S
    starting = SessionPlace(None, running=False)
    pool = _Pool([starting] * 10 + [SessionPlace("unix:/run/a.sock", running=True)])
    proxy = SessionProxy(pool=pool)  # type: ignore[arg-type]
    assert (proxy.start_wait, proxy.timeout) == (
        limits.SESSION_PROXY_START_WAIT_S,
        limits.SESSION_PROXY_TIMEOUT_S,
    )
    async with asyncio.timeout(limits.SESSION_PROXY_START_WAIT_S):
        assert await proxy.place("a.org", SID) == "unix:/run/a.sock"
