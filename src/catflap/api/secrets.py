"""The secret sets API as Pipecat Cloud's CLI calls it, with a private key.

::

    GET    /v1/organizations/{org}/secrets              {"sets": [{"name", "type", "region",
                                                                   "status"}]}
    GET    /v1/organizations/{org}/secrets/{set}        {"name", "region", "status",
                                                         "secrets": [{"fieldName"}]}
    PUT    /v1/organizations/{org}/secrets/{set}        {"status": "OK", "region"}
    DELETE /v1/organizations/{org}/secrets/{set}        {"status": "OK"}
    DELETE /v1/organizations/{org}/secrets/{set}/{key}  {"status": "OK"}

``pipecat cloud secrets set NAME K=V ...`` sends one ``PUT`` per secret, as
``{"name", "isImagePullSecret": false, "secretKey", "secretValue"}``; PCC's REST reference
documents ``{"secrets": [{"secretKey", "secretValue"}, ...]}``. Both are taken. ``secrets list``
reads the sets, ``secrets list NAME`` one set's secret names, ``secrets unset NAME KEY`` and
``secrets delete NAME`` delete. The CLI takes a 404 on a set for "no such set", and wants a JSON
body from a ``DELETE``.

These are the sets ``catflap secrets`` keeps (:class:`~catflap.secretsets.store.SecretStore`):
the same names, bounds and messages, checked by the store. No answer, log line or error holds a
value: a read gives names only, a write answers ``OK``. The store is written before the answer,
so a set is ``ready`` at once (PCC provisions asynchronously, answering ``202`` and ``pending``
first); instances started from then on get it, running ones keep what they started with. Every
set is in region ``self-hosted``; a ``region`` in a request or a query is not read (catflap has
one region). Image pull secrets answer 501: catflap pulls no images.

``GET /v1/organizations/{org}/properties`` is here too, answering only ``defaultRegion``: the
CLI's ``secrets set`` reads it before it asks for confirmation, and fails without it.

Checks run in the other private-key routes' order: key (401), organization (404), then the
names (400 ``invalid_secret_name``) and the body.
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations at run
# time, and they name dependencies local to ``secrets_router``.

import logging
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from catflap.api.auth import (
    OrganizationDependency,
    ParamCheckedRoute,
    error_responses,
    organization_in_path,
)
from catflap.api.services import SELF_HOSTED_REGION
from catflap.contract import limits
from catflap.contract.body import NotJson, UnportableJson, loads_strict
from catflap.contract.errors import (
    BadRequest,
    InternalError,
    InvalidSecretName,
    NotSupportedSelfHosted,
    RequestTooLarge,
    SecretSetNotFound,
    SecretStoreError,
    ServiceUnavailable,
    UnsupportedMediaType,
)
from catflap.contract.names import secret_name_problem
from catflap.requestbody import read_bounded_body
from catflap.secretsets.store import check_set_name

if TYPE_CHECKING:
    from catflap.secretsets.store import SecretStore

__all__ = [
    "OrganizationProperties",
    "SecretField",
    "SecretPair",
    "SecretPutRequest",
    "SecretSetDetails",
    "SecretSetList",
    "SecretSetSummary",
    "SecretsOk",
    "secrets_router",
]

log = logging.getLogger("catflap.api")

#: A set's ``type`` (PCC's ``SecretSetSummary.type``; image pull secrets would be
#: ``imagePullSecret``, which catflap has none of).
SetType = Literal["secret"]
#: A set's ``status``: stored before the answer, so always ready.
SetStatus = Literal["ready"]


class SecretSetSummary(BaseModel):
    """One set in the list (PCC's ``SecretSetSummary``)."""

    name: str
    type: SetType = "secret"
    region: str = SELF_HOSTED_REGION
    status: SetStatus = "ready"


class SecretSetList(BaseModel):
    """The organization's sets, by name; never their secrets."""

    sets: list[SecretSetSummary]


class SecretField(BaseModel):
    """One secret's name (a value is never returned)."""

    fieldName: str  # noqa: N815 - PCC's wire name


class SecretSetDetails(BaseModel):
    """One set: its secrets' names, sorted; never their values."""

    name: str
    region: str = SELF_HOSTED_REGION
    status: SetStatus = "ready"
    secrets: list[SecretField]


class SecretsOk(BaseModel):
    """A change, stored."""

    status: Literal["OK"] = "OK"
    region: str | None = Field(default=None, description="PUT only: where the set is")


class OrganizationProperties(BaseModel):
    """``GET /v1/organizations/{org}/properties``: PCC's ``{"properties": {...}}``."""

    properties: dict[str, str]


class SecretPair(BaseModel):
    """One secret to put."""

    model_config = ConfigDict(extra="ignore")
    secretKey: str = Field(  # noqa: N815 - PCC's wire name
        description="The environment variable's name: [a-zA-Z0-9_-], 1 to 64 characters"
    )
    secretValue: str = Field(  # noqa: N815
        description="Its value: UTF-8 text without NUL, at most 32 KiB"
    )


class SecretPutRequest(BaseModel):
    """``PUT /secrets/{set}``: one secret as the CLI sends it (``secretKey``, ``secretValue``), or
    several as PCC's REST reference does (``secrets``); both at once are refused."""

    model_config = ConfigDict(extra="ignore")
    name: str | None = Field(default=None, description="The set's name, if given: the path's")
    isImagePullSecret: bool = Field(  # noqa: N815 - PCC's wire name
        default=False, description="true: an image pull secret, which catflap has no use for (501)"
    )
    secretKey: str | None = None  # noqa: N815
    secretValue: str | None = None  # noqa: N815
    secrets: list[SecretPair] | None = Field(
        default=None,
        description="Several secrets at once, at most SECRETS_PER_REQUEST_MAX",
    )
    region: str | None = Field(default=None, description="Not read: catflap has one region")


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with its ``$defs`` references replaced by the definitions, so that it can sit
    in an operation's ``openapi_extra`` (a ``#/$defs/...`` reference there would point at the
    document's root)."""
    definitions = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(definitions[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


#: The body's schema in the OpenAPI document: the route reads it by hand, within a bound.
_PUT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": _inline(SecretPutRequest.model_json_schema())}},
    }
}


#: The two bodies a PUT takes, as error messages name them. No square brackets: the CLI prints
#: API errors as rich markup.
_SHAPES = (
    'send one secret as {"secretKey": NAME, "secretValue": VALUE}, or several as '
    '{"secrets": a list of those}'
)


def _check_secret_name(name: str) -> None:
    problem = secret_name_problem("secret", name)
    if problem:
        raise InvalidSecretName(problem)


async def _read_put(request: Request, set_name: str) -> dict[str, str]:
    """The secrets a ``PUT`` puts, by name; bounded in bytes and in count.

    Raises:
        UnsupportedMediaType: 415, not ``application/json``.
        RequestTooLarge: 413, over ``SECRETS_REQUEST_MAX_BYTES`` or ``SECRETS_PER_REQUEST_MAX``.
        BadRequest: 400, not JSON of that shape. No message quotes a value.
        NotSupportedSelfHosted: 501, an image pull secret.
    """
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise UnsupportedMediaType("send the secrets as JSON with Content-Type: application/json")
    data = await read_bounded_body(
        request,
        limits.SECRETS_REQUEST_MAX_BYTES,
        lambda _: RequestTooLarge(
            f"request body over {limits.SECRETS_REQUEST_MAX_BYTES} bytes: put the secrets in "
            "several requests"
        ),
    )
    try:
        document = loads_strict(data)
    except (UnportableJson, NotJson):
        raise BadRequest("the request body is not valid JSON") from None
    if isinstance(document, dict) and isinstance(document.get("secrets"), list):
        count = len(document["secrets"])
        if count > limits.SECRETS_PER_REQUEST_MAX:
            raise RequestTooLarge(
                f"the request puts {count} secrets; at most {limits.SECRETS_PER_REQUEST_MAX} "
                "per request: split them over several requests"
            )
    try:
        body = SecretPutRequest.model_validate(document)
    except ValidationError as exc:
        first = exc.errors(include_input=False)[0]  # the input may be a value: never echoed
        where = ".".join(str(part) for part in first["loc"]) or "request"
        raise BadRequest(f"invalid request: {where}: {first['msg']}; {_SHAPES}") from None
    if body.isImagePullSecret:
        raise NotSupportedSelfHosted(
            "catflap is self-hosted and does not do image pull secrets: it pulls no images "
            "(agents run from the bot.py folders catflap.toml names); see README's "
            "'Operating with the Pipecat Cloud CLI'"
        )
    if body.name is not None and body.name != set_name:
        raise BadRequest(
            f"the body's name {body.name[:64]!r} is not the path's secret set {set_name!r}: "
            "send the same name, or none"
        )
    single = body.secretKey is not None or body.secretValue is not None
    if single == (body.secrets is not None):
        raise BadRequest(f"{_SHAPES} (one of the two)")
    if body.secrets is not None:
        pairs = [(pair.secretKey, pair.secretValue) for pair in body.secrets]
    elif body.secretKey is None or body.secretValue is None:
        raise BadRequest('send both "secretKey" and "secretValue"')
    else:
        pairs = [(body.secretKey, body.secretValue)]
    if not pairs:
        raise BadRequest('"secrets" is empty: send at least one secret')
    return dict(pairs)


def secrets_router(
    *, organization: OrganizationDependency, store: "SecretStore | None"
) -> APIRouter:
    """The secret sets API, as a router for :func:`catflap.api.app.create_api`.

    Args:
        organization: the private-key dependency (:func:`catflap.api.auth.private_key_org`).
        store: the organisations' sets (``ApiDeps.secrets``); None: every route answers 503.
    """
    router = APIRouter(tags=["secrets"], route_class=ParamCheckedRoute)
    in_path = organization_in_path(organization)
    base = "/v1/organizations/{org}/secrets"

    def usable() -> "SecretStore":
        if store is None:
            raise ServiceUnavailable("this API has no secret store")
        return store

    def unusable(exc: SecretStoreError) -> InternalError:
        # The store's message says what the operator must do (a key, a writable state_dir)
        # and never holds a value, but it names files and variables: the log, not the client.
        log.error("! the secret store cannot be used: %s", exc)
        return InternalError("the secret store cannot be used; see the gateway log")

    @router.get(
        base,
        response_model=SecretSetList,
        responses=error_responses(401, 404, 500, 503),
        summary="List secret sets",
    )
    async def list_sets(
        owner: Annotated[str, Depends(in_path)],
        region: Annotated[str | None, Query(description="Not read: one region")] = None,
    ) -> SecretSetList:
        """The organization's secret sets, by name (``pipecat cloud secrets list``).

        Raises:
            Unauthorized: 401, no private key.
            AgentNotFound: 404, the key belongs to another organization.
        """
        try:
            names = await usable().set_names(owner)
        except SecretStoreError as exc:
            raise unusable(exc) from None
        return SecretSetList(sets=[SecretSetSummary(name=name) for name in names])

    @router.get(
        base + "/{secret_set}",
        response_model=SecretSetDetails,
        responses=error_responses(400, 401, 404, 500, 503),
        summary="A secret set's secret names",
    )
    async def get_set(secret_set: str, owner: Annotated[str, Depends(in_path)]) -> SecretSetDetails:
        """The names of a set's secrets, sorted; never their values
        (``pipecat cloud secrets list NAME``).

        Raises:
            InvalidSecretName: 400, not a set name.
            SecretSetNotFound: 404, no such set.
        """
        check_set_name(secret_set)
        try:
            keys = await usable().keys(owner, secret_set)
        except SecretStoreError as exc:
            raise unusable(exc) from None
        if keys is None:
            raise SecretSetNotFound(_no_set(owner, secret_set))
        return SecretSetDetails(
            name=secret_set, secrets=[SecretField(fieldName=key) for key in keys]
        )

    @router.put(
        base + "/{secret_set}",
        response_model=SecretsOk,
        response_model_exclude_none=True,
        responses=error_responses(400, 401, 404, 413, 415, 500, 501, 503),
        summary="Put secrets into a set",
        openapi_extra=_PUT_BODY,
    )
    async def put_secrets(
        secret_set: str, request: Request, owner: Annotated[str, Depends(in_path)]
    ) -> SecretsOk:
        """Create the set, or add secrets to it, replacing same-named ones
        (``pipecat cloud secrets set NAME KEY=VALUE ...``, one request per secret). Stored
        before the answer: instances started from now on get it.

        Raises:
            InvalidSecretName: 400, the set's or a secret's name.
            InvalidSecretValue: 400, a value with a NUL byte.
            SecretTooLarge: 400, a value over 32 KiB, or the set over 64 KiB.
            TooManySecretSets: 400, a 101st set.
            RequestTooLarge: 413, over ``SECRETS_REQUEST_MAX_BYTES`` or
                ``SECRETS_PER_REQUEST_MAX`` secrets.
            NotSupportedSelfHosted: 501, an image pull secret.
        """
        check_set_name(secret_set)
        secrets = await _read_put(request, secret_set)
        target = usable()
        try:
            created = await target.put(owner, secret_set, secrets)
        except SecretStoreError as exc:
            raise unusable(exc) from None
        # Names only, as `catflap secrets set` prints them.
        log.info(
            "secret set %r of organization %r %s through the API: %s",
            secret_set,
            owner,
            "created" if created else "updated",
            ", ".join(sorted(secrets)),
        )
        return SecretsOk(region=SELF_HOSTED_REGION)

    @router.delete(
        base + "/{secret_set}",
        response_model=SecretsOk,
        response_model_exclude_none=True,
        responses=error_responses(400, 401, 404, 500, 503),
        summary="Delete a secret set",
    )
    async def delete_set(secret_set: str, owner: Annotated[str, Depends(in_path)]) -> SecretsOk:
        """Delete the whole set (``pipecat cloud secrets delete NAME``).

        Raises:
            SecretSetNotFound: 404, no such set.
        """
        check_set_name(secret_set)
        try:
            await usable().delete(owner, secret_set)
        except SecretStoreError as exc:
            raise unusable(exc) from None
        log.info("secret set %r of organization %r deleted through the API", secret_set, owner)
        return SecretsOk()

    @router.delete(
        base + "/{secret_set}/{secret}",
        response_model=SecretsOk,
        response_model_exclude_none=True,
        responses=error_responses(400, 401, 404, 500, 503),
        summary="Delete one secret of a set",
    )
    async def delete_secret(
        secret_set: str, secret: str, owner: Annotated[str, Depends(in_path)]
    ) -> SecretsOk:
        """Delete one secret (``pipecat cloud secrets unset NAME KEY``).

        Raises:
            SecretSetNotFound: 404, no such set.
            SecretNotFound: 404, the set has no such secret.
        """
        check_set_name(secret_set)
        _check_secret_name(secret)
        try:
            await usable().delete(owner, secret_set, secret)
        except SecretStoreError as exc:
            raise unusable(exc) from None
        log.info(
            "secret %r deleted from secret set %r of organization %r through the API",
            secret,
            secret_set,
            owner,
        )
        return SecretsOk()

    @router.get(
        "/v1/organizations/{org}/properties",
        response_model=OrganizationProperties,
        responses=error_responses(401, 404),
        summary="The organization's properties",
    )
    async def properties(owner: Annotated[str, Depends(in_path)]) -> OrganizationProperties:
        """Only ``defaultRegion``, ``self-hosted``: ``pipecat cloud secrets set`` reads it to show
        where a set will be before it asks to go on (``organizations properties list`` prints
        it too). Changing a property is not done here: they are catflap.toml's.

        Raises:
            Unauthorized: 401, no private key.
            AgentNotFound: 404, the key belongs to another organization.
        """
        return OrganizationProperties(properties={"defaultRegion": SELF_HOSTED_REGION})

    return router


def _no_set(org: str, name: str) -> str:
    return (
        f"organization {org!r} has no secret set {name!r} (`pipecat cloud secrets list` "
        "shows its sets)"
    )
