"""Bounds on what a session may hold in the pool (issue 11, from reading the code): the wait
for ``bot()``'s end, duplicate leases, and a silent agent's single attempt."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from websockets.asyncio.client import connect

from catflap.auth.replay import MemoryReplayStore
from catflap.auth.tokens import mint_token
from catflap.config import CatflapConfig
from catflap.contract import limits
from catflap.contract.errors import CatflapMisuse, ServiceUnavailable
from catflap.gateway.admission import Admission
from catflap.gateway.dispatch import connect_agent
from catflap.gateway.timings import Timings
from catflap.gateway.upstream import AgentSilent, open_upstream
from catflap.pool.instance import Instance, InstanceState

from ..conftest import (
    BOTS,
    ECHO,
    ROOT,
    TEST_KEYRING,
    raw_request,
    running_gateway,
    seconds,
    upgrade_request,
)

pytestmark = pytest.mark.slow  # end to end: real gateways, agent processes


async def test_a_runtime_that_never_reports_the_end_is_replaced_and_recorded() -> None:
    """``await lease.ended`` had no bound: a runtime that dropped a session without reporting
    it held the slot until the instance died. Now the wait is bounded, the instance replaced
    and the record says what happened."""
    agents = {"echo": {"path": ECHO, "scaling": {"min_agents": 1, "max_agents": 1}}}
    # The wait ends at the session's start + max_session_duration (1 s) + this grace.
    timings = {"lease_end": 1.0 * seconds(1)}
    async with running_gateway(agents, adjust=_one_second_sessions("echo"), timings=timings) as gw:
        await gw.wait_ready("echo.my-org")
        pool = gw.pool.agents["echo.my-org"]
        (instance,) = pool.live()
        assert instance.pid is not None
        async with connect(f"{gw.ws}/ws/generic/echo.my-org", close_timeout=0.5) as ws:
            await ws.recv()
            (session_id,) = gw.gateway.sessions.live
            os.kill(instance.pid, signal.SIGSTOP)  # the runtime freezes: it reports nothing
            started = time.monotonic()  # the client closes now
        try:
            async with asyncio.timeout(seconds(limits.CLOSE_WAIT_S + 10)):
                while (record := gw.gateway.sessions.ended.get(session_id)) is None:
                    await asyncio.sleep(0.02)
            took = time.monotonic() - started
        finally:
            with contextlib.suppress(ProcessLookupError):  # already killed, as it should be
                os.kill(instance.pid, signal.SIGCONT)
        assert record.completion_status == "agent_crashed"
        assert record.error is not None and "did not report the end of bot()" in record.error
        # Close handshake bound, or the session's limit and the grace, with a margin.
        assert took < max(limits.CLOSE_WAIT_S, 1.0) + gw.gateway.timings.lease_end + seconds(3)
        await gw.wait_ready("echo.my-org")  # replaced: the slot is usable again
        (replacement,) = pool.live()
        assert replacement.pid != instance.pid
        async with connect(f"{gw.ws}/ws/generic/echo.my-org") as ws:
            await ws.recv()


def _one_second_sessions(name: str) -> Callable[[CatflapConfig], CatflapConfig]:
    """max_session_duration = 1 s, below the 60 s the config accepts, for a quick test."""

    def adjust(config: CatflapConfig) -> CatflapConfig:
        org = config.organizations["my-org"]
        agent = org.agents[name].model_copy(update={"max_session_duration": 1})
        org = org.model_copy(update={"agents": {**org.agents, name: agent}})
        return config.model_copy(update={"organizations": {"my-org": org}})

    return adjust


async def test_a_bot_working_on_after_its_client_left_is_not_cut_short() -> None:
    """Post-call work after the connection closed is the bot's right until its time limit:
    the bounded wait for its end does not kill it (the record is ``client_closed``)."""
    agents = {"postcall": {"path": BOTS / "postcall", "scaling": {"min_agents": 1}}}
    # far shorter than the 3 s of post-call work
    async with running_gateway(agents, timings={"lease_end": 0.5}) as gw:
        await gw.wait_ready("postcall.my-org")
        (instance,) = gw.pool.agents["postcall.my-org"].live()
        async with connect(f"{gw.ws}/ws/generic/postcall.my-org") as ws:
            assert await ws.recv() == "ready"
            (session_id,) = gw.gateway.sessions.live
        async with asyncio.timeout(seconds(15)):
            while (record := gw.gateway.sessions.ended.get(session_id)) is None:
                await asyncio.sleep(0.05)
        assert record.completion_status == "client_closed"
        assert record.error is None
        assert gw.pool.agents["postcall.my-org"].live() == [instance]  # not replaced


async def test_an_instance_refuses_a_second_lease_with_the_same_session_id() -> None:
    instance = Instance(instance_id=1, agent_key="a.o", capacity=2, started_at=0.0)
    instance.state = InstanceState.READY
    first = instance.reserve("s1")
    with pytest.raises(CatflapMisuse, match="already holds session s1"):
        instance.reserve("s1")
    assert instance.leases == {"s1": first}


class _OneLeasePool:
    """Counts acquisitions and cancellations; every lease points at the same instance."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.acquired = 0
        self.cancelled = 0

    async def acquire(self, agent_key: str, session_id: str, **_: Any) -> SimpleNamespace:
        self.acquired += 1
        return self._lease(session_id)

    def _lease(self, session_id: str) -> SimpleNamespace:
        return SimpleNamespace(
            session_id=session_id,
            address=self.address,
            instance_key="1",
            instance_label="instance 1 (silent)",
        )

    def cancel(self, lease: object) -> None:
        self.cancelled += 1


async def test_an_agent_whose_response_head_never_ends_is_given_up() -> None:
    """The agent's 101 is read up to ``UPSTREAM_RESPONSE_HEAD_MAX_BYTES``, not forever."""
    with tempfile.TemporaryDirectory(prefix="cfbig") as folder:
        path = str(Path(folder) / "babbling.sock")

        async def babble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\n")
            with contextlib.suppress(OSError):
                # Never a blank line: past the bound by a few lines, then 8 MiB more at most.
                for _ in range(limits.UPSTREAM_RESPONSE_HEAD_MAX_BYTES // 8192 + 1000):
                    writer.write(b"X-More: " + b"m" * 8192 + b"\r\n")
                    await writer.drain()
            writer.close()

        server = await asyncio.start_unix_server(babble, path)
        try:
            with pytest.raises(ServiceUnavailable):
                await open_upstream(
                    f"unix:{path}",
                    b"GET /ws HTTP/1.1\r\n\r\n",
                    timeout=limits.UPSTREAM_HANDSHAKE_TIMEOUT_S,
                )
        finally:
            server.close()


async def test_a_silent_agent_is_one_failed_attempt_not_three() -> None:
    """An instance that accepts the connection and never answers the upgrade used to be tried
    three times (3 x 10 s, cold-starting instances); now it is one attempt and a 503."""
    with tempfile.TemporaryDirectory(prefix="cfsil") as folder:
        path = str(Path(folder) / "silent.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(8)  # accepts (the kernel does) and never answers
        try:
            pool = _OneLeasePool(f"unix:{path}")
            accepted = _accepted("s1", claims=None)
            lease = pool._lease("s1")
            started = time.monotonic()
            with pytest.raises(AgentSilent) as refused:
                await connect_agent(
                    pool,  # type: ignore[arg-type]
                    accepted,  # type: ignore[arg-type]
                    lease,  # type: ignore[arg-type]
                    b"GET /ws HTTP/1.1\r\n\r\n",
                    timeout=0.3,
                )
            took = time.monotonic() - started
        finally:
            listener.close()
    assert refused.value.status == 503
    assert Timings().upstream_handshake == limits.UPSTREAM_HANDSHAKE_TIMEOUT_S
    assert pool.acquired == 0  # no second instance was leased
    assert pool.cancelled == 1
    assert 0.3 <= took < 0.3 + seconds(1)


async def test_a_token_refused_for_readiness_is_not_spent() -> None:
    """A 503 (the agent cannot start: bot.py fails to import) gives the token back, like a
    429 does: the jti is not remembered, so the client may retry with it."""
    agents = {
        "broken": {
            "path": ROOT / "tests" / "bots" / "broken",
            "websocket_auth": "token",
            "scaling": {"min_agents": 0, "max_agents": 1},
        }
    }
    async with running_gateway(agents, ready_timeout=10) as gw:
        token, claims = mint_token(TEST_KEYRING, "broken.my-org", now=time.time())
        response = await raw_request(
            gw.port,
            upgrade_request(
                "/ws/generic/broken.my-org", extra=f"Authorization: Bearer {token}\r\n"
            ),
            timeout=20,
        )
        assert (response.status, response.json()["code"]) == (503, "PCC-1001")
        replay = gw.gateway.replay
        assert isinstance(replay, MemoryReplayStore)
        assert len(replay) == 0  # the jti was given back
        assert await replay.consume(claims.jti, claims.exp)  # first use is still ahead


class _AnsweringAgent:
    """A unix socket that answers every upgrade with ``answer`` (or, with None, never)."""

    def __init__(self, folder: str, answer: bytes | None) -> None:
        self.path = str(Path(folder) / "agent.sock")
        self.answer = answer
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.done = asyncio.Event()

    async def __aenter__(self) -> _AnsweringAgent:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.writers.append(writer)
            await reader.readuntil(b"\r\n\r\n")
            if self.answer is None:
                await self.done.wait()  # silent until the test ends
            else:
                writer.write(self.answer)
                await writer.drain()
            writer.close()

        self.server = await asyncio.start_unix_server(handle, self.path)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.done.set()
        self.server.close()
        for writer in self.writers:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def _accepted(session_id: str, claims: SimpleNamespace | None) -> SimpleNamespace:
    """As much of an ``UpgradeAccepted`` as dispatch reads."""
    agent = SimpleNamespace(key="a.o", service_host=SimpleNamespace(agent="a", org="o"))
    return SimpleNamespace(
        agent=agent, session_id=session_id, claims=claims, known_agent=lambda: agent
    )


def _dispatch_fixture(address: str) -> tuple[_OneLeasePool, Admission, SimpleNamespace]:
    pool = _OneLeasePool(address)
    claims = SimpleNamespace(jti="jti-1", exp=int(time.time()) + 300)
    admission = Admission(
        replay=MemoryReplayStore(),
        pool=pool,  # type: ignore[arg-type]
        upstream_timeout=0.3,
        count_token=lambda _: None,
    )
    return pool, admission, _accepted("jti-1", claims)


@pytest.mark.parametrize(
    ("answer", "retried", "token_back"),
    [
        (b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n", False, True),
        (b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n", True, True),
        (None, False, False),
    ],
    ids=["refused-400", "draining-503", "silent"],
)
async def test_which_agent_answers_are_retried_and_which_keep_the_token_spent(
    answer: bytes | None, retried: bool, token_back: bool
) -> None:
    """An agent's refusal is its verdict on the request (no retry elsewhere, which would
    cold-start instances for a request every agent refuses); 503 is a draining instance
    (retried). A refusal gives the token back; an upgrade written and never answered may
    have started a bot, so its token stays spent."""
    with tempfile.TemporaryDirectory(prefix="cfans") as folder:
        async with _AnsweringAgent(folder, answer) as agent:
            pool, admission, accepted = _dispatch_fixture(f"unix:{agent.path}")
            assert await admission.replay.consume("jti-1", accepted.claims.exp)
            lease = pool._lease("jti-1")
            with pytest.raises(ServiceUnavailable):
                await admission.reach_agent(
                    accepted,  # type: ignore[arg-type]
                    lease,  # type: ignore[arg-type]
                    b"GET /ws HTTP/1.1\r\n\r\n",
                )
    assert pool.acquired == (limits.DISPATCH_ATTEMPTS - 1 if retried else 0)
    replay = admission.replay
    assert isinstance(replay, MemoryReplayStore)
    assert len(replay) == (0 if token_back else 1)
