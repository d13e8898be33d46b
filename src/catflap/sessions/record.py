"""One session's record and the rule that names how it ended.

Completion statuses (documented in docs/operations.md):

=======================  ==============================================================
``completed``            ``bot()`` returned on its own
``client_closed``        the client closed (or vanished) first, then ``bot()`` returned
``bot_error``            ``bot()`` raised; ``error`` holds the exception class and message
``agent_crashed``        the agent process died during the session
``stopped``              an operator stopped the session
``time_limit``           ``max_session_duration`` ran out and ``bot()`` was cancelled
``agent_start_timeout``  a WebRTC session's client sent no offer in time; ``bot()`` never ran
``drained``              the gateway shut down and its drain deadline passed
``error``                the gateway's relay failed and sent 1011 both ways
``gateway_lost``         cluster mode: the relaying gateway died; another one finished the record
=======================  ==============================================================

Each status has one PCC ``endState`` (``contract.status.END_STATES``), which
:meth:`SessionRecord.to_api` adds; ``resourceMetrics`` is what the runtime sampled of its
process while ``bot()`` ran.

``error`` is cut to :data:`~catflap.contract.limits.RECORD_ERROR_MAX_CHARS` characters, marker
included, whenever it is set (:func:`cut_error`): a bot raising with a 500 KB message would
otherwise be stored whole and sent with every sessions API answer and dashboard poll. The cut
happens on the record itself, so every store (SQLite, PostgreSQL, Redis) and every reader gets
the same text, and records stored whole before this rule are cut when read back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from catflap.contract.errors import cut_error
from catflap.contract.resources import ResourceMetrics
from catflap.contract.status import CompletionStatus, EndState, end_state
from catflap.pool.instance import SessionEnd

__all__ = ["RelayStats", "SessionRecord", "completion_status"]


@dataclass(frozen=True, slots=True)
class RelayStats:
    """What passed through one session, for its record."""

    bytes_client_to_agent: int
    bytes_agent_to_client: int
    frames_client_to_agent: int
    frames_agent_to_client: int
    #: The close code each peer sent (None: it sent none; 1005: a close without a code).
    client_close_code: int | None
    agent_close_code: int | None
    #: The code the gateway itself sent to the client, if it had to.
    gateway_close_code: int | None
    #: True when the client's side ended first (close frame or vanished).
    client_initiated: bool
    #: True when the agent's connection dropped with no close frame.
    agent_vanished: bool
    #: True when the relay itself failed (the fast lane ran out of memory) and ended the
    #: session with 1011: the record's status is then ``error``.
    relay_failed: bool = False


def completion_status(end: SessionEnd, stats: RelayStats, *, drained: bool) -> CompletionStatus:
    """Combine the runtime's report and what the relay saw into one status."""
    if stats.relay_failed:
        return "error"
    if drained:
        return "drained"
    if end.status == "completed":
        return "client_closed" if stats.client_initiated else "completed"
    return end.status


@dataclass(slots=True)
class SessionRecord:
    """A session as the sessions API returns it (camelCase on the wire, like PCC)."""

    session_id: str
    agent: str
    organization: str
    created_at: float
    #: ``websocket`` for the generic endpoint, else the telephony provider's name.
    transport: str = "websocket"
    cold_start: bool = False
    bot_start_seconds: float | None = None
    ended_at: float | None = None
    completion_status: CompletionStatus | None = None
    error: str | None = None
    client_close_code: int | None = None
    agent_close_code: int | None = None
    gateway_close_code: int | None = None
    bytes_client_to_agent: int = 0
    bytes_agent_to_client: int = 0
    frames_client_to_agent: int = 0
    frames_agent_to_client: int = 0
    #: CPU and memory of the instance's process while the session ran, as PCC names them
    #: (:mod:`catflap.contract.resources`); None while active, or when none was reported.
    resource_metrics: ResourceMetrics | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        # Every write of ``error`` passes here: the dataclass __init__ (records built by the
        # gateway or read back from any store), finish(), and any later assignment.
        if name == "error" and isinstance(value, str):
            value = cut_error(value)
        object.__setattr__(self, name, value)

    def finish(self, end: SessionEnd, stats: RelayStats, *, drained: bool, now: float) -> None:
        self.ended_at = now
        self.completion_status = completion_status(end, stats, drained=drained)
        self.error = end.error
        if stats.relay_failed and self.error is None:
            self.error = "the gateway's relay failed (see its log); both sides got 1011"
        self.client_close_code = stats.client_close_code
        self.agent_close_code = stats.agent_close_code
        self.gateway_close_code = stats.gateway_close_code
        self.bytes_client_to_agent = stats.bytes_client_to_agent
        self.bytes_agent_to_client = stats.bytes_agent_to_client
        self.frames_client_to_agent = stats.frames_client_to_agent
        self.frames_agent_to_client = stats.frames_agent_to_client
        self.resource_metrics = end.resources

    @property
    def end_state(self) -> EndState:
        """PCC's ``endState`` (``contract.status.END_STATES``)."""
        return end_state(self.completion_status)

    def to_api(self) -> dict[str, Any]:
        """The record's fields in camelCase (PCC's names), with PCC's derived ``endState``."""

        def camel(name: str) -> str:
            head, *rest = name.split("_")
            return head + "".join(part.title() for part in rest)

        fields = {camel(key): value for key, value in asdict(self).items()}
        fields["endState"] = self.end_state
        return fields
