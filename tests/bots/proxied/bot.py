"""A bot whose routes on ``pipecatcloud_system.app`` are reached through the gateway's session
proxy: each shows exactly what the bot received, or answers in a shape a test checks.

- ``/echo/{rest}`` (every method): the method, path, raw path, query, every header as received
  (order and repeats kept) and the body (base64).
- ``GET /status``: PCC's own example route; the session id the proxy named.
- ``GET /big?size=N``: N bytes (default 5 MB) in 64 KiB chunks, chunked, without a length;
  byte ``i`` is ``i % 251``. ``GET /big-counted?size=N`` also counts what it has produced, in
  ``GET /produced``.
- ``GET /slow``: never answers (the proxy's 504).
- ``GET /teapot``: 418 with two ``set-cookie`` headers and one of its own.
- ``POST /release``: ends the ``bot()`` of the session in ``x-daily-session-id``.

``bot(args)`` echoes a WebSocket session's messages until the client leaves; a session without
a transport runs until released (or stopped). With ``PROXIED_BOT_IMPORT_GATE`` set, importing
this file waits (at most 30 s) until that file exists: a test holds an instance in its cold start.
"""

import asyncio
import base64
import os
import time

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pipecatcloud_system import app

_GATE = os.environ.get("PROXIED_BOT_IMPORT_GATE")
if _GATE:
    _until = time.monotonic() + 30
    while not os.path.exists(_GATE) and time.monotonic() < _until:
        time.sleep(0.01)

CHUNK = 64 * 1024
#: Any chunk of the body is a slice of this: byte i of the body is i % 251.
PATTERN = bytes(i % 251 for i in range(CHUNK + 251))
RELEASE: dict[str, asyncio.Event] = {}
PRODUCED = {"bytes": 0}


def _release(session_id: str) -> asyncio.Event:
    return RELEASE.setdefault(session_id, asyncio.Event())


@app.api_route(
    "/echo/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
)
async def echo(request: Request, rest: str) -> JSONResponse:
    body = await request.body()
    return JSONResponse(
        {
            "method": request.method,
            "path": request.scope["path"],
            "raw_path": request.scope["raw_path"].decode("latin-1"),
            "query": request.scope["query_string"].decode("latin-1"),
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.headers.raw],
            "body": base64.b64encode(body).decode(),
        },
        headers={"x-bot": "echo"},
    )


@app.get("/status")
async def status(request: Request) -> dict:
    return {"status": "running", "session_id": request.headers.get("x-daily-session-id")}


async def _pattern(size: int, counted: bool):
    sent = 0
    while sent < size:
        n = min(CHUNK, size - sent)
        start = sent % 251
        yield PATTERN[start : start + n]
        sent += n
        if counted:
            PRODUCED["bytes"] = sent


@app.get("/big")
async def big(size: int = 5_000_000) -> StreamingResponse:
    return StreamingResponse(_pattern(size, False), media_type="application/octet-stream")


@app.get("/big-counted")
async def big_counted(size: int = 5_000_000) -> StreamingResponse:
    PRODUCED["bytes"] = 0
    return StreamingResponse(_pattern(size, True), media_type="application/octet-stream")


@app.get("/produced")
async def produced() -> dict:
    return dict(PRODUCED)


@app.get("/slow")
async def slow() -> dict:
    await asyncio.sleep(3600)
    return {}


@app.get("/teapot")
async def teapot() -> Response:
    response = Response(b"short and stout", status_code=418, media_type="text/plain")
    response.raw_headers.append((b"set-cookie", b"a=1; Path=/"))
    response.raw_headers.append((b"set-cookie", b"b=2; Path=/"))
    response.raw_headers.append((b"x-bot", b"teapot"))
    return response


@app.post("/release")
async def release(request: Request) -> dict:
    session_id = request.headers.get("x-daily-session-id", "")
    _release(session_id).set()
    return {"released": session_id}


async def bot(args):
    websocket = getattr(args, "websocket", None)
    if websocket is None:
        await _release(args.session_id).wait()
        return
    await websocket.send_text("ready")
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("bytes") is not None:
            await websocket.send_bytes(message["bytes"])
        else:
            await websocket.send_text(message["text"])
