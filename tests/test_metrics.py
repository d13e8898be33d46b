"""GET /metrics: exact counts after known traffic, read while a session is live and after."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from .conftest import (
    PUBLIC_KEY,
    RunningGateway,
    raw_request,
    running_gateway,
    seconds,
    upgrade_request,
)

pytestmark = pytest.mark.slow  # end to end: real gateways, agent processes


async def scrape(gw: RunningGateway) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{gw.http}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_count_sessions_traffic_refusals_and_tokens() -> None:
    agents = {"echo": {"websocket_auth": "token", "scaling": {"min_agents": 1}}}
    async with running_gateway(agents) as gw:
        await gw.wait_ready("echo.my-org")
        async with httpx.AsyncClient() as client:
            started = (
                await client.post(
                    f"{gw.http}/v1/public/echo/start",
                    json={"transport": "websocket"},
                    headers={"Authorization": f"Bearer {PUBLIC_KEY}"},
                )
            ).json()
        path = f"/ws/generic/echo.my-org/{started['token']}"
        async with connect(gw.ws + path) as ws:
            await ws.recv()
            for _ in range(5):
                await ws.send(b"x" * 100)
                await ws.recv()
            live = await scrape(gw)
            try:
                await connect(gw.ws + path)  # the same token again
            except websockets.InvalidStatus as exc:
                assert exc.response.status_code == 403
        await raw_request(gw.port, upgrade_request("/ws/generic/nope.my-org"))
        async with asyncio.timeout(seconds(5)):
            while not gw.gateway.sessions.ended:
                await asyncio.sleep(0.01)
        after = await scrape(gw)

    agent = "echo.my-org"
    assert value(live, "catflap_sessions_active", agent=agent) == 1
    assert value(live, "catflap_pool_instances", agent=agent, state="busy") == 1
    assert value(live, "catflap_relayed_frames_total", direction="client_to_agent") == 5
    assert value(live, "catflap_relayed_frames_total", direction="agent_to_client") == 6
    assert value(live, "catflap_relayed_bytes_total", direction="client_to_agent") == 5 * (100 + 6)

    assert value(after, "catflap_sessions_active", agent=agent) == 0
    assert value(after, "catflap_pool_instances", agent=agent, state="idle") == 1
    assert value(after, "catflap_sessions_started_total", agent=agent, transport="websocket") == 1
    assert (
        value(after, "catflap_sessions_completed_total", agent=agent, status="client_closed") == 1
    )
    assert value(after, "catflap_relayed_frames_total", direction="client_to_agent") == 6  # +close
    assert value(after, "catflap_session_start_seconds_count", start="warm") == 1
    assert value(after, "catflap_cold_starts_total", agent=agent) == 0
    assert value(after, "catflap_token_verifications_total", result="ok") == 1
    assert value(after, "catflap_token_verifications_total", result="replayed") == 1
    assert (
        value(after, "catflap_handshake_refusals_total", status="403", reason="token_replayed") == 1
    )
    assert value(after, "catflap_handshake_refusals_total", status="404", reason="404") == 1
