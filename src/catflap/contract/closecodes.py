"""WebSocket close codes that catflap itself may send, and when.

Codes a peer sends are relayed unchanged; this table is only for closes that the gateway or the
agent runtime originates. 1005, 1006 and 1015 are reserved by RFC 6455 for local reporting and
must never appear on the wire: :func:`assert_sendable` guards every close catflap builds.
"""

from __future__ import annotations

import enum

__all__ = ["CLOSE_CODE_EXPLANATIONS", "SENDABLE", "CloseCode", "assert_sendable"]


class CloseCode(enum.IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    POLICY_VIOLATION = 1008
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    BAD_GATEWAY = 1014
    # Never sent; listed so that code can name them when it reports what it saw.
    NO_STATUS = 1005
    ABNORMAL = 1006
    TLS_FAILURE = 1015


#: When catflap sends each code. Rendered into docs/operations.md.
CLOSE_CODE_EXPLANATIONS: dict[CloseCode, str] = {
    CloseCode.NORMAL: (
        "runtime -> client: bot() returned with the socket open; the session time limit ran "
        "out (reason 'session time limit reached'); an operator stopped the session "
        "(reason 'session stopped')"
    ),
    CloseCode.GOING_AWAY: (
        "gateway -> agent: the client vanished without a close frame, or broke the protocol"
    ),
    CloseCode.PROTOCOL_ERROR: (
        "gateway -> the peer that sent a control frame over 125 bytes or a fragmented one "
        "(RFC 6455 5.5); the other side gets 1001 (client at fault) or 1011 (agent at fault)"
    ),
    CloseCode.POLICY_VIOLATION: (
        "gateway -> provider: the stream is not the named provider, its opening messages did "
        "not arrive in time, or (Twilio) the agent it names is unknown or needs a token"
    ),
    CloseCode.INTERNAL_ERROR: (
        "gateway -> client: the agent connection dropped without a close (agent crash), or "
        "the agent broke the protocol; "
        "runtime -> client: bot() raised (reason: the exception class)"
    ),
    CloseCode.SERVICE_RESTART: (
        "gateway -> both: shutdown drain deadline reached, or a second SIGTERM"
    ),
    CloseCode.TRY_AGAIN_LATER: (
        "gateway -> both: one side kept its buffer full for SLOW_PEER_TIMEOUT_S; "
        "gateway -> Twilio: the agent named in 'start' is at capacity"
    ),
    CloseCode.BAD_GATEWAY: (
        "gateway -> provider: the agent instance could not be reached after the gateway "
        "accepted the stream"
    ),
}

#: The codes catflap may put on the wire.
SENDABLE: frozenset[int] = frozenset(CLOSE_CODE_EXPLANATIONS)


def assert_sendable(code: int) -> int:
    """Return ``code`` if catflap may send it; raise ``AssertionError`` otherwise.

    Raises:
        AssertionError: ``code`` is reserved (1005/1006/1015) or not in the documented table.
            This is catflap misuse, never a peer's fault.
    """
    if code not in SENDABLE:
        raise AssertionError(f"close code {code} is not in catflap's documented table")
    return code
