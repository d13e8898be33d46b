"""One WebSocket session through the gateway, from upgrade request to record.

Steps, in order; on the generic endpoint any failure before step 5 is an HTTP error with no bot
started:

1. the pure upgrade check (:func:`~catflap.gateway.upgrade.check_upgrade`);
2. spend the token's ``jti`` (a replay is 403);
3. reserve a pool slot (429 at capacity, 503 when no instance can be made ready);
4. forward the upgrade to the instance and wait for its 101 (503 if it does not come);
   steps 2-4 run while the client is watched: if it leaves, they are cancelled, and a refusal
   or a departure gives the slot and the token back;
5. send the 101 to the client and relay bytes until both sides close;
6. wait for the runtime to report that ``bot()`` ended, then finish the record.

Provider endpoints insert their opening-message handshake between steps 1 and 4; see
:mod:`catflap.gateway.telephony`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from catflap.auth.replay import consume_or_reject
from catflap.contract import headers as hdrs
from catflap.contract import limits
from catflap.contract.closecodes import CloseCode
from catflap.contract.errors import (
    CatflapMisuse,
    Draining,
    InternalError,
    RequestRejected,
    ServiceUnavailable,
    TokenRejected,
)
from catflap.gateway.httphead import RequestHead
from catflap.gateway.relay import Relay
from catflap.gateway.upgrade import UpgradeAccepted, check_upgrade
from catflap.gateway.upstream import (
    AgentSilent,
    UpstreamReply,
    build_upstream_request,
    check_forwardable,
    open_upstream,
)
from catflap.logs import SessionLog, not_logged, refusal_log_budget, session_log
from catflap.pool.instance import SessionEnd
from catflap.pool.pool import SessionLease
from catflap.sessions.record import SessionRecord

if TYPE_CHECKING:
    from catflap.config import AgentSpec
    from catflap.gateway.front import GatewayConnection
    from catflap.gateway.server import Gateway

__all__ = [
    "ClientLeft",
    "admit",
    "connect_agent",
    "give_token_back",
    "Delivery",
    "reach_agent",
    "relay_session",
    "run_session",
    "start_on_agent",
    "while_client_waits",
]

log = logging.getLogger("catflap.gateway")
T = TypeVar("T")


async def run_session(
    gateway: Gateway, conn: GatewayConnection, head: RequestHead, trailing: bytes
) -> None:
    """Take one upgrade request from check to record. Never raises: an unexpected error is
    logged and the connection answered 500 (before the upgrade) or dropped (after it), so it
    can never be left open and unanswered."""
    try:
        await _run_session(gateway, conn, head, trailing)
    except Exception:
        log.exception("! unexpected error in a session for %s", loggable(head.path))
        if conn.transport.is_closing():
            return
        if conn.transport.get_protocol() is not conn:
            conn.transport.abort()  # a relay owns it: its legs see the end
        elif conn.upgraded:
            conn.close_websocket(CloseCode.INTERNAL_ERROR, InternalError.code)
        else:
            conn.reject(InternalError("internal error in the gateway; see its log"))


async def _run_session(
    gateway: Gateway, conn: GatewayConnection, head: RequestHead, trailing: bytes
) -> None:
    started = time.perf_counter()
    try:
        if gateway.draining:
            raise Draining("the gateway is shutting down; connect again to reach another one")
        accepted = check_upgrade(head, gateway.directory, gateway.keyring, now=gateway.clock())
        check_forwardable(head, own_key=accepted.provider is not None)
    except RequestRejected as rejected:
        refuse(gateway, conn, head, rejected, None)
        return
    except Exception:
        log.exception("! unexpected error checking %s", loggable(head.path))
        conn.reject(InternalError("internal error while checking the request; see the log"))
        return
    if accepted.provider is not None:
        from catflap.gateway.telephony import run_provider_session

        await run_provider_session(gateway, conn, head, trailing, accepted, started)
        return
    agent = _agent(accepted)
    transport_type = (
        None if agent.config.generic_transport_type == "auto" else hdrs.TRANSPORT_TYPE_WEBSOCKET
    )
    request = build_upstream_request(
        head, accepted, client_host=conn.client_host, transport_type=transport_type
    )
    try:
        (lease, reply), early = await while_client_waits(
            conn, start_on_agent(gateway, accepted, request)
        )
    except ClientLeft:
        accepted_log(accepted).info("! client left before its session started")
        return
    except RequestRejected as rejected:
        refuse(gateway, conn, head, rejected, accepted)
        return
    except Exception:
        log.exception("! unexpected error while starting a session for %s", loggable(head.path))
        conn.reject(InternalError("internal error while starting the session; see the log"))
        return
    conn.upgraded = True
    conn.transport.write(reply.head)  # the agent's 101, valid for the client's own key
    await relay_session(
        gateway, conn, accepted, lease, reply, client_pending=trailing + early, started=started
    )


class ClientLeft(Exception):
    """The client closed its connection while its session was being admitted."""


async def while_client_waits(
    conn: GatewayConnection, admission: Coroutine[Any, Any, T]
) -> tuple[T, bytes]:
    """Run ``admission`` while reading the client, so that its departure cancels it.

    A paused transport would notice neither a FIN nor a reset, and a session would be started
    (token spent, instance cold-started, ``bot()`` run) for nobody. A WebSocket client sends
    nothing before the 101, so what it does send meanwhile is kept, bounded, for the relay.

    Returns:
        What ``admission`` returned, and the bytes the client sent meanwhile.

    Raises:
        ClientLeft: the client went away; ``admission`` was cancelled (and gave back what it
            held).
    """
    task = asyncio.ensure_future(admission)
    early = bytearray()

    def sink(data: bytes | None) -> None:
        if data is None:
            task.cancel()
            return
        early.extend(data)
        if len(early) > limits.RELAY_HIGH_WATER_BYTES and not conn.transport.is_closing():
            conn.transport.pause_reading()  # a client that will not wait: TCP holds the rest

    if conn.lost:
        task.cancel()
    else:
        conn.sink = sink
        conn.transport.resume_reading()
    try:
        result = await task
    except asyncio.CancelledError:
        if conn.lost and not _cancelling():
            raise ClientLeft from None
        raise
    finally:
        conn.sink = None
        if not conn.transport.is_closing():
            conn.transport.pause_reading()
    return result, bytes(early)


def _cancelling() -> bool:
    """True when the running task itself is being cancelled (shutdown), not just its child."""
    current = asyncio.current_task()
    return current is not None and current.cancelling() > 0


def _agent(accepted: UpgradeAccepted) -> AgentSpec:
    if accepted.agent is None:
        raise CatflapMisuse("a session reached the pool before its agent was known")
    return accepted.agent


def accepted_log(accepted: UpgradeAccepted | None) -> SessionLog:
    """The session's logger, with the agent and organisation once they are known."""
    if accepted is None:
        return session_log(log, "-")
    if accepted.agent is None:
        return session_log(log, accepted.session_id)
    host = accepted.agent.service_host
    return session_log(log, accepted.session_id, agent=host.agent, org=host.org)


def refuse(
    gateway: Gateway,
    conn: GatewayConnection,
    head: RequestHead,
    rejected: RequestRejected,
    accepted: UpgradeAccepted | None,
) -> None:
    skipped = refusal_log_budget.take()
    if skipped is not None:
        accepted_log(accepted).info(
            "! %s %s -> %d %s%s",
            head.method,
            loggable(head.path),
            rejected.status,
            rejected.to_body()["code"],
            not_logged(skipped),
        )
    conn.reject(rejected)


def count_refusal(gateway: Gateway, status: str, rejected: RequestRejected) -> None:
    """Count a refusal (``status`` is an HTTP status, or a close code after the upgrade)."""
    reason = rejected.to_body()["code"]
    gateway.metrics.refusals.labels(status, reason).inc()
    if isinstance(rejected, TokenRejected):
        gateway.metrics.token_verifications.labels(rejected.reason).inc()


async def admit(gateway: Gateway, accepted: UpgradeAccepted) -> SessionLease:
    """Spend the token and reserve a slot; a refusal or cancellation gives the token back.

    The token is spent first, so that a replay racing its first use is refused without
    touching the pool; if the pool then refuses (429, 503) or the client leaves, the jti is
    released, so that the client can retry with the same token after ``Retry-After``.

    Raises:
        TokenRejected: 403, the token was used before.
        AtCapacity: 429.
        AgentNotReady: 503.
    """
    if accepted.claims is not None:
        try:
            await consume_or_reject(gateway.replay, accepted.claims)
        except asyncio.CancelledError:
            # The client left while the store was answering: the jti may be spent.
            await give_token_back(gateway, accepted)
            raise
    try:
        lease = await gateway.pool.acquire(_agent(accepted).key, accepted.session_id)
    except BaseException:
        await give_token_back(gateway, accepted)
        raise
    if accepted.claims is not None:
        gateway.metrics.token_verifications.labels("ok").inc()
    return lease


async def give_token_back(gateway: Gateway, accepted: UpgradeAccepted) -> None:
    """Forget a spent jti whose session never reached the agent; never raises."""
    if accepted.claims is None:
        return
    try:
        await gateway.replay.release(accepted.claims.jti)
    except Exception:
        # The token then stays spent: the client mints another one.
        accepted_log(accepted).exception("! could not give the token back")


async def start_on_agent(
    gateway: Gateway, accepted: UpgradeAccepted, request: bytes
) -> tuple[SessionLease, UpstreamReply]:
    """Admit the session (:func:`admit`) and reach its instance (:func:`connect_agent`).

    On any failure, and on cancellation, the slot and the token are given back.

    Raises:
        RequestRejected: 403, 429 or 503, as :func:`admit` and :func:`connect_agent`.
    """
    lease = await admit(gateway, accepted)
    return await reach_agent(gateway, accepted, lease, request)


@dataclasses.dataclass
class Delivery:
    """Whether a forwarded upgrade may have started a bot: written to an instance that has
    not answered it (yet). The token of such a session stays spent."""

    maybe_started: bool = False


async def reach_agent(
    gateway: Gateway, accepted: UpgradeAccepted, lease: SessionLease, request: bytes
) -> tuple[SessionLease, UpstreamReply]:
    """:func:`connect_agent`; on failure the token is given back, unless the upgrade may have
    reached an agent that started ``bot()`` (no answer came: silent, or the client left).

    Raises:
        RequestRejected: as :func:`connect_agent`.
    """
    delivery = Delivery()
    try:
        return await connect_agent(gateway, accepted, lease, request, delivery)
    except BaseException:
        if not delivery.maybe_started:
            await give_token_back(gateway, accepted)
        raise


async def connect_agent(
    gateway: Gateway,
    accepted: UpgradeAccepted,
    lease: SessionLease,
    request: bytes,
    delivery: Delivery | None = None,
) -> tuple[SessionLease, UpstreamReply]:
    """Forward the upgrade to the leased instance and wait for its 101.

    An instance that cannot be reached, or that answers 503 (it is draining), is given up
    and another one leased, up to ``DISPATCH_ATTEMPTS`` in all; any other answer is the
    agent's verdict on this request and is not tried elsewhere. This function owns ``lease``:
    on failure it has been cancelled. ``delivery`` says, on failure, whether the last upgrade
    was written and never answered.

    Returns:
        The lease that worked (perhaps not the one passed in) and the agent's reply.

    Raises:
        ServiceUnavailable: 503, no instance could be reached or switched protocols.
        AtCapacity: 429, no other instance was free for a retry.
    """
    tried: set[str] = set()
    delivery = delivery if delivery is not None else Delivery()

    def sent() -> None:
        delivery.maybe_started = True

    for attempt in range(1, limits.DISPATCH_ATTEMPTS + 1):
        tried.add(lease.instance_key)
        delivery.maybe_started = False
        try:
            reply = await open_upstream(
                lease.address, request, timeout=gateway.upstream_timeout, on_sent=sent
            )
            if reply.status == 101:
                return lease, reply
            delivery.maybe_started = False  # it answered, and refused: no bot started
            reply.transport.abort()
            problem = f"the agent refused the session with HTTP {reply.status}"
            final = reply.status != 503
        except AgentSilent:
            # Connected but no answer: the request may be what stalls it, so no retry.
            gateway.pool.cancel(lease)
            raise
        except ServiceUnavailable as unreachable:
            problem, final = unreachable.message, False
        except BaseException:
            gateway.pool.cancel(lease)
            raise
        gateway.pool.cancel(lease)
        accepted_log(accepted).warning(
            "! attempt %d: %s at %s", attempt, problem, lease.instance_label
        )
        if final or attempt == limits.DISPATCH_ATTEMPTS:
            raise ServiceUnavailable(f"{problem}; retry shortly")
        lease = await gateway.pool.acquire(
            _agent(accepted).key, accepted.session_id, avoid=frozenset(tried)
        )
    raise CatflapMisuse("unreachable")


async def relay_session(
    gateway: Gateway,
    conn: GatewayConnection,
    accepted: UpgradeAccepted,
    lease: SessionLease,
    reply: UpstreamReply,
    *,
    client_pending: bytes,
    started: float,
) -> None:
    """Relay an upgraded session until both sides close and ``bot()`` has ended."""
    agent = _agent(accepted)
    name, org = agent.service_host.agent, agent.service_host.org
    slog = session_log(log, accepted.session_id, agent=name, org=org)
    start_seconds = time.perf_counter() - started
    record = SessionRecord(
        session_id=accepted.session_id,
        agent=name,
        organization=org,
        created_at=gateway.clock(),
        transport=accepted.provider.name if accepted.provider else "websocket",
        cold_start=lease.cold_start,
        bot_start_seconds=start_seconds,
    )
    gateway.sessions.started(record)
    metrics = gateway.metrics
    metrics.sessions_started.labels(agent.key, record.transport).inc()
    metrics.start_seconds.labels("cold" if lease.cold_start else "warm").observe(start_seconds)
    if lease.cold_start:
        metrics.cold_starts.labels(agent.key).inc()
    # Persist off the handshake path; the end-of-session save waits for this one.
    first_save = gateway.spawn(_store(gateway, dataclasses.replace(record)))
    slog.info(
        "= %s session started on %s (%s start, %.1f ms)",
        record.transport,
        lease.instance_label,
        "cold" if lease.cold_start else "warm",
        start_seconds * 1000,
    )
    conn.handed_off()
    relay = Relay(conn.transport, reply.transport, lane=gateway.lane)
    gateway.relays[accepted.session_id] = relay
    try:
        relay.start(client_pending=client_pending, agent_pending=reply.trailing)
        stats = await relay.done
    except asyncio.CancelledError:
        relay.abort()
        raise
    finally:
        # Both connections are closed: the session no longer counts against max_connections,
        # even while its bot runs on (post-call work) until the runtime reports.
        gateway.relays.pop(accepted.session_id, None)
    deadline = started + agent.config.max_session_duration + gateway.lease_end_timeout
    end = await _bot_ended(gateway, lease, slog, deadline=deadline)
    record.finish(end, stats, drained=relay.drained, now=gateway.clock())
    gateway.sessions.ended_now(record)
    metrics.session_ended(agent.key, str(record.completion_status), relay.traffic())
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


async def _bot_ended(
    gateway: Gateway, lease: SessionLease, slog: SessionLog, *, deadline: float
) -> SessionEnd:
    """The runtime's report that ``bot()`` ended, by ``deadline`` (``time.perf_counter()``).

    A bot may run on after its connection closed (post-call work), but never past the
    session's ``max_session_duration``: the runtime cancels it then, and kills its process
    ``BOT_CANCEL_GRACE_S`` later. So the deadline is the session's start plus its duration
    plus ``LEASE_END_TIMEOUT_S``. A runtime that has not reported by then would hold the slot
    forever: its instance is replaced instead and the session recorded ``agent_crashed``.
    """
    try:
        return await asyncio.wait_for(
            asyncio.shield(lease.ended), max(deadline - time.perf_counter(), 0.0)
        )
    except TimeoutError:
        pass
    problem = (
        "the agent runtime did not report the end of bot() by the session's time limit "
        f"plus {gateway.lease_end_timeout:g} s"
    )
    slog.error("! %s on %s; replacing the instance", problem, lease.instance_label)
    gateway.pool.abandon(lease, problem)
    return SessionEnd(status="agent_crashed", error=problem)


async def _store(gateway: Gateway, record: SessionRecord) -> None:
    try:
        await gateway.store.save(record)
    except Exception:
        session_log(log, record.session_id, agent=record.agent, org=record.organization).exception(
            "! could not store the session record"
        )


def loggable(path: str) -> str:
    """The path without a token segment: tokens never go to the log."""
    parts = path.split("/")
    keep = 4 if len(parts) > 2 and parts[2] == "generic" else 3
    return "/".join(parts[:keep]) + ("/<token>" if len(parts) > keep else "")
