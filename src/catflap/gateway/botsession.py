"""Sessions without a transport: the long-held ``POST /bot`` that runs one ``bot()`` on an instance.

``POST /v1/public/{agent}/start`` with no ``transport`` (what ``pipecatcloud``'s
``Session.start()`` sends) starts the bot at once, as Pipecat Cloud does:

1. reserve a pool slot: 429 at ``max_agents``, 503 when no instance gets ready (the pool's own
   typed errors, as for a WebSocket session; there is no token to spend);
2. connect to the instance and write ``POST /bot`` with the session's body (JSON),
   ``x-daily-session-id`` and ``x-pcc-max-session-seconds``;
3. wait, bounded by the upstream handshake timeout, until the runtime reports
   ``session_started`` (the lease's ``started``): the session is accepted, recorded, and
   ``/start`` answers ``{"sessionId"}``. An HTTP answer before that is the runtime's refusal
   (409, 503, 413, 400): the slot goes back and ``/start`` answers 503. As for a WebSocket
   session (``gateway/dispatch.py``), an instance that cannot be reached, answers 503 (full,
   draining) or ends first is given up and another leased, up to ``DISPATCH_ATTEMPTS`` in all;
4. the request stays open in a gateway task (the drain waits for it) until the runtime answers
   it (``bot()`` ended) or the lease ends (a crash); the record is then finished from the
   pool's end, with no relay traffic.

A Daily session (``createDailyRoom``, :mod:`catflap.gateway.daily`) is the same session whose
``POST /bot`` also carries ``x-daily-room-url`` and ``x-daily-room-token``; its record's
transport is ``daily``. A SmallWebRTC session (``"transport": "webrtc"``) is one whose
``POST /bot`` carries ``x-daily-transport-type: webrtc``: the runtime reports it started at
once and waits for the client's offer, which comes through the session proxy to the runtime's
``/api/offer``; its record's transport is ``webrtc``.

``DELETE`` stops such a session through the pool (``stop_session``) as any other, and the
runtime enforces ``max_session_duration`` from the header.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from catflap.config import AgentSpec
from catflap.contract import headers as hdrs
from catflap.contract import limits
from catflap.contract.errors import BodyTooLarge, InvalidBody, ServiceUnavailable
from catflap.gateway.daily import DailyRoom
from catflap.gateway.recorder import Recorder, Recording
from catflap.gateway.sessionlog import accepted_log
from catflap.gateway.upgrade import UpgradeAccepted
from catflap.gateway.upstream import ResponseHeadReader, connect_instance, response_status
from catflap.pool.interface import SessionLease, SessionPool
from catflap.sessions.record import RelayStats

__all__ = [
    "BOT_TRANSPORT",
    "DAILY_TRANSPORT",
    "NO_RELAY",
    "WEBRTC_TRANSPORT",
    "BotSessions",
    "InstanceRefused",
    "bot_request",
    "encode_bot_body",
    "wait_until_started",
]

#: The ``transport`` of these sessions' records: they run on the runtime's ``/bot`` route.
BOT_TRANSPORT = "bot"
#: The ``transport`` of the records of ``/bot`` sessions in a Daily room.
DAILY_TRANSPORT = "daily"
#: The ``transport`` of the records of ``/bot`` sessions over SmallWebRTC.
WEBRTC_TRANSPORT = "webrtc"
#: How often the wait for ``session_started`` looks at the lease: the pool's lease has a flag,
#: not a future, for it. A start takes milliseconds, so this adds at most a few to ``/start``.
_ACCEPT_POLL_S = 0.005
#: What a session without a WebSocket relays: nothing.
NO_RELAY = RelayStats(
    bytes_client_to_agent=0,
    bytes_agent_to_client=0,
    frames_client_to_agent=0,
    frames_agent_to_client=0,
    client_close_code=None,
    agent_close_code=None,
    gateway_close_code=None,
    client_initiated=False,
    agent_vanished=False,
)


def encode_bot_body(value: Any) -> bytes:
    """The ``POST /bot`` body: ``value`` as compact UTF-8 JSON (``{}`` when the client sent
    none, as PCC's base image reads it).

    Raises:
        BodyTooLarge: 413, over ``BOT_BODY_MAX_BYTES``.
        InvalidBody: 400, ``value`` cannot be written as JSON.
    """
    try:
        data = json.dumps(
            {} if value is None else value,
            separators=(",", ":"),
            ensure_ascii=False,
            allow_nan=False,
        ).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidBody(f"body must be a JSON value: {exc}") from None
    if len(data) > limits.BOT_BODY_MAX_BYTES:
        raise BodyTooLarge(
            f"the body is {len(data)} bytes of JSON; at most {limits.BOT_BODY_MAX_BYTES} "
            "for a session without a WebSocket"
        )
    return data


def bot_request(
    agent: AgentSpec,
    session_id: str,
    body: bytes,
    daily: DailyRoom | None = None,
    *,
    webrtc: bool = False,
) -> bytes:
    """The ``POST /bot`` request an instance receives for one session (in ``daily``'s room,
    when given: its URL and token are printable ASCII, :mod:`catflap.gateway.daily` checks;
    waiting for a SmallWebRTC offer with ``webrtc``)."""
    head = [
        f"POST {hdrs.BOT_PATH} HTTP/1.1",
        "host: catflap-agent",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
        f"{hdrs.SESSION_ID_HEADER}: {session_id}",
        f"{hdrs.MAX_SESSION_SECONDS_HEADER}: {agent.config.max_session_duration}",
    ]
    if daily is not None:
        head.append(f"{hdrs.DAILY_ROOM_URL_HEADER}: {daily.url}")
        head.append(f"{hdrs.DAILY_ROOM_TOKEN_HEADER}: {daily.token}")
    if webrtc:
        head.append(f"{hdrs.DAILY_TRANSPORT_TYPE_HEADER}: {hdrs.TRANSPORT_TYPE_WEBRTC}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def _started(lease: SessionLease, *, unknown: bool) -> bool:
    """Whether the runtime reported ``session_started``; ``unknown`` where the lease cannot
    say: a local pool's lease has the flag, a cluster lease has not (the agent host sees the
    report, not this gateway)."""
    return bool(getattr(lease, "started", unknown))


def _code_in(body_start: bytes) -> str:
    """`` (code)`` from the start of the runtime's JSON error, when it arrived with the head
    (at most ``UPSTREAM_RESPONSE_HEAD_MAX_BYTES``); else nothing: it only helps the reader."""
    try:
        code = json.loads(body_start).get("code")
    except (ValueError, AttributeError):
        return ""
    return f" ({code})" if isinstance(code, str) and code.isascii() and len(code) <= 64 else ""


async def wait_until_started(
    lease: SessionLease, answer: asyncio.Future[tuple[bytes, bytes]]
) -> None:
    """Return once the runtime runs ``bot()`` for the lease's session; ``answer`` is the
    response head (and what followed it) of its ``POST /bot``.

    Raises:
        InstanceRefused: 503, this instance answered 503, closed the connection or ended.
        ServiceUnavailable: 503, the runtime refused the request itself (409, 400, 413).
    """
    # Once written, a cluster session counts as accepted (see _started).
    while not _started(lease, unknown=True):
        if answer.done():
            status = 0 if answer.exception() else response_status(answer.result()[0])
            if status == 200:
                return  # bot() already ran to its end: the session happened
            if not status:
                raise InstanceRefused(
                    "the agent closed the connection before starting the session; retry shortly"
                )
            following = answer.result()[1]
            problem = f"the agent refused the session with HTTP {status}{_code_in(following)}"
            problem += "; retry shortly"
            # 503: this instance is full or draining; another may not be. Anything else is
            # the runtime's verdict on the request itself, the same on every instance.
            raise InstanceRefused(problem) if status == 503 else ServiceUnavailable(problem)
        if lease.ended.done():
            raise InstanceRefused(
                "the agent instance ended before it started the session; retry shortly"
            )
        awaited: list[asyncio.Future[Any]] = [answer, lease.ended]
        await asyncio.wait(awaited, timeout=_ACCEPT_POLL_S)


class InstanceRefused(ServiceUnavailable):
    """This instance could not take the session (unreachable, full, draining, or gone before
    it started the bot); another instance may, so the session is tried there."""


@dataclass(slots=True)
class _BotCall:
    """One written ``POST /bot``: its connection and the answer still to come."""

    transport: asyncio.Transport
    reply: ResponseHeadReader

    def close(self) -> None:
        self.transport.abort()
        if self.reply.done.done() and not self.reply.done.cancelled():
            self.reply.done.exception()  # retrieved: a lost connection is expected here


@dataclass(frozen=True, slots=True)
class BotSessions:
    """Starts sessions without a transport and holds each one's ``POST /bot`` to its end."""

    pool: SessionPool
    recorder: Recorder
    #: Runs a task in the gateway's registry (the drain waits for it).
    spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]]
    #: Seconds to reach the instance and see the runtime accept the session.
    accept_timeout: float

    async def start(
        self,
        agent: AgentSpec,
        body: bytes,
        daily: DailyRoom | None = None,
        *,
        webrtc: bool = False,
    ) -> str:
        """Start ``bot()`` for a new session on an instance (in ``daily``'s room, when given);
        return its session id once the runtime has accepted it. With ``webrtc`` the runtime
        accepts it at once and waits for the client's offer (:mod:`catflap.runtime.webrtc`).

        Raises:
            AgentNotReady: 503, no instance became ready.
            AtCapacity: 429, also when no other instance was free for a retry.
            ServiceUnavailable: 503, no instance could be reached or take the session (each
                of ``DISPATCH_ATTEMPTS`` tried one), the runtime refused the request, or it
                did not start the session in time.
        """
        started = time.perf_counter()
        accepted = UpgradeAccepted(
            agent=agent, session_id=str(uuid.uuid4()), provider=None, claims=None, body=None
        )
        request = bot_request(agent, accepted.session_id, body, daily, webrtc=webrtc)
        lease = await self.pool.acquire(agent.key, accepted.session_id)
        tried: set[str] = set()
        for attempt in range(1, limits.DISPATCH_ATTEMPTS + 1):
            tried.add(lease.instance_key)
            try:
                call = await self._accepted(accepted, lease, request)
                break
            except InstanceRefused as refused:
                self.pool.cancel(lease)
                accepted_log(accepted).warning(
                    "! attempt %d: %s at %s", attempt, refused.message, lease.instance_label
                )
                if attempt == limits.DISPATCH_ATTEMPTS:
                    raise
            except BaseException:
                if _started(lease, unknown=False):  # the client left just as the bot started
                    self.spawn(self._stop(lease.session_id))
                self.pool.cancel(lease)
                raise
            lease = await self.pool.acquire(agent.key, accepted.session_id, avoid=frozenset(tried))
        transport = (
            WEBRTC_TRANSPORT if webrtc else BOT_TRANSPORT if daily is None else DAILY_TRANSPORT
        )
        recording = self.recorder.started(accepted, lease, started=started, transport=transport)
        self.spawn(self._hold(recording, lease, call))
        return accepted.session_id

    async def _accepted(
        self, accepted: UpgradeAccepted, lease: SessionLease, request: bytes
    ) -> _BotCall:
        """Reach the instance, write the request, and wait for the session to start there."""
        reply = ResponseHeadReader(asyncio.get_running_loop())
        try:
            async with asyncio.timeout(self.accept_timeout):
                transport = await connect_instance(lease.address, reply)
                call = _BotCall(transport, reply)
                transport.write(request)
                try:
                    await wait_until_started(lease, reply.done)
                except BaseException:
                    call.close()
                    raise
        except TimeoutError:
            raise ServiceUnavailable(
                f"the agent instance did not start the session within {self.accept_timeout:g} s; "
                "retry shortly"
            ) from None
        except OSError as exc:
            raise InstanceRefused(
                f"could not reach the agent instance ({type(exc).__name__}); retry shortly"
            ) from None
        return call

    async def _hold(self, recording: Recording, lease: SessionLease, call: _BotCall) -> None:
        """Keep the request open until ``bot()`` ended (its answer) or the lease ended, then
        finish the record."""
        finishing = False
        try:
            ends: list[asyncio.Future[Any]] = [call.reply.done, lease.ended]
            await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
            finishing = True
            await self.recorder.ended(recording, lease, NO_RELAY, drained=False, traffic={})
        except asyncio.CancelledError:
            if not finishing:
                await self._drained(recording, lease)
            raise
        finally:
            call.close()

    async def _drained(self, recording: Recording, lease: SessionLease) -> None:
        """The gateway closes (past its drain deadline) while the bot runs: stop it, and record
        the session ``drained``, as a WebSocket session closed with 1012 is. Bounded: the bot's
        own time limit still ends a bot that ignores the stop."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(limits.CLOSE_WAIT_S):
                await self.pool.stop_session(lease.session_id)
                await self.recorder.ended(recording, lease, NO_RELAY, drained=True, traffic={})

    async def _stop(self, session_id: str) -> None:
        with contextlib.suppress(Exception):  # the bot's own time limit still ends it
            async with asyncio.timeout(limits.CLOSE_WAIT_S):
                await self.pool.stop_session(session_id)
