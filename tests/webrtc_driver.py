"""Drives one SmallWebRTC scenario inside a network namespace and prints what it saw as JSON.

tests/test_webrtc.py runs ``python -m tests.webrtc_driver SCENARIO`` under ``unshare -n``, with
``lo`` up and ``127.0.0.2/8`` on it (aioice skips ``127.0.0.1`` for host candidates), so the
media of these sessions never leaves the namespace. This process runs a real gateway (as
``catflap serve`` wires it) with ``examples/pipecat-webrtc-echo``, and an aiortc client that
goes through ``/start`` and the session proxy's ``/api/offer`` as Pipecat's JS client does,
sending a generated tone. The last line on stdout is one JSON object of observations; the test
asserts on it.

Scenarios: ``echo`` (the tone comes back; trickle PATCH; a second offer is refused; a
renegotiation works; the record; the client hanging up ends ``bot()``), ``stop`` (DELETE),
``duration`` (``max_session_duration``), ``browser BUNDLE SCREENSHOT`` (Pipecat's JS client,
bundled from tests/webrtc_page, in headless Chromium).
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from catflap.config import CatflapConfig
from tests.conftest import EXAMPLES, PRIVATE_KEY, PUBLIC_KEY, RunningGateway, running_gateway

AGENT = "webrtc-echo"
AGENT_KEY = f"{AGENT}.my-org"
TONE_HZ = 440.0
_RATE = 48000
_FRAME = 960  # 20 ms at 48 kHz, what a browser's Opus track carries


def _tone_track() -> Any:
    """An aiortc audio track of a 440 Hz sine, paced in real time."""
    import av
    from aiortc import MediaStreamTrack

    class Tone(MediaStreamTrack):  # type: ignore[misc]
        kind = "audio"

        def __init__(self) -> None:
            super().__init__()
            self._sent = 0
            self._start: float | None = None

        async def recv(self) -> Any:
            if self._start is None:
                self._start = time.monotonic()
            due = self._start + self._sent / _RATE
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            t = (np.arange(_FRAME) + self._sent) / _RATE
            samples = (0.5 * 32767 * np.sin(2 * np.pi * TONE_HZ * t)).astype(np.int16)
            frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate = _RATE
            frame.pts = self._sent
            frame.time_base = fractions.Fraction(1, _RATE)
            self._sent += _FRAME
            return frame

    return Tone()


def dominant_hz(frames: list[Any]) -> tuple[float, float]:
    """The strongest frequency of ``frames`` (av.AudioFrame) and their RMS, mono-mixed."""
    chunks = []
    rate = _RATE
    for frame in frames:
        data = frame.to_ndarray().astype(np.float64)
        channels = len(frame.layout.channels)
        mono = data.reshape(-1, channels).mean(axis=1) if data.shape[0] == 1 else data.mean(axis=0)
        chunks.append(mono)
        rate = frame.sample_rate
    signal = np.concatenate(chunks) if chunks else np.zeros(1)
    rms = float(np.sqrt(np.mean(signal**2)))
    spectrum = np.abs(np.fft.rfft(signal * np.hanning(len(signal))))
    freqs = np.fft.rfftfreq(len(signal), 1 / rate)
    return float(freqs[int(np.argmax(spectrum[1:])) + 1]), rms


def _adjust(changes: dict[str, Any]) -> Any:
    def adjust(config: CatflapConfig) -> CatflapConfig:
        org = config.organizations["my-org"]
        agent = org.agents[AGENT].model_copy(update=changes)
        org = org.model_copy(update={"agents": {**org.agents, AGENT: agent}})
        return config.model_copy(update={"organizations": {"my-org": org}})

    return adjust


class Client:
    """One aiortc peer connection signalled through catflap, as Pipecat's JS client does.

    ``gw`` is the in-process gateway whose ended sessions :meth:`ended` watches (None in
    cluster mode, where tests/webrtc_cluster_driver.py polls the record instead); ``signal``
    is where the offer and its PATCHes go, when not ``http`` (another gateway of a cluster).
    """

    #: The agent's name and the organisation's keys (the cluster's config has its own).
    agent = AGENT
    public_key = PUBLIC_KEY
    private_key = PRIVATE_KEY

    def __init__(
        self,
        gw: RunningGateway | None,
        http: httpx.AsyncClient,
        signal: httpx.AsyncClient | None = None,
    ) -> None:
        from aiortc import RTCPeerConnection

        self.gw = gw
        self.http = http
        self.signal_http = http if signal is None else signal
        self.pc = RTCPeerConnection()
        self.received: list[Any] = []
        self.session_id = ""
        self.pc_id: str | None = None
        self._readers: list[asyncio.Task[None]] = []

        @self.pc.on("track")
        def on_track(track: Any) -> None:
            self._readers.append(asyncio.create_task(self._read(track)))

    async def _read(self, track: Any) -> None:
        from aiortc.mediastreams import MediaStreamError

        try:
            while True:
                self.received.append(await track.recv())
        except MediaStreamError:
            return

    async def start(self, **extra: Any) -> httpx.Response:
        response = await self.http.post(
            f"/v1/public/{self.agent}/start",
            json={"transport": "webrtc", **extra},
            headers={"authorization": f"Bearer {self.public_key}"},
        )
        if response.status_code == 200:
            self.session_id = response.json()["sessionId"]
        return response

    def offer_url(self) -> str:
        return f"/v1/public/{self.agent}/sessions/{self.session_id}/api/offer"

    async def signal(self, method: str, payload: dict[str, Any]) -> httpx.Response:
        return await self.signal_http.request(
            method,
            self.offer_url(),
            json=payload,
            headers={"authorization": f"Bearer {self.public_key}"},
        )

    async def offer(self, *, pc_id: str | None = None, **extra: Any) -> httpx.Response:
        from aiortc import RTCSessionDescription

        await self.pc.setLocalDescription(await self.pc.createOffer())
        local = self.pc.localDescription
        response = await self.signal(
            "POST", {"sdp": local.sdp, "type": local.type, "pc_id": pc_id, **extra}
        )
        if response.status_code == 200:
            answer = response.json()
            self.pc_id = answer["pc_id"]
            await self.pc.setRemoteDescription(
                RTCSessionDescription(sdp=answer["sdp"], type=answer["type"])
            )
        return response

    def local_candidates(self) -> list[dict[str, Any]]:
        """Our host candidates as the JS client trickles them (aiortc puts them in the SDP)."""
        lines = self.pc.localDescription.sdp.splitlines()
        return [
            {"candidate": line[2:], "sdp_mid": "0", "sdp_mline_index": 0}
            for line in lines
            if line.startswith("a=candidate:")
        ]

    async def record(self) -> dict[str, Any]:
        response = await self.http.get(
            f"/v1/agents/{self.agent}/sessions/{self.session_id}",
            headers={"authorization": f"Bearer {self.private_key}"},
        )
        return {"status": response.status_code, **response.json()}

    async def ended(self, timeout: float = 20) -> dict[str, Any]:
        assert self.gw is not None
        async with asyncio.timeout(timeout):
            while self.session_id not in self.gw.gateway.sessions.ended:
                await asyncio.sleep(0.05)
        return await self.record()

    async def wait_audio(self, seconds: float) -> None:
        async with asyncio.timeout(seconds + 15):
            while sum(f.samples for f in self.received) < seconds * _RATE:
                await asyncio.sleep(0.05)

    async def close(self) -> None:
        await self.pc.close()
        for reader in self._readers:
            reader.cancel()


async def _connected(client: Client) -> dict[str, Any]:
    """Start, add the tone, offer, trickle: what each step answered."""
    seen: dict[str, Any] = {}
    started = await client.start(enableDefaultIceServers=True)
    seen["start"] = {"status": started.status_code, "body": started.json()}
    client.pc.addTrack(_tone_track())
    offered = await client.offer(requestData={"from": "driver"})
    seen["offer"] = {"status": offered.status_code, "keys": sorted(offered.json())}
    trickled = await client.signal(
        "PATCH", {"pc_id": client.pc_id, "candidates": [*client.local_candidates()[:1]]}
    )
    seen["patch"] = {"status": trickled.status_code, "body": trickled.json()}
    return seen


async def echo(gw: RunningGateway, http: httpx.AsyncClient) -> dict[str, Any]:
    client = Client(gw, http)
    seen = await _connected(client)
    end_marker = await client.signal(
        "PATCH",
        {"pc_id": client.pc_id, "candidates": [{"candidate": "", "sdp_mid": "0"}]},
    )
    seen["end_of_candidates"] = end_marker.status_code
    unknown = await client.signal("PATCH", {"pc_id": "nope", "candidates": []})
    seen["patch_unknown"] = {"status": unknown.status_code, "body": unknown.json()}
    second = await client.signal("POST", {"sdp": client.pc.localDescription.sdp, "type": "offer"})
    seen["second_offer"] = {"status": second.status_code, "body": second.json()}
    await client.wait_audio(3.0)
    seen["live"] = await client.record()
    frames = client.received[-50:]  # the last second, well past the jitter buffer's start
    seen["hz"], seen["rms"] = dominant_hz(frames)
    first_pc_id = client.pc_id
    renegotiated = await client.offer(pc_id=first_pc_id)
    seen["renegotiate"] = {
        "status": renegotiated.status_code,
        "same_pc_id": renegotiated.json().get("pc_id") == first_pc_id,
    }
    hung_up = time.monotonic()
    await client.close()
    seen["ended"] = await client.ended()
    seen["ended_after_hangup_s"] = time.monotonic() - hung_up
    return seen


async def stop(gw: RunningGateway, http: httpx.AsyncClient) -> dict[str, Any]:
    client = Client(gw, http)
    seen = await _connected(client)
    await client.wait_audio(1.0)
    deleted = await http.delete(
        f"/v1/agents/{AGENT}/sessions/{client.session_id}",
        headers={"authorization": f"Bearer {PRIVATE_KEY}"},
    )
    seen["delete"] = deleted.status_code
    seen["ended"] = await client.ended()
    gone = await client.signal("POST", {"sdp": client.pc.localDescription.sdp, "type": "offer"})
    seen["offer_after_end"] = {"status": gone.status_code, "body": gone.json()}
    await client.close()
    return seen


async def duration(gw: RunningGateway, http: httpx.AsyncClient) -> dict[str, Any]:
    client = Client(gw, http)
    seen = await _connected(client)
    began = time.monotonic()
    seen["ended"] = await client.ended()
    seen["seconds"] = time.monotonic() - began
    await client.close()
    return seen


#: Debian's Chromium, headless and offline, with fake capture devices that need no prompt, and
#: loopback candidates allowed (the namespace has nothing else).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--allow-loopback-in-peer-connection",
    "--autoplay-policy=no-user-gesture-required",
]
PAGE_PATH = "/__catflap_webrtc_test_page"


async def browser(gw: RunningGateway, http: httpx.AsyncClient, bundle: str, shot: str) -> Any:
    """Pipecat's JS client in Chromium: ready, the bot's audio, and a hang-up ending bot().

    The page is served on the gateway's own origin (Playwright answers that one path), so
    ``/start`` and the offer are same-origin requests to the real gateway."""
    from playwright.async_api import async_playwright

    script = Path(bundle).read_text()  # noqa: ASYNC240 - once, before anything runs
    html = (
        "<!doctype html><html><body><h1>catflap SmallWebRTC test</h1>"
        f"<pre id=state>loading</pre><script>{script}</script></body></html>"
    )
    seen: dict[str, Any] = {}
    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            f"/tmp/cf-chromium-{time.monotonic_ns()}",
            executable_path="/usr/bin/chromium",
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 900, "height": 600},
            timeout=30_000,
        )
        try:
            page = await context.new_page()
            await page.route(
                f"{gw.http}{PAGE_PATH}",
                lambda route: route.fulfill(status=200, content_type="text/html", body=html),
            )
            await page.goto(gw.http + PAGE_PATH, timeout=15_000)
            await page.evaluate(f"window.catflapStart({AGENT!r}, {PUBLIC_KEY!r})")
            await page.wait_for_function(
                "window.catflapState.ready && window.catflapState.peakRms > 0.01",
                timeout=30_000,
            )
            seen["state"] = await page.evaluate("window.catflapState")
            sessions = list(gw.gateway.sessions.live)
            seen["live_sessions"] = len(sessions)
            await page.screenshot(path=shot)
            hung_up = time.monotonic()
            await page.evaluate("window.catflapClient.disconnect()")
            async with asyncio.timeout(20):
                while sessions and sessions[0] not in gw.gateway.sessions.ended:
                    await asyncio.sleep(0.05)
            seen["ended_after_hangup_s"] = time.monotonic() - hung_up
            record = gw.gateway.sessions.ended[sessions[0]]
            seen["ended"] = {
                "completionStatus": record.completion_status,
                "transport": record.transport,
            }
        except Exception as exc:
            seen["error"] = repr(exc)
            with contextlib.suppress(Exception):
                seen["state"] = await page.evaluate("window.catflapState")
        finally:
            await context.close()
    return seen


SCENARIOS = {
    "echo": (echo, {}),
    "stop": (stop, {}),
    "duration": (duration, {"max_session_duration": 2}),
    "browser": (browser, {}),
}


async def main(scenario: str, *args: str) -> dict[str, Any]:
    run, changes = SCENARIOS[scenario]
    agents = {AGENT: {"path": EXAMPLES / "pipecat-webrtc-echo", "scaling": {"min_agents": 1}}}
    async with running_gateway(agents, adjust=_adjust(changes) if changes else None) as gw:
        await gw.wait_ready(AGENT_KEY)
        async with httpx.AsyncClient(base_url=gw.http, timeout=30) as http:
            result: dict[str, Any] = await run(gw, http, *args)
            return result


if __name__ == "__main__":
    result = asyncio.run(main(sys.argv[1], *sys.argv[2:]))
    print(json.dumps(result, default=str), flush=True)
