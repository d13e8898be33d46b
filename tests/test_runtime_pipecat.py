"""The runtime running a real Pipecat pipeline (``examples/pipecat-echo``) end to end.

The client speaks pipecat's protobuf frame format, as ``@pipecat-ai/websocket-transport`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, unix_connect
from websockets.exceptions import ConnectionClosed

from catflap.contract import headers
from catflap.contract.closecodes import CloseCode
from catflap.contract.control import ControlChannel

from .conftest import PIPECAT_ECHO, seconds

pytestmark = pytest.mark.slow  # end to end: real gateways, agent processes

frames_pb2: Any = pytest.importorskip("pipecat.frames.protobufs.frames_pb2")

BOT_DIR = PIPECAT_ECHO
WAIT_S = seconds(20)
#: 40 ms of 16 kHz mono PCM16: the output transport's chunk size, so audio returns unsplit.
CHUNK = 1280


@dataclass
class PipecatAgent:
    proc: asyncio.subprocess.Process
    control: ControlChannel
    socket_path: Path

    async def event(self, name: str) -> dict[str, Any]:
        async with asyncio.timeout(WAIT_S):
            while (msg := await self.control.receive()) is not None:
                if msg.get("event") == name:
                    return msg
        raise AssertionError(f"control channel closed before {name!r}")

    def connect(self, session_id: str) -> Any:
        return unix_connect(
            str(self.socket_path),
            uri=f"ws://agent{headers.AGENT_PATH}",
            additional_headers={
                headers.SESSION_ID_HEADER: session_id,
                headers.TRANSPORT_TYPE_HEADER: headers.TRANSPORT_TYPE_WEBSOCKET,
            },
            open_timeout=WAIT_S,
        )


@pytest.fixture
async def agent() -> AsyncIterator[PipecatAgent]:
    with tempfile.TemporaryDirectory(prefix="catflap-pc-") as tmp:
        parent, child = socket.socketpair()
        socket_path = Path(tmp) / "a.sock"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "catflap.runtime.main",
            "--bot-dir", str(BOT_DIR),
            "--listen", f"unix:{socket_path}",
            "--control-fd", str(child.fileno()),
            pass_fds=[child.fileno()],
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        child.close()
        running = PipecatAgent(proc, await ControlChannel.from_socket(parent), socket_path)
        try:
            await running.event("ready")
            yield running
        finally:
            if proc.returncode is None:
                proc.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), WAIT_S)
            await running.control.aclose()


def message(data: Any) -> bytes:
    frame = frames_pb2.Frame()
    frame.message.data = json.dumps(data)
    return bytes(frame.SerializeToString())


def text(value: str) -> bytes:
    frame = frames_pb2.Frame()
    frame.text.text = value
    return bytes(frame.SerializeToString())


def audio(pcm: bytes) -> bytes:
    frame = frames_pb2.Frame()
    frame.audio.audio = pcm
    frame.audio.sample_rate = 16000
    frame.audio.num_channels = 1
    return bytes(frame.SerializeToString())


async def receive_frame(ws: ClientConnection) -> Any:
    data = await asyncio.wait_for(ws.recv(), WAIT_S)
    assert isinstance(data, bytes), "the protobuf serializer sends binary frames"
    return frames_pb2.Frame.FromString(data)


async def test_pipecat_pipeline_echoes_frames_and_ends_when_the_client_hangs_up(
    agent: PipecatAgent,
) -> None:
    async with agent.connect("pc-1") as ws:
        await agent.event("session_started")
        await ws.send(message({"hello": ["world", 1]}))
        reply = await receive_frame(ws)
        assert json.loads(reply.message.data) == {"hello": ["world", 1]}

        await ws.send(text("ÿ hi"))
        reply = await receive_frame(ws)
        assert json.loads(reply.message.data) == {"echo": "ÿ hi"}

        chunks = [bytes([n]) * CHUNK for n in range(1, 6)]
        for chunk in chunks:
            await ws.send(audio(chunk))
        echoed = [await receive_frame(ws) for _ in chunks]
        assert [f.WhichOneof("frame") for f in echoed] == ["audio"] * len(chunks)
        assert [f.audio.audio for f in echoed] == chunks
        assert {(f.audio.sample_rate, f.audio.num_channels) for f in echoed} == {(16000, 1)}
        hung_up = time.monotonic()
    ended = await agent.event("session_ended")
    assert time.monotonic() - hung_up < 1.0
    assert ended["status"] == "completed"
    assert ended["error"] is None
    assert ended["client_disconnected"] is True


async def test_stopping_a_pipecat_session_unwinds_the_pipeline(agent: PipecatAgent) -> None:
    async with agent.connect("pc-2") as ws:
        await agent.event("session_started")
        await ws.send(message({"n": 1}))
        await receive_frame(ws)
        await agent.control.send({"command": "stop_session", "session_id": "pc-2"})
        ended = await agent.event("session_ended")
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), WAIT_S)
    assert (ended["status"], ended["error"]) == ("stopped", None)
    assert ended["bot_seconds"] < 5
    assert info.value.rcvd is not None
    assert info.value.rcvd.code == CloseCode.NORMAL
