"""Daily sessions (gateway/daily.py): ``/start`` with ``createDailyRoom: true`` or
``transport: "daily"`` creates a room and a meeting token through Daily's REST API, then starts
the bot in that room through the runtime's ``POST /bot``.

Daily's API cannot be reached from here, so a small HTTP server on 127.0.0.1 stands in for its
two endpoints, answering with the shapes Daily documents and recording every request: the one
fake. The gateway, the pool, the agent process and the bot are real, and so is the official
SDK where it is used. First the request bodies and the config as pure parts, then the client
against the stand-in (its bounds), then end to end.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from catflap.config import CatflapConfig, OrgConfig, load_config
from catflap.config.models import DAILY_API_URL_DEFAULT
from catflap.contract import limits
from catflap.contract.errors import ConfigError, DailyApiError, DailyApiTimeout, DailyNotConfigured
from catflap.gateway.botsession import DAILY_TRANSPORT
from catflap.gateway.daily import (
    DailyRoom,
    create_daily_room,
    daily_api_key,
    room_request,
    token_request,
)
from tests.conftest import PUBLIC_KEY, RunningGateway, seconds, write_config
from tests.test_bot_sessions import AGENT, AGENT_KEY, ended_record, received_by_bot, warm_gateway

DAILY_KEY = "dk_test_0123456789abcdef"
ROOM_NAME = "catflap-room-1"
ROOM_URL = f"https://catflap-test.daily.co/{ROOM_NAME}"
MEETING_TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJyIjoiY2F0ZmxhcC1yb29tLTEifQ.c2lnbmF0dXJl"

# --- the stand-in for Daily's REST API ---------------------------------------------------------


@dataclass(frozen=True)
class DailyCall:
    """One request the stand-in received."""

    method: str
    path: str
    headers: dict[str, str]
    json: Any


#: How the stand-in answers one path: (status, extra header lines, body), or HANG (never).
Answer = tuple[int, list[str], bytes]
HANG = "hang"
#: An extra header line that makes the stand-in send no content-length (the body then ends
#: with the connection).
NO_LENGTH = "-content-length"


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


def room_object(payload: Any, *, url: str = ROOM_URL, name: str = ROOM_NAME) -> dict[str, Any]:
    """Daily's answer to ``POST /rooms`` (https://docs.daily.co/reference/rest-api/rooms/create-room):
    the room object, its ``config`` being the properties asked for."""
    return {
        "id": "5e3cf703-5547-47d6-a371-37b1f0b4427f",
        "name": name,
        "api_created": True,
        "privacy": payload.get("privacy", "public"),
        "url": url,
        "created_at": "2026-12-02T08:00:00.000Z",
        "config": payload.get("properties", {}),
    }


@dataclass
class FakeDaily:
    """``POST /v1/rooms`` and ``POST /v1/meeting-tokens`` on 127.0.0.1, as Daily answers them
    unless a test sets ``answers[path]``."""

    port: int = 0
    calls: list[DailyCall] = field(default_factory=list)
    answers: dict[str, Answer | str] = field(default_factory=dict)
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _answer(self, call: DailyCall) -> Answer | str:
        if call.path in self.answers:
            return self.answers[call.path]
        if call.path == "/v1/rooms":
            return 200, [], _json(room_object(call.json))
        if call.path == "/v1/meeting-tokens":
            return 200, [], _json({"token": MEETING_TOKEN})
        return 404, [], _json({"error": "not-found", "info": f"no route {call.path}"})

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            method, path, _ = head[0].split(" ")
            headers = dict(line.split(": ", 1) for line in head[1:] if line)
            headers = {name.lower(): value for name, value in headers.items()}
            data = await reader.readexactly(int(headers.get("content-length", "0")))
            call = DailyCall(method, path, headers, json.loads(data) if data else None)
            self.calls.append(call)
            answer = self._answer(call)
            if answer == HANG:
                await asyncio.sleep(3600)
            assert not isinstance(answer, str)
            status, extra, body = answer
            lines = [f"HTTP/1.1 {status} X", "content-type: application/json"]
            lines += [line for line in extra if line != NO_LENGTH]
            if NO_LENGTH not in extra:
                lines.append(f"content-length: {len(body)}")
            lines.append("connection: close")
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()


@asynccontextmanager
async def fake_daily() -> AsyncIterator[FakeDaily]:
    fake = FakeDaily()
    server = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
    fake.port = server.sockets[0].getsockname()[1]
    try:
        async with server:
            yield fake
    finally:
        for task in list(fake._handlers):
            task.cancel()
        server.close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --- the parts, without sockets ----------------------------------------------------------------


def test_the_room_is_private_and_expires_with_the_session_unless_the_client_says_otherwise() -> (
    None
):
    assert room_request(None, expires_at=1000) == {
        "privacy": "private",
        "properties": {"exp": 1000, "eject_at_room_exp": True},
    }
    asked = {"enable_recording": "cloud", "exp": 500, "eject_at_room_exp": False}
    assert room_request(asked, expires_at=1000) == {"privacy": "private", "properties": asked}


def test_the_token_is_always_for_the_new_room_and_expires_with_it_by_default() -> None:
    assert token_request("r1", None, expires_at=1000) == {
        "properties": {"exp": 1000, "room_name": "r1"}
    }
    # A room_name the client sends would open another room (or, absent, every room).
    asked = {"is_owner": True, "exp": 900, "room_name": "someone-elses-room"}
    assert token_request("r1", asked, expires_at=1000) == {
        "properties": {"exp": 900, "is_owner": True, "room_name": "r1"}
    }


def test_the_daily_api_key_comes_from_the_config_or_the_variable_it_names() -> None:
    in_file = OrgConfig(daily_api_key=SecretStr(DAILY_KEY))
    assert daily_api_key("my-org", in_file, {}).get_secret_value() == DAILY_KEY
    from_env = OrgConfig(daily_api_key_env="MY_DAILY_KEY")
    key = daily_api_key("my-org", from_env, {"MY_DAILY_KEY": DAILY_KEY})
    assert key.get_secret_value() == DAILY_KEY
    with pytest.raises(DailyNotConfigured, match=r"variable MY_DAILY_KEY, which is not set"):
        daily_api_key("my-org", from_env, {"MY_DAILY_KEY": " "})
    with pytest.raises(DailyNotConfigured) as missing:
        daily_api_key("my-org", OrgConfig(), {})
    assert (missing.value.status, missing.value.code) == (400, "daily_not_configured")
    assert "[organizations.my-org] daily_api_key, or daily_api_key_env" in missing.value.message


def test_catflap_toml_takes_a_daily_key_and_never_shows_it(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"my-agent": {}})
    base = path.read_text()
    path.write_text(
        base.replace(
            "[organizations.my-org]\n",
            "[organizations.my-org]\n"
            + (f'daily_api_key = "{DAILY_KEY}"\ndaily_api_url = "http://127.0.0.1:9/v1"\n'),
        )
    )
    config = load_config(path)
    org = config.organizations["my-org"]
    assert org.daily_api_key is not None and org.daily_api_key.get_secret_value() == DAILY_KEY
    assert org.daily_api_url == "http://127.0.0.1:9/v1"
    assert DAILY_KEY not in repr(config) and DAILY_KEY not in str(org)
    assert OrgConfig().daily_api_url == DAILY_API_URL_DEFAULT == "https://api.daily.co/v1"
    both = '[organizations.my-org]\ndaily_api_key = "k"\ndaily_api_key_env = "K"\n'
    path.write_text(base.replace("[organizations.my-org]\n", both))
    with pytest.raises(ConfigError, match="daily_api_key or daily_api_key_env, not both"):
        load_config(path)
    spaced = f'[organizations.my-org]\ndaily_api_key = "{DAILY_KEY} x"\n'
    path.write_text(base.replace("[organizations.my-org]\n", spaced))
    with pytest.raises(ConfigError, match="printable ASCII without spaces") as refused:
        load_config(path)
    assert DAILY_KEY not in str(refused.value)


# --- the client against the stand-in: what it sends, and its bounds ----------------------------


async def _create(fake: FakeDaily, **changes: Any) -> DailyRoom:
    arguments: dict[str, Any] = {
        "api_url": fake.url,
        "api_key": SecretStr(DAILY_KEY),
        "room_properties": {"enable_recording": "cloud"},
        "token_properties": {"is_owner": True},
        "expires_at": 1_800_000_000,
    }
    return await create_daily_room(**(arguments | changes))


async def test_the_client_creates_a_room_then_a_token_for_it_with_the_key() -> None:
    async with fake_daily() as fake:
        room = await _create(fake)
    assert room == DailyRoom(url=ROOM_URL, name=ROOM_NAME, token=MEETING_TOKEN)
    assert MEETING_TOKEN not in repr(room)
    assert [(c.method, c.path) for c in fake.calls] == [
        ("POST", "/v1/rooms"),
        ("POST", "/v1/meeting-tokens"),
    ]
    for call in fake.calls:
        assert call.headers["authorization"] == f"Bearer {DAILY_KEY}"
        assert call.headers["content-type"] == "application/json"
        assert call.headers["accept-encoding"] == "identity"
    assert fake.calls[0].json == {
        "privacy": "private",
        "properties": {
            "exp": 1_800_000_000,
            "eject_at_room_exp": True,
            "enable_recording": "cloud",
        },
    }
    assert fake.calls[1].json == {
        "properties": {"exp": 1_800_000_000, "is_owner": True, "room_name": ROOM_NAME}
    }


async def test_dailys_refusal_is_a_502_with_its_status_and_text_but_never_the_key() -> None:
    async with fake_daily() as fake:
        fake.answers["/v1/rooms"] = (
            401,
            [],
            _json({"error": "authentication-error", "info": f"bad key {DAILY_KEY}"}),
        )
        with pytest.raises(DailyApiError) as refused:
            await _create(fake)
    assert (refused.value.status, refused.value.code) == (502, "daily_api_error")
    assert refused.value.message.startswith(
        "Daily's API answered 401 to POST /rooms (authentication-error: bad key [daily_api_key]);"
    )
    assert DAILY_KEY not in json.dumps(refused.value.to_body())
    assert len(fake.calls) == 1  # no token for a room that does not exist


async def test_a_refusal_that_is_not_json_is_quoted_cut_and_printable() -> None:
    page = b"<html>\n<h1>Bad Gateway</h1>\n" + b"x" * 1000 + b"</html>"
    async with fake_daily() as fake:
        fake.answers["/v1/meeting-tokens"] = (503, [], page)
        with pytest.raises(DailyApiError) as refused:
            await _create(fake)
        fake.answers["/v1/meeting-tokens"] = (200, [], b"{not json")
        with pytest.raises(DailyApiError, match="other than a JSON object"):
            await _create(fake)
    message = refused.value.message
    assert message.startswith("Daily's API answered 503 to POST /meeting-tokens (<html> <h1>Bad")
    assert "\n" not in message and "x" * 250 in message and "x" * 400 not in message
    assert message.endswith(
        "check the organization's Daily API key and the dailyMeetingTokenProperties"
    )


async def test_an_answer_over_the_byte_bound_is_refused_declared_or_streamed() -> None:
    over = b" " * (limits.DAILY_API_RESPONSE_MAX_BYTES + 1)
    async with fake_daily() as fake:
        fake.answers["/v1/rooms"] = (200, [], over)
        with pytest.raises(DailyApiError, match=str(limits.DAILY_API_RESPONSE_MAX_BYTES)):
            await _create(fake)
        # No content-length: the end of the connection ends the body; counted as it arrives.
        fake.answers["/v1/rooms"] = (200, [NO_LENGTH], over)
        with pytest.raises(DailyApiError, match=str(limits.DAILY_API_RESPONSE_MAX_BYTES)):
            await _create(fake)
        fits = _json(room_object({})).ljust(limits.DAILY_API_RESPONSE_MAX_BYTES)
        fake.answers["/v1/rooms"] = (200, [], fits)
        assert (await _create(fake)).url == ROOM_URL


async def test_a_compressed_answer_is_refused_rather_than_inflated() -> None:
    async with fake_daily() as fake:
        fake.answers["/v1/rooms"] = (200, ["content-encoding: gzip"], b"\x1f\x8b")
        with pytest.raises(DailyApiError, match="content-encoding 'gzip'"):
            await _create(fake)


@pytest.mark.parametrize(
    ("url", "token", "refused"),
    [
        (ROOM_URL, "t" * limits.DAILY_ROOM_TOKEN_MAX_CHARS, None),
        (ROOM_URL, "t" * (limits.DAILY_ROOM_TOKEN_MAX_CHARS + 1), "'token'"),
        (ROOM_URL, "tok\r\nx-injected: 1", "'token'"),
        ("https://d.co/" + "r" * limits.DAILY_ROOM_URL_MAX_CHARS, MEETING_TOKEN, "'url'"),
        ("https://d.co/a b", MEETING_TOKEN, "'url'"),
        ("javascript:alert(1)", MEETING_TOKEN, "'url'"),
    ],
    ids=["token-at-bound", "token-over", "token-crlf", "url-over", "url-space", "url-scheme"],
)
async def test_room_urls_and_tokens_must_fit_a_header_line(
    url: str, token: str, refused: str | None
) -> None:
    async with fake_daily() as fake:
        fake.answers["/v1/meeting-tokens"] = (200, [], _json({"token": token}))
        fake.answers["/v1/rooms"] = (200, [], _json(room_object({}, url=url)))
        if refused is None:
            assert (await _create(fake)).token == token
        else:
            with pytest.raises(DailyApiError, match=f"without a usable {refused}"):
                await _create(fake)


async def test_an_answer_that_is_not_dailys_is_a_502() -> None:
    async with fake_daily() as fake:
        fake.answers["/v1/meeting-tokens"] = (200, [], b"[1, 2]")
        with pytest.raises(DailyApiError, match="other than a JSON object"):
            await _create(fake)
        fake.answers["/v1/meeting-tokens"] = (200, [], _json({"id": "no token here"}))
        with pytest.raises(DailyApiError, match="without a usable 'token'"):
            await _create(fake)
    with pytest.raises(DailyApiError, match=r"could not reach Daily's API, or read its answer"):
        await create_daily_room(
            api_url=f"http://127.0.0.1:{_closed_port()}/v1",
            api_key=SecretStr(DAILY_KEY),
            room_properties=None,
            token_properties=None,
            expires_at=1,
        )


async def test_a_silent_daily_is_a_504_after_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "DAILY_API_TIMEOUT_S", 0.3)
    async with fake_daily() as fake:
        fake.answers["/v1/rooms"] = HANG
        began = time.monotonic()
        with pytest.raises(DailyApiTimeout) as silent:
            await _create(fake)
    assert time.monotonic() - began < seconds(5)
    assert (silent.value.status, silent.value.code) == (504, "daily_api_timeout")
    assert f"within {limits.DAILY_API_TIMEOUT_S:g} s" in silent.value.message


# --- end to end: a real gateway, agent process and bot -----------------------------------------


def _with_daily(fake: FakeDaily | None, **org: Any) -> Callable[[CatflapConfig], CatflapConfig]:
    """The organization's Daily settings, past the config file (the stand-in's port)."""
    settings = dict(org)
    if fake is not None:
        settings.setdefault("daily_api_key", SecretStr(DAILY_KEY))
        settings["daily_api_url"] = fake.url

    def adjust(config: CatflapConfig) -> CatflapConfig:
        changed = config.organizations["my-org"].model_copy(update=settings)
        return config.model_copy(update={"organizations": {"my-org": changed}})

    return adjust


async def _start(gw: RunningGateway, payload: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=gw.http, timeout=seconds(30)) as client:
        return await client.post(
            f"/v1/public/{AGENT}/start",
            json=payload,
            headers={"authorization": f"Bearer {PUBLIC_KEY}"},
        )


def _no_session_ran(gw: RunningGateway) -> None:
    """Nothing started: no live session, and every slot of the warm instance is free."""
    assert not gw.gateway.sessions.live
    assert all(not instance.leases for instance in gw.pool.agents[AGENT_KEY].live())


@pytest.mark.slow
@pytest.mark.parametrize(
    "asked", [{"createDailyRoom": True}, {"transport": "daily"}], ids=["createDailyRoom", "daily"]
)
async def test_a_daily_session_creates_a_room_and_a_token_and_the_bot_joins_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, asked: dict[str, Any]
) -> None:
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "received.jsonl"
    body = {"out": str(out), "user": "Ada"}
    async with fake_daily() as fake, warm_gateway(adjust=_with_daily(fake)) as gw:
        duration = gw.config.organizations["my-org"].agents[AGENT].max_session_duration
        before = int(time.time())
        response = await _start(
            gw,
            {
                **asked,
                "dailyRoomProperties": {"enable_recording": "cloud", "max_participants": 2},
                "dailyMeetingTokenProperties": {"is_owner": True, "user_name": "Ada"},
                "body": body,
            },
        )
        after = int(time.time())
        assert response.status_code == 200, response.text
        session_id = response.json()["sessionId"]
        assert response.json() == {
            "sessionId": session_id,
            "dailyRoom": ROOM_URL,
            "dailyToken": MEETING_TOKEN,
        }
        (received,) = await received_by_bot(out)
        assert received == {
            "type": "DailySessionArguments",
            "session_id": session_id,
            "body": body,
            "room_url": ROOM_URL,
            "token": MEETING_TOKEN,
        }
        record = await ended_record(gw, session_id)
        assert (record.transport, record.completion_status) == (DAILY_TRANSPORT, "completed")
    rooms, tokens = fake.calls
    assert (rooms.method, rooms.path, tokens.method, tokens.path) == (
        "POST",
        "/v1/rooms",
        "POST",
        "/v1/meeting-tokens",
    )
    assert (
        rooms.headers["authorization"] == tokens.headers["authorization"] == f"Bearer {DAILY_KEY}"
    )
    expires = rooms.json["properties"]["exp"]
    assert before + duration <= expires <= after + duration
    assert rooms.json == {
        "privacy": "private",
        "properties": {
            "exp": expires,
            "eject_at_room_exp": True,
            "enable_recording": "cloud",
            "max_participants": 2,
        },
    }
    assert tokens.json == {
        "properties": {"exp": expires, "is_owner": True, "user_name": "Ada", "room_name": ROOM_NAME}
    }
    assert DAILY_KEY not in caplog.text


@pytest.mark.slow
async def test_without_a_daily_key_a_daily_room_is_a_400_naming_the_setting(
    tmp_path: Path,
) -> None:
    out = tmp_path / "received.jsonl"
    async with fake_daily() as fake, warm_gateway() as gw:
        refused = await _start(gw, {"createDailyRoom": True, "body": {"out": str(out)}})
        assert refused.status_code == 400, refused.text
        assert refused.json() == {
            "error": "organization 'my-org' has no Daily API key, so catflap cannot create "
            "Daily rooms: set [organizations.my-org] daily_api_key, or daily_api_key_env naming "
            "an environment variable that holds it; or send no createDailyRoom (a session "
            "without a transport)",
            "code": "daily_not_configured",
        }
        _no_session_ran(gw)
    assert not fake.calls and not out.exists()


@pytest.mark.slow
async def test_the_daily_key_can_come_from_an_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "received.jsonl"
    monkeypatch.delenv("CATFLAP_TEST_DAILY_KEY", raising=False)
    async with fake_daily() as fake:
        adjust = _with_daily(fake, daily_api_key=None, daily_api_key_env="CATFLAP_TEST_DAILY_KEY")
        async with warm_gateway(adjust=adjust) as gw:
            unset = await _start(gw, {"transport": "daily", "body": {"out": str(out)}})
            assert (unset.status_code, unset.json()["code"]) == (400, "daily_not_configured")
            assert "CATFLAP_TEST_DAILY_KEY" in unset.json()["error"]
            assert not fake.calls
            monkeypatch.setenv("CATFLAP_TEST_DAILY_KEY", DAILY_KEY)
            started = await _start(gw, {"transport": "daily", "body": {"out": str(out)}})
            assert started.status_code == 200, started.text
            await ended_record(gw, started.json()["sessionId"])
    assert [c.headers["authorization"] for c in fake.calls] == [f"Bearer {DAILY_KEY}"] * 2


@pytest.mark.slow
@pytest.mark.parametrize("failing", ["/v1/rooms", "/v1/meeting-tokens"], ids=["room", "token"])
async def test_a_daily_500_is_a_502_and_no_bot_starts_nor_slot_is_held(
    tmp_path: Path, failing: str
) -> None:
    out = tmp_path / "received.jsonl"
    async with fake_daily() as fake, warm_gateway(adjust=_with_daily(fake)) as gw:
        fake.answers[failing] = (500, [], _json({"error": "server-error", "info": "try later"}))
        refused = await _start(gw, {"createDailyRoom": True, "body": {"out": str(out)}})
        assert refused.status_code == 502, refused.text
        step = failing.removeprefix("/v1")
        assert refused.json()["code"] == "daily_api_error"
        assert refused.json()["error"].startswith(
            f"Daily's API answered 500 to POST {step} (server-error: try later); no session was "
            "started"
        )
        assert DAILY_KEY not in refused.text
        _no_session_ran(gw)
        # The instance is untouched: a session without a transport runs on it at once.
        plain = await _start(gw, {"body": {"out": str(out)}})
        assert plain.status_code == 200, plain.text
        await ended_record(gw, plain.json()["sessionId"])
    assert len(await received_by_bot(out)) == 1


@pytest.mark.slow
async def test_a_silent_daily_is_a_504_and_no_bot_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limits, "DAILY_API_TIMEOUT_S", 0.5)
    out = tmp_path / "received.jsonl"
    async with fake_daily() as fake, warm_gateway(adjust=_with_daily(fake)) as gw:
        fake.answers["/v1/rooms"] = HANG
        refused = await _start(gw, {"createDailyRoom": True, "body": {"out": str(out)}})
        assert (refused.status_code, refused.json()["code"]) == (504, "daily_api_timeout")
        _no_session_ran(gw)
    assert not out.exists()


@pytest.mark.slow
async def test_at_max_agents_a_daily_session_gets_429_before_any_room_is_made(
    tmp_path: Path,
) -> None:
    out = tmp_path / "received.jsonl"
    async with fake_daily() as fake, warm_gateway(adjust=_with_daily(fake), max_agents=1) as gw:
        running = await _start(gw, {"body": {"out": str(out), "then": "wait"}})
        assert running.status_code == 200, running.text
        await received_by_bot(out)
        full = await _start(gw, {"createDailyRoom": True, "body": {"out": str(out)}})
        assert (full.status_code, full.json()["code"]) == (429, "PCC-AGENT-AT-CAPACITY")
        assert not fake.calls
        await gw.pool.stop_session(running.json()["sessionId"])
        await ended_record(gw, running.json()["sessionId"])


@pytest.mark.slow
async def test_over_the_start_rate_daily_and_webrtc_sessions_get_429_before_any_room_is_made(
    tmp_path: Path,
) -> None:
    """The address's one start goes to a bot; then a Daily room, a WebRTC session and another
    bot are refused with 429 ``too_many_starts``: no room is made, no slot taken."""
    out = tmp_path / "received.jsonl"
    async with fake_daily() as fake:
        with_daily = _with_daily(fake)

        def adjust(config: CatflapConfig) -> CatflapConfig:
            config = with_daily(config)
            settings = config.gateway.model_copy(  # one start per 1000 s
                update={"session_starts_per_source": 0.001, "session_starts_burst": 1}
            )
            return config.model_copy(update={"gateway": settings})

        async with warm_gateway(adjust=adjust) as gw:
            first = await _start(gw, {"body": {"out": str(out)}})
            assert first.status_code == 200, first.text
            await ended_record(gw, first.json()["sessionId"])
            for payload in (
                {"createDailyRoom": True, "body": {"out": str(out)}},
                {"transport": "webrtc"},
                {"body": {"out": str(out)}},
            ):
                refused = await _start(gw, payload)
                assert refused.status_code == 429, refused.text
                assert refused.json()["code"] == "too_many_starts"
                # The next start is 1000 s after the first, less the seconds gone since.
                assert 900 <= int(refused.headers["retry-after"]) <= 1000
                _no_session_ran(gw)
            assert not fake.calls
    assert len(await received_by_bot(out)) == 1


@pytest.mark.slow
async def test_the_sdk_starts_a_daily_session_with_use_daily(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("pipecatcloud")
    from pipecatcloud import Session, SessionParams

    out = tmp_path / "received.jsonl"
    async with fake_daily() as fake, warm_gateway(adjust=_with_daily(fake)) as gw:
        monkeypatch.setenv("PIPECAT_API_HOST", gw.http)
        data = {"out": str(out), "user": {"name": "Ada"}}
        params = SessionParams(
            data=data, use_daily=True, daily_room_properties={"start_video_off": True}
        )
        result = await Session(AGENT, PUBLIC_KEY, params=params).start()
        assert result == {
            "sessionId": result["sessionId"],
            "dailyRoom": ROOM_URL,
            "dailyToken": MEETING_TOKEN,
        }
        (received,) = await received_by_bot(out)
        assert received == {
            "type": "DailySessionArguments",
            "session_id": result["sessionId"],
            "body": data,
            "room_url": ROOM_URL,
            "token": MEETING_TOKEN,
        }
        await ended_record(gw, result["sessionId"])
    assert fake.calls[0].json["properties"]["start_video_off"] is True
    assert fake.calls[1].json["properties"]["room_name"] == ROOM_NAME


@pytest.mark.slow
async def test_in_cluster_mode_a_gateway_starts_a_daily_session_on_an_agent_host() -> None:
    from tests.test_cluster import cluster

    async with fake_daily() as fake:
        daily = f'daily_api_key = "{DAILY_KEY}"\ndaily_api_url = "{fake.url}"\n'
        async with (
            cluster(gateways=1, hosts=1, slots=1, org_settings=daily) as cl,
            httpx.AsyncClient(timeout=seconds(30)) as client,
        ):
            started = await client.post(
                f"{cl.http(0)}/v1/public/echo/start",
                json={"createDailyRoom": True, "body": {"k": 1}},
                headers={"authorization": "Bearer pk_test"},
            )
            assert started.status_code == 200, started.text
            session_id = started.json()["sessionId"]
            assert started.json() == {
                "sessionId": session_id,
                "dailyRoom": ROOM_URL,
                "dailyToken": MEETING_TOKEN,
            }
            # The cluster's bot is a WebSocket echo: it fails on args.websocket, and the error
            # names the arguments' class, which proves that the bot got Daily's.
            async with asyncio.timeout(seconds(20)):
                while True:
                    shown = await client.get(
                        f"{cl.http(0)}/v1/agents/echo/sessions/{session_id}",
                        headers={"authorization": "Bearer sk_test"},
                    )
                    if shown.status_code == 200 and shown.json().get("completionStatus"):
                        break
                    await asyncio.sleep(0.05)
    assert shown.json()["completionStatus"] == "bot_error"
    assert shown.json()["transport"] == DAILY_TRANSPORT
    assert "DailySessionArguments" in shown.json()["error"]
    assert [c.path for c in fake.calls] == ["/v1/rooms", "/v1/meeting-tokens"]
    assert {c.headers["authorization"] for c in fake.calls} == {f"Bearer {DAILY_KEY}"}
