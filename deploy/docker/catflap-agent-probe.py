#!/usr/bin/env python3
"""Probes and the preStop drain for a Kubernetes pod running ``catflap agent-host``.

``catflap agent-host`` has no HTTP port of its own: it supervises runtime processes
(``python -m catflap.runtime.main``), each listening on ``tcp:<advertise>:0`` (a random port)
with ``GET /livez`` and ``GET /readyz``. This script gives the kubelet something honest to
check, and gives the pod the drain that ``catflap agent-host`` does not do on SIGTERM.

    catflap-agent-probe started  exit 0 if at least one local runtime answers GET /readyz 200
    catflap-agent-probe ready    the same, and Redis (CATFLAP_REDIS_URL, when set) answers PING
    catflap-agent-probe live     exit 0 if at least one local runtime answers GET /livez 200
    catflap-agent-probe drain [--timeout S]
                                 preStop: mark this pod's instances "draining" in Redis so no
                                 gateway dispatches to them, then wait until none of them holds
                                 or has reserved a session (or until the timeout), exit 0

``ready`` includes Redis because an agent host cut off from Redis gets no new session (its
instances' keys expire) even though its runtimes are fine: a rolling update should not count
such a pod as available. ``started`` (the startup probe) leaves Redis out, so that a Redis
outage while a pod starts does not get its container restarted, which would not help.

Runtimes are found through /proc: processes whose command line runs ``catflap.runtime.main``,
and the listening TCP sockets they own. Nothing here is guessed from port numbers.

``drain`` reads the environment: ``POD_IP`` (the address given to ``--advertise``),
``CATFLAP_REDIS_URL``, ``CATFLAP_AGENT`` (``agent.org``) and ``CATFLAP_PREFIX`` (default
``catflap``). It relies on two facts of catflap's Redis layout (src/catflap/cluster/): an
instance's hash ``{prefix}:inst:{id}`` has an ``address`` field ``tcp:<ip>:<port>``, and the
dispatch script only picks instances whose ``state`` field is ``ready``. ``catflap
agent-host`` never rewrites ``state`` while an instance lives (the heartbeat only refreshes
TTLs), so ``draining`` sticks until the instance is deregistered at SIGTERM.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import os
import struct
import sys
import time
from pathlib import Path

RUNTIME_MODULE = b"catflap.runtime.main"
TCP_LISTEN = "0A"  # st column of /proc/net/tcp{,6}
HTTP_TIMEOUT_S = 2.0
DRAIN_POLL_S = 2.0

#: KEYS[1]: the agent's instance set. ARGV: key prefix, this pod's address prefix
#: ("tcp:10.1.2.3:"), now in ms. Marks this pod's live instances "draining" and returns
#: {instances, sessions} still on them (running plus unexpired reservations). HSET only runs
#: on a hash that exists (HGET just returned its address), so no key without a TTL is created.
DRAIN_LUA = """
local mine, busy = 0, 0
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local ikey = ARGV[1] .. ':inst:' .. id
  local address = redis.call('HGET', ikey, 'address')
  if address and string.sub(address, 1, #ARGV[2]) == ARGV[2] then
    mine = mine + 1
    redis.call('HSET', ikey, 'state', 'draining')
    busy = busy + redis.call('SCARD', ikey .. ':active')
    busy = busy + redis.call('ZCOUNT', ikey .. ':resv', ARGV[3], '+inf')
  end
end
return {mine, busy}
"""


def _runtime_pids() -> list[int]:
    pids: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if RUNTIME_MODULE in cmdline.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def _socket_inodes(pid: int) -> set[str]:
    inodes: set[str] = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def _decode_address(hex_address: str) -> tuple[str, int]:
    """``0100007F:1F90`` -> ``("127.0.0.1", 8080)``; the kernel prints host-order words."""
    hex_ip, hex_port = hex_address.split(":")
    raw = bytes.fromhex(hex_ip)
    words = struct.unpack(f"<{len(raw) // 4}I", raw)
    packed = struct.pack(f">{len(words)}I", *words)
    return str(ipaddress.ip_address(packed)), int(hex_port, 16)


def _listeners(inodes: set[str]) -> list[tuple[str, int]]:
    found: list[tuple[str, int]] = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == TCP_LISTEN and fields[9] in inodes:
                found.append(_decode_address(fields[1]))
    return found


def runtime_addresses() -> list[tuple[str, int]]:
    """Every (ip, port) a local ``catflap.runtime.main`` process listens on."""
    addresses: list[tuple[str, int]] = []
    for pid in _runtime_pids():
        addresses.extend(_listeners(_socket_inodes(pid)))
    return addresses


def _http_ok(host: str, port: int, path: str) -> bool:
    connection = http.client.HTTPConnection(host, port, timeout=HTTP_TIMEOUT_S)
    try:
        connection.request("GET", path)
        return connection.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def check(path: str) -> int:
    """0 when at least one local runtime answers ``path`` with 200."""
    addresses = runtime_addresses()
    for host, port in addresses:
        if _http_ok(host, port, path):
            return 0
    print(f"no local catflap runtime answered GET {path} (found {len(addresses)})")
    return 1


def redis_ok(url: str) -> bool:
    """True when the Redis at ``url`` answers PING within ``READINESS_CHECK_TIMEOUT_S``."""
    import redis
    from redis.exceptions import RedisError

    from catflap.contract.limits import READINESS_CHECK_TIMEOUT_S

    client = redis.Redis.from_url(
        url,
        socket_timeout=READINESS_CHECK_TIMEOUT_S,
        socket_connect_timeout=READINESS_CHECK_TIMEOUT_S,
    )
    try:
        return bool(client.ping())
    except (RedisError, OSError) as exc:
        print(f"Redis unreachable ({exc})")
        return False
    finally:
        client.close()


def ready() -> int:
    """0 when a local runtime is ready and Redis (if configured) answers."""
    if check("/readyz") != 0:
        return 1
    url = os.environ.get("CATFLAP_REDIS_URL")
    return 0 if url is None or redis_ok(url) else 1


def _address_prefix(pod_ip: str) -> str:
    """The start of this pod's instance addresses, as the runtime reports them."""
    ip = ipaddress.ip_address(pod_ip)
    return f"tcp:[{ip}]:" if ip.version == 6 else f"tcp:{ip}:"


def drain(timeout: float) -> int:
    """Stop new sessions reaching this pod's instances; wait for the ones they hold."""
    import redis
    from redis.exceptions import RedisError

    pod_ip = os.environ["POD_IP"]
    prefix = os.environ.get("CATFLAP_PREFIX", "catflap")
    agent = os.environ["CATFLAP_AGENT"]
    client = redis.Redis.from_url(
        os.environ["CATFLAP_REDIS_URL"], socket_timeout=2, socket_connect_timeout=2
    )
    script = client.register_script(DRAIN_LUA)
    deadline = time.monotonic() + timeout
    quiet = 0
    while True:
        try:
            mine, busy = script(
                keys=[f"{prefix}:agent:{agent}:instances"],
                args=[prefix, _address_prefix(pod_ip), int(time.time() * 1000)],
            )
        except (RedisError, OSError) as exc:
            # Cannot see the sessions: keep waiting (live sessions do not need Redis).
            print(f"drain: Redis unreachable ({exc}); still waiting", flush=True)
            quiet = 0
        else:
            # Two idle readings in a row: a reservation made just before the first one has
            # either become an active session or expired by the second.
            quiet = quiet + 1 if int(busy) == 0 else 0
            if quiet >= 2:
                print(f"drain: {int(mine)} instance(s) of {agent} idle; stopping", flush=True)
                return 0
        if time.monotonic() >= deadline:
            print(f"drain: {timeout:g} s passed with sessions still running; stopping", flush=True)
            return 0
        time.sleep(DRAIN_POLL_S)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="catflap-agent-probe",
        description="Probes and the preStop drain for a pod running catflap agent-host.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("started", help="a local runtime answers GET /readyz with 200")
    sub.add_parser("ready", help="started, and Redis ($CATFLAP_REDIS_URL) answers PING")
    sub.add_parser("live", help="a local runtime answers GET /livez with 200")
    drain_parser = sub.add_parser("drain", help="preStop: mark draining, wait for sessions")
    drain_parser.add_argument("--timeout", type=float, default=3600.0)
    options = parser.parse_args(argv)
    if options.command == "started":
        return check("/readyz")
    if options.command == "ready":
        return ready()
    if options.command == "live":
        return check("/livez")
    return drain(options.timeout)


if __name__ == "__main__":
    sys.exit(main())
