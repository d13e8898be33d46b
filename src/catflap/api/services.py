"""The agents ("services") API as Pipecat Cloud's CLI reads it, with a private key.

::

    GET /v1/organizations                      {"organizations": [{"name", "verboseName"}]}
    GET /v1/organizations/{org}/services       {"services": [agent, ...]}
    GET /v1/organizations/{org}/services/{agent}
        {"body": {"name", "ready", "activeSessionCount", "autoScaling", "websocketAuth",
                  "maxSessionDuration", "deployment": {"manifest": {"spec": ...}}, ...}}

``pipecat cloud agent list`` and ``agent status`` print these; ``agent start`` asks for an
agent's ``body.ready`` before it calls ``/start``. ``ready`` is true when the pool would place a
session now: a ready instance has a free slot, or a new instance may start (below
``max_agents`` and not backing off after failed starts; then ``errors`` carries the failure).
In cluster mode, where instances live on agent hosts, it is true while the agent is not at
capacity. Agents are what ``catflap.toml`` configures: there are no deployments, so
``activeDeploymentId`` is null and ``createdAt``/``updatedAt`` are when this gateway built its
control API (on its first API request). Checks run in the sessions API's order: key (401),
organization and agent (404).
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations at run
# time, and they name dependencies local to ``services_router``.

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends

from catflap.api.auth import (
    OrganizationDependency,
    ParamCheckedRoute,
    error_responses,
    organization_in_path,
)
from catflap.api.sessions import iso_time
from catflap.contract.errors import AgentNotFound, AgentNotReady

if TYPE_CHECKING:
    from catflap.config import AgentSpec
    from catflap.directory import AgentDirectory
    from catflap.pool.interface import AgentReadiness, SessionPool
    from catflap.sessions.recent import RecentRecords

__all__ = ["SELF_HOSTED_REGION", "services_router"]

#: The ``region`` of every agent: a catflap gateway is one place, the operator's.
SELF_HOSTED_REGION = "self-hosted"


def services_router(
    *,
    organization: OrganizationDependency,
    agents: "AgentDirectory",
    sessions: "RecentRecords",
    pool: "SessionPool",
    readiness: "Callable[[str], Awaitable[AgentReadiness]] | None",
    loaded_at: float,
) -> APIRouter:
    """The agents API, as a router for :func:`catflap.api.app.create_api`.

    Args:
        organization: the private-key dependency (:func:`catflap.api.auth.private_key_org`).
        sessions: the live sessions, counted per agent (``activeSessionCount``).
        readiness: the local pool's readiness; None: from ``pool.at_capacity`` alone.
        loaded_at: when the API was built (Unix seconds): the agents' timestamps.
    """
    router = APIRouter(tags=["agents"], route_class=ParamCheckedRoute)
    in_path = organization_in_path(organization)
    errors = error_responses(401, 404)
    loaded = iso_time(loaded_at)

    def summary(spec: "AgentSpec") -> dict[str, Any]:
        return {
            "name": str(spec.service_host.agent),
            "id": spec.key,
            "region": SELF_HOSTED_REGION,
            "activeDeploymentId": None,
            "createdAt": loaded,
            "updatedAt": loaded,
        }

    def of(org: str) -> list["AgentSpec"]:
        return [spec for spec in agents if spec.service_host.org == org]

    @router.get("/v1/organizations", responses=errors, summary="The key's organization")
    async def organizations(owner: Annotated[str, Depends(organization)]) -> dict[str, Any]:
        """The one organization the private key belongs to (the CLI's default organization
        when ``PIPECAT_ORG`` is not set).

        Raises:
            Unauthorized: 401, no private key.
        """
        return {"organizations": [{"name": owner, "verboseName": owner}]}

    @router.get("/v1/organizations/{org}/services", responses=errors, summary="List agents")
    async def list_agents(owner: Annotated[str, Depends(in_path)]) -> dict[str, Any]:
        """Every agent of the organization, as ``catflap.toml`` configures them.

        Raises:
            Unauthorized: 401, no private key.
            AgentNotFound: 404, the key belongs to another organization.
        """
        return {"services": [summary(spec) for spec in of(owner)]}

    @router.get(
        "/v1/organizations/{org}/services/{agent}", responses=errors, summary="An agent's status"
    )
    async def agent_status(agent: str, owner: Annotated[str, Depends(in_path)]) -> dict[str, Any]:
        """One agent's settings and whether it would take a session now (``body.ready``).

        Raises:
            Unauthorized: 401, no private key.
            AgentNotFound: 404, no such agent in the key's organization.
        """
        spec = agents.agent(owner, agent)
        if spec is None:
            raise AgentNotFound(f"no agent {agent!r} in organization {owner!r}")
        config = spec.config
        errors_now: list[dict[str, str]] = []
        instances: dict[str, int] | None = None
        if readiness is not None:
            state = await readiness(spec.key)
            ready = state.ready
            instances = state.instances
            if state.problem is not None:
                errors_now.append({"code": AgentNotReady.code, "message": state.problem})
        else:
            ready = not await pool.at_capacity(spec.key)
        active = sum(
            1
            for record in list(sessions.live.values())
            if (record.organization, record.agent) == (owner, agent)
        )
        body = summary(spec) | {
            "ready": ready,
            "activeSessionCount": active,
            "autoScaling": {
                "minReplicas": config.scaling.min_agents,
                "maxReplicas": config.scaling.max_agents,
            },
            "websocketAuth": config.websocket_auth,
            "maxSessionDuration": config.max_session_duration,
            "deployment": {
                "manifest": {
                    "spec": {
                        "maxSessionDurationSeconds": config.max_session_duration,
                        "websocketAuth": config.websocket_auth,
                    }
                }
            },
            "agentProfile": None,
            "krispViva": None,
            "errors": errors_now,
        }
        if instances is not None:
            body["instances"] = instances
            body["currentRevision"] = {
                "phase": "Ready" if ready else "NotReady",
                "readyReplicas": instances.get("idle", 0) + instances.get("busy", 0),
                "deploymentID": "",
            }
        return {"body": body}

    return router
