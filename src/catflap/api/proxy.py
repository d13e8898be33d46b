"""The session proxy's route: ``/v1/public/{agent}/sessions/{session_id}/{path}``, every method,
to the bot of a live session (:mod:`catflap.gateway.sessionproxy` makes the hop).

The checks, in order: the organisation's public key (401 ``401``, as ``/start``), the agent (404
``404``), the session id's form (400 ``bad_request``), the path (400 ``invalid_proxy_path``,
404 ``reserved_path``), the body, read whole up to ``SESSION_PROXY_BODY_MAX_BYTES`` (413
``request_too_large``), then where the session runs (404 ``session_not_found``, 503
``session_starting``) and the bot's answer (502 ``session_unreachable``, 504
``session_proxy_timeout``). The proxy runs during a drain too: sessions still running may be
reached until they end.

The answer streams: :class:`ProxiedResponse` sends each chunk as the bot's connection yields it
and waits for the client to take it (uvicorn's flow control), so the gateway holds one chunk at
a time, whatever the body's size. A client that takes no chunk for ``SLOW_PEER_TIMEOUT_S``, or
a bot whose answer breaks off, ends the response unfinished: the connection closes without the
body's end, so the client cannot mistake it for a whole answer.
"""

# No ``from __future__ import annotations``: FastAPI reads the route's annotations at run time.

import logging
from typing import TYPE_CHECKING, Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Request
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from catflap.api.auth import canonical_session_id, error_responses, public_key_org
from catflap.contract import limits
from catflap.contract.errors import (
    AgentNotFound,
    RequestTooLarge,
    ServiceUnavailable,
    SessionNotFound,
)
from catflap.gateway.sessionproxy import (
    AnswerBrokeOff,
    ProxiedAnswer,
    SessionProxy,
    forwarded_headers,
    proxied_target,
    raw_rest,
)
from catflap.requestbody import read_bounded_body

if TYPE_CHECKING:
    from catflap.directory import AgentDirectory

__all__ = ["PROXY_METHODS", "ProxiedResponse", "session_proxy_router"]

log = logging.getLogger("catflap.gateway.proxy")

#: PCC's session proxy methods.
PROXY_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD")


class ProxiedResponse(StreamingResponse):
    """The bot's answer, streamed to the client chunk by chunk as the client takes them.

    Starlette's ``StreamingResponse`` brings the watch for a client that leaves (it cancels the
    stream); this class adds the headers as the bot sent them, the bound on a client that stops
    reading, and the connection to the instance closed in every case.
    """

    def __init__(self, answer: ProxiedAnswer, *, send_timeout: float) -> None:
        super().__init__(answer.chunks(), status_code=answer.status)
        self.raw_headers = answer.headers
        self._answer = answer
        self._send_timeout = send_timeout

    async def stream_response(self, send: Send) -> None:
        async def bounded(message: Message) -> None:
            with anyio.fail_after(self._send_timeout):
                await send(message)

        try:
            status, head = self.status_code, self.raw_headers
            await bounded({"type": "http.response.start", "status": status, "headers": head})
            async for chunk in self.body_iterator:
                await bounded({"type": "http.response.body", "body": chunk, "more_body": True})
            await bounded({"type": "http.response.body", "body": b"", "more_body": False})
        except TimeoutError:
            # Returning unfinished makes uvicorn close the connection without the body's end.
            log.warning(
                "! session %s: the client took no proxied bytes for %g s; cutting it off",
                self._answer.session_id,
                self._send_timeout,
            )
        except AnswerBrokeOff as exc:
            log.warning("! %s; cutting the client's response off", exc)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Shielded: a client that left cancels the stream, and the close must still run.
            with anyio.move_on_after(limits.CLOSE_WAIT_S, shield=True):
                await self._answer.aclose()


#: The methods whose body the OpenAPI document describes (the others' bodies pass through too).
_METHODS_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})
_PASSED_THROUGH_BODY: dict[str, Any] = {
    "requestBody": {
        "required": False,
        "description": "Passed to the bot unchanged, up to 1 MiB (413 beyond it).",
        "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
    }
}


def session_proxy_router(*, agents: "AgentDirectory", proxy: SessionProxy | None) -> APIRouter:
    """The proxy's route over the agent directory and the gateway's :class:`SessionProxy`
    (None: every proxied request gets 503)."""
    router = APIRouter()
    organization = public_key_org(agents)

    async def session_proxy(
        agent: str,
        session_id: str,
        path: str,
        request: Request,
        org: Annotated[str, Depends(organization)],
    ) -> ProxiedResponse:
        """Forward this request to ``/{path}`` on the runtime that runs the session: the bot's
        own routes (``pipecatcloud_system.app``) and ``/api/offer``, never the runtime's
        ``/ws``, ``/bot``, ``/livez``, ``/readyz`` or ``/metrics``. Every request header but
        ``host``, ``content-length`` and ``authorization`` (and hop-by-hop ones) is passed on,
        with ``x-daily-session-id``; the query string and a body of up to 1 MiB too. The bot's
        status, headers and body come back as it sends them."""
        spec = agents.agent(org, agent)
        if spec is None:
            raise AgentNotFound(f"no agent {agent!r} in organization {org!r}")
        session = canonical_session_id(session_id)
        rest = raw_rest(request.scope.get("raw_path", b""), agent, session_id)
        if rest is None:
            raise SessionNotFound(f"no session {session_id[:64]!r}: the session id has a '/'")
        target = proxied_target(rest, request.scope.get("query_string", b""))
        body = await read_bounded_body(
            request,
            limits.SESSION_PROXY_BODY_MAX_BYTES,
            lambda size: RequestTooLarge(
                f"the proxied request body is {size} bytes or more; at most "
                f"{limits.SESSION_PROXY_BODY_MAX_BYTES} are passed on to a bot"
            ),
        )
        if proxy is None:
            raise ServiceUnavailable("this API proxies no sessions")
        address = await proxy.place(spec.key, session)
        answer = await proxy.forward(
            address,
            request.method,
            target,
            forwarded_headers(request.headers.raw, session),
            body,
            session_id=session,
        )
        return ProxiedResponse(answer, send_timeout=proxy.send_timeout)

    for method in PROXY_METHODS:  # one route each: OpenAPI wants one operation id per method
        router.add_api_route(
            "/v1/public/{agent}/sessions/{session_id}/{path:path}",
            session_proxy,
            methods=[method],
            operation_id=f"session_proxy_{method.lower()}",
            responses=error_responses(400, 401, 404, 413, 502, 503, 504),
            summary="Reach a route of a running session's bot",
            # The body is the bot's business: any bytes, passed through as they are.
            openapi_extra=_PASSED_THROUGH_BODY if method in _METHODS_WITH_BODY else None,
        )
    return router
