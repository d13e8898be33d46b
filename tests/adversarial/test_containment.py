"""An unexpected error inside the gateway's session code never leaves a connection open and
unanswered: before the upgrade it is a 500 JSON answer, after it a dropped connection."""

from __future__ import annotations

import asyncio
import time

import pytest

from catflap.gateway import session

from ..conftest import ECHO, raw_request, running_gateway, seconds, upgrade_request

pytestmark = pytest.mark.slow  # end to end: real gateways, agent processes


def _boom(*args: object, **kwargs: object) -> None:
    raise RuntimeError("a bug in the gateway")


@pytest.mark.parametrize(
    ("target", "module", "name"),
    [
        ("/ws/twilio", session, "run_provider_session"),
        ("/ws/generic/echo.my-org", session, "build_upstream_request"),
    ],
    ids=["provider", "generic"],
)
async def test_an_unexpected_error_before_the_upgrade_is_a_500_and_a_close(
    monkeypatch: pytest.MonkeyPatch, target: str, module: object, name: str
) -> None:
    agents = {"echo": {"path": ECHO, "scaling": {"min_agents": 1}}}
    async with running_gateway(agents) as gw:
        monkeypatch.setattr(module, name, _boom)
        started = time.monotonic()
        response = await raw_request(gw.port, upgrade_request(target), timeout=5)
        assert (response.status, response.json()["code"]) == (500, "internal_error")
        assert "bug" not in response.body.decode()  # details only in the log
        assert time.monotonic() - started < seconds(2)
        async with asyncio.timeout(seconds(5)):
            while gw.gateway.open_connections():
                await asyncio.sleep(0.01)  # and the connection is gone from the count
