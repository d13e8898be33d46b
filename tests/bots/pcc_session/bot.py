"""A ``POST /bot`` bot that records what it was given and shows it through its own routes.

``pipecatcloud_system.app`` carries ``GET /sessions/{id}`` (what ``bot(args)`` got) and
``POST /release/{id}`` (makes that session's ``bot()`` return). A body ``{"wait": true}`` keeps
``bot()`` running until released, stopped or out of budget; any other body returns at once.
"""

import asyncio

from pipecatcloud_system import app

SEEN = {}
RELEASE = {}


@app.get("/sessions/{session_id}")
async def seen(session_id: str):
    return SEEN.get(session_id, {})


@app.post("/release/{session_id}")
async def release(session_id: str):
    RELEASE.setdefault(session_id, asyncio.Event()).set()
    return {"released": session_id}


async def bot(args):
    print(f"bot() got {type(args).__name__} for {args.session_id}")
    SEEN[args.session_id] = {
        "type": type(args).__name__,
        "session_id": args.session_id,
        "body": args.body,
        "room_url": getattr(args, "room_url", None),
        "token": getattr(args, "token", None),
    }
    if isinstance(args.body, dict) and args.body.get("wait"):
        await RELEASE.setdefault(args.session_id, asyncio.Event()).wait()
