"""The live view: ``GET /dashboard`` (a page) and ``GET /v1/dashboard/state`` (private key).

Served only when the gateway runs with ``--dashboard`` (``[gateway] dashboard = true``). The
page itself holds no data; it asks for a private key and polls the state every second:

- ``agents``: the organization's agents, their pool instances by state (starting, idle, busy,
  draining; ``null`` when the pool is on other machines) and live session counts;
- ``live``: sessions relayed by this gateway now, with duration and bytes so far;
- ``ended``: the last 20 sessions that ended here, newest first, with their status.

Stopping goes through the sessions API, like ``catflap sessions stop``.
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations at run
# time, and they name dependencies local to ``dashboard_router``.

import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import HTMLResponse

from catflap.api.auth import OrganizationDependency
from catflap.api.dashboard_page import CONTENT_SECURITY_POLICY, PAGE
from catflap.sessions.record import SessionRecord

if TYPE_CHECKING:
    from catflap.config import AgentSpec
    from catflap.metrics import RelayTraffic
    from catflap.sessions.recent import RecentRecords

#: ``{(agent key, instance state): count}``, or None when the pool is on other machines.
PoolStates = Callable[[], dict[tuple[str, str], int] | None]

__all__ = ["RECENT_ENDINGS", "PoolStates", "dashboard_router", "dashboard_state"]

#: Ended sessions the live view lists.
RECENT_ENDINGS = 20
_INSTANCE_STATES = ("starting", "idle", "busy", "draining")
_PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _traffic(record: SessionRecord, live: dict[str, int] | None) -> dict[str, int]:
    if live is not None:
        return {
            "bytesClientToAgent": live["bytes_client_to_agent"],
            "bytesAgentToClient": live["bytes_agent_to_client"],
            "framesClientToAgent": live["frames_client_to_agent"],
            "framesAgentToClient": live["frames_agent_to_client"],
        }
    return {
        "bytesClientToAgent": record.bytes_client_to_agent,
        "bytesAgentToClient": record.bytes_agent_to_client,
        "framesClientToAgent": record.frames_client_to_agent,
        "framesAgentToClient": record.frames_agent_to_client,
    }


def dashboard_state(
    org: str,
    *,
    now: float,
    agents: Iterable["AgentSpec"],
    sessions: "RecentRecords",
    relays: Mapping[str, "RelayTraffic"],
    pool_states: PoolStates,
    draining: bool,
) -> dict[str, Any]:
    """What the live view shows of ``org``, read from the gateway's memory (no I/O).

    Args:
        now: wall-clock seconds, for the sessions' durations.
        agents: every configured agent; those of ``org`` are shown.
        relays: the live sessions' relays, for their traffic so far.
    """
    live = [r for r in list(sessions.live.values()) if r.organization == org]
    live.sort(key=lambda r: r.created_at)
    live_counts: dict[str, int] = {}
    for record in live:
        live_counts[record.agent] = live_counts.get(record.agent, 0) + 1
    states = pool_states()
    agent_rows = []
    for spec in agents:
        if spec.service_host.org != org:
            continue
        name = str(spec.service_host.agent)
        instances = (
            None
            if states is None
            else {state: states.get((spec.key, state), 0) for state in _INSTANCE_STATES}
        )
        agent_rows.append(
            {
                "agent": name,
                "key": spec.key,
                "websocketAuth": spec.config.websocket_auth,
                "minAgents": spec.config.scaling.min_agents,
                "maxAgents": spec.config.scaling.max_agents,
                "instances": instances,
                "liveSessions": live_counts.get(name, 0),
            }
        )
    live_rows = []
    for record in live:
        relay = relays.get(record.session_id)
        live_rows.append(
            {
                "sessionId": record.session_id,
                "agent": record.agent,
                "transport": record.transport,
                "coldStart": record.cold_start,
                "createdAt": record.created_at,
                "seconds": max(0.0, now - record.created_at),
                **_traffic(record, relay.traffic() if relay is not None else None),
            }
        )
    ended = (r for r in reversed(sessions.ended.values()) if r.organization == org)
    ended_rows = [
        {
            "sessionId": record.session_id,
            "agent": record.agent,
            "transport": record.transport,
            "createdAt": record.created_at,
            "endedAt": record.ended_at,
            "seconds": max(0.0, (record.ended_at or now) - record.created_at),
            "completionStatus": record.completion_status,
            "error": record.error,
            **_traffic(record, None),
        }
        for record in itertools.islice(ended, RECENT_ENDINGS)
    ]
    return {
        "organization": org,
        "now": now,
        "draining": draining,
        "agents": agent_rows,
        "live": live_rows,
        "ended": ended_rows,
    }


def dashboard_router(
    *,
    organization: OrganizationDependency,
    agents: Iterable["AgentSpec"],
    sessions: "RecentRecords",
    relays: Mapping[str, "RelayTraffic"],
    pool_states: PoolStates,
    clock: Callable[[], float],
    draining: Callable[[], bool],
) -> APIRouter:
    """The live view, as a router for :func:`catflap.api.app.create_api`.

    Args:
        organization: the private-key dependency (:func:`catflap.api.auth.private_key_org`).
        clock: wall-clock seconds; ``draining``: whether shutdown began. Both are read per
            request, as are ``sessions``, ``relays`` and ``pool_states``.
    """
    router = APIRouter(tags=["dashboard"])

    @router.get("/dashboard", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE, headers=_PAGE_HEADERS)

    @router.get("/v1/dashboard/state", summary="What the live view shows")
    async def state(org: Annotated[str, Depends(organization)]) -> dict[str, Any]:
        """The organization's agents, pool instances, live sessions and recent endings.

        Raises:
            Unauthorized: 401, no private key.
        """
        return dashboard_state(
            org,
            now=clock(),
            agents=agents,
            sessions=sessions,
            relays=relays,
            pool_states=pool_states,
            draining=draining(),
        )

    return router
