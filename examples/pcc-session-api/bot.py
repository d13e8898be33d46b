"""A bot with its own HTTP route, as on Pipecat Cloud: ``GET /status`` through
``pipecatcloud_system``, reachable through the session proxy while the session runs.

Started without a transport (the SDK's ``Session(...).start()``, or ``POST /start`` with no
``transport``), ``bot(args)`` gets ``PipecatSessionArguments``: it records the session and
runs until the session is stopped (``DELETE``) or its time limit ends it.

``GET /status`` answers for the session the proxy names in ``x-daily-session-id``. With one
session per instance (PCC's rule, catflap's default) a module-level global would do; the dict
keeps it right when ``sessions_per_instance`` is above 1 and several sessions share a process.
"""

import asyncio
import time

from fastapi import Header, HTTPException

from pipecatcloud_system import app

#: session id -> what the session was started with and when.
SESSIONS: dict[str, dict] = {}


@app.get("/status")
async def status(x_daily_session_id: str | None = Header(default=None)) -> dict:
    session = SESSIONS.get(x_daily_session_id or "")
    if session is None:
        raise HTTPException(status_code=404, detail="no such session on this instance")
    shown = {key: value for key, value in session.items() if key != "started"}
    return {**shown, "running_s": round(time.monotonic() - session["started"], 3)}


async def bot(args) -> None:
    SESSIONS[args.session_id] = {
        "session_id": args.session_id,
        "args": type(args).__name__,
        "body": args.body,
        "started": time.monotonic(),
    }
    try:
        await asyncio.Event().wait()  # until stopped: cancellation ends the session
    finally:
        SESSIONS.pop(args.session_id, None)
