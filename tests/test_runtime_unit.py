"""The agent runtime without processes or sockets: a session's lifecycle through the ASGI app
in memory (the test plays the client with ASGI messages), the HTTP routes, the control loop
with a fake command source and server, and RunningBots. Time is a fake the test moves, so
budgets and the cancellation grace need no waiting."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import socket
import types
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.types import Message

import catflap.runtime.session as session_module
from catflap.contract import headers, limits
from catflap.contract.control import (
    ChildEvent,
    ControlChannel,
    ControlProtocolError,
    ParentCommand,
)
from catflap.contract.resources import ResourcePoint, summarize
from catflap.logs import SessionContext
from catflap.runtime.app import RESERVED_PATHS, ReservedRouteError, check_bot_routes, create_app
from catflap.runtime.args import PipecatSessionArguments
from catflap.runtime.botloader import LoadedBot
from catflap.runtime.control_loop import ControlLoop
from catflap.runtime.metrics import RuntimeMetrics
from catflap.runtime.resources import SessionSampler
from catflap.runtime.running import RunningBots
from catflap.runtime.session import SessionRunner

from .conftest import seconds

Bot = Callable[[Any], Awaitable[None]]


class FakeTime:
    """A monotonic clock and a sleep that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.sleepers.append((self.now + delay, wake))
        await wake

    def pending(self) -> list[float]:
        """How far ahead each sleeper still waiting is due."""
        return [due - self.now for due, wake in self.sleepers if not wake.done()]

    def advance(self, delay: float) -> None:
        self.now += delay
        for due, wake in self.sleepers:
            if due <= self.now and not wake.done():
                wake.set_result(None)


class FakeCapture:
    """Records what a BotOutputCapture would be told, in order, beside the emitted events."""

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def session_started(self, context: SessionContext) -> None:
        self.log.append(f"capture started {context}")

    def session_ended(self, context: SessionContext) -> None:
        self.log.append(f"capture ended {context}")


async def bounded(awaitable: Awaitable[Any]) -> Any:
    async with asyncio.timeout(seconds(5)):
        return await awaitable


class Client:
    """One in-memory WebSocket connection to the app: the test sends and reads ASGI messages."""

    def __init__(self, app: Any, scope: dict[str, Any]) -> None:
        self.to_app: asyncio.Queue[Message] = asyncio.Queue()
        self.from_app: asyncio.Queue[Message] = asyncio.Queue()
        self.to_app.put_nowait({"type": "websocket.connect"})
        self.handler = asyncio.create_task(app(scope, self.to_app.get, self.from_app.put))

    async def sent(self) -> Message:
        """The next message the app sent."""
        message: Message = await bounded(self.from_app.get())
        return message

    async def sent_text(self) -> Any:
        message = await self.sent()
        assert message["type"] == "websocket.send", message
        return json.loads(message["text"])

    def send(self, text: str) -> None:
        self.to_app.put_nowait({"type": "websocket.receive", "text": text})

    def hang_up(self) -> None:
        self.to_app.put_nowait({"type": "websocket.disconnect", "code": 1001})

    async def done(self) -> None:
        await bounded(self.handler)


class Runtime:
    """A SessionRunner on a fake clock, its app, and what it reported."""

    def __init__(self, bot: Bot, **hooks: Any) -> None:
        self.time = FakeTime()
        self.running = RunningBots()
        self.events: asyncio.Queue[ChildEvent] = asyncio.Queue()
        self.log: list[str] = []
        self.metrics = RuntimeMetrics("my-agent.my-org")
        self.sessions = SessionRunner(
            bot=LoadedBot(
                module=types.ModuleType("bot"),
                bot=bot,
                readyz=hooks.get("readyz"),
                select_subprotocol=hooks.get("select_subprotocol"),
            ),
            running=self.running,
            emit=self.emit,
            metrics=self.metrics,
            agent="my-agent",
            org="my-org",
            capture=FakeCapture(self.log),  # type: ignore[arg-type]
            clock=self.time.clock,
            sleep=self.time.sleep,
            max_sessions=hooks.get("max_sessions"),
            sampler=self.sampler,
        )
        self.app = create_app(self.sessions, hooks.get("app"))

    def sampler(self) -> SessionSampler:
        """Reads a process that uses a quarter of a core and 64 MiB, only at the session's
        start and end (its interval never passes on the fake clock)."""

        def read() -> tuple[float, int]:
            return self.time.clock() * FAKE_CPU_SHARE, FAKE_RSS

        return SessionSampler(read=read, clock=self.time.clock, sleep=_forever)

    async def emit(self, event: ChildEvent) -> None:
        self.log.append(f"event {event['event']}")
        await self.events.put(event)

    async def event(self) -> ChildEvent:
        event: ChildEvent = await bounded(self.events.get())
        return event

    def connect(
        self,
        *,
        session_id: str | None = None,
        query: str = "",
        transport_type: str | None = headers.TRANSPORT_TYPE_WEBSOCKET,
        max_seconds: str | None = None,
        subprotocols: list[str] | None = None,
    ) -> Client:
        extra = {
            headers.SESSION_ID_HEADER: session_id,
            headers.TRANSPORT_TYPE_HEADER: transport_type,
            headers.MAX_SESSION_SECONDS_HEADER: max_seconds,
        }
        scope = {
            "type": "websocket",
            "asgi": {"version": "3.0"},
            "scheme": "ws",
            "http_version": "1.1",
            "path": headers.AGENT_PATH,
            "raw_path": headers.AGENT_PATH.encode(),
            "root_path": "",
            "query_string": query.encode(),
            "headers": [(k.encode(), v.encode()) for k, v in extra.items() if v is not None],
            "subprotocols": subprotocols or [],
            "client": ("127.0.0.1", 50000),
            "server": ("agent", 80),
        }
        return Client(self.app, scope)

    async def start(self, **connect: Any) -> Client:
        """Connect and wait until the bot runs: accepted, its first frame read, started."""
        client = self.connect(**connect)
        assert await client.sent() == ACCEPT
        await client.sent_text()
        assert (await self.event())["event"] == "session_started"
        return client

    def metric(self, name: str, **labels: str) -> float | None:
        value = self.metrics.registry.get_sample_value(name, {"agent": "my-agent.my-org", **labels})
        return value


FAKE_CPU_SHARE = 0.25
FAKE_RSS = 64 * 2**20


async def _forever(_: float) -> None:
    await asyncio.Event().wait()


def ended(session_id: str, status: str, **fields: Any) -> dict[str, Any]:
    """The session_ended event, with the fields a test does not name at their usual values;
    ``resources`` is what the fake process gives over ``bot_seconds`` (none for 0 s)."""
    seconds = fields.get("bot_seconds", 0.0)
    point: ResourcePoint = {
        "t": round(seconds, 1),
        "c": round(FAKE_CPU_SHARE * 1000),
        "m": FAKE_RSS,
    }
    return {
        "event": "session_ended",
        "session_id": session_id,
        "status": status,
        "error": None,
        "client_disconnected": False,
        "bot_seconds": 0.0,
        "resources": summarize([point]) if seconds > 0 else None,
        **fields,
    }


def close(code: int, reason: str = "") -> Message:
    return {"type": "websocket.close", "code": code, "reason": reason}


ACCEPT: Message = {"type": "websocket.accept", "subprotocol": None, "headers": []}


async def echo(args: Any) -> None:
    """Sends what the bot was given, then echoes text until the client hangs up."""
    ws = args.websocket
    hello = {
        "session_id": args.session_id,
        "body": args.body,
        "transport_type": args.transport_type,
        "handle_sigint": args.handle_sigint,
        "handle_sigterm": args.handle_sigterm,
    }
    await ws.send_text(json.dumps(hello))
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        await ws.send_text(json.dumps(message["text"]))


async def until_set(event: asyncio.Event) -> None:
    """A bot task's stand-in: runs until ``event`` is set (or it is cancelled)."""
    await event.wait()


async def sleep_forever(args: Any) -> None:
    await args.websocket.send_text('"started"')
    await asyncio.Event().wait()


# --- A session from accept to session_ended ----------------------------------------------------


async def test_a_session_runs_the_bot_with_its_id_body_and_transport_then_reports_the_end() -> None:
    runtime = Runtime(echo)
    body = base64.b64encode(json.dumps({"k": "ÿ"}).encode()).decode()
    client = runtime.connect(session_id="sess-1", query=f"body={body}")
    assert await client.sent() == ACCEPT
    assert await client.sent_text() == {
        "session_id": "sess-1",
        "body": {"k": "ÿ"},
        "transport_type": "websocket",
        "handle_sigint": False,
        "handle_sigterm": False,
    }
    assert await runtime.event() == {"event": "session_started", "session_id": "sess-1"}
    assert "sess-1" in runtime.running
    client.send("hello")
    assert await client.sent_text() == "hello"
    runtime.time.advance(2.5)
    client.hang_up()
    await client.done()
    assert await runtime.event() == ended(
        "sess-1", "completed", client_disconnected=True, bot_seconds=2.5
    )
    assert client.from_app.empty()  # the client left first: nothing to close
    assert len(runtime.running) == 0
    context = SessionContext("sess-1", "my-agent", "my-org")
    assert runtime.log == [
        f"capture started {context}",
        "event session_started",
        f"capture ended {context}",  # before the end is reported: the log file is complete
        "event session_ended",
    ]
    assert runtime.metric("catflap_runtime_sessions_started_total") == 1
    assert runtime.metric("catflap_runtime_sessions_active") == 0
    assert runtime.metric("catflap_runtime_sessions_ended_total", status="completed") == 1
    assert runtime.metric("catflap_runtime_bot_seconds_sum") == 2.5


async def test_without_headers_the_id_is_generated_and_body_and_transport_are_none() -> None:
    runtime = Runtime(echo)
    client = runtime.connect(transport_type=None, query="body=%25%25not-base64")
    assert await client.sent() == ACCEPT
    hello = await client.sent_text()
    assert uuid.UUID(hello["session_id"]).version == 4
    assert (hello["body"], hello["transport_type"]) == (None, None)
    client.hang_up()
    await client.done()


async def test_a_transport_type_other_than_websocket_reaches_the_bot_as_none() -> None:
    runtime = Runtime(echo)
    client = runtime.connect(session_id="t", transport_type="twilio")
    await client.sent()
    assert (await client.sent_text())["transport_type"] is None
    client.hang_up()
    await client.done()


async def test_a_bot_that_returns_with_the_socket_open_closes_it_1000() -> None:
    async def bot(args: Any) -> None:
        await args.websocket.send_text('"bye"')

    runtime = Runtime(bot)
    client = runtime.connect(session_id="r")
    assert await client.sent() == ACCEPT
    assert await client.sent_text() == "bye"
    assert await client.sent() == close(1000)
    await client.done()
    await runtime.event()
    assert await runtime.event() == ended("r", "completed")


async def test_a_bot_that_closes_the_socket_itself_keeps_its_code() -> None:
    async def bot(args: Any) -> None:
        await args.websocket.close(code=4000, reason="mine")

    runtime = Runtime(bot)
    client = runtime.connect(session_id="own")
    assert [await client.sent(), await client.sent()] == [ACCEPT, close(4000, "mine")]
    await client.done()
    assert client.from_app.empty()  # no second close
    await runtime.event()
    assert await runtime.event() == ended("own", "completed")


async def test_a_bot_that_raises_closes_1011_with_the_class_and_reports_the_error() -> None:
    async def bot(args: Any) -> None:
        raise ValueError("no " + "x" * 5000)

    runtime = Runtime(bot)
    client = runtime.connect(session_id="boom")
    assert [await client.sent(), await client.sent()] == [ACCEPT, close(1011, "ValueError")]
    await client.done()
    await runtime.event()
    event = dict(await runtime.event())
    error = event.pop("error")
    assert event == {k: v for k, v in ended("boom", "bot_error").items() if k != "error"}
    assert isinstance(error, str) and error.startswith("ValueError: no xxx")
    assert len(error.encode()) < 5000  # cut: it travels on the bounded control channel
    assert runtime.metric("catflap_runtime_bot_errors_total") == 1
    assert runtime.metric("catflap_runtime_sessions_ended_total", status="bot_error") == 1


async def test_a_bot_that_cancels_itself_is_a_bot_error() -> None:
    async def bot(args: Any) -> None:
        raise asyncio.CancelledError

    runtime = Runtime(bot)
    client = runtime.connect(session_id="c")
    assert [await client.sent(), await client.sent()] == [ACCEPT, close(1011, "CancelledError")]
    await client.done()
    await runtime.event()
    assert await runtime.event() == ended("c", "bot_error", error="CancelledError")


async def test_session_arguments_that_cannot_be_built_end_the_session_as_a_bot_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(**kwargs: Any) -> Any:
        raise TypeError("unexpected keyword")

    monkeypatch.setattr(session_module, "make_session_args", refuse)
    runtime = Runtime(echo)
    client = runtime.connect(session_id="args")
    assert [await client.sent(), await client.sent()] == [ACCEPT, close(1011, "TypeError")]
    await client.done()
    await runtime.event()
    assert await runtime.event() == ended(
        "args", "bot_error", error="TypeError: unexpected keyword"
    )


async def test_the_budget_cancels_the_bot_when_it_runs_out_and_closes_1000() -> None:
    runtime = Runtime(sleep_forever)
    client = await runtime.start(session_id="t", max_seconds="30")
    assert runtime.time.pending() == [30.0]
    runtime.time.advance(29.5)
    await asyncio.sleep(0)
    assert client.from_app.empty()
    runtime.time.advance(0.5)
    assert await client.sent() == close(1000, "session time limit reached")
    await client.done()
    assert await runtime.event() == ended("t", "time_limit", bot_seconds=30.0)
    assert runtime.time.pending() == []


@pytest.mark.parametrize("budget", ["0", "-5", "", "soon", "1.5"])
async def test_a_budget_that_is_not_a_positive_integer_means_no_limit(budget: str) -> None:
    runtime = Runtime(echo)
    client = await runtime.start(session_id="n", max_seconds=budget)
    assert runtime.time.pending() == []
    client.hang_up()
    await client.done()
    assert (await runtime.event())["status"] == "completed"  # type: ignore[typeddict-item]


async def test_a_stop_request_cancels_the_bot_and_closes_1000() -> None:
    runtime = Runtime(sleep_forever)
    client = await runtime.start(session_id="s")
    runtime.time.advance(1.25)
    assert runtime.running.stop("s") is True
    assert await client.sent() == close(1000, "session stopped")
    await client.done()
    assert await runtime.event() == ended("s", "stopped", bot_seconds=1.25)
    assert runtime.running.stuck == set()


async def test_a_stopped_session_has_closed_its_socket_before_the_runtime_counts_as_idle() -> (
    None
):
    """A drain or the pool's departure waits for idle, then uvicorn closes what is left with
    1012: the session's own close must already be out (it lost that race under load)."""
    runtime = Runtime(sleep_forever)
    client = await runtime.start(session_id="s")
    idle = asyncio.ensure_future(runtime.running.wait_idle())
    runtime.running.stop("s")
    await bounded(idle)
    assert client.from_app.get_nowait() == close(1000, "session stopped")
    await client.done()


async def test_a_bot_that_ignores_cancellation_is_reported_after_the_grace_and_kept_as_stuck() -> (
    None
):
    release = asyncio.Event()

    async def stubborn(args: Any) -> None:
        await args.websocket.send_text('"started"')
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await release.wait()

    runtime = Runtime(stubborn)
    client = await runtime.start(session_id="stuck")
    runtime.running.stop("stuck")
    await bounded(_until(lambda: runtime.time.pending() == [5.0]))
    runtime.time.advance(5.0)
    assert await client.sent() == close(1000, "session stopped")
    await client.done()
    assert await runtime.event() == ended(
        "stuck", "stopped", error="bot ignored cancellation", bot_seconds=5.0
    )
    (task,) = runtime.running.stuck
    release.set()
    await bounded(task)
    assert runtime.running.stuck == set()


async def test_a_second_session_with_a_running_id_is_closed_1008() -> None:
    runtime = Runtime(sleep_forever)
    first = await runtime.start(session_id="dup")
    second = runtime.connect(session_id="dup")
    assert [await second.sent(), await second.sent()] == [
        ACCEPT,
        close(1008, "duplicate session id"),
    ]
    await second.done()
    assert runtime.events.empty()
    assert runtime.metric("catflap_runtime_sessions_started_total") == 1
    runtime.running.stop("dup")
    await first.done()


@pytest.mark.parametrize(
    ("hook", "offered", "chosen"),
    [
        (None, ["a", "b"], None),
        (lambda offered: "b" if "b" in offered else None, ["a", "b"], "b"),
        (lambda offered: "z", ["a", "b"], None),
        (lambda offered: 1 / 0, ["a"], None),
    ],
    ids=["no-hook", "hook-picks-one", "hook-picks-one-not-offered", "hook-raises"],
)
async def test_the_subprotocol_comes_from_the_bots_hook(
    hook: Any, offered: list[str], chosen: str | None
) -> None:
    runtime = Runtime(echo, select_subprotocol=hook)
    client = runtime.connect(session_id="p", subprotocols=offered)
    assert await client.sent() == {**ACCEPT, "subprotocol": chosen}
    client.hang_up()
    await client.done()


async def test_a_client_gone_before_accept_starts_no_session() -> None:
    runtime = Runtime(echo)
    client = runtime.connect(session_id="gone")
    client.to_app.get_nowait()
    client.to_app.put_nowait({"type": "websocket.disconnect", "code": 1001})
    await client.done()
    assert runtime.events.empty()
    assert "gone" not in runtime.running


# --- HTTP routes ---------------------------------------------------------------------------------


async def http_get(runtime: Runtime, path: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=runtime.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://agent") as http:
        response: httpx.Response = await bounded(http.get(path))
        return response


async def test_livez_and_readyz_without_a_hook_are_ok() -> None:
    runtime = Runtime(echo)
    for path in ["/livez", "/readyz"]:
        response = await http_get(runtime, path)
        assert (response.status_code, response.json()) == (200, {"status": "ok"})


async def _async_ready() -> dict[str, Any]:
    return {"ready": True, "extra": 1}


async def _async_not_ready() -> dict[str, Any]:
    return {"ready": False}


def _raises() -> bool:
    raise ValueError("nope")


@pytest.mark.parametrize(
    ("readyz", "status"),
    [
        (lambda: False, 503),
        (lambda: True, 200),
        (_async_ready, 200),
        (_async_not_ready, 503),
        (_raises, 503),
    ],
    ids=["false", "true", "async-dict-ready", "async-dict-not-ready", "raises"],
)
async def test_readyz_follows_the_bots_hook(readyz: Any, status: int) -> None:
    runtime = Runtime(echo, readyz=readyz)
    response = await http_get(runtime, "/readyz")
    body = {"status": "ok" if status == 200 else "not ready"}
    assert (response.status_code, response.json()) == (status, body)


async def test_metrics_are_served_in_prometheus_text_format() -> None:
    runtime = Runtime(echo)
    response = await http_get(runtime, "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert 'catflap_runtime_sessions_active{agent="my-agent.my-org"} 0.0' in response.text


# --- POST /bot ------------------------------------------------------------------------------------


class BotRecorder:
    """A ``/bot`` bot: records what it was given, then runs until ``release`` is set."""

    def __init__(self) -> None:
        self.args: list[Any] = []
        self.release = asyncio.Event()
        self.running = asyncio.Event()

    async def __call__(self, args: Any) -> None:
        self.args.append(args)
        self.running.set()
        await self.release.wait()


def bot_headers(session_id: str | None = "b-1", **extra: str) -> dict[str, str]:
    named = {} if session_id is None else {headers.SESSION_ID_HEADER: session_id}
    return {**named, **extra}


def post_bot(
    runtime: Runtime, request_headers: dict[str, str], content: bytes = b""
) -> asyncio.Task[httpx.Response]:
    """``POST /bot`` in memory, as a task: the answer comes when the session ends."""

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=runtime.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://agent") as http:
            return await http.post("/bot", content=content, headers=request_headers)

    return asyncio.create_task(post())


async def test_bot_request_runs_a_pipecat_session_and_answers_when_bot_returns() -> None:
    bot = BotRecorder()
    runtime = Runtime(bot)
    answer = post_bot(runtime, bot_headers(), b'{"k": [1, "\\u00ff"]}')
    assert await runtime.event() == {"event": "session_started", "session_id": "b-1"}
    await bounded(bot.running.wait())
    (args,) = bot.args
    # pipecatcloud's class when installed, else pipecat's, else catflap's own.
    assert type(args).__name__ in {"PipecatSessionArguments", "RunnerArguments"}
    assert (args.session_id, args.body) == ("b-1", {"k": [1, "\u00ff"]})
    assert (args.handle_sigint, args.handle_sigterm) == (False, False)
    assert not answer.done()  # held for the session's life
    runtime.time.advance(3.0)
    bot.release.set()
    response = await bounded(answer)
    assert (response.status_code, response.json()) == (
        200,
        {"sessionId": "b-1", "status": "completed"},
    )
    assert await runtime.event() == ended("b-1", "completed", bot_seconds=3.0)
    assert runtime.metric("catflap_runtime_sessions_ended_total", status="completed") == 1
    context = SessionContext("b-1", "my-agent", "my-org")
    assert runtime.log == [  # the session's log file is complete before its end is reported
        f"capture started {context}",
        "event session_started",
        f"capture ended {context}",
        "event session_ended",
    ]


async def test_bot_request_with_daily_headers_gets_daily_session_arguments() -> None:
    bot = BotRecorder()
    runtime = Runtime(bot)
    daily = {"x-daily-room-url": "https://x.daily.co/r", "x-daily-room-token": "t"}
    answer = post_bot(runtime, bot_headers("d-1", **daily), b"null")
    await bounded(bot.running.wait())
    (args,) = bot.args
    assert type(args).__name__ in {"DailySessionArguments", "DailyRunnerArguments"}
    assert (args.session_id, args.body, args.room_url, args.token) == (
        "d-1",
        None,
        "https://x.daily.co/r",
        "t",
    )
    bot.release.set()
    assert (await bounded(answer)).json()["status"] == "completed"


async def test_bot_request_with_an_empty_body_gives_the_bot_none() -> None:
    bot = BotRecorder()
    bot.release.set()
    runtime = Runtime(bot)
    assert (await bounded(post_bot(runtime, bot_headers()))).status_code == 200
    assert bot.args[0].body is None


async def test_bot_request_budget_ends_it_as_time_limit() -> None:
    runtime = Runtime(BotRecorder())
    answer = post_bot(runtime, bot_headers(**{headers.MAX_SESSION_SECONDS_HEADER: "30"}))
    await runtime.event()
    await bounded(_until(lambda: runtime.time.pending() == [30.0]))
    runtime.time.advance(30.0)
    assert (await bounded(answer)).json() == {"sessionId": "b-1", "status": "time_limit"}
    assert await runtime.event() == ended("b-1", "time_limit", bot_seconds=30.0)


async def test_bot_request_stopped_answers_stopped() -> None:
    runtime = Runtime(BotRecorder())
    answer = post_bot(runtime, bot_headers())
    await runtime.event()
    assert runtime.running.stop("b-1")
    assert (await bounded(answer)).json() == {"sessionId": "b-1", "status": "stopped"}
    assert (await runtime.event())["status"] == "stopped"  # type: ignore[typeddict-item]


async def test_bot_request_whose_bot_raises_answers_bot_error() -> None:
    async def broken(args: Any) -> None:
        raise ValueError("no")

    runtime = Runtime(broken)
    response = await bounded(post_bot(runtime, bot_headers()))
    assert response.json() == {"sessionId": "b-1", "status": "bot_error"}
    await runtime.event()
    assert await runtime.event() == ended("b-1", "bot_error", error="ValueError: no")


async def test_a_bot_request_whose_client_hangs_up_keeps_running_until_bot_returns() -> None:
    bot = BotRecorder()
    runtime = Runtime(bot)
    to_app: asyncio.Queue[Message] = asyncio.Queue()
    to_app.put_nowait({"type": "http.request", "body": b"{}", "more_body": False})
    sent: asyncio.Queue[Message] = asyncio.Queue()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/bot",
        "raw_path": b"/bot",
        "root_path": "",
        "query_string": b"",
        "headers": [(headers.SESSION_ID_HEADER.encode(), b"gone")],
        "client": ("127.0.0.1", 50000),
        "server": ("agent", 80),
    }
    handler = asyncio.create_task(runtime.app(scope, to_app.get, sent.put))
    await bounded(bot.running.wait())
    to_app.put_nowait({"type": "http.disconnect"})
    await asyncio.sleep(0)
    assert "gone" in runtime.running  # hanging up stops nothing, as in PCC
    bot.release.set()
    await bounded(handler)
    await runtime.event()
    assert await runtime.event() == ended("gone", "completed", client_disconnected=True)


def json_string_of(size: int) -> bytes:
    """A JSON document of exactly ``size`` bytes."""
    return b'"' + b"a" * (size - 2) + b'"'


async def test_bot_body_up_to_the_limit_is_accepted_and_one_byte_more_is_413() -> None:
    bot = BotRecorder()
    bot.release.set()
    runtime = Runtime(bot)
    at_limit = json_string_of(limits.BOT_BODY_MAX_BYTES)
    assert (await bounded(post_bot(runtime, bot_headers(), at_limit))).status_code == 200
    over = await bounded(
        post_bot(runtime, bot_headers(), json_string_of(limits.BOT_BODY_MAX_BYTES + 1))
    )
    assert over.status_code == 413
    assert over.json()["code"] == "body_too_large"
    assert len(bot.args) == 1


@pytest.mark.parametrize(
    ("content", "request_headers", "status", "code"),
    [
        (b"{}", bot_headers(None), 400, "missing_session_id"),
        (b"{nope", bot_headers(), 400, "invalid_body"),
        (b'{"n": NaN}', bot_headers(), 400, "invalid_body"),
        (b"\xff", bot_headers(), 400, "invalid_body"),
    ],
    ids=["no-session-id", "bad-json", "nan", "not-utf8"],
)
async def test_bad_bot_requests_are_refused_before_any_session(
    content: bytes, request_headers: dict[str, str], status: int, code: str
) -> None:
    runtime = Runtime(BotRecorder())
    response = await bounded(post_bot(runtime, request_headers, content))
    assert response.status_code == status
    assert response.json()["code"] == code
    assert set(response.json()) == {"error", "code"}
    assert runtime.events.empty()


async def test_bot_request_with_a_running_id_is_409_and_a_full_or_closing_runtime_503() -> None:
    runtime = Runtime(BotRecorder(), max_sessions=1)
    first = post_bot(runtime, bot_headers("one"))
    await runtime.event()
    duplicate = await bounded(post_bot(runtime, bot_headers("one")))
    assert (duplicate.status_code, duplicate.json()["code"]) == (409, "session_already_running")
    full = await bounded(post_bot(runtime, bot_headers("two")))
    assert (full.status_code, full.json()["code"]) == (503, "instance_full")
    runtime.running.refuse_new()
    runtime.running.stop("one")
    await bounded(first)
    closing = await bounded(post_bot(runtime, bot_headers("three")))
    assert (closing.status_code, closing.json()["code"]) == (503, "draining")
    assert "retry-after" in closing.headers


# --- Bot routes on the runtime's app (pipecatcloud_system) ----------------------------------------


async def test_routes_a_bot_adds_are_served_after_the_runtimes_own() -> None:
    bot_app = FastAPI()

    @bot_app.get("/status")
    async def status() -> dict[str, str]:
        return {"bot": "up"}

    @bot_app.get("/{anything:path}")
    async def catch_all(anything: str) -> dict[str, str]:
        return {"caught": anything}

    runtime = Runtime(echo, app=bot_app)
    assert runtime.app is bot_app
    assert (await http_get(runtime, "/status")).json() == {"bot": "up"}
    # A catch-all of the bot's does not shadow the runtime's routes.
    assert (await http_get(runtime, "/livez")).json() == {"status": "ok"}
    assert (await http_get(runtime, "/elsewhere")).json() == {"caught": "elsewhere"}


@pytest.mark.parametrize("path", RESERVED_PATHS)
def test_a_bot_route_on_a_reserved_path_is_refused_naming_it(path: str) -> None:
    bot_app = FastAPI()
    bot_app.add_api_route(path, lambda: None, methods=["GET"])
    with pytest.raises(ReservedRouteError, match=f"declares {path} on pipecatcloud_system.app"):
        check_bot_routes(bot_app)


def test_pipecatcloud_system_outside_a_runtime_is_an_app_nobody_serves() -> None:
    import pipecatcloud_system

    assert isinstance(pipecatcloud_system.app, FastAPI)
    assert "not" in (pipecatcloud_system.__doc__ or "")  # documented as unserved


def test_own_pipecat_session_arguments_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        PipecatSessionArguments("s")  # type: ignore[call-arg]


# --- The control loop -----------------------------------------------------------------------------


class FakeCommands:
    """A command source the test fills: commands, protocol errors, then ``None`` (EOF)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[ParentCommand | ControlProtocolError | None] = asyncio.Queue()

    def push(self, *items: ParentCommand | ControlProtocolError | None) -> None:
        for item in items:
            self.queue.put_nowait(item)

    async def receive_command(self) -> ParentCommand | None:
        item = await self.queue.get()
        if isinstance(item, ControlProtocolError):
            raise item
        return item


class FakeServer:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.exited = asyncio.Event()

    def stop_accepting(self) -> None:
        self.calls.append("stop_accepting")

    def exit(self) -> None:
        self.calls.append("exit")
        self.exited.set()


class Loop:
    """A ControlLoop running on fakes, with the events it emitted."""

    def __init__(self, *, orphan_grace_s: float = 1.0) -> None:
        self.commands = FakeCommands()
        self.server = FakeServer()
        self.running = RunningBots()
        self.events: asyncio.Queue[ChildEvent] = asyncio.Queue()
        self.loop = ControlLoop(
            self.commands,
            self.server,
            self.running,
            self.events.put,
            orphan_grace_s=orphan_grace_s,
        )
        self.task = asyncio.create_task(self.loop.run())

    async def event(self) -> ChildEvent:
        event: ChildEvent = await bounded(self.events.get())
        return event

    def start_bot(self, session_id: str) -> tuple[asyncio.Task[None], asyncio.Event]:
        bot = asyncio.create_task(until_set(asyncio.Event()), name=f"bot[{session_id}]")
        return bot, self.running.add(session_id, bot)

    def start_bots(self, *session_ids: str) -> list[asyncio.Event]:
        """Register a bot for each id; their stop events, in order."""
        return [self.start_bot(session_id)[1] for session_id in session_ids]

    async def settle(self) -> None:
        """Until the loop has taken every queued command (it then waits for the next one)."""
        await bounded(_until(self.commands.queue.empty))
        for _ in range(5):
            await asyncio.sleep(0)

    async def finish(self) -> None:
        await bounded(self.task)
        for bot in list(self.running._tasks.values()):
            bot.cancel()


async def _until(condition: Callable[[], bool]) -> None:
    """Bounded polling by the caller's timeout; yields to the loop between checks."""
    while not condition():
        await asyncio.sleep(0)


@pytest.fixture
async def control() -> AsyncIterator[Loop]:
    loop = Loop()
    try:
        yield loop
    finally:
        loop.task.cancel()
        await asyncio.gather(loop.task, return_exceptions=True)


async def test_ping_is_answered_with_the_same_seq(control: Loop) -> None:
    control.commands.push({"command": "ping", "seq": 41}, {"command": "ping", "seq": 42})
    assert [await control.event(), await control.event()] == [
        {"event": "pong", "seq": 41},
        {"event": "pong", "seq": 42},
    ]


async def test_a_bad_line_is_logged_and_the_loop_reads_on(
    control: Loop, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "catflap.runtime")
    control.commands.push(ControlProtocolError("control line is not JSON: x"))
    control.commands.push({"command": "ping", "seq": 1})
    assert await control.event() == {"event": "pong", "seq": 1}
    assert [r.getMessage() for r in caplog.records] == [
        "! ignoring a bad control line: control line is not JSON: x"
    ]
    assert not control.task.done()


async def test_stop_session_asks_that_session_only_and_an_unknown_id_is_logged(
    control: Loop, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "catflap.runtime")
    stop_a, stop_b = control.start_bots("a", "b")
    control.commands.push(
        {"command": "stop_session", "session_id": "a"},
        {"command": "stop_session", "session_id": "nobody"},
    )
    await control.settle()
    assert (stop_a.is_set(), stop_b.is_set()) == (True, False)
    assert [r.getMessage() for r in caplog.records] == ["stop_session: no running session nobody"]


async def test_shutdown_stops_accepting_at_once_and_exits_when_the_last_session_ends(
    control: Loop,
) -> None:
    bot, stop = control.start_bot("last")
    control.commands.push({"command": "shutdown"}, {"command": "ping", "seq": 1})
    assert await control.event() == {"event": "pong", "seq": 1}  # still answering
    assert control.server.calls == ["stop_accepting"]
    assert control.running.closing  # POST /bot on an open connection gets 503 draining
    assert not stop.is_set()  # running sessions finish on their own
    control.commands.push({"command": "shutdown"})
    await control.settle()
    control.running.remove("last")
    await bounded(control.server.exited.wait())
    assert control.server.calls == ["stop_accepting", "stop_accepting", "exit"]
    bot.cancel()


async def test_shutdown_with_no_session_exits_at_once(control: Loop) -> None:
    control.commands.push({"command": "shutdown"})
    await bounded(control.server.exited.wait())
    assert control.server.calls == ["stop_accepting", "exit"]


async def test_end_of_file_stops_every_session_and_exits_once_they_have_ended(
    control: Loop, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "catflap.runtime")
    stops = control.start_bots("a", "b")
    control.commands.push(None)
    await bounded(_until(lambda: all(stop.is_set() for stop in stops)))
    assert control.running.closing
    assert control.server.calls == []
    control.running.remove("a")
    control.running.remove("b")
    await control.finish()
    assert control.server.calls == ["exit"]
    assert [r.getMessage() for r in caplog.records] == [
        "x control channel closed (the pool is gone): stopping all sessions"
    ]


async def test_end_of_file_exits_after_the_grace_even_if_a_session_never_ends() -> None:
    control = Loop(orphan_grace_s=0)
    bot, stop = control.start_bot("stubborn")
    control.commands.push(None)
    await control.finish()
    assert stop.is_set()
    assert control.server.calls == ["exit"]
    bot.cancel()


async def test_end_of_file_during_a_drain_ends_the_loop_and_its_drain() -> None:
    control = Loop(orphan_grace_s=0)
    bot, _ = control.start_bot("s")
    control.commands.push({"command": "shutdown"}, None)
    await control.finish()
    assert control.server.calls == ["stop_accepting", "exit"]
    assert len(control.loop._background) == 0
    bot.cancel()


async def test_garbage_on_a_real_channel_never_stops_the_loop() -> None:
    """Bad JSON, a non-object, an unknown command and a missing field, over a socketpair."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    channel = await ControlChannel.from_socket(theirs)
    server = FakeServer()
    events: asyncio.Queue[ChildEvent] = asyncio.Queue()
    loop = ControlLoop(channel, server, RunningBots(), events.put)
    task = asyncio.create_task(loop.run())
    garbage = b'not json\n[1]\n{"command":"no_such_command"}\n{"command":"stop_session"}\n'
    await asyncio.get_running_loop().sock_sendall(ours, garbage + b'{"command":"ping","seq":7}\n')
    assert await bounded(events.get()) == {"event": "pong", "seq": 7}
    ours.close()
    await bounded(task)
    assert server.calls == ["exit"]
    await channel.aclose()


# --- RunningBots ----------------------------------------------------------------------------------


async def test_running_bots_tracks_sessions_until_removed_and_signals_idle() -> None:
    running = RunningBots()
    assert (len(running), "x" in running) == (0, False)
    await bounded(running.wait_idle())
    task = asyncio.create_task(asyncio.sleep(0))
    stop = running.add("x", task)
    assert (len(running), "x" in running, stop.is_set()) == (1, True, False)
    idle = asyncio.create_task(running.wait_idle())
    await asyncio.sleep(0)
    assert not idle.done()
    assert (running.stop("x"), running.stop("y")) == (True, False)
    assert stop.is_set()
    await task
    running.remove("x")
    await bounded(idle)
    assert (len(running), running.stuck) == (0, set())


async def test_running_bots_keeps_a_bot_removed_while_running_as_stuck_until_it_ends() -> None:
    running = RunningBots()
    release = asyncio.Event()
    task = asyncio.create_task(until_set(release))
    running.add("s", task)
    running.remove("s")
    assert running.stuck == {task}
    release.set()
    await task
    await asyncio.sleep(0)
    assert running.stuck == set()


async def test_stop_all_asks_every_session() -> None:
    running = RunningBots()
    stops = [running.add(n, asyncio.create_task(asyncio.sleep(0))) for n in ("a", "b")]
    running.stop_all()
    assert [s.is_set() for s in stops] == [True, True]
    for n in ("a", "b"):
        running.remove(n)
    await asyncio.sleep(0)
