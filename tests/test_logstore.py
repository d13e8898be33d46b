"""Reading and pruning session log files, on files the tests write themselves."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest

from catflap import logstore
from catflap.contract import limits
from catflap.logstore import LogStore, prune_forever

from .conftest import seconds

SID = "11111111-2222-4333-8444-555555555555"


def write_session(
    root: Path, session_id: str, count: int, *, start: int = 0, partial: bool = False
) -> Path:
    path = root / "my-org" / "echo" / f"{session_id}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as out:
        for number in range(start, start + count):
            record = {
                "@timestamp": f"2025-01-01T00:00:{number:02d}.000Z",
                "stream": "logging",
                "level": "INFO",
                "session_id": session_id,
                "agent": "echo",
                "org": "my-org",
                "line": f"line {number}",
            }
            out.write(json.dumps(record) + "\n")
        if partial:
            out.write('{"@timestamp": "2025-01-01T00:01:00.000Z", "line": "half')
    return path


def lines(page: logstore.LogPage) -> list[str]:
    return [entry.line for entry in page.entries]


@pytest.mark.parametrize("block", [7, 64, 1024 * 1024])
def test_pages_in_both_orders_skip_the_line_being_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block: int
) -> None:
    monkeypatch.setattr(logstore, "_BLOCK_BYTES", block)  # block edges inside lines
    write_session(tmp_path, SID, 10, partial=True)
    store = LogStore(tmp_path)
    asc = store.read_session("my-org", "echo", SID, limit=3, offset=2, order="asc")
    assert (asc.total, lines(asc)) == (10, ["line 2", "line 3", "line 4"])
    desc = store.read_session("my-org", "echo", SID, limit=3, order="desc")
    assert lines(desc) == ["line 9", "line 8", "line 7"]
    tail = store.read_session("my-org", "echo", SID, limit=5, offset=8, order="desc")
    assert lines(tail) == ["line 1", "line 0"]
    everything = store.read_session("my-org", "echo", SID, limit=100, order="asc")
    assert lines(everything) == [f"line {n}" for n in range(10)]
    entry = everything.entries[0]
    assert entry.to_api() == {
        "log": "line 0",
        "timestamp": "2025-01-01T00:00:00.000Z",
        "sessionId": SID,
        "level": "INFO",
        "stream": "logging",
    }


def test_a_missing_session_reads_as_empty_and_names_cannot_escape(tmp_path: Path) -> None:
    store = LogStore(tmp_path)
    assert store.read_session("my-org", "echo", SID).total == 0
    assert not store.has_session("my-org", "echo", SID)
    for org, agent, session_id in [("..", "echo", SID), ("my-org", "a/b", SID), ("o", "a", "")]:
        with pytest.raises(ValueError):
            store.session_file(org, agent, session_id)


def test_a_line_that_is_not_json_is_returned_as_text(tmp_path: Path) -> None:
    path = write_session(tmp_path, SID, 1)
    with path.open("a") as out:
        out.write("not json\n")
    page = LogStore(tmp_path).read_session("my-org", "echo", SID, order="asc")
    assert [(e.line, e.timestamp) for e in page.entries][-1] == ("not json", None)


def test_recent_sessions_merge_by_time(tmp_path: Path) -> None:
    other = "22222222-2222-4333-8444-555555555555"
    write_session(tmp_path, SID, 3, start=0)  # lines 0, 1, 2
    write_session(tmp_path, other, 3, start=10)  # lines 10, 11, 12
    store = LogStore(tmp_path)
    desc = store.read_recent("my-org", "echo", limit=4, order="desc")
    assert desc.total == 6
    assert lines(desc) == ["line 12", "line 11", "line 10", "line 2"]
    assert [e.session_id for e in desc.entries][-1] == SID
    asc = store.read_recent("my-org", "echo", limit=2, offset=2, order="asc")
    assert lines(asc) == ["line 2", "line 10"]
    assert store.read_recent("my-org", "nobody").total == 0


def _age(path: Path, seconds: float, now: float) -> None:
    os.utime(path, (now - seconds, now - seconds))


def test_prune_deletes_files_past_the_retention_age(tmp_path: Path) -> None:
    now = time.time()
    old = write_session(tmp_path, SID, 2)
    new = write_session(tmp_path, "22222222-2222-4333-8444-555555555555", 2)
    _age(old, 8 * 86400, now)
    _age(new, 6 * 86400, now)
    size = old.stat().st_size
    result = LogStore(tmp_path).prune(now=now, max_age_s=7 * 86400, max_total_bytes=1 << 30)
    assert (result.files, result.bytes) == (1, size)
    assert not old.exists() and new.exists()


def test_prune_deletes_the_oldest_files_while_over_the_size_limit(tmp_path: Path) -> None:
    now = time.time()
    paths = [
        write_session(tmp_path, f"{n}1111111-2222-4333-8444-555555555555", 20) for n in range(4)
    ]
    for age, path in zip((40, 30, 20, 10), paths, strict=True):
        _age(path, age, now)
    size = paths[0].stat().st_size
    result = LogStore(tmp_path).prune(now=now, max_age_s=86400, max_total_bytes=2 * size + 1)
    assert (result.files, result.bytes) == (2, 2 * size)
    assert [path.exists() for path in paths] == [False, False, True, True]


class Rounds:
    """The pruner's wait between rounds, under the test's control: one round per release."""

    def __init__(self) -> None:
        self.finished: asyncio.Queue[float] = asyncio.Queue()
        self._release = asyncio.Event()

    async def sleep(self, interval: float) -> None:
        await self.finished.put(interval)
        await self._release.wait()
        self._release.clear()

    async def next_round(self) -> float:
        """Let the pruner run once more; the interval it then waits for."""
        self._release.set()
        return await self.wait()

    async def wait(self) -> float:
        async with asyncio.timeout(seconds(5)):
            return await self.finished.get()


async def test_the_pruner_enforces_the_limits_until_cancelled(tmp_path: Path) -> None:
    now = time.time()
    old = write_session(tmp_path, SID, 1)
    _age(old, 2 * 86400, now)
    rounds = Rounds()
    task = asyncio.create_task(
        prune_forever(
            LogStore(tmp_path),
            retention_days=1,
            max_total_mb=1024,
            interval=60,
            clock=lambda: now,
            sleep=rounds.sleep,
        )
    )
    try:
        assert await rounds.wait() == 60
        assert not old.exists()
        again = write_session(tmp_path, "22222222-2222-4333-8444-555555555555", 1)
        _age(again, 2 * 86400, now)
        assert await rounds.next_round() == 60
        assert not again.exists()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_a_page_stops_at_the_byte_limit_but_total_counts_every_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_session(tmp_path, SID, 10)
    one_line = len((tmp_path / "my-org" / "echo" / f"{SID}.jsonl").read_text().splitlines()[0])
    assert limits.LOGS_PAGE_MAX_BYTES < limits.LOGS_LIMIT_MAX * limits.LOG_LINE_MAX_CHARS
    monkeypatch.setattr(limits, "LOGS_PAGE_MAX_BYTES", 3 * one_line + 1)
    store = LogStore(tmp_path)
    page = store.read_session("my-org", "echo", SID, limit=100, order="asc")
    assert (page.total, lines(page)) == (10, ["line 0", "line 1", "line 2"])
    tiny = logstore._read_file(
        store.session_file("my-org", "echo", SID), SID, skip=0, take=5, order="desc", max_bytes=1
    )
    assert lines(tiny) == ["line 9"]  # at least one line, however long
