"""The live view in a real browser: Debian's headless Chromium, driven by Playwright.

The test opens ``/dashboard``, enters a private key, sees a live session appear, clicks Stop,
and sees the session listed under recent endings as ``stopped`` while the client gets 1000.
``CATFLAP_UPDATE_SCREENSHOT=1`` also writes the screenshot to ``docs/dashboard.png``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Page, async_playwright, expect
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from .conftest import PRIVATE_KEY, ROOT, RunningGateway, running_gateway, seconds

pytestmark = pytest.mark.slow  # end to end: real gateways, agent processes

CHROMIUM = Path("/usr/bin/chromium")
#: Headless, offline, and quiet: no first-run UI, no update or sync traffic, no QUIC probing.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = ROOT / "docs" / "dashboard.png"
AGENTS = {
    "echo": {"scaling": {"min_agents": 1, "max_agents": 3}},
    "support-bot": {"websocket_auth": "token", "scaling": {"min_agents": 0}},
}


def ms(value: float) -> float:
    """Playwright takes milliseconds."""
    return seconds(value) * 1000


async def short_session(gw: RunningGateway) -> None:
    async with connect(gw.ws + "/ws/generic/echo.my-org") as ws:
        await ws.recv()
        await ws.send(b"\x00" * 3000)
        await ws.recv()
    async with asyncio.timeout(seconds(10)):
        while not gw.gateway.sessions.ended:
            await asyncio.sleep(0.02)


async def log_in(page: Page, key: str) -> None:
    await page.fill("#key", key)
    await page.click("#login button[type=submit]")


async def test_the_dashboard_is_off_unless_enabled() -> None:
    async with running_gateway({"echo": {}}) as gw, httpx.AsyncClient() as client:
        for path in ("/dashboard", "/v1/dashboard/state"):
            response = await client.get(gw.http + path)
            assert response.status_code == 404


async def test_state_needs_a_private_key_and_lists_the_orgs_sessions() -> None:
    async with running_gateway(AGENTS, dashboard=True) as gw, httpx.AsyncClient() as client:
        await gw.wait_ready("echo.my-org")
        refused = await client.get(gw.http + "/v1/dashboard/state")
        assert refused.status_code == 401 and refused.json()["code"] == "401"
        page = await client.get(gw.http + "/dashboard")
        assert page.status_code == 200 and "catflap live view" in page.text
        assert "script-src 'sha256-" in page.headers["content-security-policy"]
        async with connect(gw.ws + "/ws/generic/echo.my-org") as ws:
            sid = json.loads(await ws.recv())["session_id"]
            await ws.send("x" * 100)
            await ws.recv()
            headers = {"Authorization": f"Bearer {PRIVATE_KEY}"}
            state = (await client.get(gw.http + "/v1/dashboard/state", headers=headers)).json()
    assert state["organization"] == "my-org"
    echo = next(a for a in state["agents"] if a["agent"] == "echo")
    assert echo["instances"]["busy"] == 1 and echo["liveSessions"] == 1
    (live,) = state["live"]
    assert live["sessionId"] == sid and live["bytesClientToAgent"] == 100 + 6
    assert live["seconds"] >= 0 and state["ended"] == []


@pytest.fixture
def chromium() -> Path:
    """Debian's Chromium; missing is a failure, not a skip (CI must run this test)."""
    assert CHROMIUM.exists(), "Debian's chromium is missing: `./dev test` installs it as root"
    return CHROMIUM


async def test_dashboard_shows_a_live_session_and_stops_it(tmp_path: Path, chromium: Path) -> None:
    async with running_gateway(AGENTS, dashboard=True) as gw:
        await gw.wait_ready("echo.my-org")
        await short_session(gw)  # so that "recent endings" has a row too
        async with (
            connect(gw.ws + "/ws/generic/echo.my-org") as ws,
            async_playwright() as playwright,
        ):
            sid = json.loads(await ws.recv())["session_id"]
            await ws.send(b"\x01" * 20000)
            await ws.recv()
            browser = await playwright.chromium.launch_persistent_context(
                str(tmp_path / "profile"),  # a fresh --user-data-dir
                executable_path=str(chromium),
                args=CHROMIUM_ARGS,
                headless=True,
                viewport={"width": 1200, "height": 720},
                timeout=ms(30),
            )
            try:
                page = await browser.new_page()
                await page.goto(gw.http + "/dashboard", timeout=ms(15))
                await log_in(page, "sk_wrong")
                await expect(page.locator("#login-error")).to_contain_text(
                    "refused", timeout=ms(10)
                )
                await log_in(page, PRIVATE_KEY)
                row = page.locator(f'#live tr[data-session="{sid}"]')
                await expect(row).to_have_count(1, timeout=ms(10))
                agent = page.locator('#agents tr[data-agent="echo"] td')
                await expect(agent.nth(3)).to_have_text("1", timeout=ms(5))  # busy
                await expect(row.locator("td").nth(5)).to_have_text("19.5 KiB", timeout=ms(5))
                await page.reload()  # the key stays for this tab
                await expect(row).to_have_count(1, timeout=ms(10))
                shot = tmp_path / "dashboard.png"
                await page.screenshot(path=str(shot), full_page=True)
                if os.environ.get("CATFLAP_UPDATE_SCREENSHOT"):
                    shutil.copyfile(shot, SCREENSHOT)

                await row.locator("button.stop").click()
                status = page.locator(f'#ended tr[data-session="{sid}"] td.status')
                await expect(status).to_have_text("stopped", timeout=ms(10))
                await expect(row).to_have_count(0, timeout=ms(5))
            finally:
                await browser.close()
            with pytest.raises(ConnectionClosed):
                async with asyncio.timeout(seconds(5)):
                    while True:
                        await ws.recv()
            assert (ws.close_code, ws.close_reason) == (1000, "session stopped")
        record = gw.gateway.sessions.get(sid)
        assert record is not None and record.completion_status == "stopped"
