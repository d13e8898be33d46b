"""A session on ``/ws/{twilio,telnyx,plivo,exotel}``: handshake, route, replay, relay.

Unlike the generic endpoint, the gateway accepts the provider's WebSocket itself, because it has
to read the provider's opening messages before it can name (Twilio) or trust (all four) the
stream:

1. Checks that need no messages run before the upgrade, with HTTP statuses as on the generic
   endpoint: a malformed or unknown ``?serviceHost=`` (400/404), a token agent without a valid
   path token (403), ``?body=`` (400/413), and, when the agent is known, the client address's
   start rate (429 ``too_many_starts``) and capacity (429/503).
2. The gateway answers 101 and reads frames until the ``start`` message
   (:mod:`catflap.gateway.providers` judges them). A stream that is not the provider, or that
   stays silent past ``provider_handshake_timeout``, is closed with 1008; no bot starts.
3. For Twilio without ``?serviceHost=``, the ``start`` message names the agent; routing and
   token failures found now are closed with 1008, the start rate and capacity with 1013.
4. The gateway opens ``/ws`` on the instance with a key of its own and no
   ``x-catflap-transport-type`` header (pipecat then auto-detects the provider), replays the
   opening frames exactly as received, in order, and from then on relays bytes as on the
   generic path.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import os
from typing import TYPE_CHECKING

from catflap.contract import limits
from catflap.contract.closecodes import CloseCode
from catflap.contract.errors import (
    AtCapacity,
    InternalError,
    RequestRejected,
    ServiceUnavailable,
    TooManyStarts,
)
from catflap.gateway.frames import ControlFrameError, FrameReader
from catflap.gateway.httphead import RequestHead
from catflap.gateway.providers import HandshakeDone, HandshakeInvalid, Provider, ProviderHandshake
from catflap.gateway.relaying import relay_session
from catflap.gateway.sessionlog import accepted_log
from catflap.gateway.steps import SessionSteps
from catflap.gateway.upgrade import UpgradeAccepted, resolve_agent
from catflap.gateway.upstream import build_upstream_request
from catflap.gateway.waiting import ClientLeft, while_client_waits
from catflap.pool.interface import SessionLease

if TYPE_CHECKING:
    from catflap.gateway.front import GatewayConnection

__all__ = ["HandshakeFailed", "accept_response", "read_opening", "run_provider_session"]

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_OP_TEXT, _OP_BINARY, _OP_CLOSE = 0x1, 0x2, 0x8


class HandshakeFailed(Exception):
    """The provider's opening messages were wrong, absent, cut off or too much (close 1008),
    or broke RFC 6455 itself (close 1002)."""

    def __init__(self, reason: str, code: CloseCode = CloseCode.POLICY_VIOLATION) -> None:
        super().__init__(reason)
        self.code = code


def accept_response(key: str) -> bytes:
    """The 101 the gateway sends when it accepts a provider's WebSocket itself."""
    accept = base64.b64encode(hashlib.sha1(key.encode() + _WS_GUID).digest()).decode()
    return (
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept}\r\n\r\n"
    ).encode()


async def read_opening(
    conn: GatewayConnection, provider: Provider, initial: bytes, *, deadline: float
) -> tuple[bytes, bytes, HandshakeDone]:
    """Read frames until the provider's ``start`` message.

    Args:
        initial: bytes the client sent right after its request head.
        deadline: seconds the messages may take.

    Returns:
        The opening frames exactly as received, the bytes after them, and the verdict.

    Raises:
        HandshakeFailed: the stream is not the provider, closed, or stayed silent too long.
    """
    # Frames are read with catflap's own small reader rather than websockets' parser because
    # they must be replayed to the bot byte for byte, masks included.
    reader = FrameReader(max_frame=limits.PROVIDER_OPENING_FRAME_MAX_BYTES)
    judge = ProviderHandshake(provider)
    arrived = asyncio.Event()
    ended = conn.lost  # it may have gone in the very turn its admission finished
    #: Never hold more than the whole opening may be, plus one frame header, plus one read.
    buffer_cap = limits.PROVIDER_OPENING_MAX_BYTES + limits.FRAME_HEADER_MAX_BYTES

    def sink(data: bytes | None) -> None:
        nonlocal ended
        if data is None:
            ended = True
        else:
            reader.feed(data)
            if reader.buffered > buffer_cap and not conn.transport.is_closing():
                conn.transport.pause_reading()  # the loop below decides, TCP holds the rest
        arrived.set()

    reader.feed(initial)
    conn.sink = sink
    conn.transport.resume_reading()
    opening = bytearray()
    frames = 0
    try:
        async with asyncio.timeout(deadline):
            while True:
                try:
                    frame = reader.next_frame()
                except ControlFrameError as exc:
                    raise HandshakeFailed(str(exc), CloseCode.PROTOCOL_ERROR) from None
                except ValueError as exc:
                    raise HandshakeFailed(f"{provider.expectation()}; {exc}") from None
                if frame is None:
                    if ended:
                        raise HandshakeFailed("closed before the opening messages")
                    if reader.buffered > buffer_cap:
                        raise HandshakeFailed(_too_much(provider))
                    arrived.clear()
                    if not conn.transport.is_closing():
                        conn.transport.resume_reading()
                    await arrived.wait()
                    continue
                if frame.opcode == _OP_CLOSE:
                    raise HandshakeFailed("closed before the opening messages")
                opening += frame.raw
                frames += 1
                if (
                    len(opening) > limits.PROVIDER_OPENING_MAX_BYTES
                    or frames > limits.PROVIDER_OPENING_MAX_FRAMES
                ):
                    raise HandshakeFailed(_too_much(provider))
                if frame.opcode & 0x8:  # ping/pong: kept for the bot, not judged
                    continue
                if not frame.fin or frame.opcode not in (_OP_TEXT, _OP_BINARY):
                    raise HandshakeFailed(f"{provider.expectation()}; got a fragmented message")
                text = None
                if frame.opcode == _OP_TEXT:
                    try:
                        text = frame.payload.decode("utf-8")
                    except UnicodeDecodeError:
                        raise HandshakeFailed("text frame is not UTF-8") from None
                verdict = judge.feed(text)
                if isinstance(verdict, HandshakeInvalid):
                    raise HandshakeFailed(verdict.reason)
                if isinstance(verdict, HandshakeDone):
                    return bytes(opening), reader.take_remaining(), verdict
    except TimeoutError:
        raise HandshakeFailed(
            f"no {provider.title} 'start' message within {deadline:g} s"
        ) from None
    finally:
        conn.sink = None
        if not conn.transport.is_closing():
            conn.transport.pause_reading()


def _too_much(provider: Provider) -> str:
    return (
        f"{provider.expectation()}; no 'start' within {limits.PROVIDER_OPENING_MAX_FRAMES} "
        f"frames or {limits.PROVIDER_OPENING_MAX_BYTES} bytes"
    )


async def run_provider_session(
    steps: SessionSteps,
    conn: GatewayConnection,
    head: RequestHead,
    trailing: bytes,
    accepted: UpgradeAccepted,
    started: float,
) -> None:
    """Run one provider session; never raises."""
    provider = accepted.provider
    assert provider is not None
    slog = accepted_log(accepted)
    admission, refusals = steps.admission, steps.refusals
    lease: SessionLease | None = None
    # 1. Known agent: capacity is still an HTTP answer.
    if accepted.agent is not None:
        try:
            steps.start_limit.check(conn.client_host)  # before any token or slot
            lease, early = await while_client_waits(conn, admission.admit(accepted))
            trailing += early
        except ClientLeft:
            slog.info("! client left before its session started")
            return
        except RequestRejected as rejected:
            refusals.refuse(conn, head, rejected, accepted)
            return
    key = head.header("sec-websocket-key") or ""
    conn.upgraded = True
    conn.transport.write(accept_response(key))
    try:
        # 2. The provider's opening messages.
        try:
            opening, rest, verdict = await read_opening(
                conn, provider, trailing, deadline=steps.provider_handshake_timeout
            )
        except HandshakeFailed as failed:
            refusals.opening_refused(
                conn, failed.code, str(failed), slog, provider=provider.name, path=head.path
            )
            return
        # 3. Twilio names its agent in the start message.
        if accepted.agent is None:
            try:
                agent, claims = resolve_agent(
                    verdict.service_host or "",
                    accepted.path_token,
                    steps.directory,
                    steps.keyring,
                    now=steps.clock(),
                    token_hint="put the token in the stream URL path: /ws/twilio/<token>",
                )
                accepted = dataclasses.replace(
                    accepted,
                    agent=agent,
                    claims=claims,
                    session_id=claims.jti if claims else accepted.session_id,
                )
                slog = accepted_log(accepted)
                steps.start_limit.check(conn.client_host)
                lease, early = await while_client_waits(conn, admission.admit(accepted))
                rest += early
            except ClientLeft:
                slog.info("! %s: client left before its session started", provider.name)
                return
            except (AtCapacity, TooManyStarts, ServiceUnavailable) as busy:
                refusals.close_stream(
                    conn, CloseCode.TRY_AGAIN_LATER, busy, slog, provider=provider.name
                )
                return
            except RequestRejected as rejected:
                reason = (
                    rejected.message
                    if verdict.service_host
                    else ("no _pipecatCloudServiceHost <Parameter> in the Twilio 'start' message")
                )
                refusals.close_stream(
                    conn,
                    CloseCode.POLICY_VIOLATION,
                    rejected,
                    slog,
                    provider=provider.name,
                    reason=reason,
                )
                return
        assert lease is not None
        # 4. Open the agent's /ws as a client of our own, then replay and relay.
        request = build_upstream_request(
            head,
            accepted,
            client_host=conn.client_host,
            transport_type=None,
            websocket_key=base64.b64encode(os.urandom(16)).decode(),
        )
        owned, lease = lease, None  # connect_agent owns it now
        try:
            (session_lease, reply), early = await while_client_waits(
                conn, admission.reach_agent(accepted, owned, request)
            )
            rest += early
        except ClientLeft:
            slog.info("! %s: client left before its session started", provider.name)
            return
        except RequestRejected as unreachable:
            slog.warning("! %s", unreachable.message)
            conn.close_websocket(CloseCode.BAD_GATEWAY, "the agent could not be reached")
            return
        await relay_session(
            steps.relays,
            steps.recorder,
            conn,
            accepted,
            session_lease,
            reply,
            client_pending=opening + rest,
            started=started,
        )
    except Exception:
        slog.exception("! unexpected error in a %s session", provider.name)
        conn.close_websocket(CloseCode.INTERNAL_ERROR, InternalError.code)
    finally:
        if lease is not None:
            admission.pool.cancel(lease)
            await admission.give_token_back(accepted)
