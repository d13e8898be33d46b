"""The control API's unit tier: ``create_api(ApiDeps)`` built from real parts, driven in-process.

No gateway, no sockets, no processes: the app runs on httpx's ASGI transport over a real key
ring, session registry, SQLite session store (a temp file), metrics and agent directory, with
a fake pool and a clock the test sets. Each test asserts the exact status and JSON body.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from catflap.api.app import create_api
from catflap.api.deps import ApiDeps
from catflap.auth.tokens import verify_token
from catflap.config import CatflapConfig
from catflap.contract import limits
from catflap.directory import AgentDirectory
from catflap.gateway.httphead import HeadParser
from catflap.gateway.metricslistener import MetricsListener
from catflap.metrics import CONTENT_TYPE, GatewayMetrics, MetricSources
from catflap.pool.interface import SessionLease, SessionPlace
from catflap.sessions.recent import RecentRecords
from catflap.sessions.record import SessionRecord
from catflap.sessions.sqlite import SqliteSessionStore

from .conftest import PRIVATE_KEY, PUBLIC_KEY, TEST_KEYRING, FakeClock

OTHER_PRIVATE_KEY = "sk_other_456"
BASE = "ws://gateway.test:8080"
SESSIONS = "/v1/agents/echo/sessions"
SID = "123e4567-e89b-42d3-a456-426614174000"
UNKNOWN = "00000000-0000-4000-8000-000000000000"


def config(tmp_path: Path, **gateway: Any) -> CatflapConfig:
    return CatflapConfig.model_validate(
        {
            "public_url": BASE,
            "logs": {"dir": tmp_path / "logs"},
            "gateway": gateway,
            "organizations": {
                "my-org": {
                    "public_keys": [PUBLIC_KEY],
                    "private_keys": [PRIVATE_KEY],
                    "agents": {
                        "echo": {"path": str(tmp_path), "scaling": {"max_agents": 2}},
                        "secure": {"path": str(tmp_path), "websocket_auth": "token"},
                    },
                },
                "other-org": {
                    "private_keys": [OTHER_PRIVATE_KEY],
                    "agents": {"echo": {"path": str(tmp_path)}},
                },
            },
        }
    )


@dataclass
class FakePool:
    """The :class:`~catflap.pool.interface.SessionPool` the API sees: capacity and stop only."""

    full: set[str] = field(default_factory=set)
    running: set[str] = field(default_factory=set)
    stopped: list[str] = field(default_factory=list)
    #: What the agent's runtime does with a stop (ends the record, as the gateway would).
    on_stop: Callable[[str], None] | None = None

    async def at_capacity(self, agent_key: str) -> bool:
        return agent_key in self.full

    async def acquire(
        self, agent_key: str, session_id: str, *, avoid: frozenset[str] = frozenset()
    ) -> SessionLease:
        raise AssertionError("the API never acquires a slot")

    def cancel(self, lease: SessionLease) -> None:
        raise AssertionError("the API never holds a lease")

    def abandon(self, lease: SessionLease, problem: str) -> None:
        raise AssertionError("the API never holds a lease")

    async def stop_session(self, session_id: str) -> bool:
        self.stopped.append(session_id)
        if self.on_stop is not None:
            self.on_stop(session_id)
        return session_id in self.running

    async def locate(self, agent_key: str, session_id: str) -> SessionPlace | None:
        running = session_id in self.running
        return SessionPlace(address="tcp:127.0.0.1:1", running=True) if running else None


class Traffic:
    def __init__(self, **counts: int) -> None:
        self.counts = counts

    def traffic(self) -> dict[str, int]:
        return dict(self.counts)


@dataclass
class Draining:
    """The gateway's "shutdown began" flag, as a test sets it."""

    now: bool = False

    def __call__(self) -> bool:
        return self.now


class FailingStore(SqliteSessionStore):
    async def get(self, session_id: str) -> SessionRecord | None:
        raise OSError("disk on fire")


@dataclass
class Api:
    deps: ApiDeps
    pool: FakePool
    clock: FakeClock
    relays: dict[str, Traffic]
    client: httpx.AsyncClient
    draining: Draining

    async def get(self, path: str, *, key: str | None = PRIVATE_KEY, **kw: Any) -> httpx.Response:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return await self.client.get(path, headers={**headers, **kw.pop("headers", {})}, **kw)

    async def start(
        self, agent: str, payload: Any, *, key: str | None = PUBLIC_KEY, **headers: str
    ) -> httpx.Response:
        sent = {"content-type": "application/json", **headers}
        if key:
            sent["authorization"] = f"Bearer {key}"
        content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return await self.client.post(f"/v1/public/{agent}/start", content=content, headers=sent)


@pytest.fixture
async def make_api(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Builds an :class:`Api`: ``[gateway]`` settings, the store's class and the pool's
    instance counts may be given."""
    opened: list[tuple[httpx.AsyncClient, SqliteSessionStore]] = []

    async def make(
        store_class: type[SqliteSessionStore] = SqliteSessionStore,
        pool_states: dict[tuple[str, str], int] | None = None,
        dependencies: Callable[[], Any] | None = None,
        **gateway: Any,
    ) -> Api:
        cfg = config(tmp_path, **gateway)
        store = store_class(tmp_path / f"sessions-{len(opened)}.sqlite3")
        pool = FakePool()
        clock = FakeClock()
        sessions = RecentRecords()
        relays: dict[str, Traffic] = {}
        draining = Draining()
        metrics = GatewayMetrics(
            MetricSources(agent_keys=lambda: ["echo.my-org"], pool_states=lambda: pool_states)
        )
        deps = ApiDeps(
            config=cfg,
            agents=AgentDirectory(cfg),
            keyring=TEST_KEYRING,
            clock=clock,
            pool=pool,
            sessions=sessions,
            store=store,
            metrics=metrics,
            draining=draining,
            relays=relays,
            dependencies=dependencies,
        )
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_api(deps)), base_url="http://gateway.test"
        )
        opened.append((client, store))
        return Api(deps, pool, clock, relays, client, draining)

    yield make
    for client, store in opened:
        await client.aclose()
        await store.close()


@pytest.fixture
async def api(make_api: Callable[..., Any]) -> Api:
    made: Api = await make_api()
    return made


def record(session_id: str = SID, **fields: Any) -> SessionRecord:
    values: dict[str, Any] = {"agent": "echo", "organization": "my-org", "created_at": 1000.0}
    return SessionRecord(session_id=session_id, **{**values, **fields})


def error(message: str, code: str) -> dict[str, str]:
    return {"error": message, "code": code}


# --- health ----------------------------------------------------------------------------------


async def test_readyz_answers_503_draining_once_shutdown_began(api: Api) -> None:
    assert (await api.get("/livez")).json() == {"status": "ok"}
    assert (await api.get("/readyz")).json() == {"status": "ok"}
    api.draining.now = True
    response = await api.get("/readyz")
    assert (response.status_code, response.json()) == (503, {"status": "draining"})


async def test_readyz_answers_503_naming_the_dependencies_that_do_not_answer(
    make_api: Callable[..., Any],
) -> None:
    down: list[str] = []

    async def dependencies() -> list[str]:
        return list(down)

    api: Api = await make_api(dependencies=dependencies)
    assert ((await api.get("/readyz")).status_code, (await api.get("/readyz")).json()) == (
        200,
        {"status": "ok"},
    )
    down[:] = ["database", "redis"]
    response = await api.get("/readyz")
    assert (response.status_code, response.json()) == (
        503,
        {"status": "unavailable", "unreachable": ["database", "redis"]},
    )
    down.clear()
    assert (await api.get("/readyz")).status_code == 200
    api.draining.now = True  # draining comes first
    response = await api.get("/readyz")
    assert (response.status_code, response.json()) == (503, {"status": "draining"})


async def test_unknown_route_and_method_are_json_404_and_405(api: Api) -> None:
    response = await api.get("/nowhere")
    assert (response.status_code, response.json()) == (404, error("not found", "404"))
    response = await api.client.put("/livez")
    assert (response.status_code, response.json()) == (405, error("Method Not Allowed", "405"))


# --- POST /v1/public/{agent}/start -------------------------------------------------------------


async def test_start_gives_a_generic_ws_url_and_a_fresh_session_id(api: Api) -> None:
    response = await api.start("echo", {"transport": "websocket"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body == {"sessionId": body["sessionId"], "wsUrl": f"{BASE}/ws/generic/echo.my-org"}
    assert str(uuid.UUID(body["sessionId"])) == body["sessionId"]


async def test_start_mints_a_token_whose_jti_is_the_session_id(api: Api) -> None:
    response = await api.start("secure", {"transport": "websocket", "body": {"caller": "x"}})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"sessionId", "wsUrl", "token", "body"}
    assert body["wsUrl"] == f"{BASE}/ws/generic/secure.my-org"
    claims = verify_token(
        body["token"], TEST_KEYRING, service_host="secure.my-org", now=api.clock()
    )
    assert claims.jti == body["sessionId"]
    assert body["body"] == "eyJjYWxsZXIiOiJ4In0="  # base64 of the JSON body


async def test_start_for_a_provider_puts_the_token_in_the_path(api: Api) -> None:
    body = (await api.start("secure", {"transport": "twilio"})).json()
    assert body["wsUrl"] == f"{BASE}/ws/twilio/{body['token']}"
    assert body["serviceHost"] == "secure.my-org"
    body = (await api.start("echo", {"transport": "telnyx"})).json()
    assert body["wsUrl"] == f"{BASE}/ws/telnyx?serviceHost=echo.my-org"


@pytest.mark.parametrize(
    ("key", "agent", "payload", "status", "expected"),
    [
        (
            None,
            "echo",
            {"transport": "websocket"},
            401,
            error("missing or invalid public API key: send Authorization: Bearer pk_...", "401"),
        ),
        (
            PRIVATE_KEY,
            "echo",
            {"transport": "websocket"},
            401,
            error("missing or invalid public API key: send Authorization: Bearer pk_...", "401"),
        ),
        (
            PUBLIC_KEY,
            "nope",
            {"transport": "websocket"},
            404,
            error("no agent 'nope' in organization 'my-org'", "404"),
        ),
        (
            PUBLIC_KEY,
            "echo",
            {"transport": "smoke-signals"},
            400,
            error(
                "transport 'smoke-signals' is not supported: send one of daily, webrtc, "
                "websocket, twilio, telnyx, plivo, exotel, or none (a session without a "
                "transport)",
                "unsupported_transport",
            ),
        ),
        (
            PUBLIC_KEY,
            "echo",
            {"transport": "websocket", "body": {}},
            400,
            error(
                'this agent uses websocket_auth = "none": do not send a body to /start; '
                "base64-encode it yourself and append ?body=<b64> to the WebSocket URL",
                "body_not_allowed",
            ),
        ),
        (
            PUBLIC_KEY,
            "echo",
            b"{not json",
            400,
            error("the request body is not valid JSON", "bad_request"),
        ),
        (
            PUBLIC_KEY,
            "secure",
            b'{"transport": "websocket", "body": NaN}',
            400,
            error(
                "the request body is text that is not valid JSON (NaN is not JSON); bodies "
                "must be strict JSON, as for ?body=",
                "invalid_body",
            ),
        ),
        (
            PUBLIC_KEY,
            "echo",
            b'{"transport": "websocket", "x": "' + b"a" * limits.START_REQUEST_MAX_BYTES + b'"}',
            413,
            error(f"request body over {limits.START_REQUEST_MAX_BYTES} bytes", "request_too_large"),
        ),
    ],
    ids=[
        "no-key",
        "private-key",
        "unknown-agent",
        "transport",
        "body-not-allowed",
        "not-json",
        "nan",
        "too-large",
    ],
)
async def test_start_refusals(
    api: Api, key: str | None, agent: str, payload: Any, status: int, expected: dict[str, str]
) -> None:
    response = await api.start(agent, payload, key=key)
    assert (response.status_code, response.json()) == (status, expected)


async def test_start_refuses_a_body_that_is_not_json(api: Api) -> None:
    response = await api.start("echo", {"transport": "websocket"}, **{"content-type": "text/plain"})
    assert (response.status_code, response.json()) == (
        415,
        error(
            "send the request body as JSON with Content-Type: application/json",
            "unsupported_media_type",
        ),
    )


async def test_start_at_capacity_is_429_with_retry_after(api: Api) -> None:
    api.pool.full.add("echo.my-org")
    response = await api.start("echo", {"transport": "websocket"})
    assert (response.status_code, response.json()) == (
        429,
        error("agent echo.my-org is at max_agents; retry shortly", "PCC-AGENT-AT-CAPACITY"),
    )
    assert response.headers["retry-after"] == str(limits.RETRY_AFTER_AT_CAPACITY_S)


# --- sessions API ------------------------------------------------------------------------------


async def test_list_reads_the_store_and_prefers_the_fresher_record_in_memory(api: Api) -> None:
    await api.deps.store.save(record(SID, created_at=1000.0))
    await api.deps.store.save(record(UNKNOWN, created_at=2000.0, ended_at=2010.0))
    await api.deps.store.save(record(str(uuid.uuid4()), organization="other-org"))
    live = record(SID, created_at=1000.0, bytes_client_to_agent=42)
    api.deps.sessions.started(live)
    response = await api.get(SESSIONS)
    assert response.status_code == 200, response.text
    assert response.json() == {
        "total_count": 2,
        "sessions": [record(UNKNOWN, created_at=2000.0, ended_at=2010.0).to_api(), live.to_api()],
    }
    ended = (await api.get(SESSIONS, params={"status": "ended"})).json()
    assert [s["sessionId"] for s in ended["sessions"]] == [UNKNOWN]


async def test_show_finds_a_record_only_this_gateway_holds(api: Api) -> None:
    api.deps.sessions.started(record(SID))
    response = await api.get(f"{SESSIONS}/{SID.upper()}")
    assert (response.status_code, response.json()) == (200, record(SID).to_api())


@pytest.mark.parametrize(
    ("key", "path", "params", "status", "expected"),
    [
        (
            None,
            SESSIONS,
            {},
            401,
            error("missing or invalid private API key: send Authorization: Bearer sk_...", "401"),
        ),
        (
            PUBLIC_KEY,
            SESSIONS,
            {},
            401,
            error(
                "this is a public key (pk_...); this API needs a private key: "
                "send Authorization: Bearer sk_...",
                "401",
            ),
        ),
        (
            PRIVATE_KEY,
            "/v1/agents/nope/sessions",
            {},
            404,
            error("no agent 'nope' in organization 'my-org'", "404"),
        ),
        (
            PRIVATE_KEY,
            SESSIONS,
            {"limit": "0"},
            400,
            error("invalid limit: Input should be greater than or equal to 1", "bad_request"),
        ),
        (
            PRIVATE_KEY,
            SESSIONS,
            {"startTime": "20", "endTime": "10"},
            400,
            error("startTime (20) is after endTime (10)", "bad_request"),
        ),
        (
            PRIVATE_KEY,
            f"{SESSIONS}/not-a-uuid",
            {},
            400,
            error(
                "invalid session id 'not-a-uuid': session ids are UUID strings such as "
                "'123e4567-e89b-42d3-a456-426614174000'",
                "bad_request",
            ),
        ),
        (
            PRIVATE_KEY,
            f"{SESSIONS}/{UNKNOWN}",
            {},
            404,
            error(f"no session {UNKNOWN} for agent 'echo'", "404"),
        ),
        (
            OTHER_PRIVATE_KEY,
            f"{SESSIONS}/{SID}",
            {},
            404,
            error(f"no session {SID} for agent 'echo'", "404"),
        ),
    ],
    ids=[
        "no-key",
        "public-key",
        "unknown-agent",
        "limit",
        "time-range",
        "bad-id",
        "unknown-session",
        "other-org",
    ],
)
async def test_sessions_refusals(
    api: Api,
    key: str | None,
    path: str,
    params: dict[str, str],
    status: int,
    expected: dict[str, str],
) -> None:
    api.deps.sessions.started(record(SID))
    response = await api.get(path, key=key, params=params)
    assert (response.status_code, response.json()) == (status, expected)


async def test_stop_asks_the_pool_and_answers_terminated_once_the_record_ended(
    api: Api,
) -> None:
    api.deps.sessions.started(record(SID))
    api.pool.running.add(SID)

    def bot_ends_later(session_id: str) -> None:
        ended = record(session_id, ended_at=1010.0, completion_status="stopped")
        loop = asyncio.get_running_loop()
        loop.call_later(0.3, api.deps.sessions.ended_now, ended)

    api.pool.on_stop = bot_ends_later
    started = time.perf_counter()
    response = await api.client.delete(
        f"{SESSIONS}/{SID}", headers={"authorization": f"Bearer {PRIVATE_KEY}"}
    )
    assert time.perf_counter() - started >= 0.3
    assert (response.status_code, response.json()) == (
        200,
        {
            "status": "terminated",
            "session_id": SID,
            "completionStatus": "stopped",
            "endState": "terminated",
        },
    )
    assert api.pool.stopped == [SID]


async def test_a_stop_that_bot_outlives_answers_202_stopping(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limits, "STOP_WAIT_S", 0.3)
    api.deps.sessions.started(record(SID))
    api.pool.running.add(SID)  # the runtime has the order; bot() never ends
    started = time.perf_counter()
    response = await api.client.delete(
        f"/v1/organizations/my-org/services/echo/sessions/{SID}",
        headers={"authorization": f"Bearer {PRIVATE_KEY}"},
    )
    assert 0.3 <= time.perf_counter() - started < 2.0
    assert (response.status_code, response.json()) == (
        202,
        {"status": "stopping", "session_id": SID},
    )
    assert api.pool.stopped == [SID]


async def test_stop_refuses_a_session_that_ended_or_runs_nowhere(api: Api) -> None:
    auth = {"authorization": f"Bearer {PRIVATE_KEY}"}
    api.deps.sessions.started(record(SID))
    response = await api.client.delete(f"{SESSIONS}/{SID}", headers=auth)
    assert (response.status_code, response.json()) == (
        404,
        error(
            f"session {SID} is not running (it has ended, or no gateway of this deployment "
            "serves it); only live sessions can be stopped",
            "404",
        ),
    )
    ended = record(SID, ended_at=1010.0, completion_status="client_closed")
    api.deps.sessions.ended_now(ended)
    response = await api.client.delete(f"{SESSIONS}/{SID}", headers=auth)
    assert (response.status_code, response.json()) == (
        404,
        error(
            f"session {SID} has already ended (client_closed); only live sessions can be stopped",
            "404",
        ),
    )
    assert api.pool.stopped == []  # neither reached the pool: one runs nowhere, one ended


async def test_a_failing_store_is_a_500_that_points_at_the_log(
    make_api: Callable[..., Any],
) -> None:
    api: Api = await make_api(FailingStore)
    expected = error("could not read the session records; see the gateway log", "internal_error")
    response = await api.get(f"{SESSIONS}/{SID}")
    assert (response.status_code, response.json()) == (500, expected)
    response = await api.get("/v1/agents/echo/logs", params={"sessionId": SID})
    assert (response.status_code, response.json()) == (500, expected)


# --- logs API --------------------------------------------------------------------------------


async def test_logs_of_a_session_come_from_its_file(api: Api) -> None:
    folder = api.deps.config.log_dir / "my-org" / "echo"
    folder.mkdir(parents=True)
    lines = [
        {
            "@timestamp": f"2026-01-01T00:00:0{i}.000Z",
            "stream": "stdout",
            "level": "INFO",
            "session_id": SID,
            "line": f"line {i}",
        }
        for i in range(3)
    ]
    (folder / f"{SID}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    response = await api.get(
        "/v1/agents/echo/logs", params={"sessionId": SID, "order": "asc", "limit": 2}
    )
    assert (response.status_code, response.json()) == (
        200,
        {
            "total": {"value": 3, "relation": "eq"},
            "logs": [
                {
                    "log": f"line {i}",
                    "timestamp": f"2026-01-01T00:00:0{i}.000Z",
                    "sessionId": SID,
                    "level": "INFO",
                    "stream": "stdout",
                }
                for i in range(2)
            ],
        },
    )


async def test_logs_of_a_known_session_without_a_file_are_empty_else_404(api: Api) -> None:
    api.deps.sessions.started(record(SID))
    response = await api.get("/v1/agents/echo/logs", params={"sessionId": SID})
    assert (response.status_code, response.json()) == (
        200,
        {"total": {"value": 0, "relation": "eq"}, "logs": []},
    )
    response = await api.get("/v1/agents/echo/logs", params={"sessionId": UNKNOWN})
    assert (response.status_code, response.json()) == (
        404,
        error(f"no session {UNKNOWN} for agent 'echo'", "404"),
    )
    response = await api.get("/v1/agents/nope/logs", params={"sessionId": SID})
    assert (response.status_code, response.json()) == (
        404,
        error("no agent 'nope' in organization 'my-org'", "404"),
    )


# --- dashboard -------------------------------------------------------------------------------


async def test_dashboard_is_not_served_unless_enabled(api: Api) -> None:
    for path in ("/dashboard", "/v1/dashboard/state"):
        response = await api.get(path)
        assert (response.status_code, response.json()) == (404, error("not found", "404"))


async def test_dashboard_state_shows_the_orgs_agents_live_and_ended_sessions(
    make_api: Callable[..., Any],
) -> None:
    states = {("echo.my-org", "idle"): 1, ("echo.my-org", "busy"): 1}
    api: Api = await make_api(dashboard=True, pool_states=states)
    api.clock.now = 1030.0
    api.deps.sessions.started(record(SID, created_at=1000.0, cold_start=True))
    api.deps.sessions.started(record(str(uuid.uuid4()), organization="other-org"))
    api.relays[SID] = Traffic(
        bytes_client_to_agent=10,
        bytes_agent_to_client=20,
        frames_client_to_agent=1,
        frames_agent_to_client=2,
    )
    ended = record(
        UNKNOWN,
        created_at=900.0,
        ended_at=905.0,
        completion_status="bot_error",
        error="RuntimeError: boom",
        bytes_agent_to_client=7,
    )
    api.deps.sessions.ended_now(ended)
    response = await api.get("/v1/dashboard/state")
    zero = {
        "bytesClientToAgent": 0,
        "bytesAgentToClient": 0,
        "framesClientToAgent": 0,
        "framesAgentToClient": 0,
    }
    assert (response.status_code, response.json()) == (
        200,
        {
            "organization": "my-org",
            "now": 1030.0,
            "draining": False,
            "agents": [
                {
                    "agent": "echo",
                    "key": "echo.my-org",
                    "websocketAuth": "none",
                    "minAgents": limits.MIN_AGENTS_DEFAULT,
                    "maxAgents": 2,
                    "instances": {"starting": 0, "idle": 1, "busy": 1, "draining": 0},
                    "liveSessions": 1,
                },
                {
                    "agent": "secure",
                    "key": "secure.my-org",
                    "websocketAuth": "token",
                    "minAgents": limits.MIN_AGENTS_DEFAULT,
                    "maxAgents": limits.MAX_AGENTS_DEFAULT,
                    "instances": {"starting": 0, "idle": 0, "busy": 0, "draining": 0},
                    "liveSessions": 0,
                },
            ],
            "live": [
                {
                    "sessionId": SID,
                    "agent": "echo",
                    "transport": "websocket",
                    "coldStart": True,
                    "createdAt": 1000.0,
                    "seconds": 30.0,
                    "bytesClientToAgent": 10,
                    "bytesAgentToClient": 20,
                    "framesClientToAgent": 1,
                    "framesAgentToClient": 2,
                },
            ],
            "ended": [
                {
                    "sessionId": UNKNOWN,
                    "agent": "echo",
                    "transport": "websocket",
                    "createdAt": 900.0,
                    "endedAt": 905.0,
                    "seconds": 5.0,
                    "completionStatus": "bot_error",
                    "error": "RuntimeError: boom",
                    **zero,
                    "bytesAgentToClient": 7,
                },
            ],
        },
    )


async def test_dashboard_page_and_state_need_what_they_need(make_api: Callable[..., Any]) -> None:
    api: Api = await make_api(dashboard=True)
    page = await api.get("/dashboard", key=None)
    assert page.status_code == 200 and page.headers["cache-control"] == "no-store"
    assert "content-security-policy" in page.headers
    response = await api.get("/v1/dashboard/state", key=None)
    assert (response.status_code, response.json()) == (
        401,
        error("missing or invalid private API key: send Authorization: Bearer sk_...", "401"),
    )
    api.draining.now = True
    assert (await api.get("/v1/dashboard/state")).json()["draining"] is True


# --- /metrics ----------------------------------------------------------------------------------


async def test_metrics_on_the_main_port_are_for_loopback_clients(api: Api) -> None:
    response = await api.get("/metrics", key=None)
    assert response.status_code == 200 and response.headers["content-type"] == CONTENT_TYPE
    assert 'catflap_sessions_active{agent="echo.my-org"} 0.0' in response.text
    response = await api.get("/metrics", key=None, headers={"x-forwarded-for": "203.0.113.7"})
    assert (response.status_code, response.json()) == (
        403,
        error(
            "GET /metrics is served to loopback clients only: set [gateway] metrics_key, or "
            "metrics_listen for a separate metrics port",
            "metrics_forbidden",
        ),
    )


async def test_metrics_with_a_key_need_it(make_api: Callable[..., Any]) -> None:
    api: Api = await make_api(metrics_key=SecretStr("m" * 32))
    response = await api.get("/metrics", key="wrong")
    assert (response.status_code, response.json()) == (
        401,
        error("GET /metrics needs Authorization: Bearer <[gateway] metrics_key>", "401"),
    )
    assert response.headers["www-authenticate"] == 'Bearer realm="catflap metrics"'
    assert (await api.get("/metrics", key="m" * 32)).status_code == 200


def _head(raw: bytes) -> Any:
    parsed = HeadParser().feed(raw)
    assert parsed is not None
    return parsed[0]


def test_metrics_listener_answers_from_the_settings_and_metrics_it_was_given(
    tmp_path: Path,
) -> None:
    settings = config(tmp_path, metrics_listen="127.0.0.1:0", metrics_key="k" * 32).gateway
    listener = MetricsListener(settings=settings, metrics=GatewayMetrics())
    answer = listener.answer(
        _head(b"GET /metrics HTTP/1.1\r\nAuthorization: Bearer " + b"k" * 32 + b"\r\n\r\n"),
        "203.0.113.7",
    )
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and b"catflap_sessions_started" in answer
    refused = listener.answer(_head(b"GET /metrics HTTP/1.1\r\n\r\n"), "127.0.0.1")
    assert refused.startswith(b"HTTP/1.1 401 ")
    assert refused.endswith(
        b'{"error":"GET /metrics needs Authorization: Bearer <[gateway] metrics_key>","code":"401"}'
    )
    elsewhere = listener.answer(_head(b"GET / HTTP/1.1\r\n\r\n"), "127.0.0.1")
    assert elsewhere.endswith(
        b'{"error":"not found: this port serves only /metrics","code":"not_found"}'
    )
