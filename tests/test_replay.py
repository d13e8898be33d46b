"""Single use of session tokens: the replay stores (memory, SQLite, Redis), release, and
consume_or_reject."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from hypothesis import example, given, settings
from hypothesis import strategies as st
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from catflap.auth import (
    KeyRing,
    MemoryReplayStore,
    ReplayStore,
    TokenClaims,
    consume_or_reject,
    mint_token,
    verify_token,
)
from catflap.auth.redis_replay import RedisReplayStore
from catflap.auth.sqlite_replay import SqliteReplayStore
from catflap.cluster.keys import Keys
from catflap.contract.errors import ServiceUnavailable, TokenRejected

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


# --- release --------------------------------------------------------------------------------


async def test_memory_store_release_lets_the_jti_be_consumed_again() -> None:
    store = MemoryReplayStore(clock=FakeClock())
    assert await store.consume("jti-1", T0 + 300) is True
    await store.release("jti-1")
    assert len(store) == 0
    assert await store.consume("jti-1", T0 + 300) is True
    assert await store.consume("jti-1", T0 + 300) is False


async def test_memory_store_release_of_an_unknown_jti_is_harmless() -> None:
    store = MemoryReplayStore(clock=FakeClock())
    await store.consume("kept", T0 + 300)
    await store.release("never-seen")
    await store.release("never-seen")
    assert await store.consume("kept", T0 + 300) is False
    assert len(store) == 1


async def test_memory_store_prunes_correctly_after_release_and_a_new_expiry() -> None:
    clock = FakeClock()
    store = MemoryReplayStore(clock=clock)
    await store.consume("jti-1", T0 + 10)
    await store.release("jti-1")
    assert await store.consume("jti-1", T0 + 20) is True
    clock.now = T0 + 10  # the first entry's expiry must not drop the second consume
    assert await store.consume("jti-1", T0 + 20) is False
    clock.now = T0 + 20
    assert len(store) == 0
    assert store._heap == [] or all(exp > clock.now for exp, _ in store._heap)


# --- SQLite ---------------------------------------------------------------------------------


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[tuple[SqliteReplayStore, FakeClock]]:
    clock = FakeClock()
    store = SqliteReplayStore(tmp_path / "replay.sqlite3", clock=clock)
    yield store, clock
    await store.close()


async def test_sqlite_store_accepts_first_use_and_refuses_second_use(
    sqlite_store: tuple[SqliteReplayStore, FakeClock],
) -> None:
    store, _ = sqlite_store
    assert await store.consume("jti-1", T0 + 300) is True
    assert await store.consume("jti-1", T0 + 300) is False
    assert await store.consume("jti-2", T0 + 300) is True
    assert len(store) == 2


async def test_sqlite_store_remembers_spent_jtis_across_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "state" / "replay.sqlite3"  # the folder is created
    first = SqliteReplayStore(path, clock=FakeClock())
    assert await first.consume("jti-1", T0 + 300) is True
    await first.close()
    again = SqliteReplayStore(path, clock=FakeClock(T0 + 299))
    try:
        assert await again.consume("jti-1", T0 + 300) is False
        assert await again.consume("jti-2", T0 + 300) is True
    finally:
        await again.close()


async def test_sqlite_store_refuses_a_jti_until_the_second_it_expires(
    sqlite_store: tuple[SqliteReplayStore, FakeClock],
) -> None:
    store, clock = sqlite_store
    assert await store.consume("jti-1", T0 + 300)
    for now in (T0 + 1, T0 + 299, T0 + 299.999):
        clock.now = now
        assert await store.consume("jti-1", T0 + 300) is False
    clock.now = T0 + 300
    assert len(store) == 0
    # The row is still there (not pruned yet) and is taken over by the new token.
    assert await store.consume("jti-1", T0 + 600) is True
    clock.now = T0 + 599
    assert await store.consume("jti-1", T0 + 600) is False


async def test_sqlite_store_does_not_remember_tokens_that_are_already_expired(
    sqlite_store: tuple[SqliteReplayStore, FakeClock],
) -> None:
    store, _ = sqlite_store
    assert await store.consume("stale", T0) is True
    assert await store.consume("stale", T0) is True
    assert await store.prune() == 0


async def test_sqlite_store_prune_deletes_only_expired_rows(
    sqlite_store: tuple[SqliteReplayStore, FakeClock],
) -> None:
    store, clock = sqlite_store
    for index, exp in enumerate((T0 + 10, T0 + 20, T0 + 30)):
        await store.consume(f"jti-{index}", exp)
    clock.now = T0 + 20
    assert await store.prune() == 2
    assert len(store) == 1
    assert await store.consume("jti-2", T0 + 30) is False


async def test_sqlite_store_prunes_by_itself(tmp_path: Path) -> None:
    clock = FakeClock()
    store = SqliteReplayStore(tmp_path / "r.sqlite3", clock=clock, maintenance_interval=0.01)
    try:
        await store.consume("old", T0 + 10)
        clock.now = T0 + 11
        await store.consume("new", T0 + 311)
        async with asyncio.timeout(5):
            while store._db.execute("SELECT COUNT(*) FROM spent_tokens").fetchone()[0] != 1:
                await asyncio.sleep(0.01)
    finally:
        await store.close()


async def test_sqlite_store_consumes_each_jti_once_under_concurrent_calls(
    sqlite_store: tuple[SqliteReplayStore, FakeClock],
) -> None:
    store, _ = sqlite_store
    results = await asyncio.gather(*(store.consume("jti-1", T0 + 300) for _ in range(50)))
    assert results.count(True) == 1


async def test_sqlite_store_release_lets_the_jti_be_consumed_again(tmp_path: Path) -> None:
    path = tmp_path / "replay.sqlite3"
    store = SqliteReplayStore(path, clock=FakeClock())
    assert await store.consume("jti-1", T0 + 300) is True
    await store.release("jti-1")
    await store.release("never-seen")  # harmless
    assert await store.consume("jti-1", T0 + 300) is True
    assert await store.consume("jti-1", T0 + 300) is False
    await store.release("jti-1")
    await store.close()
    again = SqliteReplayStore(path, clock=FakeClock())  # the release was written down
    try:
        assert await again.consume("jti-1", T0 + 300) is True
    finally:
        await again.close()


def _lock_writes(path: Path) -> sqlite3.Connection:
    """Another writer (another gateway sharing the state dir) holding the write lock."""
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    return other


async def test_sqlite_store_waits_for_a_locked_file_off_the_event_loop(tmp_path: Path) -> None:
    path = tmp_path / "replay.sqlite3"
    store = SqliteReplayStore(path, clock=FakeClock())
    other = _lock_writes(path)
    try:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1

        running = asyncio.create_task(ticker())
        spending = asyncio.create_task(store.consume("jti-1", T0 + 300))
        await asyncio.sleep(0.2)
        assert not spending.done()  # waiting for the lock, on the worker thread...
        assert ticks >= 10  # ...while the loop keeps running
        other.execute("COMMIT")
        assert await spending is True
        assert await store.consume("jti-1", T0 + 300) is False
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
    finally:
        other.close()
        await store.close()


async def test_sqlite_store_answers_503_when_the_file_stays_locked(tmp_path: Path) -> None:
    path = tmp_path / "replay.sqlite3"
    store = SqliteReplayStore(path, clock=FakeClock(), busy_timeout=0.1)
    other = _lock_writes(path)
    try:
        with pytest.raises(ServiceUnavailable):
            await store.consume("jti-1", T0 + 300)
        await store.release("jti-1")  # logged, not raised
    finally:
        other.close()
    try:
        assert await store.consume("jti-1", T0 + 300) is True  # nothing was marked
    finally:
        await store.close()


async def test_sqlite_store_answers_503_on_a_disk_error(
    sqlite_store: tuple[SqliteReplayStore, FakeClock], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _ = sqlite_store

    def broken(*args: object) -> bool:
        raise sqlite3.DatabaseError("disk I/O error")

    monkeypatch.setattr("catflap.auth.sqlite_replay._upsert", broken)
    with pytest.raises(ServiceUnavailable):
        await store.consume("jti-1", T0 + 300)


async def test_sqlite_store_close_is_idempotent_and_checkpoints(tmp_path: Path) -> None:
    path = tmp_path / "replay.sqlite3"
    store = SqliteReplayStore(path, clock=FakeClock())
    for index in range(100):
        await store.consume(f"jti-{index}", T0 + 300)
    await store.close()
    await store.close()
    wal = path.with_name(path.name + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0
    with pytest.raises(ServiceUnavailable):
        await store.consume("jti-x", T0 + 300)


_SHARED_SPENDER = """
import asyncio, json, sys, time
from pathlib import Path
from catflap.auth.sqlite_replay import SqliteReplayStore

async def main() -> None:
    store = SqliteReplayStore(Path(sys.argv[1]), maintenance_interval=0.01)
    exp = int(time.time()) + 300
    while not Path(sys.argv[2]).exists():  # start together
        await asyncio.sleep(0.001)
    won = [jti for jti in (f"jti-{n}" for n in range(int(sys.argv[3])))
           if await store.consume(jti, exp)]
    await store.close()
    print(json.dumps(won))

asyncio.run(main())
"""


def test_gateways_sharing_a_state_dir_spend_each_jti_once(tmp_path: Path) -> None:
    """Four processes on one file, racing for the same 300 jtis: each is won exactly once."""
    path, go, count = tmp_path / "replay.sqlite3", tmp_path / "go", 300
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _SHARED_SPENDER, str(path), str(go), str(count)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    time.sleep(0.5)  # let every process open the file
    go.touch()
    won: list[str] = []
    for proc in procs:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        won += json.loads(out)
    assert sorted(won) == sorted(f"jti-{n}" for n in range(count))


# --- Redis (the real one at 127.0.0.1:6379, as tests/test_cluster.py) ------------------------

REDIS_URL = os.environ.get("CATFLAP_TEST_REDIS", "redis://127.0.0.1:6379/0")


@pytest.fixture
async def redis_store() -> AsyncIterator[RedisReplayStore]:
    client = aioredis.Redis.from_url(REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
    keys = Keys(f"cftest-{uuid.uuid4().hex[:8]}")
    try:
        yield RedisReplayStore(client, keys)
    finally:
        leftover = [key async for key in client.scan_iter(f"{keys.prefix}:*")]
        if leftover:
            await client.delete(*leftover)
        await client.aclose()


async def test_redis_store_release_lets_the_jti_be_consumed_again(
    redis_store: RedisReplayStore,
) -> None:
    exp = int(time.time()) + 300
    assert await redis_store.consume("jti-1", exp) is True
    assert await redis_store.consume("jti-1", exp) is False
    await redis_store.release("jti-1")
    assert await redis_store.consume("jti-1", exp) is True
    assert await redis_store.consume("jti-1", exp) is False


async def test_redis_store_release_of_an_unknown_jti_is_harmless(
    redis_store: RedisReplayStore,
) -> None:
    exp = int(time.time()) + 300
    await redis_store.consume("kept", exp)
    await redis_store.release("never-seen")
    assert await redis_store.consume("kept", exp) is False


async def test_redis_store_release_without_redis_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # No retries: the default backoff would spend seconds on a refused connection.
    client = aioredis.Redis(
        host="127.0.0.1", port=port, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
    )
    store = RedisReplayStore(client, Keys("cftest-down"))
    try:
        await store.release("jti-1")
        assert "stays spent" in caplog.text
        with pytest.raises(ServiceUnavailable):
            await store.consume("jti-1", int(time.time()) + 300)
    finally:
        await client.aclose()


# --- every store, against one model ---------------------------------------------------------


def test_every_store_has_consume_and_release() -> None:
    for cls in (MemoryReplayStore, SqliteReplayStore, RedisReplayStore):
        for name in ("consume", "release"):
            assert asyncio.iscoroutinefunction(getattr(cls, name)), (cls, name)


@settings(max_examples=40, deadline=None)
@given(
    events=st.lists(
        st.tuples(
            st.sampled_from(["consume", "release"]),
            st.integers(0, 3),  # which jti
            st.integers(0, 50),  # lifetime from now
            st.integers(0, 30),  # clock advance before the call
        ),
        max_size=40,
    )
)
# Found by CI: a jti remembered, then offered again with an exp already past.
@example(events=[("consume", 0, 1, 0), ("consume", 0, 0, 0)])
def test_sqlite_and_memory_stores_match_a_model_with_releases(
    events: list[tuple[str, int, int, int]],
) -> None:
    clock = FakeClock()
    workdir = tempfile.mkdtemp(prefix="cfreplay")

    async def run() -> None:
        stores: list[MemoryReplayStore | SqliteReplayStore] = [
            MemoryReplayStore(clock=clock),
            SqliteReplayStore(Path(workdir) / "r.sqlite3", clock=clock),
        ]
        model: dict[str, int] = {}
        try:
            for action, which, lifetime, advance in events:
                clock.now += advance
                jti, exp = f"jti-{which}", int(clock.now) + lifetime
                for key in [k for k, v in model.items() if v <= clock.now]:
                    del model[key]
                if action == "release":
                    model.pop(jti, None)
                    for store in stores:
                        await store.release(jti)
                    continue
                expected = jti not in model
                if expected and exp > clock.now:
                    model[jti] = exp
                for store in stores:
                    assert await store.consume(jti, exp) is expected, (store, action, jti)
                    assert len(store) == len(model)
        finally:
            await stores[1].close()

    try:
        asyncio.run(run())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


async def test_redis_store_a_set_whose_answer_was_lost_is_not_taken_for_a_replay() -> None:
    """The connection dies after Redis ran the ``SET NX`` but before its answer came back;
    the cluster client sends it again on a new connection (catflap.cluster.client), where
    ``NX`` fails. The token's first use must still be accepted, once."""
    from catflap.cluster.client import connect

    upstream_host, upstream_port = "127.0.0.1", int(REDIS_URL.rsplit(":", 1)[1].split("/")[0])
    dropped: list[bool] = []

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        redis_r, redis_w = await asyncio.open_connection(upstream_host, upstream_port)
        if not dropped:
            # The first connection: pass commands through until the jti SET, then hang up
            # without passing Redis's answer back.
            while data := await client_r.read(65536):
                redis_w.write(data)
                await redis_w.drain()
                if b"lost-answer" in data:  # the token's SET, not the handshake
                    await asyncio.sleep(0.1)  # Redis runs it
                    dropped.append(True)
                    client_w.transport.abort()
                    redis_w.close()
                    return
                client_w.write(await redis_r.read(65536))
                await client_w.drain()
            return
        await asyncio.gather(pipe(client_r, redis_w), pipe(redis_r, client_w))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = connect(f"redis://127.0.0.1:{port}")
    keys = Keys(f"cftest-{uuid.uuid4().hex[:8]}")
    store = RedisReplayStore(client, keys)
    admin = aioredis.Redis.from_url(REDIS_URL)
    try:
        exp = int(time.time()) + 300
        assert await store.consume("lost-answer", exp) is True
        assert dropped == [True]  # the answer really was lost once
        assert await admin.exists(keys.jti("lost-answer")) == 1
        assert await store.consume("lost-answer", exp) is False  # a real replay still is one
    finally:
        await client.aclose()
        await admin.delete(keys.jti("lost-answer"))
        await admin.aclose()
        server.close()
