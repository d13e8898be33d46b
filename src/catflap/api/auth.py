"""What the API routers share: the private- and public-key checks, the session id check, 400s
that name the bad parameter, and the error shape their OpenAPI entries document.

Every private-key call needs ``Authorization: Bearer sk_...``: the private key picks the
organization, as a public key (``pk_...``) does for ``/start`` and the session proxy.
"""

# No ``from __future__ import annotations``: FastAPI reads the dependency's annotations at run
# time.

import hmac
import re
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from catflap.contract.errors import AgentNotFound, BadRequest, Unauthorized

if TYPE_CHECKING:
    from catflap.config import OrgConfig
    from catflap.directory import AgentDirectory

__all__ = [
    "PUBLIC_KEY_SCHEME",
    "ErrorBody",
    "OrganizationDependency",
    "ParamCheckedRoute",
    "bearer_credentials",
    "canonical_session_id",
    "error_responses",
    "key_in",
    "organization_in_path",
    "private_key_org",
    "public_key_org",
]

#: The public-key bearer scheme of ``/start`` (PCC's ``PublicKeyAuth``), for the OpenAPI
#: document: as a route dependency it only reads the header (``auto_error=False``); the route
#: checks the key itself, so that every refusal is catflap's JSON 401.
PUBLIC_KEY_SCHEME = HTTPBearer(
    auto_error=False,
    scheme_name="public key",
    description="A public API key of the organization: `Authorization: Bearer pk_...`",
)

#: A FastAPI dependency that gives the organization a request's key belongs to.
OrganizationDependency = Callable[..., Awaitable[str]]

#: The canonical 8-4-4-4-12 form that catflap gives every session id.
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class ErrorBody(BaseModel):
    """Every refusal's JSON (``contract.errors.error_body``), for the OpenAPI schema."""

    error: str
    code: str


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """A route's ``responses=``: each of ``statuses`` answers an :class:`ErrorBody`."""
    return {status: {"model": ErrorBody} for status in statuses}


class ParamCheckedRoute(APIRoute):
    """A route whose invalid parameters are a 400 naming the parameter.

    FastAPI's own validation error goes through the app's generic handler, whose message does
    not say which parameter was wrong.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                first = exc.errors()[0]
                where = str(first["loc"][-1]) if first.get("loc") else "request"
                raise BadRequest(f"invalid {where}: {first['msg']}") from None

        return checked


def bearer_credentials(authorization: str | None) -> str | None:
    """The credentials of an ``Authorization: Bearer <credentials>`` header, if it is one."""
    scheme, _, credentials = (authorization or "").partition(" ")
    credentials = credentials.strip()
    return credentials if scheme.lower() == "bearer" and credentials else None


def key_in(key: str, keys: list[str]) -> bool:
    """Whether ``key`` is one of ``keys``; checks every key (no early exit) in constant time per
    key, so the answer's timing gives no hint about private keys."""
    found = False
    for candidate in keys:
        found |= hmac.compare_digest(key.encode(), candidate.encode())
    return found


def canonical_session_id(value: str) -> str:
    """The session id in canonical form.

    Raises:
        BadRequest: 400, ``value`` is not a UUID string.
    """
    canonical = value.lower()
    if not _UUID.fullmatch(canonical):
        raise BadRequest(
            f"invalid session id {value[:64]!r}: session ids are UUID strings such as "
            "'123e4567-e89b-42d3-a456-426614174000'"
        )
    return canonical


def private_key_org(organizations: Mapping[str, "OrgConfig"]) -> OrganizationDependency:
    """A FastAPI dependency giving the organization whose private key the request carries.

    Args:
        organizations: ``[organizations]`` of the configuration, by name.
    """
    bearer = HTTPBearer(
        auto_error=False,
        scheme_name="private key",
        description="A private API key of the organization: `Authorization: Bearer sk_...`",
    )

    async def organization(  # async: a plain def would run on a worker thread
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> str:
        """The organization whose private key the request carries.

        Raises:
            Unauthorized: 401, no key, an unknown key, or a public key.
        """
        key = credentials.credentials.strip() if credentials else ""
        if key:
            orgs = organizations.items()
            for org, org_cfg in orgs:
                if key_in(key, org_cfg.private_keys):
                    return org
            if any(key in org_cfg.public_keys for _, org_cfg in orgs):
                raise Unauthorized(
                    "this is a public key (pk_...); this API needs a private key: "
                    "send Authorization: Bearer sk_..."
                )
        raise Unauthorized("missing or invalid private API key: send Authorization: Bearer sk_...")

    return organization


def public_key_org(agents: "AgentDirectory") -> OrganizationDependency:
    """A FastAPI dependency giving the organization whose public key the request carries, as
    ``/start`` checks it (the same bearer parsing, the same 401); it puts the public-key
    security scheme in the OpenAPI document."""
    bearer = HTTPBearer(
        auto_error=False,
        scheme_name="public key",
        description="A public API key of the organization: `Authorization: Bearer pk_...`",
    )

    async def organization(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> str:
        """The organization whose public key the request carries.

        Raises:
            Unauthorized: 401, no key or not a public key.
        """
        org = agents.org_for_public_key(credentials.credentials.strip()) if credentials else None
        if org is None:
            raise Unauthorized(
                "missing or invalid public API key: send Authorization: Bearer pk_..."
            )
        return org

    return organization


def organization_in_path(organization: OrganizationDependency) -> OrganizationDependency:
    """The private-key dependency for Pipecat Cloud's org-scoped paths
    (``/v1/organizations/{org}/...``, what the ``pipecat cloud`` CLI calls): the key's
    organization, which must be the one the path names.

    Args:
        organization: :func:`private_key_org`'s dependency.
    """

    async def in_path(  # async: a plain def would run on a worker thread
        org: str, owner: Annotated[str, Depends(organization)]
    ) -> str:
        """The organization of the path, once the key is known to belong to it.

        Raises:
            Unauthorized: 401, no valid private key.
            AgentNotFound: 404, the key belongs to another organization.
        """
        if org != owner:
            raise AgentNotFound(
                f"no organization {org[:64]!r} for this private key: it belongs to "
                f"{owner!r}; set PIPECAT_ORG={owner} (or pass --organization {owner})"
            )
        return org

    return in_path
