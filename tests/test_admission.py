"""Admission without sockets: token before slot, what is given back on refusal, and dispatch
retry, with an in-memory replay store, a fake pool and a fake agent hop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from catflap.auth.replay import MemoryReplayStore
from catflap.auth.tokens import TokenClaims, mint_token
from catflap.config import AgentConfig, AgentSpec
from catflap.contract import limits
from catflap.contract.errors import AtCapacity, ServiceUnavailable, TokenRejected
from catflap.contract.names import AgentName, OrgName, ServiceHost
from catflap.gateway import dispatch
from catflap.gateway.admission import Admission
from catflap.gateway.upgrade import UpgradeAccepted
from catflap.gateway.upstream import AgentSilent, UpstreamReply
from catflap.pool.instance import SessionEnd

from .conftest import ECHO, TEST_KEYRING

NOW = 1_800_000_000.0
AGENT = AgentSpec(ServiceHost(AgentName("echo"), OrgName("org")), AgentConfig(path=ECHO))
REQUEST = b"GET /ws HTTP/1.1\r\n\r\n"


@dataclass
class FakeLease:
    session_id: str
    instance_key: str
    cold_start: bool = False
    ended: asyncio.Future[SessionEnd] = field(default_factory=asyncio.Future)

    @property
    def address(self) -> str:
        return f"unix:/nowhere/{self.instance_key}"

    @property
    def instance_label(self) -> str:
        return f"instance {self.instance_key}"


class FakePool:
    """Hands out leases on instances i1, i2, ...; records every call in ``events``."""

    def __init__(self, events: list[str], refusal: Exception | None = None) -> None:
        self.events = events
        self.refusal = refusal
        self.hold: asyncio.Event | None = None
        self.cancelled: list[str] = []
        self.avoided: list[frozenset[str]] = []
        self._next = 0

    async def at_capacity(self, agent_key: str) -> bool:
        return False

    async def acquire(
        self, agent_key: str, session_id: str, *, avoid: frozenset[str] = frozenset()
    ) -> FakeLease:
        self.events.append("acquire")
        self.avoided.append(avoid)
        if self.hold is not None:
            await self.hold.wait()
        if self.refusal is not None:
            raise self.refusal
        self._next += 1
        return FakeLease(session_id, f"i{self._next}")

    def cancel(self, lease: FakeLease) -> None:
        self.cancelled.append(lease.instance_key)

    def abandon(self, lease: FakeLease, problem: str) -> None:
        raise AssertionError("admission never abandons a lease")

    async def stop_session(self, session_id: str) -> bool:
        return False


class RecordingReplay(MemoryReplayStore):
    def __init__(self, events: list[str]) -> None:
        super().__init__(clock=lambda: NOW)
        self.events = events

    async def consume(self, jti: str, exp: int) -> bool:
        self.events.append("consume")
        return await super().consume(jti, exp)

    async def release(self, jti: str) -> None:
        self.events.append("release")
        await super().release(jti)


@dataclass
class Setup:
    events: list[str]
    pool: FakePool
    replay: RecordingReplay
    admission: Admission
    tokens: list[str]
    claims: TokenClaims
    accepted: UpgradeAccepted


def setup(*, refusal: Exception | None = None, token: bool = True) -> Setup:
    events: list[str] = []
    pool = FakePool(events, refusal)
    replay = RecordingReplay(events)
    tokens: list[str] = []
    admission = Admission(replay=replay, pool=pool, upstream_timeout=0.1, count_token=tokens.append)
    _, claims = mint_token(TEST_KEYRING, AGENT.key, now=NOW)
    accepted = UpgradeAccepted(
        agent=AGENT,
        session_id=claims.jti,
        provider=None,
        claims=claims if token else None,
        body=None,
    )
    return Setup(events, pool, replay, admission, tokens, claims, accepted)


async def is_spent(s: Setup) -> bool:
    """True when the token's jti is remembered (a new consume is refused)."""
    return not await MemoryReplayStore.consume(s.replay, s.claims.jti, s.claims.exp)


async def test_the_token_is_spent_before_a_slot_is_reserved() -> None:
    s = setup()
    lease = await s.admission.admit(s.accepted)
    assert s.events == ["consume", "acquire"]
    assert lease.session_id == s.claims.jti
    assert s.tokens == ["ok"]


async def test_a_replayed_token_is_refused_without_touching_the_pool() -> None:
    s = setup()
    await s.admission.admit(s.accepted)
    s.events.clear()
    with pytest.raises(TokenRejected) as refused:
        await s.admission.admit(s.accepted)
    assert refused.value.status == 403
    assert s.events == ["consume"]
    assert s.tokens == ["ok"]  # the refusal is counted where it is answered, not here


@pytest.mark.parametrize(
    "refusal",
    [AtCapacity("full"), ServiceUnavailable("not ready")],
    ids=["429", "503"],
)
async def test_a_pool_refusal_gives_the_token_back(refusal: Exception) -> None:
    s = setup(refusal=refusal)
    with pytest.raises(type(refusal)):
        await s.admission.admit(s.accepted)
    assert s.events == ["consume", "acquire", "release"]
    assert not await is_spent(s)  # the client may retry with the same token
    assert s.tokens == []


async def test_a_client_leaving_while_a_slot_is_awaited_gives_the_token_back() -> None:
    s = setup()
    s.pool.hold = asyncio.Event()
    task = asyncio.ensure_future(s.admission.admit(s.accepted))
    while s.events != ["consume", "acquire"]:
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert s.events[-1] == "release"
    assert not await is_spent(s)


async def test_a_session_without_a_token_only_reserves_a_slot() -> None:
    s = setup(token=False)
    await s.admission.admit(s.accepted)
    assert s.events == ["acquire"]
    assert s.tokens == []


class FakeTransport:
    def __init__(self) -> None:
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


Hop = Callable[[Callable[[], None] | None], UpstreamReply]


def answering(status: int) -> Hop:
    def answer(on_sent: Callable[[], None] | None) -> UpstreamReply:
        assert on_sent is not None
        on_sent()
        head = f"HTTP/1.1 {status} X\r\n\r\n".encode()
        return UpstreamReply(FakeTransport(), status, head, b"")  # type: ignore[arg-type]

    return answer


def unreachable(on_sent: Callable[[], None] | None) -> UpstreamReply:
    raise ServiceUnavailable("could not reach the agent instance (ConnectionRefusedError)")


def silent(on_sent: Callable[[], None] | None) -> UpstreamReply:
    assert on_sent is not None
    on_sent()  # written, never answered: a bot may have started
    raise AgentSilent("the agent instance did not answer the upgrade")


@pytest.fixture
def hops(monkeypatch: pytest.MonkeyPatch) -> list[Hop]:
    """The agent hop's answers, in order: dispatch's ``open_upstream`` replaced, no sockets."""
    answers: list[Hop] = []

    async def open_upstream(
        address: str,
        request: bytes,
        *,
        timeout: float,  # noqa: ASYNC109
        on_sent: Callable[[], None] | None = None,
    ) -> UpstreamReply:
        assert request == REQUEST and timeout == 0.1
        return answers.pop(0)(on_sent)

    monkeypatch.setattr(dispatch, "open_upstream", open_upstream)
    return answers


async def test_a_draining_instance_is_retried_on_another_one(hops: list[Hop]) -> None:
    s = setup()
    hops += [answering(503), answering(101)]
    lease, reply = await s.admission.start_on_agent(s.accepted, REQUEST)
    assert reply.status == 101
    assert lease.instance_key == "i2"
    assert s.pool.cancelled == ["i1"]
    assert s.pool.avoided == [frozenset(), frozenset({"i1"})]
    assert await is_spent(s)


async def test_an_agents_refusal_is_final_and_gives_the_token_back(hops: list[Hop]) -> None:
    s = setup()
    hops += [answering(400)]
    with pytest.raises(ServiceUnavailable, match="refused the session with HTTP 400"):
        await s.admission.start_on_agent(s.accepted, REQUEST)
    assert s.pool.cancelled == ["i1"] and len(s.pool.avoided) == 1  # no retry
    assert not await is_spent(s)


async def test_unreachable_instances_are_tried_up_to_the_limit(hops: list[Hop]) -> None:
    s = setup()
    hops += [unreachable] * limits.DISPATCH_ATTEMPTS
    with pytest.raises(ServiceUnavailable):
        await s.admission.start_on_agent(s.accepted, REQUEST)
    assert len(s.pool.cancelled) == limits.DISPATCH_ATTEMPTS
    assert not await is_spent(s)


async def test_a_silent_agent_keeps_the_token_spent_and_is_not_retried(hops: list[Hop]) -> None:
    s = setup()
    hops += [silent]
    with pytest.raises(AgentSilent):
        await s.admission.start_on_agent(s.accepted, REQUEST)
    assert s.pool.cancelled == ["i1"] and len(s.pool.avoided) == 1
    assert await is_spent(s)  # a bot may have started with it
