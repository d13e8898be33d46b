"""The logs API: a session's log lines, with a private key.

::

    GET /v1/agents/{agent}/logs?sessionId=&limit=&offset=&order=asc|desc
        {"total": {"value": n, "relation": "eq"},
         "logs": [{"log": line, "timestamp": iso, "sessionId": id, "level": .., "stream": ..}]}

The same route answers at ``/v1/organizations/{org}/services/{agent}/logs``, where the
``pipecat cloud agent logs`` CLI asks (with ``limit``, ``sessionId`` and ``deploymentId``, which
catflap ignores: it has no deployments); the path's organization must be the key's.

Lines come from the session log files the agent runtimes write
(:mod:`catflap.runtime.botlogs`): the bot's own ``logging``, ``loguru`` and ``print`` output,
and the runtime's lines about the session. A :class:`~catflap.logstore.LogSource` reads them:
the files themselves (``catflap serve``), or in cluster mode the copies agent hosts ship to
Redis (:mod:`catflap.cluster.logship`). Without ``sessionId`` the answer merges the agent's
most recent sessions by timestamp.
Checks run in the sessions API's order: key (401), query and session id format (400), agent in
the key's organization (404), session (404).
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations at run
# time, and they name dependencies local to ``logs_router``.

import logging
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field

from catflap.api.auth import (
    OrganizationDependency,
    ParamCheckedRoute,
    canonical_session_id,
    error_responses,
    organization_in_path,
)
from catflap.api.sessions import AGENT_PREFIX, ORG_PREFIX, SessionNotFound, SessionRecords
from catflap.contract import limits
from catflap.contract.errors import InternalError
from catflap.logstore import LogPage, LogSource

__all__ = ["LogLine", "LogsAnswer", "LogsTotal", "logs_router"]

log = logging.getLogger("catflap.api")


class LogsTotal(BaseModel):
    value: int = Field(description="lines that match, on every page")
    relation: Literal["eq"] = "eq"


class LogLine(BaseModel):
    log: str = Field(description="the line as the bot (or the runtime) wrote it")
    timestamp: str | None = Field(description="UTC, ISO 8601 with milliseconds")
    sessionId: str  # noqa: N815 - PCC's wire names are camelCase
    level: str | None = None
    stream: str | None = Field(default=None, description="stdout, stderr, logging or loguru")


class LogsAnswer(BaseModel):
    """One page of log lines (Pipecat Cloud's shape, with ``sessionId`` on each line)."""

    total: LogsTotal
    logs: list[LogLine]


def logs_router(
    *, organization: OrganizationDependency, records: SessionRecords, source: LogSource
) -> APIRouter:
    """The logs API, as a router for :func:`catflap.api.app.create_api`.

    Args:
        organization: the private-key dependency (:func:`catflap.api.auth.private_key_org`).
        records: where a session with no log file (yet) is known to exist.
        source: where the lines are read (files in ``CatflapConfig.log_dir``, or Redis).
    """
    router = APIRouter(tags=["logs"], route_class=ParamCheckedRoute)
    errors = error_responses(400, 401, 404, 500)

    routes = (
        (AGENT_PREFIX, organization, ""),
        (ORG_PREFIX, organization_in_path(organization), " (Pipecat Cloud CLI path)"),
    )
    for prefix, dependency, suffix in routes:

        @router.get(
            f"{prefix}/logs",
            response_model=LogsAnswer,
            responses=errors,
            summary="Read an agent's log lines" + suffix,
        )
        async def agent_logs(
            agent: str,
            org: Annotated[str, Depends(dependency)],
            session_id: Annotated[
                str | None,
                Query(
                    alias="sessionId",
                    description="one session's lines; without it, the agent's "
                    f"{limits.LOGS_RECENT_SESSIONS_MAX} most recent sessions, merged by time",
                ),
            ] = None,
            limit: Annotated[
                int, Query(ge=1, le=limits.LOGS_LIMIT_MAX)
            ] = limits.LOGS_LIMIT_DEFAULT,
            offset: Annotated[
                int, Query(ge=0, le=limits.API_OFFSET_MAX, description="skip this many lines first")
            ] = 0,
            order: Annotated[
                Literal["asc", "desc"], Query(description="asc: oldest first; desc: newest first")
            ] = "desc",
        ) -> dict[str, Any]:
            """Log lines of one session (or of the agent's recent sessions), with their total.

            Raises:
                BadRequest: 400, a query parameter is invalid or sessionId is not a UUID.
                Unauthorized: 401, no private key.
                AgentNotFound: 404, the agent is not in the key's organization.
                SessionNotFound: 404, the agent has no such session.
                InternalError: 500, the log files or the session store could not be read.
            """
            sid = canonical_session_id(session_id) if session_id is not None else None
            records.check_agent(org, agent)
            try:
                page: LogPage | None
                if sid is None:
                    page = await source.read_recent(
                        org, agent, limit=limit, offset=offset, order=order
                    )
                else:
                    page = await source.read_session(
                        org, agent, sid, limit=limit, offset=offset, order=order
                    )
                    if page is None and await records.of_agent(org, agent, sid) is None:
                        raise SessionNotFound(f"no session {sid} for agent {agent!r}")
                if page is None:
                    page = LogPage(0, [])  # no line written (yet), or pruned
            except OSError:
                log.exception("! could not read the session logs")
                raise InternalError(
                    "could not read the session logs; see the gateway log"
                ) from None
            return {
                "total": {"value": page.total, "relation": "eq"},
                "logs": [entry.to_api() for entry in page.entries],
            }

    return router
