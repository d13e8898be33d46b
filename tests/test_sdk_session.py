"""The official Pipecat Cloud SDK starts catflap sessions unchanged: ``pipecatcloud``'s
``Session(agent, public_key, SessionParams(data=...)).start()`` with only ``PIPECAT_API_HOST``
pointing at a real gateway, a real agent process, and what the bot received checked."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import PRIVATE_KEY, PUBLIC_KEY, RunningGateway
from tests.test_bot_sessions import AGENT, ended_record, received_by_bot, warm_gateway

pipecatcloud = pytest.importorskip("pipecatcloud")
from pipecatcloud import Session, SessionParams  # noqa: E402
from pipecatcloud.exception import AgentStartError  # noqa: E402

pytestmark = pytest.mark.slow


@asynccontextmanager
async def _gateway(
    monkeypatch: pytest.MonkeyPatch, **scaling: int
) -> AsyncIterator[RunningGateway]:
    """A gateway with one instance of the bot ready, and the SDK pointed at it."""
    async with warm_gateway(**scaling) as gw:
        monkeypatch.setenv("PIPECAT_API_HOST", gw.http)
        yield gw


async def test_the_sdk_starts_a_session_and_the_bot_gets_its_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "received.jsonl"
    async with _gateway(monkeypatch) as gw:
        data = {"out": str(out), "user": {"name": "Ada", "tags": ["a", "b"]}}
        result = await Session(AGENT, PUBLIC_KEY, params=SessionParams(data=data)).start()
        assert set(result) == {"sessionId"}
        (received,) = await received_by_bot(out)
        assert received == {
            "type": "PipecatSessionArguments",
            "session_id": result["sessionId"],
            "body": data,
        }
        assert (await ended_record(gw, result["sessionId"])).completion_status == "completed"


async def test_a_session_the_sdk_started_stops_with_delete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "received.jsonl"
    async with _gateway(monkeypatch) as gw:
        params = SessionParams(data={"out": str(out), "then": "wait"})
        session_id = (await Session(AGENT, PUBLIC_KEY, params=params).start())["sessionId"]
        await received_by_bot(out)
        async with httpx.AsyncClient(base_url=gw.http) as client:
            stopped = await client.delete(
                f"/v1/agents/{AGENT}/sessions/{session_id}",
                headers={"authorization": f"Bearer {PRIVATE_KEY}"},
            )
        assert stopped.is_success, stopped.text
        assert (await ended_record(gw, session_id)).completion_status == "stopped"


async def test_the_sdk_sees_catflaps_refusals_as_agent_start_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "received.jsonl"
    async with _gateway(monkeypatch, max_agents=1) as gw:
        params = SessionParams(data={"out": str(out), "then": "wait"})
        session_id = (await Session(AGENT, PUBLIC_KEY, params=params).start())["sessionId"]
        await received_by_bot(out)
        with pytest.raises(AgentStartError, match="PCC-AGENT-AT-CAPACITY"):
            await Session(AGENT, PUBLIC_KEY, params=params).start()
        with pytest.raises(AgentStartError, match="401"):
            await Session(AGENT, "pk_not_a_key", params=params).start()
        await gw.pool.stop_session(session_id)
        assert (await ended_record(gw, session_id)).completion_status == "stopped"
