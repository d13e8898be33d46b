"""The documented client path end to end: gateway -> pool -> runtime -> a real Pipecat pipeline."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from websockets.asyncio.client import connect

from .conftest import PIPECAT_ECHO, running_gateway, seconds

pytestmark = pytest.mark.slow  # end to end: real gateways, agent processes

frames_pb2: Any = pytest.importorskip("pipecat.frames.protobufs.frames_pb2")


def message(data: Any) -> bytes:
    frame = frames_pb2.Frame()
    frame.message.data = json.dumps(data)
    return bytes(frame.SerializeToString())


async def test_pipecat_echo_through_the_gateway_cold_then_warm() -> None:
    agents = {"pipecat-echo": {"path": PIPECAT_ECHO, "scaling": {"min_agents": 0}}}
    async with running_gateway(agents) as gw:
        url = f"{gw.ws}/ws/generic/pipecat-echo.my-org"
        for attempt in ("cold", "warm"):
            async with connect(url, open_timeout=seconds(30)) as ws:
                await ws.send(message({"attempt": attempt}))
                async with asyncio.timeout(seconds(20)):
                    reply = frames_pb2.Frame.FromString(await ws.recv())
                assert json.loads(reply.message.data) == {"attempt": attempt}
                hung_up = time.perf_counter()
            async with asyncio.timeout(seconds(5)):
                while gw.gateway.sessions.live:
                    await asyncio.sleep(0.01)
            assert time.perf_counter() - hung_up < 1.0
        first, second = gw.gateway.sessions.ended.values()
        assert (first.cold_start, second.cold_start) == (True, False)
        assert {first.completion_status, second.completion_status} == {"client_closed"}
