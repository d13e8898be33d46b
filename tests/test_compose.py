"""The composition root without sockets or processes: what the config says reaches the steps,
and what a caller overrides replaces it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from catflap.auth.replay import MemoryReplayStore
from catflap.auth.sqlite_replay import SqliteReplayStore
from catflap.auth.tokens import mint_token
from catflap.compose import REPLAY_FILE, AgentLaunch, Overrides, build_gateway
from catflap.config import CatflapConfig, load_config
from catflap.contract import limits
from catflap.contract.errors import CatflapMisuse
from catflap.gateway.listener import Gateway
from catflap.gateway.timings import Timings
from catflap.pool.pool import LocalPool
from catflap.sessions.sqlite import SqliteSessionStore

from .conftest import TEST_KEYRING, FakeClock, upgrade_request, write_config
from .test_front import RecordingTransport

AGENTS = {"echo": {}, "tok": {"websocket_auth": "token"}}


class IdlePool:
    """A pool that is never asked for a slot here; it records being started and closed."""

    def __init__(self) -> None:
        self.started = self.closed = False

    def instance_states(self) -> dict[tuple[str, str], int]:
        return {("echo.my-org", "idle"): 2}

    def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True

    async def at_capacity(self, agent_key: str) -> bool:
        return False

    async def acquire(self, agent_key: str, session_id: str, **_: Any) -> Any:
        raise AssertionError("no session gets this far in these tests")

    def cancel(self, lease: Any) -> None: ...

    def abandon(self, lease: Any, problem: str) -> None: ...

    async def stop_session(self, session_id: str) -> bool:
        return False


def config(tmp_path: Path, **gateway: Any) -> CatflapConfig:
    loaded = load_config(write_config(tmp_path, AGENTS))
    settings = loaded.gateway.model_copy(update=gateway)
    return loaded.model_copy(update={"gateway": settings, "state_dir": tmp_path / "state"})


def overrides(tmp_path: Path, **replace: Any) -> Overrides:
    parts: dict[str, Any] = {
        "pool": IdlePool(),
        "store": SqliteSessionStore(tmp_path / "sessions.sqlite3"),
        "replay": MemoryReplayStore(),
        "keyring": TEST_KEYRING,
    }
    return Overrides(**{**parts, **replace})


async def answer(gateway: Gateway, request: bytes) -> RecordingTransport:
    """What the gateway answers an upgrade request, through its front, on a fake transport."""
    conn = gateway.front()
    transport = RecordingTransport()
    fake: Any = transport
    conn.connection_made(fake)
    conn.data_received(request)
    for _ in range(100):  # the session task answers within a few loop turns
        if transport.written:
            return transport
        await asyncio.sleep(0)
    raise AssertionError("no answer")


def refusals(gateway: Gateway, status: int, reason: str) -> float:
    labels = {"status": str(status), "reason": reason}
    sample = gateway.metrics.registry.get_sample_value("catflap_handshake_refusals_total", labels)
    return sample or 0.0


async def test_the_gateway_settings_reach_the_front_and_the_timings(tmp_path: Path) -> None:
    cfg = config(tmp_path, max_connections=3, provider_handshake_timeout=2.5, drain_timeout=7)
    gateway = await build_gateway(cfg, overrides(tmp_path))
    assert gateway.front.max_connections == 3
    assert gateway.timings == Timings(provider_handshake=2.5, drain=7)
    assert gateway.lane is None  # started with the gateway, not when wired


async def test_by_default_a_session_runs_on_the_limits_timeouts(tmp_path: Path) -> None:
    """What a deployment gets without overrides: each wait bounded by its limit."""
    gateway = await build_gateway(config(tmp_path), overrides(tmp_path))
    timings = gateway.timings
    assert timings.slow_peer == limits.SLOW_PEER_TIMEOUT_S
    assert timings.close_wait == limits.CLOSE_WAIT_S
    assert timings.upstream_handshake == limits.UPSTREAM_HANDSHAKE_TIMEOUT_S
    assert timings.lease_end == limits.LEASE_END_TIMEOUT_S
    # ... and the relays are opened with them.
    live_relays = gateway._relays
    assert live_relays.slow_peer_timeout == limits.SLOW_PEER_TIMEOUT_S
    assert live_relays.close_wait == limits.CLOSE_WAIT_S


async def test_overridden_timings_replace_the_configured_ones(tmp_path: Path) -> None:
    timings = Timings(slow_peer=1.0, close_wait=0.5, lease_end=0.25)
    gateway = await build_gateway(config(tmp_path), overrides(tmp_path, timings=timings))
    assert gateway.timings is timings


async def test_the_directory_keyring_and_clock_reach_the_upgrade_check(tmp_path: Path) -> None:
    clock = FakeClock()
    gateway = await build_gateway(config(tmp_path), overrides(tmp_path, clock=clock))
    unknown = await answer(gateway, upgrade_request("/ws/generic/nobody.my-org"))
    assert unknown.status() == 404
    assert refusals(gateway, 404, "404") == 1

    token, claims = mint_token(TEST_KEYRING, "tok.my-org", now=clock.now)
    clock.now = claims.exp + 1  # the injected clock, not the wall clock, decides expiry
    expired = await answer(gateway, upgrade_request(f"/ws/generic/tok.my-org/{token}"))
    assert (expired.status(), expired.body()["code"]) == (403, "token_expired")
    assert gateway.metrics.registry.get_sample_value(
        "catflap_token_verifications_total", {"result": "expired"}
    )


async def test_a_draining_gateway_refuses_upgrades_with_503(tmp_path: Path) -> None:
    gateway = await build_gateway(config(tmp_path), overrides(tmp_path))
    gateway.draining = True
    refused = await answer(gateway, upgrade_request("/ws/generic/echo.my-org"))
    assert (refused.status(), refused.body()["code"]) == (503, "draining")


async def test_the_metrics_read_the_pool_and_the_configured_agents(tmp_path: Path) -> None:
    gateway = await build_gateway(config(tmp_path), overrides(tmp_path))
    text = gateway.metrics.render().decode()
    assert 'catflap_sessions_active{agent="echo.my-org"} 0.0' in text
    assert 'catflap_sessions_active{agent="tok.my-org"} 0.0' in text
    assert 'catflap_pool_instances{agent="echo.my-org",state="idle"} 2.0' in text


async def test_without_overrides_the_stores_open_in_the_state_dir_and_close_with_it(
    tmp_path: Path,
) -> None:
    pool = IdlePool()
    gateway = await build_gateway(config(tmp_path), Overrides(pool=pool, keyring=TEST_KEYRING))
    assert isinstance(gateway.replay, SqliteReplayStore)
    assert isinstance(gateway.store, SqliteSessionStore)
    assert (tmp_path / "state" / REPLAY_FILE).is_file()
    await gateway.close()
    assert not pool.closed  # never started, so not stopped either


async def test_a_local_pool_is_made_from_the_launch_settings(tmp_path: Path) -> None:
    launch = AgentLaunch(tmp_path / "sockets", ready_timeout=5.0, ping_interval=0.5)
    cfg = config(tmp_path)
    gateway = await build_gateway(cfg, overrides(tmp_path, pool=None), launch=launch)
    assert isinstance(gateway.pool, LocalPool)
    assert sorted(gateway.pool.agents) == ["echo.my-org", "tok.my-org"]


async def test_a_gateway_needs_a_pool_or_a_way_to_launch_one(tmp_path: Path) -> None:
    with pytest.raises(CatflapMisuse):
        await build_gateway(config(tmp_path), overrides(tmp_path, pool=None))
