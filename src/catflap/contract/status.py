"""How a session ended: one source for the status literals of the runtime, pool and record.

Each layer adds what only it can see: the runtime knows how ``bot()`` ended, the pool also
knows when the process died under it, and the record also knows what the relay saw.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["BotStatus", "CompletionStatus", "EndStatus"]

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
    ]
)
