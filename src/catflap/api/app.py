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

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from catflap.api.auth import (
    PUBLIC_KEY_SCHEME,
    bearer_credentials,
    error_responses,
    private_key_org,
)
from catflap.api.dashboard import dashboard_router
from catflap.api.logs import logs_router
from catflap.api.metrics import metrics_router
from catflap.api.proxy import session_proxy_router
from catflap.api.secrets import secrets_router
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
from catflap.contract.ice import ice_config_document
from catflap.gateway.botsession import encode_bot_body
from catflap.gateway.daily import create_daily_room, daily_api_key
from catflap.logstore import FileLogSource, LogStore
from catflap.requestbody import read_bounded_body

if TYPE_CHECKING:
    from catflap.api.deps import ApiDeps
    from catflap.config import AgentSpec

__all__ = [
    "START_TRANSPORTS",
    "RouteMethodNotAllowed",
    "RouteNotFound",
    "StartRequest",
    "StartResponse",
    "create_api",
]

log = logging.getLogger("catflap.api")


#: The ``transport`` values ``/start`` serves (PCC's ``daily`` and ``websocket``, plus the
#: telephony providers); no ``transport`` is a session without one, or a Daily one.
START_TRANSPORTS = ("daily", "webrtc", "websocket", *TELEPHONY_TRANSPORTS)


def _enum_of_strings(schema: dict[str, Any], values: tuple[str, ...]) -> None:
    """Document ``values`` as the strings a ``str | None`` field takes. The field stays a plain
    string for validation, so that another value gets the route's own 400 naming the choices."""
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") == "string":
            branch["enum"] = list(values)


class StartRequest(BaseModel):
    """Body of ``POST /v1/public/{agent}/start`` (PCC's ``StartRequest``); docs/pcc-start-fields.md
    says what catflap does with each field. Unknown fields are ignored, as PCC does."""

    model_config = ConfigDict(extra="allow")
    createDailyRoom: bool = Field(  # noqa: N815 - PCC's wire name
        default=False,
        description="Create a Daily room (and meeting token) for the session and start the bot "
        "in it at once; needs the organization's Daily API key. Same as transport daily.",
    )
    dailyRoomProperties: dict[str, Any] | None = Field(  # noqa: N815
        default=None,
        description="Daily room properties (https://docs.daily.co/reference/rest-api/rooms/config)"
        " for a Daily session, over catflap's exp and eject_at_room_exp.",
        examples=[{"enable_recording": "cloud"}],
    )
    dailyMeetingTokenProperties: dict[str, Any] | None = Field(  # noqa: N815
        default=None,
        description="Daily meeting token properties "
        "(https://docs.daily.co/reference/rest-api/meeting-tokens/config) for a Daily session; "
        "room_name is always the new room.",
        examples=[{"is_owner": True}],
    )
    enableDefaultIceServers: bool = Field(  # noqa: N815
        default=False,
        description="A WebRTC session: also answer the agent's STUN/TURN servers ([webrtc] "
        "ice_servers) as iceConfig.iceServers, for the client's peer connection.",
    )
    transport: str | None = Field(
        default=None,
        description="None: a session without a transport (the bot starts now through the "
        "runtime's POST /bot), or a Daily one with createDailyRoom. daily: a Daily session. "
        "websocket or a telephony provider: a WebSocket URL to connect to.",
        json_schema_extra=lambda schema: _enum_of_strings(schema, START_TRANSPORTS),
    )
    body: Any = Field(
        default=None,
        description="The session's data, given to bot() as args.body: at most 1,000,000 bytes "
        "of JSON for a session without a WebSocket, 4096 for a WebSocket one.",
        examples=[{"foo": "bar"}],
    )


class StartResponse(BaseModel):
    """``/start``'s answer (PCC's ``StartResponse``); only the fields of the session's kind."""

    sessionId: str  # noqa: N815 - PCC's wire name
    #: WebSocket and telephony transports only: a session without a transport has no URL.
    wsUrl: str | None = None  # noqa: N815
    token: str | None = None
    body: str | None = Field(
        default=None, description="WebSocket sessions: the request's body as base64 JSON."
    )
    #: Telephony transports: the ``agent.org`` to put in Twilio's
    #: ``<Parameter name="_pipecatCloudServiceHost">`` (already in the URL for the others).
    serviceHost: str | None = None  # noqa: N815
    dailyRoom: str | None = Field(  # noqa: N815
        default=None, description="Daily sessions: the URL of the room the bot joined."
    )
    dailyToken: str | None = Field(  # noqa: N815
        default=None, description="Daily sessions: the meeting token to join the room with."
    )
    iceConfig: dict[str, Any] | None = Field(  # noqa: N815
        default=None,
        description="WebRTC sessions with enableDefaultIceServers: "
        '{"iceServers": [{"urls": [...], "username", "credential"}]}.',
    )


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


def _schema_ref(name: str) -> str:
    return f"#/components/schemas/{name}"


#: Request bodies that routes read by hand (bounded), so FastAPI does not see their models:
#: the OpenAPI document gets their schemas from here.
_HAND_READ_BODIES: tuple[type[BaseModel], ...] = (StartRequest,)


def _with_hand_read_bodies(app: FastAPI) -> None:
    """Make ``app``'s OpenAPI document include the schemas of :data:`_HAND_READ_BODIES`."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = generate()  # FastAPI caches it in app.openapi_schema
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            for model in _HAND_READ_BODIES:
                schema = model.model_json_schema(ref_template=_schema_ref("{model}"))
                schemas.update(schema.pop("$defs", {}))
                schemas[model.__name__] = schema
        return app.openapi_schema or generate()

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented extension point


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
        # 503 takes the gateway out of the load balancer's rotation; live sessions go on.
        if deps.draining():
            return JSONResponse({"status": "draining"}, status_code=503)
        if deps.dependencies is not None:
            # Cluster mode: a gateway that cannot reach Redis (or the records' database)
            # refuses every new session, so another gateway should get them. Names only:
            # why they failed is in the log, not in an unauthenticated answer.
            unreachable = await deps.dependencies()
            if unreachable:
                return JSONResponse(
                    {"status": "unavailable", "unreachable": unreachable}, status_code=503
                )
        return JSONResponse({"status": "ok"})

    @app.post(
        "/v1/public/{agent}/start",
        response_model=StartResponse,
        response_model_exclude_none=True,
        responses=error_responses(400, 401, 404, 413, 415, 429, 502, 503, 504),
        dependencies=[Depends(PUBLIC_KEY_SCHEME)],
        # The body is read by hand, within START_REQUEST_MAX_BYTES (_read_json); this is
        # what the document says it is.
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": _schema_ref("StartRequest")}}},
            }
        },
    )
    async def start(agent: str, request: Request) -> dict[str, Any]:
        """Start a session.

        With ``transport`` ``websocket`` or a telephony provider: mint the WebSocket URL (and
        token) a client connects with; the bot starts when the client connects to ``wsUrl``.
        With no ``transport`` (and no ``createDailyRoom``), as Pipecat Cloud's SDK sends it:
        start the bot now through the runtime's ``POST /bot`` and answer ``{"sessionId"}``
        once it runs (:mod:`catflap.gateway.botsession`). With ``createDailyRoom: true`` or
        ``transport: "daily"``: create a Daily room and token first
        (:mod:`catflap.gateway.daily`), start the bot in it, and answer
        ``{"sessionId", "dailyRoom", "dailyToken"}``. With ``transport: "webrtc"``: start the
        bot, which waits for the client's offer through the session proxy, and answer
        ``{"sessionId", "iceConfig"?}`` (:mod:`catflap.runtime.webrtc`).
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
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "request"
            raise BadRequest(f"invalid request: {where}: {first['msg']}") from None
        transport = payload.transport
        if transport is None and payload.createDailyRoom:
            transport = "daily"
        client_host = request.client.host if request.client else None
        if transport is None or transport == "daily":
            return await _start_bot(
                org, spec, payload, daily=transport == "daily", client_host=client_host
            )
        if transport == "webrtc":
            return await _start_webrtc(spec, payload, client_host=client_host)
        if transport not in START_TRANSPORTS:
            raise UnsupportedTransport(
                f"transport {transport!r} is not supported: send one of "
                f"{', '.join(START_TRANSPORTS)}, or none (a session without a transport)"
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

    def _limit_start(spec: AgentSpec, client_host: str | None) -> None:
        """Take a start from the client's address, once nothing else refuses the session."""
        if deps.start_limit is not None:
            deps.start_limit(client_host, f"POST /start of {spec.key}")

    async def _start_bot(
        org: str,
        spec: AgentSpec,
        payload: StartRequest,
        *,
        daily: bool,
        client_host: str | None,
    ) -> dict[str, Any]:
        """A session on the runtime's ``POST /bot``, in a new Daily room when ``daily``.

        Every refusal that needs no instance comes first, so that a room is created only for
        a session that can start, and a room that cannot be created holds no slot.
        """
        if deps.draining():
            raise Draining("the gateway is shutting down; start the session again")
        body = encode_bot_body(payload.body)
        if deps.bot_sessions is None:
            raise ServiceUnavailable("this API starts no sessions without a transport")
        if not daily:
            _limit_start(spec, client_host)
            return {"sessionId": await deps.bot_sessions.start(spec, body)}
        settings = deps.config.organizations[org]
        api_key = daily_api_key(org, settings)
        if await deps.pool.at_capacity(spec.key):
            raise AtCapacity(f"agent {spec.key} is at max_agents; retry shortly")
        _limit_start(spec, client_host)  # before the room: a refusal costs Daily nothing
        room = await create_daily_room(
            api_url=settings.daily_api_url,
            api_key=api_key,
            room_properties=payload.dailyRoomProperties,
            token_properties=payload.dailyMeetingTokenProperties,
            expires_at=int(deps.clock()) + spec.config.max_session_duration,
        )
        session_id = await deps.bot_sessions.start(spec, body, daily=room)
        return {"sessionId": session_id, "dailyRoom": room.url, "dailyToken": room.token}

    async def _start_webrtc(
        spec: AgentSpec, payload: StartRequest, *, client_host: str | None
    ) -> dict[str, Any]:
        """A SmallWebRTC session: a ``POST /bot`` that waits for the client's offer, which it
        sends to ``/v1/public/{agent}/sessions/{sessionId}/api/offer`` (the session proxy)."""
        if deps.draining():
            raise Draining("the gateway is shutting down; start the session again")
        body = encode_bot_body(payload.body)
        if deps.bot_sessions is None:
            raise ServiceUnavailable("this API starts no sessions without a WebSocket")
        _limit_start(spec, client_host)
        response: dict[str, Any] = {
            "sessionId": await deps.bot_sessions.start(spec, body, webrtc=True)
        }
        if payload.enableDefaultIceServers:
            servers = [server.to_wire() for server in spec.config.webrtc.ice_servers]
            response["iceConfig"] = ice_config_document(servers)["iceConfig"]
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

    app.include_router(session_proxy_router(agents=deps.agents, proxy=deps.session_proxy))
    _with_hand_read_bodies(app)
    organization = private_key_org(deps.config.organizations)
    app.include_router(metrics_router(settings=deps.config.gateway, metrics=deps.metrics))
    records = SessionRecords(deps.agents, deps.sessions, deps.store)
    app.include_router(sessions_router(organization=organization, records=records, pool=deps.pool))
    app.include_router(
        logs_router(
            organization=organization,
            records=records,
            source=deps.logs or FileLogSource(LogStore(deps.config.log_dir)),
        )
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
    app.include_router(secrets_router(organization=organization, store=deps.secrets))
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
