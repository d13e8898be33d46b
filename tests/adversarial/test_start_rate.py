"""One address starting sessions in a loop (bench/attackers.py ``close-declares-16MiB``: each
upgrade on ``/ws/generic`` starts a real ``bot()``), over real sockets against ``catflap serve``
with ``[gateway] session_starts_per_source = 1``, ``session_starts_burst = 5``.

A burst from 127.0.0.1 gets exactly 5 sessions and 429 ``too_many_starts`` for the rest, before
any upgrade and with no bot started; so do its provider upgrades and its ``/start`` of a bot;
a token refused so is not spent. 127.0.0.2 has a bucket of its own, 127.0.0.3 is exempt. The
gateway's RSS stays within a bound through a flood of refusals, and it serves as before.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import Iterator

import pytest

from ..conftest import ECHO, PUBLIC_KEY, seconds, upgrade_request
from .conftest import (
    ORG,
    PRIVATE_KEY,
    TOKEN_AGENT,
    HostileGateway,
    MiB,
    RssWatch,
    assert_healthy,
    client_frame,
    close_code_of,
    hostile_gateway,
    http_get,
    mint_token,
    read_until_closed,
    status_of,
)

pytestmark = pytest.mark.slow  # end to end: real gateways, agent processes

RATE = 1
BURST = 5
#: An agent that holds every session these tests keep open at once, on one warm instance.
MANY = "many"
TARGET = f"/ws/generic/{MANY}.{ORG}"
LIMITED, OTHER, EXEMPT = "127.0.0.1", "127.0.0.2", "127.0.0.3"
MESSAGE = (
    f"this address started over {RATE} sessions a second; retry after 1 s (Retry-After) "
    "or raise [gateway] session_starts_per_source"
)
BODY = json.dumps({"error": MESSAGE, "code": "too_many_starts"}, separators=(",", ":")).encode()


@pytest.fixture(scope="module")
def gateway() -> Iterator[HostileGateway]:
    extra = (
        f"[gateway]\nsession_starts_per_source = {RATE}\nsession_starts_burst = {BURST}\n"
        f'session_starts_exempt = ["{EXEMPT}/32"]\n'
    )
    agents = (
        f"[organizations.{ORG}.agents.{MANY}]\n"
        f'path = "{ECHO}"\n'
        f"[organizations.{ORG}.agents.{MANY}.scaling]\n"
        "min_agents = 1\nmax_agents = 1\nsessions_per_instance = 40\n"
    )
    with hostile_gateway(extra=extra, agents=agents) as gw:
        yield gw


class Attempt:
    """One upgrade from ``source``: its response head, and the rest until close if refused."""

    def __init__(
        self, head: bytes, rest: bytes, writer: asyncio.StreamWriter, reader: asyncio.StreamReader
    ) -> None:
        self.head = head
        self.rest = rest
        self.writer = writer
        self.reader = reader

    @property
    def status(self) -> int:
        return status_of(self.head)

    def header(self, name: str) -> str | None:
        found = re.search(rf"^{name}: ([^\r]*)\r$", self.head.decode("latin-1"), re.I | re.M)
        return None if found is None else found.group(1)


async def attempt(port: int, source: str, target: str = TARGET, *, extra: str = "") -> Attempt:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    writer.write(upgrade_request(target, extra=extra))
    await writer.drain()
    async with asyncio.timeout(seconds(15)):
        head = await reader.readuntil(b"\r\n\r\n")
    rest = b""
    if status_of(head) != 101:
        rest = await read_until_closed(reader, timeout=5)
        writer.close()
    return Attempt(head, rest, writer, reader)


def assert_too_many_starts(answer: Attempt) -> None:
    """The exact refusal: 429, the JSON body, Retry-After, and no upgrade."""
    assert answer.status == 429, answer.head
    assert answer.header("retry-after") == "1"
    assert answer.header("content-type") == "application/json"
    assert answer.header("upgrade") is None
    assert answer.rest == BODY


async def post_start(
    port: int, source: str, agent: str, payload: dict[str, object]
) -> tuple[bytes, bytes]:
    """``POST /v1/public/{agent}/start`` from ``source``: (head, body)."""
    body = json.dumps(payload).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    writer.write(
        f"POST /v1/public/{agent}/start HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {PUBLIC_KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    data = await read_until_closed(reader, timeout=10)
    writer.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def sessions_of(gw: HostileGateway, agent: str) -> int:
    status, body = http_get(
        gw.port, f"/v1/agents/{agent}/sessions", headers=f"Authorization: Bearer {PRIVATE_KEY}\r\n"
    )
    assert status == 200, body[:300]
    total: int = json.loads(body)["total_count"]
    return total


def wait_for_sessions(gw: HostileGateway, agent: str, expected: int) -> None:
    """Bounded poll until ``agent`` has ``expected`` session records, never more."""
    deadline = time.monotonic() + seconds(5)
    while (count := sessions_of(gw, agent)) != expected:
        assert count < expected and time.monotonic() < deadline, (count, expected)
        time.sleep(0.05)


def healthy(gw: HostileGateway) -> None:
    """:func:`assert_healthy`, once 127.0.0.1 (its session's source) has a start again."""
    time.sleep(1.2 / RATE)
    assert_healthy(gw)


def refusals_counted(gw: HostileGateway) -> float:
    _, body = http_get(gw.port, "/metrics")
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in body.decode().splitlines()
        if line.startswith("catflap_handshake_refusals_total{")
        and 'reason="too_many_starts"' in line
    )


def test_a_burst_from_one_address_gets_exactly_its_burst_and_spends_nothing_else(
    gateway: HostileGateway,
) -> None:
    port = gateway.port
    token = asyncio.run(mint_token(port, TOKEN_AGENT))["token"]  # /start with a URL: no start
    # Starting the gateway took some of 127.0.0.1's starts (its readiness check is a session):
    # let its bucket fill up again.
    time.sleep(BURST / RATE + 0.5)
    counted_before = refusals_counted(gateway)
    tries = 3 * BURST

    async def attack() -> tuple[list[Attempt], list[Attempt], tuple[bytes, bytes]]:
        tasks = [asyncio.create_task(attempt(port, LIMITED)) for _ in range(tries)]
        # Right after the first refusal (the bucket is empty, and a start is 1 s away), the
        # other ways to start a session from the same address are refused as well.
        pending: set[asyncio.Task[Attempt]] = set(tasks)
        while True:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if any(task.result().status == 429 for task in done):
                break
        auth = f"Authorization: Bearer {token}\r\n"
        late = await asyncio.gather(
            attempt(port, LIMITED, f"/ws/generic/{TOKEN_AGENT}.{ORG}", extra=auth),
            attempt(port, LIMITED, f"/ws/telnyx?serviceHost={MANY}.{ORG}"),
        )
        started = await post_start(port, LIMITED, MANY, {})
        results = [await task for task in tasks]
        for answer in results:
            answer.writer.close()  # the admitted sessions end; their records stay
        return results, list(late), started

    with RssWatch(gateway.pid) as watch:
        results, (with_token, telnyx), (start_head, start_body) = asyncio.run(attack())
    admitted = [r for r in results if r.status == 101]
    refused = [r for r in results if r.status != 101]
    assert len(admitted) == BURST, [r.head[:40] for r in results]
    for answer in [*refused, with_token, telnyx]:
        assert_too_many_starts(answer)
    # /start of a bot (no transport) is refused by the same bucket, through the control API.
    assert status_of(start_head) == 429, start_head
    assert re.search(rb"^retry-after: 1\r?$", start_head, re.I | re.M), start_head
    assert json.loads(start_body) == {"error": MESSAGE, "code": "too_many_starts"}
    watch.assert_below(16 * MiB)
    # No bot started for a refusal: the agent has exactly the admitted sessions.
    wait_for_sessions(gateway, MANY, BURST)
    assert sessions_of(gateway, TOKEN_AGENT) == 0
    assert refusals_counted(gateway) - counted_before == len(refused) + 3
    gateway.wait_for_log("-> 429 too_many_starts")

    # The refused token was not spent: once a start is back, the same token gets its session.
    time.sleep(1.2)

    async def retry() -> Attempt:
        auth = f"Authorization: Bearer {token}\r\n"
        answer = await attempt(port, LIMITED, f"/ws/generic/{TOKEN_AGENT}.{ORG}", extra=auth)
        answer.writer.close()
        return answer

    again = asyncio.run(retry())
    assert again.status == 101, again.head
    healthy(gateway)


def test_another_address_has_its_own_bucket_and_an_exempt_one_has_none(
    gateway: HostileGateway,
) -> None:
    port = gateway.port
    before = sessions_of(gateway, MANY)

    async def attack() -> tuple[list[Attempt], list[Attempt]]:
        other = await asyncio.gather(*(attempt(port, OTHER) for _ in range(BURST + 3)))
        exempt = await asyncio.gather(*(attempt(port, EXEMPT) for _ in range(3 * BURST)))
        for answer in [*other, *exempt]:
            answer.writer.close()
        return list(other), list(exempt)

    with RssWatch(gateway.pid) as watch:
        other, exempt = asyncio.run(attack())
    assert sorted(a.status for a in other) == [101] * BURST + [429] * 3
    for answer in other:
        if answer.status == 429:
            assert_too_many_starts(answer)
    assert [a.status for a in exempt] == [101] * (3 * BURST)
    wait_for_sessions(gateway, MANY, before + BURST + 3 * BURST)
    watch.assert_below(16 * MiB)
    healthy(gateway)


def test_a_flood_of_starts_from_one_address_is_refused_in_bounded_memory(
    gateway: HostileGateway,
) -> None:
    """300 upgrades, 30 at a time, from an address past its burst: each costs a lookup and a
    429; the starts admitted are what the rate allows while it lasts, no more."""
    port = gateway.port
    source = "127.0.0.4"
    flood = 300

    async def attack() -> tuple[list[Attempt], float]:
        first = await asyncio.gather(*(attempt(port, source) for _ in range(BURST)))
        assert [a.status for a in first] == [101] * BURST
        for answer in first:
            answer.writer.close()
        began = time.monotonic()
        gate = asyncio.Semaphore(30)

        async def one() -> Attempt:
            async with gate:
                answer = await attempt(port, source)
                answer.writer.close()
                return answer

        answers = await asyncio.gather(*(one() for _ in range(flood)))
        return list(answers), time.monotonic() - began

    with RssWatch(gateway.pid) as watch:
        answers, took = asyncio.run(attack())
    admitted = sum(1 for a in answers if a.status == 101)
    assert admitted <= took * RATE + 1, (admitted, took)
    for answer in answers:
        if answer.status != 101:
            assert_too_many_starts(answer)
    assert flood - admitted >= flood - (took * RATE + 1)
    assert took < seconds(30)
    watch.assert_below(16 * MiB)
    healthy(gateway)


def _twilio_start(service_host: str) -> bytes:
    start = {
        "event": "start",
        "sequenceNumber": "1",
        "start": {
            "accountSid": "AC" + "1" * 32,
            "streamSid": "MZ" + "2" * 32,
            "callSid": "CA" + "3" * 32,
            "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            "customParameters": {"_pipecatCloudServiceHost": service_host},
        },
        "streamSid": "MZ" + "2" * 32,
    }
    return client_frame(0x1, json.dumps(start).encode())


def test_a_twilio_stream_over_the_rate_is_closed_1013_once_its_start_names_the_agent(
    gateway: HostileGateway,
) -> None:
    """Twilio without ``?serviceHost=``: the agent is known only from the ``start`` message,
    after the gateway's own 101, so the refusal is a close (1013, as for capacity)."""
    port = gateway.port
    source = "127.0.0.5"

    async def use_up_the_burst() -> list[int]:
        answers = await asyncio.gather(*(attempt(port, source) for _ in range(BURST)))
        for answer in answers:
            answer.writer.close()
        return [a.status for a in answers]

    before = sessions_of(gateway, MANY)
    assert asyncio.run(use_up_the_burst()) == [101] * BURST
    with socket.create_connection(
        ("127.0.0.1", port), timeout=seconds(10), source_address=(source, 0)
    ) as sock:
        sock.sendall(upgrade_request("/ws/twilio"))
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head, _, rest = data.partition(b"\r\n\r\n")
        assert status_of(head) == 101
        sock.sendall(_twilio_start(f"{MANY}.{ORG}"))
        while len(rest) < 2 or len(rest) < 2 + rest[1]:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
    assert close_code_of(rest) == 1013
    assert rest[4 : 2 + rest[1]].decode() == MESSAGE  # the whole message fits a close reason
    wait_for_sessions(gateway, MANY, before + BURST)
    gateway.wait_for_log(f"twilio: {MESSAGE}")
    healthy(gateway)
