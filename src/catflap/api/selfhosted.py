"""Pipecat Cloud API calls that have no meaning in a self-hosted gateway: a clear 501 for each.

The ``pipecat cloud`` CLI (``pipecatcloud`` 1.4) also deploys images, runs cloud builds, picks
regions, keeps a spend limit, mints API keys and links GitHub. None of that exists here: the
agents are the ``bot.py`` folders that ``catflap.toml`` names, on the operator's machines. So
each of those paths answers **501** ``not_supported_self_hosted``, naming what catflap does
instead, rather than the bare 404 of a path nothing serves. :data:`NOT_SUPPORTED` is the one
list; README's "Operating with the Pipecat Cloud CLI" table follows it.

No key is needed to be told this: the answer reveals nothing, and ``pipecat cloud auth login``
has no key yet. The ``secrets`` paths are not here (:mod:`catflap.api.secrets`): catflap keeps
secret sets; only referencing a Kubernetes Secret is.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter

from catflap.api.auth import error_responses
from catflap.contract.errors import NotSupportedSelfHosted

__all__ = ["NOT_SUPPORTED", "NotSupportedRoute", "selfhosted_router"]

#: No square brackets in these messages: the CLI prints API errors as rich markup, which
#: swallows "[organizations...]" whole.
_CONFIG = "catflap.toml (its organizations.<org>.agents.<agent> table)"


@dataclass(frozen=True, slots=True)
class NotSupportedRoute:
    """One Pipecat Cloud path that catflap refuses with 501."""

    methods: tuple[str, ...]
    path: str
    #: What the call does on Pipecat Cloud.
    what: str
    #: What to do with catflap instead.
    instead: str


NOT_SUPPORTED: tuple[NotSupportedRoute, ...] = (
    NotSupportedRoute(
        ("POST", "PUT"),
        "/v1/organizations/{org}/services",
        "deploying an agent (pipecat cloud deploy)",
        f"add the agent's bot.py folder to {_CONFIG} and restart catflap serve",
    ),
    NotSupportedRoute(
        ("DELETE",),
        "/v1/organizations/{org}/services/{agent}",
        "deleting an agent",
        f"remove it from {_CONFIG} and restart catflap serve",
    ),
    NotSupportedRoute(
        ("GET",),
        "/v1/organizations/{org}/services/{agent}/deployments",
        "listing deployments",
        "an agent runs the code at its configured path; there are no deployments",
    ),
    NotSupportedRoute(
        ("GET", "POST", "PUT", "PATCH", "DELETE"),
        "/v1/organizations/{org}/services/{agent}/environments/{rest:path}",
        "GitHub-linked deploys",
        "deploy the code to the gateway's machines yourself, then restart catflap serve",
    ),
    NotSupportedRoute(
        ("GET", "POST", "PUT", "PATCH", "DELETE"),
        "/v1/organizations/{org}/github/{rest:path}",
        "the GitHub App integration",
        "deploy the code to the gateway's machines yourself",
    ),
    NotSupportedRoute(
        ("GET", "POST"),
        "/v1/organizations/{org}/builds",
        "cloud builds",
        "build your image or environment yourself; catflap runs bot.py from its folder",
    ),
    NotSupportedRoute(
        ("GET", "POST"),
        "/v1/organizations/{org}/builds/{rest:path}",
        "cloud builds",
        "build your image or environment yourself; catflap runs bot.py from its folder",
    ),
    NotSupportedRoute(
        ("GET", "POST"),
        "/v1/organizations/{org}/regions",
        "regions",
        "a catflap gateway is where you run it; scale out with agent hosts (docs/scaling.md)",
    ),
    NotSupportedRoute(
        ("GET", "POST", "DELETE"),
        "/v1/organizations/{org}/regions/{rest:path}",
        "self-hosted region enrolment",
        "a catflap gateway is where you run it; scale out with agent hosts (docs/scaling.md)",
    ),
    NotSupportedRoute(
        ("GET", "PUT"),
        "/v1/organizations/{org}/spend-limit",
        "the spend limit",
        "catflap bills nothing; cap sessions with max_agents (the agent's scaling table)",
    ),
    NotSupportedRoute(
        ("GET", "POST", "DELETE"),
        "/v1/organizations/{org}/registry-keys",
        "registry pull keys",
        "catflap pulls no images",
    ),
    NotSupportedRoute(
        ("DELETE",),
        "/v1/organizations/{org}/registry-keys/{rest:path}",
        "registry pull keys",
        "catflap pulls no images",
    ),
    NotSupportedRoute(
        ("GET", "POST"),
        "/v1/organizations/{org}/agent-profiles",
        "agent profiles",
        "size the machines (or containers) that run catflap; instances share them",
    ),
    NotSupportedRoute(
        ("PATCH",),
        "/v1/organizations/{org}/agent-profiles/{rest:path}",
        "agent profiles",
        "size the machines (or containers) that run catflap; instances share them",
    ),
    NotSupportedRoute(
        ("PATCH",),
        "/v1/organizations/{org}/properties",
        "changing organization properties",
        "set them in catflap.toml",
    ),
    NotSupportedRoute(
        ("GET",),
        "/v1/organizations/{org}/properties/schema",
        "organization properties",
        "set them in catflap.toml",
    ),
    NotSupportedRoute(
        ("GET", "POST"),
        "/v1/organizations/{org}/apiKeys",
        "API keys",
        "list keys in catflap.toml's public_keys and private_keys, then restart catflap serve",
    ),
    NotSupportedRoute(
        ("DELETE",),
        "/v1/organizations/{org}/apiKeys/{rest:path}",
        "API keys",
        "remove the key from catflap.toml's public_keys or private_keys and restart",
    ),
    NotSupportedRoute(
        ("POST",),
        "/v1/organizations/{org}/secrets/references",
        "referenced Kubernetes Secrets (secrets reference)",
        "give agent hosts the variables in their own environment and name them in the agent's "
        "pass_env (deploy/kubernetes/agent.yaml), or keep them in a secret set",
    ),
    NotSupportedRoute(
        ("GET",),
        "/v1/organizations/{org}/daily",
        "the organization's Daily API key",
        "give agents their Daily key in their own environment",
    ),
    NotSupportedRoute(
        ("GET",),
        "/v1/users",
        "user accounts (auth whoami)",
        "set PIPECAT_TOKEN to an organization's private key (sk_...) and PIPECAT_ORG",
    ),
    NotSupportedRoute(
        ("GET", "POST"),
        "/v1/onboarding",
        "onboarding",
        "set PIPECAT_TOKEN to an organization's private key (sk_...) and PIPECAT_ORG",
    ),
    NotSupportedRoute(
        ("GET", "POST"),
        "/auth/{rest:path}",
        "logging in (auth login / logout)",
        "set PIPECAT_TOKEN to an organization's private key (sk_...) and PIPECAT_ORG",
    ),
)


#: These routes' request bodies, as the OpenAPI document describes them: not read.
_IGNORED_BODY: dict[str, Any] = {
    "requestBody": {
        "required": False,
        "description": "Not read: the call has no meaning self-hosted.",
        "content": {"application/json": {"schema": {}}},
    }
}


def _refusal(message: str) -> Callable[[], Coroutine[Any, Any, None]]:
    """An endpoint taking no parameter that refuses with ``message`` (a closure per route: a
    default argument would become a query parameter)."""

    async def refuse() -> None:
        raise NotSupportedSelfHosted(message)

    return refuse


def selfhosted_router() -> APIRouter:
    """Every :data:`NOT_SUPPORTED` path, answering 501 ``not_supported_self_hosted``."""
    router = APIRouter(tags=["not self-hosted"])
    for route in NOT_SUPPORTED:
        message = (
            f"catflap is self-hosted and does not do {route.what}: {route.instead}; "
            "see README's 'Operating with the Pipecat Cloud CLI'"
        )
        slug = re.sub(r"[^a-z0-9]+", "_", route.path.lower()).strip("_")
        for method in route.methods:
            # One route per method: FastAPI names a multi-method route's operation after its
            # first method only, and a duplicate id fails /openapi.json under -W error.
            router.add_api_route(
                route.path,
                _refusal(message),
                methods=[method],
                operation_id=f"not_self_hosted_{method.lower()}_{slug}",
                responses=error_responses(501),
                summary=f"Not self-hosted: {route.what}",
                # Whatever the CLI sends is not read: the answer is always the 501.
                openapi_extra=_IGNORED_BODY if method in ("POST", "PUT", "PATCH") else None,
            )
    return router
