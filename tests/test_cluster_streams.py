"""The lifecycle stream reader on the real Redis: it reads what is appended after it started,
makes up for a lost connection from its kept id, and starts over on a stream Redis lost.

The reader's Redis client goes through ``tests/rediscut.py``, so a test can cut that one
connection while the test's own client keeps appending, as a host would.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as aioredis

from catflap.cluster.streams import StreamReader, append_event, stream_id
from catflap.contract import limits

from .conftest import seconds
from .rediscut import RedisCut, redis_cut

REDIS_URL = os.environ.get("CATFLAP_TEST_REDIS", "redis://127.0.0.1:6379/0")


@dataclass
class Following:
    stream: str
    writer: aioredis.Redis
    proxy: RedisCut
    reader: StreamReader
    seen: list[dict[str, Any]] = field(default_factory=list)

    async def append(self, *names: str) -> None:
        for name in names:
            await append_event(self.writer, self.stream, {"session_id": name})

    async def saw(self, *names: str) -> None:
        """Wait until the reader has handled exactly ``names``, in order."""
        want = [{"session_id": name} for name in names]
        async with asyncio.timeout(seconds(10)):
            while self.seen != want:
                assert self.seen == want[: len(self.seen)], self.seen
                await asyncio.sleep(0.02)


@asynccontextmanager
async def following() -> AsyncIterator[Following]:
    """A reader on a fresh stream, through a proxy the test can cut, already at the end."""
    stream = f"cftest-{uuid.uuid4().hex[:8]}:ended"
    writer = aioredis.Redis.from_url(REDIS_URL)
    async with redis_cut(REDIS_URL) as proxy:
        client = aioredis.Redis.from_url(proxy.url, socket_timeout=2, socket_connect_timeout=2)
        seen: list[dict[str, Any]] = []

        async def handle(event: dict[str, Any]) -> None:
            seen.append(event)

        reader = StreamReader(client, stream, handle, what="test events")
        state = Following(stream, writer, proxy, reader, seen)
        await state.append("before")  # already there when the reader starts: not its business
        task = asyncio.get_running_loop().create_task(reader.run())
        try:
            async with asyncio.timeout(seconds(5)):
                while reader.last_id is None:
                    await asyncio.sleep(0.01)
            yield state
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await client.aclose()
            await writer.delete(stream)
            await writer.aclose()


async def test_the_reader_starts_at_the_end_and_reads_every_later_event_in_order() -> None:
    async with following() as f:
        await f.append("one", "two", "three")
        await f.saw("one", "two", "three")


async def test_events_appended_while_the_reader_is_cut_off_are_read_once_it_is_back() -> None:
    async with following() as f:
        await f.append("one")
        await f.saw("one")
        f.proxy.cut()
        await asyncio.sleep(0.5)  # the blocked read fails; the reader backs off
        await f.append("two", "three")
        await asyncio.sleep(0.5)
        assert f.seen == [{"session_id": "one"}]
        f.proxy.heal()
        await f.saw("one", "two", "three")


async def test_a_stream_redis_lost_while_the_reader_was_away_is_read_from_its_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A restart without persistence: the stream is gone, then a new one begins."""
    async with following() as f:
        await f.append("one")
        await f.saw("one")
        f.proxy.cut()
        await asyncio.sleep(0.5)
        await f.writer.delete(f.stream)
        # A new stream whose ids are below the kept one: another server whose clock is behind.
        await f.writer.xadd(f.stream, {"data": json.dumps({"session_id": "two"})}, id="1-0")
        await f.append("three")
        with caplog.at_level(logging.WARNING, logger="catflap.cluster"):
            f.proxy.heal()
            await f.saw("one", "two", "three")
        assert "reading it from its start" in caplog.text


async def test_a_gap_the_bound_may_have_trimmed_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with following() as f:
        await f.append("one")
        await f.saw("one")
        f.proxy.cut()
        await asyncio.sleep(0.5)
        async with f.writer.pipeline(transaction=False) as pipe:
            for n in range(limits.LIFECYCLE_STREAM_MAXLEN + 200):
                pipe.xadd(
                    f.stream,
                    {"data": json.dumps({"session_id": f"n{n}"})},
                    maxlen=limits.LIFECYCLE_STREAM_MAXLEN,
                    approximate=True,
                )
            await pipe.execute()
        with caplog.at_level(logging.ERROR, logger="catflap.cluster"):
            f.proxy.heal()
            async with asyncio.timeout(seconds(10)):
                while f.seen[-1] != {"session_id": f"n{limits.LIFECYCLE_STREAM_MAXLEN + 199}"}:
                    await asyncio.sleep(0.02)
        assert "trimmed from the stream meanwhile" in caplog.text


async def test_an_unreadable_entry_is_skipped_and_the_next_one_read(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with following() as f:
        with caplog.at_level(logging.ERROR, logger="catflap.cluster"):
            await f.writer.xadd(f.stream, {"data": b"not json"})
            await f.writer.xadd(f.stream, {"other": b"field"})
            await f.append("fine")
            await f.saw("fine")
        assert caplog.text.count("skipping an unreadable entry of test events") == 2


async def test_every_append_trims_the_stream_to_about_its_bound() -> None:
    client = aioredis.Redis.from_url(REDIS_URL)
    stream = f"cftest-{uuid.uuid4().hex[:8]}:ended"
    try:
        async with client.pipeline(transaction=False) as pipe:
            for n in range(limits.LIFECYCLE_STREAM_MAXLEN):
                pipe.xadd(stream, {"data": json.dumps({"session_id": str(n)})})
            await pipe.execute()
        for n in range(200):
            await append_event(client, stream, {"session_id": f"more-{n}"})
        length = int(await client.xlen(stream))
    finally:
        await client.delete(stream)
        await client.aclose()
    # Approximate trimming removes whole nodes (100 entries each by default), never below.
    assert limits.LIFECYCLE_STREAM_MAXLEN <= length < limits.LIFECYCLE_STREAM_MAXLEN + 200


@pytest.mark.parametrize(
    ("raw", "parsed"),
    [(b"1700000000000-3", (1700000000000, 3)), ("5-0", (5, 0)), (b"42", (42, 0))],
    ids=["bytes", "text", "no-sequence"],
)
def test_stream_ids_compare_as_number_pairs(raw: bytes | str, parsed: tuple[int, int]) -> None:
    assert stream_id(raw) == parsed
    assert stream_id(b"9-1") < stream_id(b"10-0")  # not as strings
