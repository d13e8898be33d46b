"""SmallWebRTC in cluster mode, inside a network namespace; prints what it saw as JSON.

tests/test_webrtc_cluster.py runs ``python -m tests.webrtc_cluster_driver`` under
``unshare -n`` (``lo`` up, ``127.0.0.2/8`` on it), as tests/test_webrtc.py runs
:mod:`tests.webrtc_driver`. Everything runs inside the namespace: a private ``redis-server``
on a free port of ``127.0.0.1`` (the machine's Redis is not reachable from there), two
``catflap gateway`` processes and two ``catflap agent-host`` processes, each host with one
instance of ``examples/pipecat-webrtc-echo`` (tests/test_cluster.py's ``cluster()``).

Two aiortc clients cross the gateways: one starts its session on gateway A and sends its
offer and trickled candidates through gateway B, the other the other way round. With one
instance per host and one session per instance the two sessions are on different hosts, so
each offer must be routed, through Redis, to the host that runs its session. The last line on
stdout is one JSON object of observations; the test asserts on it.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import httpx
import redis

from tests.conftest import EXAMPLES, seconds
from tests.test_cluster import Cluster, cluster, private_redis
from tests.webrtc_driver import Client, _connected, dominant_hz

AGENT = "echo"  # the name tests/test_cluster.py's cluster() gives its agent
AGENT_KEY = f"{AGENT}.my-org"
PUBLIC_KEY = "pk_test"
PRIVATE_KEY = "sk_test"


class ClusterClient(Client):
    """A client of the cluster: ``/start`` on one gateway, the offer through another."""

    agent = AGENT
    public_key = PUBLIC_KEY
    private_key = PRIVATE_KEY

    def __init__(self, start: httpx.AsyncClient, signal: httpx.AsyncClient) -> None:
        super().__init__(None, start, signal)

    async def record_on(self, http: httpx.AsyncClient) -> dict[str, Any]:
        response = await http.get(
            f"/v1/agents/{AGENT}/sessions/{self.session_id}",
            headers={"authorization": f"Bearer {PRIVATE_KEY}"},
        )
        return {"status": response.status_code, **response.json()}

    async def ended_on(self, http: httpx.AsyncClient, timeout: float = 20) -> dict[str, Any]:
        """The session's record once it has ended, as ``http``'s gateway shows it."""
        async with asyncio.timeout(seconds(timeout)):
            while (record := await self.record_on(http)).get("endedAt") is None:
                await asyncio.sleep(0.05)
        return record


def _instances_of(cl: Cluster) -> dict[str, str]:
    """Each live session's instance id, from the instances' ``active`` sets in Redis."""
    client = redis.Redis.from_url(cl.redis_url)
    try:
        ids = [i.decode() for i in client.smembers(f"{cl.prefix}:agent:{AGENT_KEY}:instances")]
        return {
            session.decode(): iid
            for iid in ids
            for session in client.smembers(f"{cl.prefix}:inst:{iid}:active")
        }
    finally:
        client.close()


async def crossed(cl: Cluster, a: httpx.AsyncClient, b: httpx.AsyncClient) -> dict[str, Any]:
    clients = {"ab": ClusterClient(a, b), "ba": ClusterClient(b, a)}
    seen: dict[str, Any] = {}
    try:
        for name, client in clients.items():
            seen[name] = await _connected(client)
        placed = _instances_of(cl)
        seen["instances"] = [placed.get(c.session_id) for c in clients.values()]
        for name, client in clients.items():
            end_marker = await client.signal(
                "PATCH",
                {"pc_id": client.pc_id, "candidates": [{"candidate": "", "sdp_mid": "0"}]},
            )
            seen[name]["end_of_candidates"] = end_marker.status_code
        for name, client in clients.items():
            await client.wait_audio(3.0)
            frames = client.received[-50:]  # the last second, past the jitter buffer's start
            seen[name]["hz"], seen[name]["rms"] = dominant_hz(frames)
            seen[name]["live"] = [await client.record_on(http) for http in (a, b)]
        for name, client in clients.items():
            hung_up = time.monotonic()
            await client.close()
            seen[name]["ended"] = [await client.ended_on(http) for http in (a, b)]
            seen[name]["ended_after_hangup_s"] = time.monotonic() - hung_up
            gone = await client.signal(
                "POST", {"sdp": client.pc.localDescription.sdp, "type": "offer"}
            )
            seen[name]["offer_after_end"] = {"status": gone.status_code, "body": gone.json()}
    finally:
        for client in clients.values():
            await client.close()
    unknown_id = str(uuid.uuid4())
    unknown = await b.post(
        f"/v1/public/{AGENT}/sessions/{unknown_id}/api/offer",
        json={"sdp": "v=0", "type": "offer"},
        headers={"authorization": f"Bearer {PUBLIC_KEY}"},
    )
    seen["unknown"] = {"id": unknown_id, "status": unknown.status_code, "body": unknown.json()}
    return seen


async def main() -> dict[str, Any]:
    with private_redis() as (url, _restart):
        bot = EXAMPLES / "pipecat-webrtc-echo"
        async with cluster(gateways=2, hosts=2, slots=1, bot=bot, redis_url=url) as cl:
            timeout = seconds(30)
            async with (
                httpx.AsyncClient(base_url=cl.http(0), timeout=timeout) as a,
                httpx.AsyncClient(base_url=cl.http(1), timeout=timeout) as b,
            ):
                return await crossed(cl, a, b)


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main()), default=str), flush=True)
