"""The ``dispatch`` scenario: session starts spread over a cluster on one Redis.

``gateways`` × ``catflap gateway`` and ``hosts`` × ``catflap agent-host`` (``--slots``,
``--warm``) share a private key prefix on the Redis at ``CATFLAP_BENCH_REDIS`` (default
``redis://127.0.0.1:6379/0``). The client opens ``count`` sessions at an even pace over
``seconds``, alternating gateways; each one is timed from the start of the connect to the
bot's first frame (so a session that waited for a cold start shows it), held ``hold_s`` and
closed. Sessions per host come from the pid in that frame: each host's instances are its
descendants (``/proc``), and instances are not reaped during the run (``idle_timeout`` 300 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import contestants as cs
from bench.loadgen import percentiles
from bench.procs import Child, agent_instances_of, free_port, spawn, wait_port

__all__ = ["DispatchSpec", "run_dispatch"]

HELLO_BOT = Path(__file__).resolve().parent / "bots" / "hello"
AGENT = "hello"
#: Seconds a session may wait for a cold start, the gateways' ``agent_ready_timeout``.
READY_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class DispatchSpec:
    count: int = 500
    seconds: float = 5.0
    gateways: int = 2
    hosts: int = 3
    slots: int = 4
    warm: int = 1
    sessions_per_instance: int = 4
    hold_s: float = 0.25


def _log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _config(spec: DispatchSpec, port: int) -> str:
    text = cs.gateway_config(
        {
            AGENT: {
                "path": HELLO_BOT,
                "scaling": {
                    "min_agents": 0,
                    "max_agents": max(spec.hosts * spec.slots, 1),
                    "sessions_per_instance": spec.sessions_per_instance,
                    "idle_timeout": 300,
                },
            }
        },
        port,
    )
    return text.replace("agent_ready_timeout = 60", f"agent_ready_timeout = {READY_TIMEOUT_S:g}")


def _registered(redis_url: str, prefix: str) -> int:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        ids = client.smembers(f"{prefix}:agent:{AGENT}.{cs.ORG}:instances")
        return sum(int(client.exists(f"{prefix}:inst:{i.decode()}")) for i in ids)
    finally:
        client.close()


def _forget(redis_url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(f"{prefix}:*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


async def _one(url: str, hold_s: float) -> dict[str, Any]:
    import websockets
    from websockets.asyncio.client import connect

    started = time.perf_counter_ns()
    try:
        async with connect(url, open_timeout=READY_TIMEOUT_S + 10) as ws:
            hello = json.loads(await asyncio.wait_for(ws.recv(), 10))
            took = time.perf_counter_ns() - started
            await asyncio.sleep(hold_s)
        return {"status": 101, "ns": took, "pid": int(hello["pid"])}
    except websockets.InvalidStatus as refused:
        return {"status": refused.response.status_code}
    except (OSError, TimeoutError, websockets.WebSocketException) as exc:
        return {"status": 0, "error": f"{type(exc).__name__}: {exc}"}


async def _load(spec: DispatchSpec, ports: list[int]) -> tuple[list[dict[str, Any]], float]:
    path = f"/ws/generic/{AGENT}.{cs.ORG}"
    gap = spec.seconds / max(spec.count, 1)
    began = time.monotonic()

    async def paced(i: int) -> dict[str, Any]:
        await asyncio.sleep(max(0.0, began + i * gap - time.monotonic()))
        gateway = i % len(ports)
        result = await _one(f"ws://127.0.0.1:{ports[gateway]}{path}", spec.hold_s)
        result["gateway"] = gateway
        return result

    results = await asyncio.gather(*(paced(i) for i in range(spec.count)))
    return list(results), time.monotonic() - began


def run_dispatch(spec: DispatchSpec, workdir: Path) -> dict[str, Any]:
    """Start the cluster, run the load, and return the measurements."""
    redis_url = os.environ.get("CATFLAP_BENCH_REDIS", "redis://127.0.0.1:6379/0")
    prefix = f"cfbench-{uuid.uuid4().hex[:8]}"
    config = workdir / "cluster.toml"
    config.write_text(_config(spec, free_port()))
    env = {**os.environ, "CATFLAP_TOKEN_KEYS": "bench:dispatch-benchmark-key"}
    common = ["--config", str(config), "--redis", redis_url, "--prefix", prefix]
    common += ["--log-level", "warning"]
    hosts: list[Child] = []
    gateways: list[tuple[Child, int]] = []
    try:
        for n in range(spec.hosts):
            argv = [sys.executable, "-m", "catflap", "agent-host", *common]
            argv += ["--agent", f"{AGENT}.{cs.ORG}", "--slots", str(spec.slots)]
            argv += ["--warm", str(spec.warm)]
            hosts.append(
                spawn(f"host{n}", argv, cpus=None, log_path=workdir / f"host{n}.log", env=env)
            )
        for n in range(spec.gateways):
            port = free_port()
            argv = [sys.executable, "-m", "catflap", "gateway", *common]
            argv += ["--listen", f"127.0.0.1:{port}"]
            child = spawn(f"gateway{n}", argv, cpus=None, log_path=workdir / f"gw{n}.log", env=env)
            gateways.append((child, port))
        for child, port in gateways:
            wait_port(port, timeout=cs.START_TIMEOUT_S, child=child)
        deadline = time.monotonic() + cs.START_TIMEOUT_S
        while _registered(redis_url, prefix) < spec.hosts * spec.warm:
            if time.monotonic() > deadline:
                raise TimeoutError("the agent hosts' warm instances did not register")
            time.sleep(0.1)
        _log(
            f"dispatch: {spec.count} starts in {spec.seconds:g} s over {spec.gateways} gateways "
            f"x {spec.hosts} hosts ({spec.slots} slots, {spec.warm} warm, "
            f"{spec.sessions_per_instance} sessions per instance)"
        )
        results, took = asyncio.run(_load(spec, [port for _, port in gateways]))
        owner = {pid: n for n, host in enumerate(hosts) for pid in agent_instances_of(host.pid)}
    finally:
        for child, _ in gateways:
            child.stop()
        for host in hosts:
            host.stop()
        with contextlib.suppress(Exception):
            _forget(redis_url, prefix)
    ok = [r for r in results if r["status"] == 101]
    per_host = Counter(owner.get(r["pid"], -1) for r in ok)
    instances = Counter(owner.values())
    errors = [r["error"] for r in results if r.get("error")]
    return {
        "spec": spec.__dict__,
        "count": len(results),
        "ok": len(ok),
        "statuses": dict(sorted(Counter(str(r["status"]) for r in results).items())),
        "errors": errors[:5],
        "load_s": round(took, 2),
        "start_us": percentiles([r["ns"] for r in ok]),
        "per_host": [
            {"host": n, "sessions": per_host.get(n, 0), "instances": instances.get(n, 0)}
            for n in range(spec.hosts)
        ],
        "unattributed": per_host.get(-1, 0),
        "per_gateway": [sum(1 for r in ok if r["gateway"] == n) for n in range(spec.gateways)],
        "cold_starts": sum(instances.values()) - spec.hosts * spec.warm,
    }
