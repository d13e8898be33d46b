"""One WebSocket session through the gateway, from upgrade request to record.

Steps, in order; any failure before step 5 is an HTTP error with no bot started:

1. the pure upgrade check (:func:`~catflap.gateway.upgrade.check_upgrade`);
2. spend the token's ``jti`` (a replay is 403);
3. reserve a pool slot (429 at capacity, 503 when no instance can be made ready);
4. forward the upgrade to the instance and wait for its 101 (503 if it does not come);
5. send the 101 to the client and relay bytes until both sides close;
6. wait for the runtime to report that ``bot()`` ended, then finish the record.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import TYPE_CHECKING

from catflap.auth.replay import consume_or_reject
from catflap.contract import headers as hdrs
from catflap.contract.errors import Draining, InternalError, RequestRejected, ServiceUnavailable
from catflap.gateway.httphead import RequestHead
from catflap.gateway.relay import Relay
from catflap.gateway.upgrade import UpgradeAccepted, check_upgrade
from catflap.gateway.upstream import build_upstream_request, open_upstream
from catflap.logs import session_log
from catflap.pool.instance import Lease
from catflap.sessions.record import SessionRecord

if TYPE_CHECKING:
    from catflap.gateway.front import GatewayConnection
    from catflap.gateway.server import Gateway

__all__ = ["run_session"]

log = logging.getLogger("catflap.gateway")


def _transport_type(accepted: UpgradeAccepted) -> str | None:
    if accepted.agent.config.generic_transport_type == "auto":
        return None
    return hdrs.TRANSPORT_TYPE_WEBSOCKET


async def run_session(
    gateway: Gateway, conn: GatewayConnection, head: RequestHead, trailing: bytes
) -> None:
    """Take one upgrade request from check to record. Never raises."""
    started = time.perf_counter()
    lease: Lease | None = None
    accepted: UpgradeAccepted | None = None
    try:
        if gateway.draining:
            raise Draining("the gateway is shutting down; connect again to reach another one")
        accepted = check_upgrade(head, gateway.directory, gateway.keyring, now=gateway.clock())
        if accepted.claims is not None:
            await consume_or_reject(gateway.replay, accepted.claims)
        lease = await gateway.pool.acquire(accepted.agent.key, accepted.session_id)
        request = build_upstream_request(
            head, accepted, client_host=conn.client_host, transport_type=_transport_type(accepted)
        )
        reply = await open_upstream(lease.address, request, timeout=gateway.upstream_timeout)
        if reply.status != 101:
            reply.transport.abort()
            raise ServiceUnavailable(
                f"the agent refused the session with HTTP {reply.status}; retry shortly"
            )
    except RequestRejected as rejected:
        if lease is not None:
            gateway.pool.cancel(lease)
        sid = accepted.session_id if accepted else "-"
        session_log(log, sid).info(
            "! %s %s -> %d %s",
            head.method,
            _loggable(head.path),
            rejected.status,
            rejected.to_body()["code"],
        )
        conn.reject(rejected)
        return
    except Exception:
        if lease is not None:
            gateway.pool.cancel(lease)
        log.exception("! unexpected error while starting a session for %s", _loggable(head.path))
        conn.reject(InternalError("internal error while starting the session; see the gateway log"))
        return

    agent = accepted.agent
    slog = session_log(
        log, accepted.session_id, agent=agent.service_host.agent, org=agent.service_host.org
    )
    start_seconds = time.perf_counter() - started
    record = SessionRecord(
        session_id=accepted.session_id,
        agent=agent.service_host.agent,
        organization=agent.service_host.org,
        created_at=gateway.clock(),
        cold_start=lease.cold_start,
        bot_start_seconds=start_seconds,
    )
    gateway.sessions.started(record)
    # Persist off the handshake path; the end-of-session save waits for this one.
    first_save = gateway.spawn(_store(gateway, dataclasses.replace(record)))
    slog.info(
        "= session started on instance %d (%s start, %.1f ms)",
        lease.instance.instance_id,
        "cold" if lease.cold_start else "warm",
        start_seconds * 1000,
    )

    relay = Relay(conn.transport, reply.transport)
    gateway.relays[accepted.session_id] = relay
    try:
        conn.transport.write(reply.head)
        relay.start(client_pending=trailing, agent_pending=reply.trailing)
        stats = await relay.done
        end = await lease.ended
    except asyncio.CancelledError:
        relay.abort()
        raise
    finally:
        gateway.relays.pop(accepted.session_id, None)
    record.finish(end, stats, drained=relay.drained, now=gateway.clock())
    gateway.sessions.ended_now(record)
    await asyncio.wait([first_save])
    await _store(gateway, record)
    slog.info(
        "= session ended: %s (client close %s, agent close %s, %d/%d frames in/out)",
        record.completion_status,
        stats.client_close_code,
        stats.agent_close_code,
        stats.frames_client_to_agent,
        stats.frames_agent_to_client,
    )


async def _store(gateway: Gateway, record: SessionRecord) -> None:
    try:
        await gateway.store.save(record)
    except Exception:
        session_log(log, record.session_id).exception("! could not store the session record")


def _loggable(path: str) -> str:
    """The path without a trailing token segment: tokens never go to the log."""
    parts = path.split("/")
    return "/".join(parts[:4]) + ("/<token>" if len(parts) > 4 else "")
