"""Session logs in cluster mode: shipped by agent hosts to Redis, read through any gateway.

The end-to-end test runs two gateways and one agent host as real processes, each in a folder of
its own (working dir, config, state_dir, logs), so the only way a line reaches gateway B is
Redis. The bounds are tested on the real Redis with the shipper itself and a real session file.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
import redis
import redis.asyncio as aioredis
from websockets.asyncio.client import connect

from catflap.cluster.keys import Keys
from catflap.cluster.logship import LogShipper, RedisLogSource, fit_record
from catflap.contract import limits
from catflap.runtime.botlogs import session_log_path

from .conftest import ROOT, die_with_test_process, seconds
from .test_cluster import KEYS_ENV, REDIS_URL, _token, cluster

CHATTY = ROOT / "tests" / "bots" / "chatty"
HEADERS = {"Authorization": "Bearer sk_test"}


def _follow(url: str, session_id: str, cwd: Path) -> subprocess.Popen[str]:
    """``catflap logs --follow`` against ``url``, in a folder of its own."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "catflap",
            "logs",
            "echo",
            "--session",
            session_id,
            "--follow",
            "--json",
            "--interval",
            "0.1",
            "--url",
            url,
            "--key",
            "sk_test",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        preexec_fn=die_with_test_process,
        env={"PATH": "/usr/bin:/bin", **KEYS_ENV},
    )


@pytest.mark.slow
async def test_a_session_relayed_by_one_gateway_is_read_through_another_without_a_shared_disk(
    tmp_path: Path,
) -> None:
    async with cluster(gateways=2, hosts=1, slots=1, bot=CHATTY, own_dirs=True) as cl:
        host_dir, gateway_a_dir, gateway_b_dir = cl.dirs
        started = await _token(cl, 0)
        sid = started["sessionId"]
        ws = await connect(
            f"{cl.url(0)}/ws/generic/echo.my-org/{started['token']}", open_timeout=seconds(20)
        )
        assert await asyncio.wait_for(ws.recv(), seconds(10)) == sid
        follower_dir = tmp_path / "follower"
        follower_dir.mkdir()
        follower = _follow(cl.http(1), sid, follower_dir)
        try:
            await ws.send("log:30")
            assert await asyncio.wait_for(ws.recv(), seconds(10)) == "logged 30"
            await ws.close()
            loop = asyncio.get_running_loop()
            # --follow ends by itself once gateway B's sessions API shows the end.
            out, err = await loop.run_in_executor(
                None, lambda: follower.communicate(timeout=seconds(30))
            )
        finally:
            if follower.poll() is None:
                follower.kill()
                follower.communicate()
        assert follower.returncode == 0, err
        followed = [json.loads(line)["log"] for line in out.splitlines()]
        numbered = [t for t in followed if t.startswith("chatty: numbered line")]
        assert numbered == [f"chatty: numbered line {n}" for n in range(30)]
        assert any(t.startswith("catflap.runtime.app: = session ended") for t in followed)
        assert f"chatty: logging line of {sid}" in followed

        async with httpx.AsyncClient(base_url=cl.http(1), timeout=seconds(10)) as client:
            params = {"sessionId": sid, "order": "asc", "limit": 1000}
            agent = await client.get("/v1/agents/echo/logs", params=params, headers=HEADERS)
            pcc = await client.get(
                "/v1/organizations/my-org/services/echo/logs", params=params, headers=HEADERS
            )
            recent = await client.get(
                "/v1/agents/echo/logs", params={"limit": 1000}, headers=HEADERS
            )
            page = await client.get(
                "/v1/agents/echo/logs",
                params={"sessionId": sid, "order": "desc", "limit": 2, "offset": 1},
                headers=HEADERS,
            )
        assert agent.status_code == 200 and pcc.status_code == 200 and recent.status_code == 200
        answer = agent.json()
        assert pcc.json() == answer
        assert [e["log"] for e in answer["logs"]] == followed  # --follow missed none
        assert {e["sessionId"] for e in answer["logs"]} == {sid}

        # The host's file is the source, byte for byte: the records in Redis are its lines
        # (nothing added, so nothing secret added), and no other process has a copy.
        file = session_log_path(host_dir / "logs", "my-org", "echo", sid)
        lines = file.read_bytes().splitlines()
        assert answer["total"] == {"value": len(lines), "relation": "eq"}
        assert recent.json()["total"]["value"] == len(lines)
        assert [e["log"] for e in page.json()["logs"]] == [
            json.loads(lines[-2])["line"],
            json.loads(lines[-3])["line"],
        ]
        client_ = redis.Redis.from_url(cl.redis_url)
        try:
            stream = client_.xrange(f"{cl.prefix}:log:my-org:echo:{sid}")
        finally:
            client_.close()
        assert [fields[b"r"] for _, fields in stream] == lines
        assert [entry_id.decode() for entry_id, _ in stream] == [
            f"0-{n}" for n in range(1, len(lines) + 1)
        ]
        for other in (gateway_a_dir, gateway_b_dir, follower_dir):
            assert not [p for p in other.rglob("*.jsonl")], other


@pytest_asyncio.fixture
async def redis_client() -> AsyncIterator[tuple[aioredis.Redis, Keys]]:
    client = aioredis.Redis.from_url(REDIS_URL)
    keys = Keys(f"cftest-{uuid.uuid4().hex[:8]}")
    try:
        yield client, keys
    finally:
        found = [key async for key in client.scan_iter(f"{keys.prefix}:*")]
        if found:
            await client.delete(*found)
        await client.aclose()


def _write_lines(path: Path, session_id: str, count: int, *, width: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        for number in range(count):
            record = {
                "@timestamp": f"2025-01-01T12:00:00.{number % 1000:03d}Z",
                "stream": "logging",
                "level": "INFO",
                "session_id": session_id,
                "agent": "echo",
                "org": "my-org",
                "line": f"bot: line {number} " + "x" * width,
            }
            handle.write(json.dumps(record) + "\n")


async def test_a_session_logging_past_the_bound_keeps_its_newest_lines_in_bounded_memory(
    tmp_path: Path, redis_client: tuple[aioredis.Redis, Keys]
) -> None:
    client, keys = redis_client
    shipper = LogShipper(client, keys, tmp_path, org="my-org", agent="echo", poll_interval=0.01)
    sid = str(uuid.uuid4())
    path = session_log_path(tmp_path, "my-org", "echo", sid)
    extra = 700
    written = limits.LOGSHIP_STREAM_MAXLEN + extra
    shipper.session_started(sid)
    _write_lines(path, sid, written)
    await shipper.finish(sid)
    assert shipper.following == 0
    stream = keys.session_log("my-org", "echo", sid)
    assert await client.xlen(stream) == limits.LOGSHIP_STREAM_MAXLEN
    first, *_ = await client.xrange(stream, count=1)
    assert first[0] == f"0-{extra + 1}".encode()
    # Bounded by the kept records plus Redis's overhead per entry (docs/scaling.md: ~110 B).
    record_bytes = len(path.read_bytes().splitlines()[-1])
    memory = await client.memory_usage(stream, samples=0)
    assert memory is not None
    assert memory < limits.LOGSHIP_STREAM_MAXLEN * (record_bytes + 128), memory
    ttl_ms = await client.pttl(stream)
    assert 0 < ttl_ms <= limits.LOGSHIP_RETENTION_S * 1000

    source = RedisLogSource(client, keys)
    oldest = await source.read_session("my-org", "echo", sid, limit=2, offset=0, order="asc")
    assert oldest is not None and oldest.total == written
    assert [e.line.split(" x")[0] for e in oldest.entries] == [
        f"bot: line {extra}",
        f"bot: line {extra + 1}",
    ]
    # Offsets are the file's line numbers, as with files: --follow keeps its place.
    at = await source.read_session("my-org", "echo", sid, limit=1, offset=written - 1, order="asc")
    assert at is not None and at.entries[0].line.startswith(f"bot: line {written - 1} ")
    newest = await source.read_session("my-org", "echo", sid, limit=1, offset=1, order="desc")
    assert newest is not None and newest.entries[0].line.startswith(f"bot: line {written - 2} ")
    # A whole page of the kept lines, one call.
    page = await source.read_session(
        "my-org", "echo", sid, limit=limits.LOGS_LIMIT_MAX, offset=0, order="asc"
    )
    assert page is not None and len(page.entries) == limits.LOGSHIP_STREAM_MAXLEN
    unknown = await source.read_session("my-org", "echo", "nope", limit=1, offset=0, order="asc")
    assert unknown is None


async def test_shipping_again_after_a_lost_answer_adds_no_line_twice(
    tmp_path: Path, redis_client: tuple[aioredis.Redis, Keys]
) -> None:
    client, keys = redis_client
    sid = str(uuid.uuid4())
    _write_lines(session_log_path(tmp_path, "my-org", "echo", sid), sid, 10)
    for _ in range(2):  # a second shipper from line 1: what a retry after a timeout sends
        await LogShipper(client, keys, tmp_path, org="my-org", agent="echo").finish(sid)
    stream = keys.session_log("my-org", "echo", sid)
    assert await client.xlen(stream) == 10


async def test_an_agent_keeps_the_lines_of_its_newest_sessions_only(
    tmp_path: Path, redis_client: tuple[aioredis.Redis, Keys], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, keys = redis_client
    monkeypatch.setattr(limits, "LOGSHIP_SESSIONS_PER_AGENT_MAX", 3)
    now = [1_700_000_000.0]
    shipper = LogShipper(client, keys, tmp_path, org="my-org", agent="echo", clock=lambda: now[0])
    sids = [str(uuid.uuid4()) for _ in range(5)]
    for sid in sids:
        now[0] += 1
        _write_lines(session_log_path(tmp_path, "my-org", "echo", sid), sid, 3)
        await shipper.finish(sid)
    kept = [s.decode() for s in await client.zrange(keys.agent_logs("my-org", "echo"), 0, -1)]
    assert kept == sids[-limits.LOGSHIP_SESSIONS_PER_AGENT_MAX :]
    for sid in sids:
        exists = await client.exists(keys.session_log("my-org", "echo", sid))
        assert exists == (sid in kept)
    recent = await RedisLogSource(client, keys).read_recent(
        "my-org", "echo", limit=100, offset=0, order="desc"
    )
    assert recent.total == 9
    assert {e.session_id for e in recent.entries} == set(kept)


def test_a_record_longer_than_the_bound_is_cut_with_a_note() -> None:
    record = {"@timestamp": "t", "level": "ERROR", "session_id": "s", "line": "é" * 20_000}
    raw = json.dumps(record, ensure_ascii=False).encode()
    fitted = fit_record(raw)
    assert len(fitted) <= limits.LOGSHIP_RECORD_MAX_BYTES
    cut = json.loads(fitted)
    assert cut["line"].startswith("éé")
    assert cut["line"].endswith("the agent host's session file has the whole line]")
    assert {k: v for k, v in cut.items() if k != "line"} == {
        k: v for k, v in record.items() if k != "line"
    }
    short = json.dumps({"line": "hi"}).encode()
    assert fit_record(short) is short
    assert fit_record(b"x" * 10_000) == b"x" * limits.LOGSHIP_RECORD_MAX_BYTES


async def test_reading_logs_while_redis_is_away_is_503_redis_unreachable() -> None:
    """Not a plain-text 500: the logs API answers as every cluster read does then."""
    import socket

    from catflap.cluster.client import connect as redis_connect
    from catflap.contract.errors import RedisUnreachable

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = redis_connect(f"redis://127.0.0.1:{port}")
    source = RedisLogSource(client, Keys("cftest-away"))
    try:
        with pytest.raises(RedisUnreachable) as one:
            await source.read_session("my-org", "echo", "s", limit=10, offset=0, order="asc")
        with pytest.raises(RedisUnreachable) as recent:
            await source.read_recent("my-org", "echo", limit=10, offset=0, order="desc")
        for refused in (one.value, recent.value):
            assert (refused.status, refused.code) == (503, "redis_unreachable")
    finally:
        await client.aclose()
