"""The control API: ``POST /v1/public/{agent}/start`` and friends, as a FastAPI app.

Every error leaves as ``{"error": ..., "code": ...}``, and always as a
:class:`~catflap.contract.errors.RequestRejected` subclass: catflap's typed errors, FastAPI's own
404/405 (:class:`RouteNotFound`, :class:`RouteMethodNotAllowed`), and request-validation
failures alike go through one handler. So the set of (status, code) pairs the API can answer is
the set of those classes, which tests/test_error_table.py checks against the README.

``/docs`` and ``/redoc`` (Swagger UI and ReDoc) load their scripts and fonts from a CDN onto the
gateway's origin, so they are served only with ``[gateway] api_docs = true``;
``/openapi.json`` always is.
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from catflap.api.auth import bearer_credentials, error_responses, private_key_org
from catflap.api.dashboard import dashboard_router
from catflap.api.logs import logs_router
from catflap.api.metrics import metrics_router
from catflap.api.selfhosted import selfhosted_router
from catflap.api.services import services_router
from catflap.api.sessions import SessionRecords, sessions_router
from catflap.api.telephony import TELEPHONY_TRANSPORTS, provider_ws_url
from catflap.auth.tokens import mint_token
from catflap.contract import limits
from catflap.contract.body import NotJson, UnportableJson, encode_body, loads_strict
from catflap.contract.errors import (
    AgentNotFound,
    AtCapacity,
    BadRequest,
    BodyNotAllowed,
    Draining,
    InternalError,
    InvalidBody,
    MethodNotAllowed,
    NotFound,
    RequestRejected,
    RequestTooLarge,
    ServiceUnavailable,
    Unauthorized,
    UnsupportedMediaType,
    UnsupportedTransport,
    UpgradeRequired,
    error_body,
)
from catflap.gateway.botsession import encode_bot_body
from catflap.requestbody import read_bounded_body

if TYPE_CHECKING:
    from catflap.api.deps import ApiDeps

__all__ = ["RouteMethodNotAllowed", "RouteNotFound", "StartRequest", "StartResponse", "create_api"]

log = logging.getLogger("catflap.api")


class StartRequest(BaseModel):
    """Body of ``POST /v1/public/{agent}/start`` (PCC's ``StartRequest``)."""

    model_config = ConfigDict(extra="allow")
    transport: str | None = None
    body: Any = None
    createDailyRoom: bool = False  # noqa: N815 - PCC's wire name


class StartResponse(BaseModel):
    sessionId: str  # noqa: N815 - PCC's wire name
    #: WebSocket and telephony transports only: a session without a transport has no URL.
    wsUrl: str | None = None  # noqa: N815
    token: str | None = None
    body: str | None = None
    #: Telephony transports: the ``agent.org`` to put in Twilio's
    #: ``<Parameter name="_pipecatCloudServiceHost">`` (already in the URL for the others).
    serviceHost: str | None = None  # noqa: N815


class RouteNotFound(NotFound):
    """404 for a path no route serves (Starlette's own 404); code ``"404"``, as it always was."""

    code = "404"


class RouteMethodNotAllowed(MethodNotAllowed):
    """405 for a method a route does not serve (Starlette's own 405); code ``"405"``."""

    code = "405"


def _error_response(
    status: int, message: str, code: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(message, code), status_code=status, headers=headers)


async def _read_json(request: Request) -> Any:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise UnsupportedMediaType(
            "send the request body as JSON with Content-Type: application/json"
        )
    data = await read_bounded_body(
        request,
        limits.START_REQUEST_MAX_BYTES,
        lambda _: RequestTooLarge(f"request body over {limits.START_REQUEST_MAX_BYTES} bytes"),
    )
    # The same strict JSON as ?body= (contract/body.py): a body with NaN, 1e999 or a lone
    # surrogate is refused here as it is in the upgrade URL, with the same code.
    try:
        return loads_strict(data)
    except UnportableJson as exc:
        raise InvalidBody(
            f"the request body is {exc}; bodies must be strict JSON, as for ?body="
        ) from None
    except NotJson:
        raise BadRequest("the request body is not valid JSON") from None


def _routing_error(exc: StarletteHTTPException) -> RequestRejected:
    """Starlette's and FastAPI's own HTTP errors as catflap's classes (see the module doc)."""
    headers = tuple((exc.headers or {}).items())
    if exc.status_code == 404:
        return RouteNotFound("not found", headers=headers)
    if exc.status_code == 405:
        return RouteMethodNotAllowed(str(exc.detail), headers=headers)
    if exc.status_code == 400:
        return BadRequest(f"invalid request: {exc.detail}", headers=headers)
    # Nothing in catflap raises HTTPException, and routing raises only 404 and 405.
    log.error("! unexpected HTTP %d from the API framework: %s", exc.status_code, exc.detail)
    return InternalError("internal error; see the gateway log")


def create_api(deps: ApiDeps) -> FastAPI:
    """Build the control API over what the gateway gives it (see :class:`ApiDeps`)."""
    api_docs = deps.config.gateway.api_docs
    app = FastAPI(
        title="catflap control API",
        description="Pipecat-Cloud-compatible session API of a catflap gateway.",
        version="0.1.0",
        # None: no route at all, so /docs and /redoc are the JSON 404 of any unknown path.
        docs_url="/docs" if api_docs else None,
        redoc_url="/redoc" if api_docs else None,
    )

    @app.exception_handler(RequestRejected)
    async def _rejected(_: Request, exc: RequestRejected) -> JSONResponse:
        body = exc.to_body()
        return _error_response(exc.status, body["error"], body["code"], dict(exc.headers))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return await _rejected(request, _routing_error(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await _rejected(request, BadRequest(f"invalid request: {exc.errors()[0]['msg']}"))

    @app.get("/livez", include_in_schema=False)
    async def livez() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        if deps.draining():
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.post(
        "/v1/public/{agent}/start",
        response_model=StartResponse,
        response_model_exclude_none=True,
        responses=error_responses(400, 401, 404, 413, 415, 429, 503),
    )
    async def start(agent: str, request: Request) -> dict[str, Any]:
        """Start a session.

        With ``transport`` ``websocket`` or a telephony provider: mint the WebSocket URL (and
        token) a client connects with; the bot starts when the client connects to ``wsUrl``.
        With no ``transport`` (and no ``createDailyRoom``), as Pipecat Cloud's SDK sends it:
        start the bot now through the runtime's ``POST /bot`` and answer ``{"sessionId"}``
        once it runs (:mod:`catflap.gateway.botsession`).
        """
        key = bearer_credentials(request.headers.get("authorization"))
        org = deps.agents.org_for_public_key(key) if key else None
        if org is None:
            raise Unauthorized(
                "missing or invalid public API key: send Authorization: Bearer pk_..."
            )
        spec = deps.agents.agent(org, agent)
        if spec is None:
            raise AgentNotFound(f"no agent {agent!r} in organization {org!r}")
        try:
            payload = StartRequest.model_validate(await _read_json(request))
        except ValidationError as exc:
            raise BadRequest(f"invalid request: {exc.errors()[0]['msg']}") from None
        transport = payload.transport
        if transport is None and not payload.createDailyRoom:
            if deps.draining():
                raise Draining("the gateway is shutting down; start the session again")
            body = encode_bot_body(payload.body)
            if deps.bot_sessions is None:
                raise ServiceUnavailable("this API starts no sessions without a transport")
            return {"sessionId": await deps.bot_sessions.start(spec, body)}
        if transport is None:  # and createDailyRoom
            raise UnsupportedTransport(
                "createDailyRoom is not supported: catflap creates no Daily rooms; send no "
                'createDailyRoom (a session without a transport) or "transport": "websocket"'
            )
        if transport != "websocket" and transport not in TELEPHONY_TRANSPORTS:
            choices = ", ".join(["websocket", *TELEPHONY_TRANSPORTS])
            raise UnsupportedTransport(
                f"transport {transport!r} is not supported: catflap serves WebSocket sessions; "
                f"send one of {choices}"
            )
        body_b64: str | None = None
        if "body" in (payload.model_fields_set or ()):
            if spec.config.websocket_auth == "none":
                raise BodyNotAllowed(
                    'this agent uses websocket_auth = "none": do not send a body to /start; '
                    "base64-encode it yourself and append ?body=<b64> to the WebSocket URL"
                )
            body_b64 = encode_body(payload.body)
        if await deps.pool.at_capacity(spec.key):
            raise AtCapacity(f"agent {spec.key} is at max_agents; retry shortly")
        response: dict[str, Any] = {}
        token: str | None = None
        if spec.config.websocket_auth == "token":
            token, claims = mint_token(deps.keyring, spec.key, now=deps.clock())
            response["token"] = token
            response["sessionId"] = claims.jti
        else:
            response["sessionId"] = str(uuid.uuid4())
        base = deps.config.ws_base_url
        if transport == "websocket":
            response["wsUrl"] = f"{base}/ws/generic/{spec.key}"
        else:
            # The provider cannot send headers: the token goes in the path, the agent in
            # ?serviceHost= (or, for Twilio, in a <Parameter>: see serviceHost).
            response["wsUrl"] = provider_ws_url(
                base, transport, spec.key, token=token, body_b64=body_b64
            )
            response["serviceHost"] = spec.key
        if body_b64 is not None:
            response["body"] = body_b64
        return response

    @app.api_route(
        "/ws/{rest:path}",
        methods=["GET", "POST", "PUT", "DELETE", "PATCH"],
        include_in_schema=False,
    )
    async def websocket_over_http(rest: str) -> None:
        # Reached only by a plain request on a kept-alive API connection.
        raise UpgradeRequired(
            "this is a WebSocket endpoint: open a new connection with a WebSocket client",
            headers=(("upgrade", "websocket"),),
        )

    organization = private_key_org(deps.config.organizations)
    app.include_router(metrics_router(settings=deps.config.gateway, metrics=deps.metrics))
    records = SessionRecords(deps.agents, deps.sessions, deps.store)
    app.include_router(sessions_router(organization=organization, records=records, pool=deps.pool))
    app.include_router(
        logs_router(organization=organization, records=records, log_dir=deps.config.log_dir)
    )
    app.include_router(
        services_router(
            organization=organization,
            agents=deps.agents,
            sessions=deps.sessions,
            pool=deps.pool,
            readiness=deps.readiness,
            loaded_at=deps.clock(),
        )
    )
    app.include_router(selfhosted_router())
    if deps.config.gateway.dashboard:
        app.include_router(
            dashboard_router(
                organization=organization,
                agents=deps.agents,
                sessions=deps.sessions,
                relays=deps.relays,
                pool_states=deps.metrics.pool_states,
                clock=deps.clock,
                draining=deps.draining,
            )
        )
    return app
