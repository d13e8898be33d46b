"""Single use of session tokens: the in-memory replay store and consume_or_reject."""

from __future__ import annotations

import asyncio
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from catflap.auth import (
    KeyRing,
    MemoryReplayStore,
    ReplayStore,
    TokenClaims,
    consume_or_reject,
    mint_token,
    verify_token,
)
from catflap.contract.errors import TokenRejected

T0 = 1_700_000_000


class FakeClock:
    """A settable clock for injecting into the store."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def claims(jti: str = "session-1", exp: int = T0 + 300) -> TokenClaims:
    return TokenClaims(sh="agent.org", exp=exp, iat=exp - 300, jti=jti, kid="k1")


async def test_store_accepts_first_use_and_refuses_second_use() -> None:
    store = MemoryReplayStore(clock=FakeClock())
    assert await store.consume("jti-1", T0 + 300) is True
    assert await store.consume("jti-1", T0 + 300) is False
    assert len(store) == 1


async def test_store_tracks_each_jti_independently() -> None:
    store = MemoryReplayStore(clock=FakeClock())
    assert await store.consume("jti-1", T0 + 300) is True
    assert await store.consume("jti-2", T0 + 300) is True
    assert await store.consume("jti-1", T0 + 300) is False
    assert await store.consume("jti-2", T0 + 300) is False
    assert len(store) == 2


async def test_store_refuses_a_jti_until_the_second_it_expires() -> None:
    clock = FakeClock()
    store = MemoryReplayStore(clock=clock)
    assert await store.consume("jti-1", T0 + 300)
    for now in (T0 + 1, T0 + 150, T0 + 299, T0 + 299.999):
        clock.now = now
        assert await store.consume("jti-1", T0 + 300) is False
    clock.now = T0 + 300  # from exp on the token itself is expired; the store may forget it
    assert len(store) == 0
    assert await store.consume("jti-1", T0 + 600) is True


async def test_store_prunes_expired_entries_so_its_length_shrinks() -> None:
    clock = FakeClock()
    store = MemoryReplayStore(clock=clock)
    for index, exp in enumerate((T0 + 10, T0 + 20, T0 + 30)):
        await store.consume(f"jti-{index}", exp)
    assert len(store) == 3
    clock.now = T0 + 10
    assert len(store) == 2
    clock.now = T0 + 25
    assert len(store) == 1
    clock.now = T0 + 30
    assert len(store) == 0


async def test_store_prunes_on_consume_too() -> None:
    clock = FakeClock()
    store = MemoryReplayStore(clock=clock)
    await store.consume("old", T0 + 10)
    clock.now = T0 + 11
    await store.consume("new", T0 + 311)
    assert set(store._expiry) == {"new"}
    assert [jti for _, jti in store._heap] == ["new"]


async def test_store_memory_stays_bounded_under_a_steady_stream_of_tokens() -> None:
    clock = FakeClock()
    store = MemoryReplayStore(clock=clock)
    ttl = 300
    for second in range(3 * ttl):
        clock.now = T0 + second
        for n in range(5):
            assert await store.consume(f"{second}-{n}", T0 + second + ttl)
        assert len(store._heap) <= 5 * ttl
    assert len(store) == 5 * ttl


async def test_store_does_not_remember_tokens_that_are_already_expired() -> None:
    store = MemoryReplayStore(clock=FakeClock())
    assert await store.consume("stale", T0) is True
    assert await store.consume("staler", T0 - 100) is True
    assert len(store) == 0
    assert store._heap == []


async def test_store_consumes_each_jti_once_under_concurrent_calls() -> None:
    store = MemoryReplayStore(clock=FakeClock())
    results = await asyncio.gather(*(store.consume("jti-1", T0 + 300) for _ in range(50)))
    assert results.count(True) == 1


async def test_store_uses_wall_clock_by_default() -> None:
    store = MemoryReplayStore()
    exp = int(time.time()) + 300
    assert await store.consume("jti-1", exp) is True
    assert await store.consume("jti-1", exp) is False


def test_memory_store_satisfies_the_replay_store_protocol() -> None:
    store: ReplayStore = MemoryReplayStore()
    assert callable(store.consume)


async def test_consume_or_reject_lets_the_first_use_through() -> None:
    store = MemoryReplayStore(clock=FakeClock())
    await consume_or_reject(store, claims())
    assert len(store) == 1


async def test_verify_rejects_replayed_token() -> None:
    store = MemoryReplayStore(clock=FakeClock())
    await consume_or_reject(store, claims())
    with pytest.raises(TokenRejected) as caught:
        await consume_or_reject(store, claims())
    error = caught.value
    assert error.reason == "replayed"
    assert error.status == 403
    assert error.to_body()["code"] == "token_replayed"
    assert "/v1/public/{agent}/start" in error.message


async def test_a_minted_token_opens_exactly_one_session() -> None:
    ring = KeyRing.generate()
    clock = FakeClock(T0 + 0.5)
    store = MemoryReplayStore(clock=clock)
    token, _ = mint_token(ring, "agent.org", now=clock.now)
    first = verify_token(token, ring, service_host="agent.org", now=clock.now)
    await consume_or_reject(store, first)
    clock.now += 60
    again = verify_token(token, ring, service_host="agent.org", now=clock.now)
    with pytest.raises(TokenRejected) as caught:
        await consume_or_reject(store, again)
    assert caught.value.reason == "replayed"


async def test_consume_or_reject_uses_the_store_protocol_only() -> None:
    class SeenEverything:
        def __init__(self) -> None:
            self.calls: list[tuple[str, int]] = []

        async def consume(self, jti: str, exp: int) -> bool:
            self.calls.append((jti, exp))
            return False

    store = SeenEverything()
    with pytest.raises(TokenRejected):
        await consume_or_reject(store, claims("abc", T0 + 42))
    assert store.calls == [("abc", T0 + 42)]


@given(
    events=st.lists(
        st.tuples(
            st.integers(0, 5),  # which jti
            st.integers(0, 50),  # lifetime from now
            st.integers(0, 30),  # clock advance before the call
        ),
        max_size=60,
    )
)
def test_store_matches_a_simple_model_of_single_use(events: list[tuple[int, int, int]]) -> None:
    clock = FakeClock()
    store = MemoryReplayStore(clock=clock)
    model: dict[str, int] = {}

    async def run() -> None:
        for which, lifetime, advance in events:
            clock.now += advance
            jti, exp = f"jti-{which}", int(clock.now) + lifetime
            live = {key: value for key, value in model.items() if value > clock.now}
            expected = jti not in live
            if expected and exp > clock.now:
                live[jti] = exp
            model.clear()
            model.update(live)
            assert await store.consume(jti, exp) is expected
            assert len(store) == len(model)

    asyncio.run(run())
