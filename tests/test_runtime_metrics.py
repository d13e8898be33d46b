"""GET /metrics on an agent runtime: sessions counted once each, by how they ended."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from .conftest import RunningGateway, running_gateway, seconds

pytestmark = pytest.mark.slow  # end to end: real gateways, agent processes

AGENT = "echo.my-org"


#: (sample name, sorted labels) -> value, from one scrape.
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape_instance(gw: RunningGateway) -> Samples:
    (instance,) = gw.pool.agents[AGENT].live()
    assert instance.address is not None and instance.address.startswith("unix:")
    transport = httpx.AsyncHTTPTransport(uds=instance.address.removeprefix("unix:"))
    async with httpx.AsyncClient(transport=transport, timeout=seconds(10)) as client:
        response = await client.get("http://agent/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted({"agent": AGENT, **labels}.items()))), -1.0)


async def until_ended(gw: RunningGateway, count: int) -> None:
    async with asyncio.timeout(seconds(10)):
        while len(gw.gateway.sessions.ended) < count:
            await asyncio.sleep(0.01)


async def test_runtime_metrics_count_started_active_and_ended_sessions() -> None:
    agents = {"echo": {"scaling": {"min_agents": 1, "max_agents": 1}}}
    async with running_gateway(agents) as gw:
        await gw.wait_ready(AGENT)
        before = await scrape_instance(gw)
        async with connect(gw.ws + "/ws/generic/echo.my-org") as ws:
            await ws.recv()
            live = await scrape_instance(gw)
        await until_ended(gw, 1)
        await gw.wait_ready(AGENT)
        async with connect(gw.ws + "/ws/generic/echo.my-org") as ws:
            await ws.recv()
            await ws.send("__raise__")
            try:
                async with asyncio.timeout(seconds(10)):
                    await ws.recv()
            except ConnectionClosed:
                pass
        await until_ended(gw, 2)
        after = await scrape_instance(gw)

    assert value(before, "catflap_runtime_sessions_started_total") == 0
    assert value(before, "catflap_runtime_sessions_active") == 0
    assert value(live, "catflap_runtime_sessions_started_total") == 1
    assert value(live, "catflap_runtime_sessions_active") == 1
    assert value(live, "catflap_runtime_bot_seconds_count") == 0

    assert value(after, "catflap_runtime_sessions_started_total") == 2
    assert value(after, "catflap_runtime_sessions_active") == 0
    assert value(after, "catflap_runtime_sessions_ended_total", status="completed") == 1
    assert value(after, "catflap_runtime_sessions_ended_total", status="bot_error") == 1
    assert value(after, "catflap_runtime_sessions_ended_total", status="stopped") == 0
    assert value(after, "catflap_runtime_bot_errors_total") == 1
    assert value(after, "catflap_runtime_bot_seconds_count") == 2
    assert value(after, "catflap_runtime_bot_seconds_bucket", le="+Inf") == 2
