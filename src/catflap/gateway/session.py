"""One WebSocket session through the gateway, from upgrade request to record: the orchestration.

Steps, in order; on the generic endpoint any failure before step 5 is an HTTP error with no bot
started:

1. the pure upgrade check (:func:`~catflap.gateway.upgrade.check_upgrade`), then the client
   address's start rate (:mod:`~catflap.gateway.sourcelimit`, 429 ``too_many_starts``);
2. spend the token's ``jti`` (a replay is 403);
3. reserve a pool slot (429 at capacity, 503 when no instance can be made ready);
4. forward the upgrade to the instance and wait for its 101 (503 if it does not come);
   steps 2-4 run while the client is watched: if it leaves, they are cancelled, and a refusal
   or a departure gives the slot and the token back;
5. send the 101 to the client and relay bytes until both sides close;
6. wait for the runtime to report that ``bot()`` ended, then finish the record.

Provider endpoints insert their opening-message handshake between steps 1 and 4; see
:mod:`catflap.gateway.telephony`. Each step lives in a module of its own and takes only what it
uses (:class:`~catflap.gateway.steps.SessionSteps`): admission and dispatch retry in
:mod:`~catflap.gateway.admission` and :mod:`~catflap.gateway.dispatch`, refusals in
:mod:`~catflap.gateway.refusal`, the relay in :mod:`~catflap.gateway.relaying`, the record in
:mod:`~catflap.gateway.recorder`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from catflap.contract import headers as hdrs
from catflap.contract.closecodes import CloseCode
from catflap.contract.errors import Draining, InternalError, RequestRejected
from catflap.gateway.httphead import RequestHead
from catflap.gateway.relaying import relay_session
from catflap.gateway.sessionlog import accepted_log, log, loggable
from catflap.gateway.steps import SessionSteps
from catflap.gateway.telephony import run_provider_session
from catflap.gateway.upgrade import check_upgrade
from catflap.gateway.upstream import build_upstream_request, check_forwardable
from catflap.gateway.waiting import ClientLeft, while_client_waits

if TYPE_CHECKING:
    from catflap.gateway.front import GatewayConnection

__all__ = ["run_session"]


async def run_session(
    steps: SessionSteps, conn: GatewayConnection, head: RequestHead, trailing: bytes
) -> None:
    """Take one upgrade request from check to record. Never raises: an unexpected error is
    logged and the connection answered 500 (before the upgrade) or dropped (after it), so it
    can never be left open and unanswered."""
    try:
        await _run_session(steps, conn, head, trailing)
    except Exception:
        log.exception("! unexpected error in a session for %s", loggable(head.path))
        if conn.transport.is_closing():
            return
        if conn.transport.get_protocol() is not conn:
            conn.transport.abort()  # a relay owns it: its legs see the end
        elif conn.upgraded:
            conn.close_websocket(CloseCode.INTERNAL_ERROR, InternalError.code)
        else:
            steps.refusals.reject(conn, InternalError("internal error in the gateway; see its log"))


async def _run_session(
    steps: SessionSteps, conn: GatewayConnection, head: RequestHead, trailing: bytes
) -> None:
    started = time.perf_counter()
    refusals = steps.refusals
    try:
        if steps.draining():
            raise Draining("the gateway is shutting down; connect again to reach another one")
        accepted = check_upgrade(head, steps.directory, steps.keyring, now=steps.clock())
        check_forwardable(head, own_key=accepted.provider is not None)
    except RequestRejected as rejected:
        refusals.refuse(conn, head, rejected, None)
        return
    except Exception:
        log.exception("! unexpected error checking %s", loggable(head.path))
        refusals.reject(
            conn, InternalError("internal error while checking the request; see the log")
        )
        return
    if accepted.provider is not None:
        await run_provider_session(steps, conn, head, trailing, accepted, started)
        return
    agent = accepted.known_agent()
    transport_type = (
        None if agent.config.generic_transport_type == "auto" else hdrs.TRANSPORT_TYPE_WEBSOCKET
    )
    request = build_upstream_request(
        head, accepted, client_host=conn.client_host, transport_type=transport_type
    )
    try:
        # Last of the checks that hold nothing: a start refused here spends no token.
        steps.start_limit.check(conn.client_host)
    except RequestRejected as rejected:
        refusals.refuse(conn, head, rejected, accepted)
        return
    try:
        (lease, reply), early = await while_client_waits(
            conn, steps.admission.start_on_agent(accepted, request)
        )
    except ClientLeft:
        accepted_log(accepted).info("! client left before its session started")
        return
    except RequestRejected as rejected:
        refusals.refuse(conn, head, rejected, accepted)
        return
    except Exception:
        log.exception("! unexpected error while starting a session for %s", loggable(head.path))
        refusals.reject(
            conn, InternalError("internal error while starting the session; see the log")
        )
        return
    conn.upgraded = True
    conn.transport.write(reply.head)  # the agent's 101, valid for the client's own key
    await relay_session(
        steps.relays,
        steps.recorder,
        conn,
        accepted,
        lease,
        reply,
        client_pending=trailing + early,
        started=started,
    )
