"""The relay's lifecycle: its states, the events that move it, and the one table of transitions.

Theory of operation. A :class:`~catflap.gateway.relay.Relay` is always in one
:class:`RelayState`. Everything that can happen to it (a leg ends, a close frame goes by, the
gateway drains, the fast lane hands the session back) is a :class:`RelayEvent`, and
:data:`TRANSITIONS` says, for each state, which events may happen there and which state follows.
Two rules, as in h11's ``_state.py``:

1. Every transition lives in this module. The relay fires an event as soon as it knows it
   happened and before it acts on it (the lane's entry once the lane has taken the sockets),
   so the state always says what the relay is doing; the relay's code, not this table, does
   the acting, and the "what happens" column says what that code does.
2. This module does no I/O and knows no transport: it can be tested with nothing but enums.

Per-frame work (forwarding bytes, counting frames, pause/resume for backpressure) is not an
event: it happens in every state where Python owns the sockets, and going through this table
for each frame would cost more than the frame. Only changes of lifecycle are events, a handful
per session, and each change of state is logged at DEBUG with the ``=`` prefix.

The fast lane is two states, :attr:`RelayState.IN_LANE` and :attr:`RelayState.RECALLING`
(:data:`SOCKETS_LENT`): the lane's thread owns both sockets there, and Python may not write to,
close, pause or resume them. The relay lends each leg a
:class:`~catflap.gateway.fastlane.LentTransport` meanwhile, whose every acting method asks
:meth:`RelayMachine.refuse_socket_io`, which raises :class:`SocketsLent`: the write is refused
before it can corrupt the stream.

An event with no row in the current state is a catflap bug (:class:`IllegalTransition`). With
:attr:`RelayMachine.strict` (the relay tests turn it on) it raises. In production it is logged
at ERROR and the state stays where it was, because raising would be worse: events fire from
protocol callbacks and timers (``connection_lost``, the slow-peer timer), where an exception
skips the rest of the relay's bookkeeping and can leave the session's ``done`` future unset
forever, holding a connection slot and the bot's lease. Carrying on is the safer failure: the
relay resolves ``done`` when both legs have closed, which it reads from the legs, not from the
state, so the session still ends and is recorded. What a missed row can still get wrong is a
decision read from the state (re-entering the lane, whether the session is ending); the
suite runs every in-process relay strict so that such a row is found in tests. The one
exception is :class:`SocketsLent`, raised in production too: the alternative is a corrupted
stream.
"""

from __future__ import annotations

import enum
import logging
from typing import ClassVar, NamedTuple, NoReturn

from catflap.contract.errors import CatflapMisuse
from catflap.logs import session_log

__all__ = [
    "ROWS",
    "SOCKETS_LENT",
    "TRANSITIONS",
    "IllegalTransition",
    "RelayEvent",
    "RelayMachine",
    "RelayState",
    "Row",
    "SocketsLent",
    "render_markdown",
]

log = logging.getLogger("catflap.gateway")


class RelayState(enum.Enum):
    """Where a relayed session is in its life."""

    #: Built; the transports still belong to the upgrade code.
    NEW = "new"
    #: Bytes move on the event loop, and nothing is ending.
    RELAYING = "relaying"
    #: Both sockets are lent to the fast lane's thread, which moves the bytes.
    IN_LANE = "in lane"
    #: Still in the lane; the gateway asked for the session back and waits to act on it.
    RECALLING = "recalling"
    #: A peer's close frame went by: the closing handshake runs on the event loop.
    CLOSING = "closing"
    #: One side's connection ended; the other gets up to ``close_wait`` to end too.
    HALF_CLOSED = "half closed"
    #: catflap ends the session: its close frames (or aborts) are on their way to both sides.
    ENDING = "ending"
    #: Both connections are closed and ``done`` holds the session's RelayStats.
    DONE = "done"


class RelayEvent(enum.Enum):
    """What can happen to a relay (per-frame work is not an event: see the module docstring)."""

    START = "start"
    LANE_ENTERED = "lane entered"
    LANE_REFUSED = "lane refused"
    RECALL = "recall"
    HANDED_BACK = "handed back"
    LANE_FAILED = "lane failed"
    CLOSE_FRAME = "close frame"
    PROTOCOL_ERROR = "protocol error"
    GATEWAY_CLOSE = "gateway close"
    SLOW_PEER = "slow peer"
    ABORT = "abort"
    CLIENT_LOST = "client lost"
    AGENT_LOST = "agent lost"
    LEG_CLOSED = "leg closed"
    LAST_LEG_LOST = "last leg lost"
    CLOSE_WAIT_EXPIRED = "close wait expired"


class Row(NamedTuple):
    """One transition: in ``state``, ``event`` leads to ``next``; ``what`` the relay does."""

    state: RelayState
    event: RelayEvent
    next: RelayState
    what: str


S = RelayState
E = RelayEvent

_ABORT = "drop both connections (second SIGTERM, cancellation)"
_HANDED_BACK = (
    "put the transports back, resume reading, write what the peer could not take and scan what "
    "the lane left unscanned"
)
_EXPECTED = "expected: catflap's closes are on their way"
_DONE = "resolve `done` with the RelayStats"

#: While Python owns the sockets and nothing is ending yet, catflap may end the session.
_CATFLAP_ENDS = (
    (
        E.PROTOCOL_ERROR,
        "a peer broke RFC 6455: relay the good bytes before the bad frame, none after; 1002 to "
        "the sender, 1001 (client broke it) or 1011 (agent broke it) to the other side",
    ),
    (E.GATEWAY_CLOSE, "close both sides with the gateway's code (1012: drain or stop)"),
    (
        E.SLOW_PEER,
        "a side kept its write buffer full for `slow_peer_timeout`: close both sides with 1013",
    ),
    (E.ABORT, _ABORT),
)
#: While both sides are connected, either may vanish.
_VANISHED = (
    (
        E.CLIENT_LOST,
        S.HALF_CLOSED,
        "the client vanished without a close frame: send 1001 to the agent",
    ),
    (E.AGENT_LOST, S.ENDING, "the agent vanished without a close frame: send 1011 to the client"),
)

_ROWS = (
    Row(S.NEW, E.START, S.RELAYING, "take over both transports, relay what was read before"),
    Row(S.NEW, E.ABORT, S.ENDING, _ABORT),
    Row(
        S.RELAYING,
        E.LANE_ENTERED,
        S.IN_LANE,
        "nothing is pending: pause reading and lend both sockets to the lane's thread",
    ),
    Row(
        S.RELAYING,
        E.LANE_REFUSED,
        S.RELAYING,
        "TLS, not a socket, or the lane refused it: relay on the event loop to the end",
    ),
    Row(S.RELAYING, E.CLOSE_FRAME, S.CLOSING, "relay it; the session never re-enters the lane"),
    Row(
        S.IN_LANE,
        E.RECALL,
        S.RECALLING,
        "the gateway needs the session (drain, stop, abort, slow peer): ask the lane for it; "
        "the action waits for the hand-back",
    ),
    Row(
        S.IN_LANE,
        E.HANDED_BACK,
        S.RELAYING,
        _HANDED_BACK + "; re-enter the lane later if nothing is ending",
    ),
    Row(
        S.IN_LANE,
        E.LANE_FAILED,
        S.ENDING,
        "an allocation failed in the lane: close both sides with 1011 (abort a side that got "
        "part of a chunk)",
    ),
    Row(S.RECALLING, E.RECALL, S.RECALLING, "queue this action too"),
    Row(S.RECALLING, E.HANDED_BACK, S.RELAYING, _HANDED_BACK + ", then run the queued actions"),
    Row(
        S.RECALLING,
        E.LANE_FAILED,
        S.ENDING,
        "as from the lane; of the queued actions only an abort still runs",
    ),
    Row(S.CLOSING, E.CLOSE_FRAME, S.CLOSING, "the other side answers: relay it"),
    Row(
        S.CLOSING,
        E.LEG_CLOSED,
        S.HALF_CLOSED,
        "a side ended after its close frame: wait for the other (the agent's: flush and close "
        "the client leg)",
    ),
    Row(S.HALF_CLOSED, E.CLOSE_FRAME, S.HALF_CLOSED, "relay it"),
    Row(
        S.HALF_CLOSED,
        E.CLOSE_WAIT_EXPIRED,
        S.ENDING,
        "the other side lingered `close_wait`: abort it",
    ),
    Row(S.HALF_CLOSED, E.LAST_LEG_LOST, S.DONE, _DONE),
    Row(S.ENDING, E.CLOSE_FRAME, S.ENDING, "a peer answers catflap's close: relay it"),
    Row(
        S.ENDING,
        E.PROTOCOL_ERROR,
        S.ENDING,
        "drop what the broken side still sends; abort it past LINGERING_CLOSE_MAX_BYTES",
    ),
    Row(S.ENDING, E.GATEWAY_CLOSE, S.ENDING, "its code replaces the earlier one; close both"),
    Row(S.ENDING, E.SLOW_PEER, S.ENDING, "1013 replaces the earlier code; close both"),
    Row(S.ENDING, E.ABORT, S.ENDING, _ABORT),
    *(
        Row(S.ENDING, event, S.ENDING, _EXPECTED)
        for event in (E.CLIENT_LOST, E.AGENT_LOST, E.LEG_CLOSED)
    ),
    Row(S.ENDING, E.CLOSE_WAIT_EXPIRED, S.ENDING, "a side lingered `close_wait`: abort it"),
    Row(S.ENDING, E.LAST_LEG_LOST, S.DONE, _DONE),
    Row(S.DONE, E.GATEWAY_CLOSE, S.DONE, "nothing: both sides are gone (a drain raced the end)"),
    Row(S.DONE, E.ABORT, S.DONE, "nothing: both sides are gone"),
    *(
        Row(state, event, S.ENDING, what)
        for state in (S.RELAYING, S.CLOSING, S.HALF_CLOSED)
        for event, what in _CATFLAP_ENDS
    ),
    *(
        Row(state, event, next_state, what)
        for state in (S.RELAYING, S.CLOSING)
        for event, next_state, what in _VANISHED
    ),
)

#: Every transition there is, state by state in the enum's order (the order the docs show).
ROWS: tuple[Row, ...] = tuple(sorted(_ROWS, key=lambda row: list(RelayState).index(row.state)))

del S, E, _ROWS

#: ``TRANSITIONS[state][event]`` is the state that follows; a missing key is an illegal event.
TRANSITIONS: dict[RelayState, dict[RelayEvent, RelayState]] = {state: {} for state in RelayState}
for _row in ROWS:
    assert _row.event not in TRANSITIONS[_row.state], f"two rows for {_row[:2]}"
    TRANSITIONS[_row.state][_row.event] = _row.next
del _row

#: The states where the fast lane's thread owns both sockets: no Python I/O on them.
SOCKETS_LENT = frozenset({RelayState.IN_LANE, RelayState.RECALLING})


class IllegalTransition(CatflapMisuse):
    """An event happened in a state whose row does not allow it: a bug in catflap's relay."""

    def __init__(self, state: RelayState, event: RelayEvent, session_id: str | None) -> None:
        self.state = state
        self.event = event
        self.session_id = session_id
        super().__init__(state, event, session_id)

    def __str__(self) -> str:
        allowed = ", ".join(e.name for e in TRANSITIONS[self.state]) or "none"
        return (
            f"relay {self.session_id or '(no session id)'}: {self.event.name} is not allowed in "
            f"state {self.state.name} (allowed there: {allowed})"
        )


class SocketsLent(CatflapMisuse):
    """Python tried to act on a socket the fast lane's thread owns."""

    def __init__(self, side: str, method: str, state: RelayState) -> None:
        self.side = side
        self.method = method
        self.state = state
        super().__init__(side, method, state)

    def __str__(self) -> str:
        return (
            f"{self.method}() on the {self.side} leg's transport while its socket is lent to "
            f"the fast lane (relay state {self.state.name}): the lane's thread owns the socket "
            "until the relay's HANDED_BACK; defer the action with a RECALL (as close_both and "
            "abort do)"
        )


class RelayMachine:
    """One relay's current state, moved only through :data:`TRANSITIONS`."""

    __slots__ = ("log", "session_id", "state")

    #: Raise :class:`IllegalTransition` instead of logging it (the tests turn this on; see the
    #: module docstring for why production logs instead).
    strict: ClassVar[bool] = False

    def __init__(self, session_id: str | None = None) -> None:
        self.state = RelayState.NEW
        self.session_id = session_id
        #: The gateway's logger, bound to the session when its id is known.
        self.log: logging.Logger | logging.LoggerAdapter[logging.Logger] = (
            log if session_id is None else session_log(log, session_id)
        )

    def fire(self, event: RelayEvent, detail: str = "") -> RelayState:
        """Move along ``event``'s row; returns the new state.

        Args:
            event: what happened.
            detail: said in the DEBUG line (why the lane handed the session back, ...).

        Raises:
            IllegalTransition: no row for ``event`` in the current state, with :attr:`strict`
                (otherwise it is logged and the state stays).
        """
        state = self.state
        target = TRANSITIONS[state].get(event)
        if target is None:
            error = IllegalTransition(state, event, self.session_id)
            if self.strict:
                raise error
            self.log.error("! %s; the state stays %s", error, state.name)
            return state
        if target is not state:
            self.state = target
            self.log.debug(
                "= relay %s --%s%s--> %s",
                state.name,
                event.name,
                f" ({detail})" if detail else "",
                target.name,
            )
        return target

    @property
    def sockets_lent(self) -> bool:
        """True while the fast lane's thread owns both sockets."""
        return self.state in SOCKETS_LENT

    def refuse_socket_io(self, side: str, method: str) -> NoReturn:
        """Refuse ``method`` on ``side``'s transport: a transport stood in for while lent.

        Raises:
            SocketsLent: always (in production too: the alternative is a corrupted stream).
        """
        raise SocketsLent(side, method, self.state)


def render_markdown() -> str:
    """The transition table as a Markdown table, from :data:`ROWS` (for docs/architecture.md)."""
    lines = [
        "| state | event | next state | what happens |",
        "|---|---|---|---|",
    ]
    for row in ROWS:
        lines.append(
            f"| `{row.state.name}` | `{row.event.name}` | `{row.next.name}` | {row.what} |"
        )
    lent = ", ".join(f"`{state.name}`" for state in RelayState if state in SOCKETS_LENT)
    lines += [
        "",
        f"In {lent} the fast lane's thread owns both sockets: a write, close, pause or resume "
        "from Python is refused (`SocketsLent`). Any event not listed for a state is a catflap "
        "bug (`IllegalTransition`).",
    ]
    return "\n".join(lines) + "\n"
