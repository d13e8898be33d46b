"""300 concurrent sessions for 20 s through the gateway: nothing lost, reordered or corrupted.

A bigger run, with timings, lives in the benchmark suite (``python -m bench``); this test only
counts and checks bytes.
"""

from __future__ import annotations

import asyncio
import math
import os
import struct
import time
import zlib

import pytest
from websockets.asyncio.client import ClientConnection, connect

from catflap.config import CatflapConfig

from .conftest import running_gateway, seconds

pytestmark = pytest.mark.slow  # end to end: real gateways, agent processes

SESSIONS = int(os.environ.get("CATFLAP_LOAD_SESSIONS", "300"))
DURATION_S = float(os.environ.get("CATFLAP_LOAD_SECONDS", "20"))
INTERVAL_S = 0.1  # 10 frames/s per session: 3,000 frames/s each way in total
PAYLOAD = 160


def frame(session: int, seq: int) -> bytes:
    body = struct.pack("!II", session, seq) + os.urandom(PAYLOAD - 12)
    return body + struct.pack("!I", zlib.crc32(body))


async def one_session(url: str, index: int, stop_at: float) -> tuple[int, int, int, int, int]:
    """Returns (sent, received, reordered, corrupted, due) for one session: ``due`` is how many
    frames its schedule held from its first send to ``stop_at``. Sends keep to that schedule
    (not a sleep after each send, whose overhead would pile up on a loaded machine)."""
    received = reordered = corrupted = 0
    sent = 0
    sending = True
    all_back = asyncio.Event()
    async with connect(url, open_timeout=seconds(60), compression=None) as ws:
        await ws.recv()  # the echo bot's greeting

        async def read_all(ws: ClientConnection) -> None:
            nonlocal received, reordered, corrupted
            async for message in ws:
                assert isinstance(message, bytes)
                body, crc = message[:-4], struct.unpack("!I", message[-4:])[0]
                session, seq = struct.unpack("!II", body[:8])
                if zlib.crc32(body) != crc or session != index:
                    corrupted += 1
                elif seq != received:
                    reordered += 1
                received += 1
                if not sending and received == sent:
                    all_back.set()

        reader = asyncio.create_task(read_all(ws))
        first = time.monotonic()
        due = max(0, math.ceil((stop_at - first) / INTERVAL_S))
        while sent < due:
            await ws.send(frame(index, sent))
            sent += 1
            await asyncio.sleep(max(0.0, first + sent * INTERVAL_S - time.monotonic()))
        sending = False
        if received == sent:
            all_back.set()
        try:
            async with asyncio.timeout(seconds(30)):
                await all_back.wait()
        finally:
            reader.cancel()
    return sent, received, reordered, corrupted, due


def _no_start_limit(config: CatflapConfig) -> CatflapConfig:
    settings = config.gateway.model_copy(update={"session_starts_per_source": 0.0})
    return config.model_copy(update={"gateway": settings})


async def test_three_hundred_sessions_lose_nothing() -> None:
    per_instance = 50
    agents = {
        "echo": {
            "scaling": {
                "min_agents": SESSIONS // per_instance,
                "max_agents": SESSIONS // per_instance,
                "sessions_per_instance": per_instance,
            }
        }
    }
    # 300 starts at once from 127.0.0.1: past any per-address start rate, so the bound is off.
    async with running_gateway(agents, adjust=_no_start_limit) as gw:
        await gw.wait_ready("echo.my-org", count=SESSIONS // per_instance)
        url = f"{gw.ws}/ws/generic/echo.my-org"
        stop_at = time.monotonic() + DURATION_S
        results = await asyncio.gather(*(one_session(url, i, stop_at) for i in range(SESSIONS)))
        async with asyncio.timeout(seconds(30)):
            while len(gw.gateway.sessions.ended) < SESSIONS:
                await asyncio.sleep(0.05)
        statuses = {r.completion_status for r in gw.gateway.sessions.ended.values()}
    sent = sum(r[0] for r in results)
    # The load really ran: the sessions were open together for most of the window (the
    # handshakes of 300 take a few seconds on a loaded machine), each sending its schedule.
    assert min(r[4] for r in results) >= DURATION_S / INTERVAL_S * 0.5
    assert sent >= SESSIONS * DURATION_S / INTERVAL_S * 0.6
    assert sum(r[1] for r in results) == sent  # 0 lost
    assert sum(r[2] for r in results) == 0  # 0 reordered
    assert sum(r[3] for r in results) == 0  # 0 corrupted
    assert statuses <= {"completed", "client_closed"}
