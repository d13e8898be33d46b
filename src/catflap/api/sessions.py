"""The sessions API: list, show and stop an agent's sessions with a private key.

::

    GET    /v1/agents/{agent}/sessions                 {"total_count": n, "sessions": [...]}
    GET    /v1/agents/{agent}/sessions/{session_id}    one session record
    DELETE /v1/agents/{agent}/sessions/{session_id}    once bot() ended: 200
        {"status": "terminated", "session_id": id, "completionStatus": ..., "endState": ...}
        or, with bot() still running after STOP_WAIT_S: 202 {"status": "stopping", "session_id": id}

The same three routes, one implementation, also answer under
``/v1/organizations/{org}/services/{agent}``: the paths the ``pipecat cloud`` CLI calls. There
the path's organization must be the key's, and ``createdAt``/``endedAt`` are ISO 8601 UTC
strings (``2026-12-02T08:15:57.123Z``), which the CLI parses; catflap's own paths keep Unix
seconds. Both list filters take PCC's ``startType`` (cold, warm) and ``endState``.

Every call needs ``Authorization: Bearer sk_...``: the private key picks the organization, as a
public key does for ``/start``. Checks run in this order: key (401), query and session id
format (400), agent in the key's organization (404), session (404).

Records come from the session store, which the gateway writes when a session starts and again
when it ends; a record this gateway still holds in memory is fresher and replaces the stored
copy.

A stop answers once ``bot()`` has ended: the runtime cancels it, the client gets close 1000
"session stopped", the gateway relaying the session finishes its record (``completionStatus``
``stopped``), and the stop, which polls that record (from memory when this gateway relays the
session, else from the shared store, so it works whichever gateway relays it), answers 200
with the final status. ``bot()`` still running after :data:`~catflap.contract.limits.STOP_WAIT_S`
(a bot swallowing cancellation, which its runtime kills after ``BOT_CANCEL_GRACE_S``): 202
``{"status": "stopping"}``, and the record ends later.
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations at run
# time, and they name dependencies local to ``sessions_router``.

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from catflap.api.auth import (
    OrganizationDependency,
    ParamCheckedRoute,
    canonical_session_id,
    error_responses,
    organization_in_path,
)
from catflap.contract import limits
from catflap.contract.errors import AgentNotFound, BadRequest, InternalError, NotFound
from catflap.contract.resources import ResourceMetrics
from catflap.contract.status import CompletionStatus, EndState
from catflap.logs import session_log
from catflap.sessions.query import SessionQuery, StartTypeFilter, StatusFilter
from catflap.sessions.record import SessionRecord

if TYPE_CHECKING:
    from catflap.config import AgentSpec
    from catflap.directory import AgentDirectory
    from catflap.pool.interface import SessionPool
    from catflap.sessions.recent import RecentRecords
    from catflap.sessions.store import SessionStore

__all__ = [
    "AGENT_PREFIX",
    "LIST_LIMIT_DEFAULT",
    "LIST_LIMIT_MAX",
    "ORG_PREFIX",
    "PccSessionList",
    "PccSessionModel",
    "SessionList",
    "SessionModel",
    "SessionNotFound",
    "SessionRecords",
    "StopResponse",
    "StoppingResponse",
    "iso_time",
    "pcc_session",
    "sessions_router",
]

log = logging.getLogger("catflap.api")

#: Page size of ``GET .../sessions`` when ``limit`` is not given (PCC's default).
LIST_LIMIT_DEFAULT = 10
#: Largest page: bounds the rows one request reads and the size of its answer.
LIST_LIMIT_MAX = 1000
#: catflap's session paths (PCC's documented REST paths): times in Unix seconds.
AGENT_PREFIX = "/v1/agents/{agent}"
#: The same sessions where Pipecat Cloud's CLI and SDK look for them: times in ISO 8601.
ORG_PREFIX = "/v1/organizations/{org}/services/{agent}"

_T = TypeVar("_T")


class SessionNotFound(NotFound):
    """404: no such session for this agent (PCC's code ``"404"``, like :class:`AgentNotFound`)."""

    code = "404"


class SessionModel(BaseModel):
    """One session record (``SessionRecord.to_api()``); times are Unix seconds."""

    sessionId: str  # noqa: N815 - PCC's wire names are camelCase
    agent: str
    organization: str
    createdAt: float = Field(description="when the client's upgrade was accepted")  # noqa: N815
    transport: str = Field(
        default="websocket", description="websocket, or the telephony provider's name"
    )
    coldStart: bool = Field(  # noqa: N815
        default=False, description="a new agent instance was started for this session"
    )
    botStartSeconds: float | None = Field(  # noqa: N815
        default=None, description="from the upgrade request to the agent's 101"
    )
    endedAt: float | None = Field(default=None, description="null while the session is active")  # noqa: N815
    completionStatus: CompletionStatus | None = Field(  # noqa: N815
        default=None, description="how the session ended; null while it is active"
    )
    error: str | None = Field(default=None, description="bot_error: exception class and message")
    clientCloseCode: int | None = None  # noqa: N815
    agentCloseCode: int | None = None  # noqa: N815
    gatewayCloseCode: int | None = None  # noqa: N815
    bytesClientToAgent: int = 0  # noqa: N815
    bytesAgentToClient: int = 0  # noqa: N815
    framesClientToAgent: int = 0  # noqa: N815
    framesAgentToClient: int = 0  # noqa: N815
    endState: EndState = Field(  # noqa: N815
        default="active",
        description="PCC's endState: completionStatus mapped by the one table of "
        "docs/operations.md (active while the session runs)",
    )
    resourceMetrics: ResourceMetrics | None = Field(  # noqa: N815
        default=None,
        description="CPU millicores and resident memory bytes of the instance's process while "
        "the session ran: p50/p90/p95/p99, sampleCount, timeseries [{t, c, m}]",
    )


class PccSessionModel(SessionModel):
    """One session record as Pipecat Cloud's CLI reads it: times are ISO 8601 UTC strings."""

    # The fields' types change (Unix seconds -> ISO 8601 text): pydantic allows it, mypy not.
    createdAt: str = Field(description="when the session was accepted, ISO 8601 UTC")  # type: ignore[assignment]  # noqa: N815, E501
    endedAt: str | None = Field(default=None, description="null while the session is active")  # type: ignore[assignment]  # noqa: N815, E501


class SessionList(BaseModel):
    """One page of an agent's sessions, newest first."""

    total_count: int = Field(description="sessions matching the filters, on every page")
    sessions: list[SessionModel]


class PccSessionList(BaseModel):
    """One page of an agent's sessions, newest first, with ISO 8601 times."""

    total_count: int = Field(description="sessions matching the filters, on every page")
    sessions: list[PccSessionModel]


class StopResponse(BaseModel):
    """200 to ``DELETE /v1/agents/{agent}/sessions/{session_id}``: ``bot()`` has ended. PCC's
    ``StopResponse`` (``status``, ``session_id``) plus how the final record says it ended."""

    status: Literal["terminated"]
    session_id: str
    completionStatus: CompletionStatus = Field(  # noqa: N815 - the record's wire names
        description="the final record's: stopped, or how the session ended first (a session "
        "that ended on its own meanwhile; a bot killed for ignoring cancellation)"
    )
    endState: EndState = Field(description="PCC's endState of completionStatus")  # noqa: N815


class StoppingResponse(BaseModel):
    """202 to ``DELETE``: the runtime has the order, ``bot()`` still ran after ``STOP_WAIT_S``."""

    status: Literal["stopping"]
    session_id: str


def iso_time(seconds: float) -> str:
    """Unix seconds as ISO 8601 UTC with milliseconds and a ``Z``, the form the ``pipecat
    cloud`` CLI parses (``%Y-%m-%dT%H:%M:%S.%fZ``)."""
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def pcc_session(record: SessionRecord) -> dict[str, Any]:
    """The record as the org-scoped paths answer it: :meth:`SessionRecord.to_api` with ISO
    8601 times."""
    fields = record.to_api()
    for name in ("createdAt", "endedAt"):
        if fields[name] is not None:
            fields[name] = iso_time(fields[name])
    return fields


@dataclass(frozen=True, slots=True)
class ListFilters:
    """The query of ``GET .../sessions``, checked (see :func:`_list_filters`)."""

    status: StatusFilter
    limit: int
    offset: int
    start_time: float | None
    end_time: float | None
    start_type: StartTypeFilter
    end_state: EndState | None


def _list_filters(
    status: Annotated[
        StatusFilter, Query(description="active: not ended yet; ended: has an endedAt")
    ] = "all",
    limit: Annotated[int, Query(ge=1, le=LIST_LIMIT_MAX)] = LIST_LIMIT_DEFAULT,
    offset: Annotated[
        int, Query(ge=0, le=limits.API_OFFSET_MAX, description="skip this many sessions first")
    ] = 0,
    start_time: Annotated[
        float | None,
        Query(
            alias="startTime",
            ge=0,
            allow_inf_nan=False,
            description="only sessions created at or after this Unix time (seconds)",
        ),
    ] = None,
    end_time: Annotated[
        float | None,
        Query(
            alias="endTime",
            ge=0,
            allow_inf_nan=False,
            description="only sessions created at or before this Unix time (seconds)",
        ),
    ] = None,
    start_type: Annotated[
        StartTypeFilter,
        Query(alias="startType", description="cold: waited for a new instance; warm: did not"),
    ] = "all",
    end_state: Annotated[
        EndState | None,
        Query(alias="endState", description="PCC's endState (docs/operations.md's table)"),
    ] = None,
) -> ListFilters:
    """The list filters, one dependency for both path sets.

    Raises:
        BadRequest: 400, startTime is after endTime (a bad value: 400 naming it).
    """
    if start_time is not None and end_time is not None and start_time > end_time:
        raise BadRequest(f"startTime ({start_time:g}) is after endTime ({end_time:g})")
    return ListFilters(status, limit, offset, start_time, end_time, start_type, end_state)


async def _from_store(call: Callable[[], Awaitable[_T]]) -> _T:
    try:
        return await call()
    except Exception:
        log.exception("! the session store failed")
        raise InternalError("could not read the session records; see the gateway log") from None


class SessionRecords:
    """The agents and session records that the private-key APIs look up, read only.

    A record this gateway still holds in memory is fresher than the store's copy and replaces
    it. Every method that reads the store raises :class:`InternalError` (500) when it fails;
    the cause is logged.
    """

    def __init__(
        self, agents: "AgentDirectory", sessions: "RecentRecords", store: "SessionStore"
    ) -> None:
        self._agents = agents
        self._sessions = sessions
        self._store = store

    def check_agent(self, org: str, agent: str) -> "AgentSpec":
        """``org``'s agent named ``agent``.

        Raises:
            AgentNotFound: 404, it has none.
        """
        spec = self._agents.agent(org, agent)
        if spec is None:
            raise AgentNotFound(f"no agent {agent!r} in organization {org!r}")
        return spec

    async def of_agent(self, org: str, agent: str, session_id: str) -> SessionRecord | None:
        """The session's freshest record, if it is one of this agent's."""
        record = self._sessions.get(session_id)
        if record is None:
            record = await _from_store(lambda: self._store.get(session_id))
        if record is None or (record.organization, record.agent) != (org, agent):
            return None
        return record

    async def until_ended(
        self, org: str, agent: str, session_id: str, *, within: float
    ) -> SessionRecord | None:
        """The session's record once it is finished; None if it is still active (or gone)
        after ``within`` seconds.

        Polls every :data:`~catflap.contract.limits.STOP_POLL_INTERVAL_S`: this gateway's
        memory first, else the store every gateway shares, so it sees the end whichever gateway
        relays the session. A read that fails only costs its turn (it is logged).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            try:
                record = await self.of_agent(org, agent, session_id)
            except InternalError:
                record = None
            if record is not None and record.ended_at is not None:
                return record
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            await asyncio.sleep(min(limits.STOP_POLL_INTERVAL_S, remaining))

    async def page(self, query: SessionQuery) -> tuple[int, list[SessionRecord]]:
        """The records matching ``query`` (and how many match in all), freshest copies."""
        total, records = await _from_store(lambda: self._store.query(query))
        return total, [self._sessions.get(record.session_id) or record for record in records]


def sessions_router(
    *, organization: OrganizationDependency, records: SessionRecords, pool: "SessionPool"
) -> APIRouter:
    """The sessions API, as a router for :func:`catflap.api.app.create_api`: the same routes
    under :data:`AGENT_PREFIX` and :data:`ORG_PREFIX`.

    Args:
        organization: the private-key dependency (:func:`catflap.api.auth.private_key_org`).
        pool: stops a live session wherever it runs.
    """
    router = APIRouter(tags=["sessions"], route_class=ParamCheckedRoute)
    _add_routes(router, AGENT_PREFIX, organization, records, pool, pcc=False)
    _add_routes(router, ORG_PREFIX, organization_in_path(organization), records, pool, pcc=True)
    return router


def _add_routes(
    router: APIRouter,
    prefix: str,
    organization: OrganizationDependency,
    records: SessionRecords,
    pool: "SessionPool",
    *,
    pcc: bool,
) -> None:
    """List, show and stop under ``prefix``; ``pcc``: Pipecat Cloud's times (ISO 8601)."""
    errors = error_responses(400, 401, 404, 500)
    render: Callable[[SessionRecord], dict[str, Any]] = pcc_session if pcc else SessionRecord.to_api
    one_model = PccSessionModel if pcc else SessionModel
    list_model = PccSessionList if pcc else SessionList
    # Distinct operation ids: FastAPI derives them from the function name and the path.
    suffix = " (Pipecat Cloud CLI path)" if pcc else ""

    async def find(org: str, agent: str, session_id: str) -> SessionRecord:
        record = await records.of_agent(org, agent, session_id)
        if record is None:
            raise SessionNotFound(f"no session {session_id} for agent {agent!r}")
        return record

    @router.get(
        f"{prefix}/sessions",
        response_model=list_model,
        responses=errors,
        summary="List an agent's sessions" + suffix,
    )
    async def list_sessions(
        agent: str,
        owner: Annotated[str, Depends(organization)],
        filters: Annotated[ListFilters, Depends(_list_filters)],
    ) -> dict[str, Any]:
        """An agent's sessions, newest first, with the total number that match.

        Raises:
            BadRequest: 400, a query parameter is invalid, or startTime is after endTime.
            Unauthorized: 401, no private key.
            AgentNotFound: 404, the agent is not in the key's organization.
            InternalError: 500, the session store failed.
        """
        records.check_agent(owner, agent)
        query = SessionQuery(
            org=owner,
            agent=agent,
            status=filters.status,
            limit=filters.limit,
            offset=filters.offset,
            start_time=filters.start_time,
            end_time=filters.end_time,
            start_type=filters.start_type,
            end_state=filters.end_state,
        )
        total, page = await records.page(query)
        return {"total_count": total, "sessions": [render(record) for record in page]}

    @router.get(
        f"{prefix}/sessions/{{session_id}}",
        response_model=one_model,
        responses=errors,
        summary="Show one session" + suffix,
    )
    async def show_session(
        agent: str, session_id: str, owner: Annotated[str, Depends(organization)]
    ) -> dict[str, Any]:
        """One session's record, active or ended.

        Raises:
            BadRequest: 400, the session id is not a UUID.
            Unauthorized: 401, no private key.
            AgentNotFound: 404, the agent is not in the key's organization.
            SessionNotFound: 404, the agent has no such session.
            InternalError: 500, the session store failed.
        """
        sid = canonical_session_id(session_id)
        records.check_agent(owner, agent)
        return render(await find(owner, agent, sid))

    @router.delete(
        f"{prefix}/sessions/{{session_id}}",
        response_model=StopResponse,
        responses={
            202: {
                "model": StoppingResponse,
                "description": f"bot() still runs {limits.STOP_WAIT_S:g} s after the stop",
            },
            **errors,
        },
        summary="Stop a live session" + suffix,
    )
    async def stop_session(
        agent: str, session_id: str, owner: Annotated[str, Depends(organization)]
    ) -> Any:
        """Stop a live session: ``bot()`` is cancelled and the client gets close 1000.

        The answer comes once ``bot()`` has ended and the session's record is final (200,
        with its ``completionStatus``: ``stopped``), or after ``STOP_WAIT_S`` with ``bot()``
        still running (202 ``stopping``; its runtime kills a bot that ignores cancellation
        after ``BOT_CANCEL_GRACE_S``, and the record ends then).

        Raises:
            BadRequest: 400, the session id is not a UUID.
            Unauthorized: 401, no private key.
            AgentNotFound: 404, the agent is not in the key's organization.
            SessionNotFound: 404, no such session, or it has ended.
            InternalError: 500, the session store failed.
        """
        sid = canonical_session_id(session_id)
        spec = records.check_agent(owner, agent)
        record = await find(owner, agent, sid)
        if record.ended_at is not None:
            raise SessionNotFound(
                f"session {sid} has already ended ({record.completion_status}); "
                "only live sessions can be stopped"
            )
        # The pool reaches the session wherever it runs: this machine, or (cluster mode) the
        # agent host that holds it, through Redis. A record with no slot behind it anywhere
        # (its gateway died before finishing it) has nothing to stop, nor to wait for.
        if await pool.locate(spec.key, sid) is None or not await pool.stop_session(sid):
            raise SessionNotFound(
                f"session {sid} is not running (it has ended, or no gateway of this "
                "deployment serves it); only live sessions can be stopped"
            )
        slog = session_log(log, sid, agent=agent, org=owner)
        slog.info("x stop requested through the API")
        final = await records.until_ended(owner, agent, sid, within=limits.STOP_WAIT_S)
        if final is None:
            slog.warning(
                "! bot() still runs %g s after the stop; answering 202 stopping",
                limits.STOP_WAIT_S,
            )
            return JSONResponse({"status": "stopping", "session_id": sid}, status_code=202)
        return {
            "status": "terminated",
            "session_id": sid,
            "completionStatus": final.completion_status,
            "endState": final.end_state,
        }
