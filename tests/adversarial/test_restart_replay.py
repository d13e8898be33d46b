"""A token replayed across a gateway restart: ``catflap serve`` keeps spent jtis in its state
dir, so the same key ring (CATFLAP_TOKEN_KEYS) does not bring a used token back to life."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from ..conftest import seconds
from .conftest import ORG, TOKEN_AGENT, assert_healthy, hostile_gateway, mint_token

pytestmark = pytest.mark.slow  # end to end: real gateways, agent processes


async def open_session(port: int, token: str) -> dict[str, Any]:
    """One session on the token agent with ``token`` in the header: the bot's greeting."""
    url = f"ws://127.0.0.1:{port}/ws/generic/{TOKEN_AGENT}.{ORG}"
    async with asyncio.timeout(seconds(20)):
        async with connect(url, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
            greeting: dict[str, Any] = json.loads(await ws.recv())
            await ws.send(b"ping")
            assert await ws.recv() == b"ping"
            return greeting


def test_a_token_used_before_a_restart_is_refused_after_it() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="cfrestart"))
    try:
        with hostile_gateway(directory=workdir) as gw:
            minted = asyncio.run(mint_token(gw.port, TOKEN_AGENT))
            greeting = asyncio.run(open_session(gw.port, minted["token"]))
            assert greeting["session_id"] == minted["sessionId"]
        assert (workdir / "state" / "replay.sqlite3").is_file()

        with hostile_gateway(directory=workdir) as gw:  # same state dir, same keys
            with pytest.raises(InvalidStatus) as refused:
                asyncio.run(open_session(gw.port, minted["token"]))
            response = refused.value.response
            assert response.status_code == 403
            assert json.loads(response.body or b"{}")["code"] == "token_replayed"
            gw.wait_for_log("token_replayed")

            fresh = asyncio.run(mint_token(gw.port, TOKEN_AGENT))
            assert (
                asyncio.run(open_session(gw.port, fresh["token"]))["session_id"]
                == (fresh["sessionId"])
            )
            assert_healthy(gw)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
