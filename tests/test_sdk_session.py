"""The official Pipecat Cloud SDK starts catflap sessions unchanged: ``pipecatcloud``'s
``Session(agent, public_key, SessionParams(data=...)).start()`` with only ``PIPECAT_API_HOST``
pointing at a real gateway, a real agent process, and what the bot received checked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import BOTS, PRIVATE_KEY, PUBLIC_KEY, running_gateway
from tests.test_bot_sessions import ended_record, received_by_bot

pipecatcloud = pytest.importorskip("pipecatcloud")
from pipecatcloud import Session, SessionParams  # noqa: E402
from pipecatcloud.exception import AgentStartError  # noqa: E402

pytestmark = pytest.mark.slow

AGENT = "sdkbot"
AGENT_KEY = f"{AGENT}.my-org"


def _agents(**scaling: int) -> dict[str, dict[str, Any]]:
    return {AGENT: {"path": BOTS / "bot_session", "scaling": {"min_agents": 1, **scaling}}}


async def test_the_sdk_starts_a_session_and_the_bot_gets_its_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "received.jsonl"
    async with running_gateway(_agents()) as gw:
        monkeypatch.setenv("PIPECAT_API_HOST", gw.http)
        await gw.wait_ready(AGENT_KEY)
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
    async with running_gateway(_agents()) as gw:
        monkeypatch.setenv("PIPECAT_API_HOST", gw.http)
        await gw.wait_ready(AGENT_KEY)
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
    async with running_gateway(_agents(max_agents=1)) as gw:
        monkeypatch.setenv("PIPECAT_API_HOST", gw.http)
        await gw.wait_ready(AGENT_KEY)
        params = SessionParams(data={"out": str(out), "then": "wait"})
        session_id = (await Session(AGENT, PUBLIC_KEY, params=params).start())["sessionId"]
        await received_by_bot(out)
        with pytest.raises(AgentStartError, match="PCC-AGENT-AT-CAPACITY"):
            await Session(AGENT, PUBLIC_KEY, params=params).start()
        with pytest.raises(AgentStartError, match="401"):
            await Session(AGENT, "pk_not_a_key", params=params).start()
        await gw.pool.stop_session(session_id)
        assert (await ended_record(gw, session_id)).completion_status == "stopped"
