"""How a session ended: one source for the status literals of the runtime, pool and record.

Each layer adds what only it can see: the runtime knows how ``bot()`` ended, the pool also
knows when the process died under it, and the record also knows what the relay saw.
"""

from __future__ import annotations

from typing import Literal

__all__ = [
    "ACTIVE_END_STATE",
    "END_STATES",
    "BotStatus",
    "CompletionStatus",
    "EndState",
    "EndStatus",
    "end_state",
    "statuses_ending_as",
]

#: The runtime's report: ``bot()`` returned, ``bot()`` raised, the session budget ran out, the
#: pool asked for a stop, or a WebRTC session's client sent no offer in time (``bot()`` never
#: ran; PCC's ``endState`` name).
BotStatus = Literal["completed", "bot_error", "time_limit", "stopped", "agent_start_timeout"]

#: As far as the pool knows: the runtime's report, or the agent process died mid-session.
EndStatus = BotStatus | Literal["agent_crashed"]

#: A session record's ``completionStatus``: the pool's end combined with the relay's view.
CompletionStatus = (
    EndStatus
    | Literal[
        "client_closed",  # the bot completed after the client closed first
        "drained",  # the gateway's drain deadline closed the session (1012)
        "error",  # the gateway's relay failed (RelayStats.relay_failed) and sent 1011 both ways
        # the gateway relaying the session died (its heartbeat lapsed); another gateway finished
        # the record (cluster mode, catflap.cluster.liveness)
        "gateway_lost",
    ]
)


#: Pipecat Cloud's ``endState`` of a session (PCC-1163; ``pipecatcloud`` 1.4's
#: ``_KNOWN_END_STATES``), which its CLI shows and filters on (``--end-state``).
EndState = Literal[
    "active",
    "completed",
    "ended_before_agent_start",
    "agent_start_timeout",
    "terminated",
    "agent_error",
    "unknown",
]

#: The ``endState`` of a record that has no ``completionStatus`` yet.
ACTIVE_END_STATE: EndState = "active"

#: THE mapping from catflap's completion statuses to PCC's ``endState`` (docs/operations.md
#: renders it; tests/test_docs.py checks the two agree). The rule: the bot finishing on its own
#: is ``completed``, whoever hung up first; a bot that raised or whose process died is
#: ``agent_error``; catflap ending the bot (an operator's stop, the time limit, the drain) is
#: ``terminated``; the gateway's own relay failure, or the gateway dying under the session
#: (nobody saw how it ended), is ``unknown``. catflap records a session only once the agent
#: runs ``bot()`` for it: a start that fails is refused at ``/start`` or at the upgrade (429,
#: 503) and leaves no record, so ``ended_before_agent_start`` is never stored
#: (filtering on it finds nothing); a WebRTC session whose client sent no offer in time is
#: ``agent_start_timeout``, PCC's own name for it.
END_STATES: dict[CompletionStatus, EndState] = {
    "completed": "completed",
    "client_closed": "completed",
    "bot_error": "agent_error",
    "agent_crashed": "agent_error",
    "stopped": "terminated",
    "time_limit": "terminated",
    "drained": "terminated",
    "agent_start_timeout": "agent_start_timeout",
    "error": "unknown",
    "gateway_lost": "unknown",
}


def end_state(status: CompletionStatus | None) -> EndState:
    """PCC's ``endState`` of a record whose ``completionStatus`` is ``status`` (None: active)."""
    return ACTIVE_END_STATE if status is None else END_STATES.get(status, "unknown")


def statuses_ending_as(state: str) -> list[CompletionStatus]:
    """The completion statuses whose ``endState`` is ``state``, in :data:`END_STATES` order
    (empty for ``active``, which is no completion status, and for a state catflap never
    records)."""
    return [status for status, mapped in END_STATES.items() if mapped == state]
