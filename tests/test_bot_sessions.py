"""Sessions without a transport (gateway/botsession.py): the ``POST /bot`` request and the wait
for the runtime's acceptance as pure parts, then end to end, where ``POST /start`` with no
``transport`` makes the gateway hold a ``POST /bot`` to a real agent process: the record, the
stop, the 429, 503 and 413, the time limit, a crash and the drain, as for a WebSocket
session."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from catflap.config import CatflapConfig, load_config
from catflap.contract import limits
from catflap.contract.errors import BodyTooLarge, InvalidBody, ServiceUnavailable
from catflap.gateway.botsession import (
    BOT_TRANSPORT,
    InstanceRefused,
    bot_request,
    encode_bot_body,
    wait_until_started,
)
from catflap.pool.instance import SessionEnd
from catflap.sessions.record import SessionRecord
from tests.conftest import (
    BOTS,
    PRIVATE_KEY,
    PUBLIC_KEY,
    RunningGateway,
    running_gateway,
    seconds,
    write_config,
)

AGENT = "botsession"
AGENT_KEY = f"{AGENT}.my-org"


def _agents(**scaling: int) -> dict[str, dict[str, Any]]:
    return {AGENT: {"path": BOTS / "bot_session", "scaling": {"min_agents": 1, **scaling}}}


@asynccontextmanager
async def warm_gateway(
    *,
    adjust: Callable[[CatflapConfig], CatflapConfig] | None = None,
    timings: dict[str, float] | None = None,
    **scaling: int,
) -> AsyncIterator[RunningGateway]:
    """A gateway whose agent runs tests/bots/bot_session, with one instance ready."""
    async with running_gateway(_agents(**scaling), adjust=adjust, timings=timings) as gw:
        await gw.wait_ready(AGENT_KEY)
        yield gw


async def _start(gw: RunningGateway, payload: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=gw.http, timeout=seconds(30)) as client:
        return await client.post(
            f"/v1/public/{AGENT}/start",
            json=payload,
            headers={"authorization": f"Bearer {PUBLIC_KEY}"},
        )


def _lines(out: Path) -> list[str]:
    # A line is written whole and flushed on close, so a partly written one never counts.
    return out.read_text().split("\n")[:-1] if out.exists() else []


async def received_by_bot(out: Path, count: int = 1) -> list[dict[str, Any]]:
    """What tests/bots/bot_session wrote to ``out``, once it has written ``count`` lines."""
    async with asyncio.timeout(seconds(10)):
        while len(lines := _lines(out)) < count:
            await asyncio.sleep(0.01)
    return [json.loads(line) for line in lines]


async def ended_record(gw: RunningGateway, session_id: str, timeout: float = 10) -> SessionRecord:
    async with asyncio.timeout(seconds(timeout)):
        while (record := gw.gateway.sessions.ended.get(session_id)) is None:
            await asyncio.sleep(0.01)
    return record


async def _running(gw: RunningGateway, out: Path, *, then: str) -> str:
    """Start a session whose bot writes to ``out`` and then does ``then``; its session id."""
    response = await _start(gw, {"body": {"out": str(out), "then": then}})
    assert response.status_code == 200, response.text
    session_id: str = response.json()["sessionId"]
    return session_id


async def _another_session_runs(gw: RunningGateway, out: Path) -> None:
    """A next session starts and ends: the slot (or a replaced instance) is there for it."""
    again = await _start(gw, {"body": {"out": str(out)}})
    assert again.status_code == 200, again.text
    await ended_record(gw, again.json()["sessionId"])


def _with_agent(**changes: Any) -> Callable[[CatflapConfig], CatflapConfig]:
    """Change the agent's settings past what the config file accepts (a 1 s time limit)."""

    def adjust(config: CatflapConfig) -> CatflapConfig:
        org = config.organizations["my-org"]
        agent = org.agents[AGENT].model_copy(update=changes)
        org = org.model_copy(update={"agents": {**org.agents, AGENT: agent}})
        return config.model_copy(update={"organizations": {"my-org": org}})

    return adjust


# --- the parts, without sockets --------------------------------------------------------------


def test_the_bot_body_is_compact_utf8_json_of_at_most_bot_body_max_bytes() -> None:
    assert encode_bot_body({"a": "é", "b": [1, None]}) == '{"a":"é","b":[1,null]}'.encode()
    assert encode_bot_body(None) == b"{}"
    fits = "x" * (limits.BOT_BODY_MAX_BYTES - 2)  # and its two quotes
    assert len(encode_bot_body(fits)) == limits.BOT_BODY_MAX_BYTES
    with pytest.raises(BodyTooLarge, match=str(limits.BOT_BODY_MAX_BYTES)):
        encode_bot_body(fits + "x")
    with pytest.raises(InvalidBody):
        encode_bot_body(float("nan"))


def test_the_bot_request_names_the_session_and_its_budget(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, _agents()))
    (agent,) = [a for a in config.agents() if a.service_host.agent == AGENT]
    request = bot_request(agent, "s-1", b'{"k":1}')
    head, _, body = request.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0] == "POST /bot HTTP/1.1"
    assert {
        "content-type: application/json",
        "content-length: 7",
        "x-daily-session-id: s-1",
        f"x-pcc-max-session-seconds: {agent.config.max_session_duration}",
    } <= set(lines[1:])
    assert body == b'{"k":1}'


@dataclass
class _Lease:
    """The parts of a pool lease :func:`wait_until_started` reads."""

    started: bool = False
    ended: asyncio.Future[SessionEnd] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


def _answer(
    head: bytes | None = None, following: bytes = b""
) -> asyncio.Future[tuple[bytes, bytes]]:
    answer: asyncio.Future[tuple[bytes, bytes]] = asyncio.get_running_loop().create_future()
    if head is not None:
        answer.set_result((head, following))
    return answer


async def test_a_session_is_accepted_once_the_runtime_reports_it_started() -> None:
    lease, answer = _Lease(), _answer()
    asyncio.get_running_loop().call_soon(setattr, lease, "started", True)
    await wait_until_started(lease, answer)  # type: ignore[arg-type]


async def test_an_answer_before_the_start_is_the_runtimes_refusal() -> None:
    refused = _answer(
        b"HTTP/1.1 409 Conflict\r\ncontent-type: application/json\r\n\r\n",
        b'{"error":"...","code":"session_already_running"}',
    )
    with pytest.raises(
        ServiceUnavailable, match=r"HTTP 409 \(session_already_running\)"
    ) as verdict:
        await wait_until_started(_Lease(), refused)  # type: ignore[arg-type]
    assert not isinstance(verdict.value, InstanceRefused)  # the same on every instance
    full = _answer(b"HTTP/1.1 503 Service Unavailable\r\n\r\n")
    with pytest.raises(InstanceRefused, match="HTTP 503"):  # another instance may take it
        await wait_until_started(_Lease(), full)  # type: ignore[arg-type]
    ran = _answer(b"HTTP/1.1 200 OK\r\n\r\n")  # bot() ran and ended before the report came
    await wait_until_started(_Lease(), ran)  # type: ignore[arg-type]


async def test_a_lost_connection_or_instance_before_the_start_tries_another_instance() -> None:
    lost = _answer()
    lost.set_exception(ConnectionError("gone"))
    with pytest.raises(InstanceRefused, match="closed the connection"):
        await wait_until_started(_Lease(), lost)  # type: ignore[arg-type]
    lease = _Lease()
    lease.ended.set_result(SessionEnd(status="agent_crashed"))
    with pytest.raises(InstanceRefused, match="ended before"):
        await wait_until_started(lease, _answer())  # type: ignore[arg-type]


# --- end to end ------------------------------------------------------------------------------


@pytest.mark.slow
async def test_a_session_without_a_transport_runs_the_bot_and_is_recorded(tmp_path: Path) -> None:
    out = tmp_path / "received.jsonl"
    async with warm_gateway() as gw:
        body = {"out": str(out), "caller": "ünïcode", "n": [1, 2.5, None]}
        response = await _start(gw, {"createDailyRoom": False, "body": body})
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"
        session_id = response.json()["sessionId"]
        assert response.json() == {"sessionId": session_id}
        (received,) = await received_by_bot(out)
        assert received["session_id"] == session_id
        assert received["body"] == body
        assert received["type"] in {"PipecatSessionArguments", "RunnerArguments"}
        record = await ended_record(gw, session_id)
        assert record.completion_status == "completed"
        assert record.agent == AGENT
        assert record.transport == BOT_TRANSPORT == "bot"
        assert (record.bytes_client_to_agent, record.frames_agent_to_client) == (0, 0)
        async with httpx.AsyncClient(base_url=gw.http) as client:
            shown = await client.get(
                f"/v1/agents/{AGENT}/sessions/{session_id}",
                headers={"authorization": f"Bearer {PRIVATE_KEY}"},
            )
        assert shown.status_code == 200, shown.text
        assert shown.json()["completionStatus"] == "completed"
        # The slot came back: the next session starts on the same instance.
        await _another_session_runs(gw, out)


@pytest.mark.slow
async def test_delete_stops_a_running_bot_session(tmp_path: Path) -> None:
    out = tmp_path / "received.jsonl"
    async with warm_gateway() as gw:
        session_id = await _running(gw, out, then="wait")
        await received_by_bot(out)
        assert session_id in gw.gateway.sessions.live
        async with httpx.AsyncClient(base_url=gw.http) as client:
            stopped = await client.delete(
                f"/v1/agents/{AGENT}/sessions/{session_id}",
                headers={"authorization": f"Bearer {PRIVATE_KEY}"},
            )
        assert stopped.status_code in (200, 202, 204), stopped.text
        record = await ended_record(gw, session_id)
        assert record.completion_status == "stopped"


@pytest.mark.slow
async def test_at_max_agents_a_second_session_gets_429(tmp_path: Path) -> None:
    out = tmp_path / "received.jsonl"
    async with warm_gateway(max_agents=1) as gw:
        session_id = await _running(gw, out, then="wait")
        await received_by_bot(out)
        second = await _start(gw, {"body": {"out": str(out)}})
        assert second.status_code == 429, second.text
        assert second.json()["code"] == "PCC-AGENT-AT-CAPACITY"
        assert "retry-after" in second.headers
        await gw.pool.stop_session(session_id)
        assert (await ended_record(gw, session_id)).completion_status == "stopped"


@pytest.mark.slow
async def test_a_body_over_one_megabyte_gets_413_and_starts_nothing(tmp_path: Path) -> None:
    out = tmp_path / "received.jsonl"
    async with warm_gateway() as gw:
        envelope = json.dumps({"out": str(out), "p": ""}, separators=(",", ":"))
        padding = "x" * (limits.BOT_BODY_MAX_BYTES - len(envelope.encode()))
        fits = await _start(gw, {"body": {"out": str(out), "p": padding}})
        assert fits.status_code == 200, fits.text
        await ended_record(gw, fits.json()["sessionId"])
        over = await _start(gw, {"body": {"out": str(out), "p": padding + "x"}})
        assert over.status_code == 413, over.text
        assert over.json()["code"] == "body_too_large"
        assert len(await received_by_bot(out)) == 1
        assert not gw.gateway.sessions.live


@pytest.mark.slow
async def test_max_session_duration_ends_the_bot_as_time_limit(tmp_path: Path) -> None:
    out = tmp_path / "received.jsonl"
    async with warm_gateway(adjust=_with_agent(max_session_duration=1)) as gw:
        session_id = await _running(gw, out, then="wait")
        record = await ended_record(gw, session_id)
        assert record.completion_status == "time_limit"


@pytest.mark.slow
async def test_a_crashing_agent_is_recorded_agent_crashed_and_replaced(tmp_path: Path) -> None:
    out = tmp_path / "received.jsonl"
    async with warm_gateway() as gw:
        (crashed,) = gw.pool.agents[AGENT_KEY].live()
        session_id = await _running(gw, out, then="crash")
        record = await ended_record(gw, session_id)
        assert record.completion_status == "agent_crashed"
        await gw.wait_ready(AGENT_KEY)
        assert crashed not in gw.pool.agents[AGENT_KEY].live()
        await _another_session_runs(gw, out)


@pytest.mark.slow
async def test_the_drain_waits_for_a_bot_session_to_end(tmp_path: Path) -> None:
    out = tmp_path / "received.jsonl"
    async with warm_gateway() as gw:
        session_id = await _running(gw, out, then="sleep:0.5")
        await received_by_bot(out)
        await gw.gateway.shutdown(drain_timeout=seconds(10))
        record = gw.gateway.sessions.ended.get(session_id)
        assert record is not None and record.completion_status == "completed"


@pytest.mark.slow
async def test_past_the_drain_deadline_the_bot_is_stopped_and_recorded_drained(
    tmp_path: Path,
) -> None:
    out = tmp_path / "received.jsonl"
    async with warm_gateway(timings={"close_wait": 0.1}) as gw:
        session_id = await _running(gw, out, then="wait")
        await received_by_bot(out)
        # The listener waits close_wait + 5 s for sessions after the deadline, then cancels.
        await gw.gateway.shutdown(drain_timeout=0)
        record = gw.gateway.sessions.ended.get(session_id)
        assert record is not None and record.completion_status == "drained"
        assert not gw.pool.agents[AGENT_KEY].live()[0].leases  # the bot ended: its slot is back


@pytest.mark.slow
async def test_an_agent_that_cannot_start_gets_503_and_records_nothing() -> None:
    agents = {AGENT: {"path": BOTS / "broken", "scaling": {"min_agents": 0}}}
    async with running_gateway(agents) as gw:
        response = await _start(gw, {"body": {"out": "unused"}})
        assert response.status_code == 503, response.text
        assert response.json()["code"] == "PCC-1001"
        assert not gw.gateway.sessions.live and not gw.gateway.sessions.ended


@pytest.mark.slow
async def test_in_cluster_mode_a_gateway_runs_the_bot_on_an_agent_host_over_tcp() -> None:
    from tests.test_cluster import cluster

    async with cluster(gateways=1, hosts=1, slots=1) as cl, httpx.AsyncClient() as client:
        started = await client.post(
            f"{cl.http(0)}/v1/public/echo/start",
            json={"createDailyRoom": False, "body": {"k": 1}},
            headers={"authorization": "Bearer pk_test"},
            timeout=seconds(30),
        )
        assert started.status_code == 200, started.text
        session_id = started.json()["sessionId"]
        # The cluster's bot is a WebSocket echo: given PipecatSessionArguments, it fails on
        # args.websocket, which proves that it ran with this session and reported its end.
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
        assert "websocket" in shown.json()["error"]


@pytest.mark.slow
async def test_a_pool_instance_runs_its_sessions_per_instance_and_refuses_one_more(
    tmp_path: Path,
) -> None:
    """The pool starts each runtime with ``--sessions-per-instance``: with both slots of the one
    instance running, a ``POST /bot`` straight to it is refused by the runtime itself."""
    out = tmp_path / "received.jsonl"
    async with warm_gateway(max_agents=1, sessions_per_instance=2) as gw:
        running = [await _running(gw, out, then="wait") for _ in range(2)]
        await received_by_bot(out, count=2)
        (instance,) = gw.pool.agents[AGENT_KEY].live()
        assert set(instance.leases) == set(running)
        kind, _, where = (instance.address or "").partition(":")
        assert kind == "unix"
        direct = httpx.AsyncHTTPTransport(uds=where)
        async with httpx.AsyncClient(transport=direct, base_url="http://agent") as agent:
            extra = await agent.post(
                "/bot", json={"out": str(out)}, headers={"x-daily-session-id": "direct-1"}
            )
        assert (extra.status_code, extra.json()["code"]) == (503, "instance_full")
        for session_id in running:
            await gw.pool.stop_session(session_id)
            assert (await ended_record(gw, session_id)).completion_status == "stopped"
    assert len(await received_by_bot(out, count=2)) == 2
