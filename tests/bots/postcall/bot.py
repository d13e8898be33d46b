"""Echoes until the client leaves, then does 3 s of post-call work (a summary, a CRM write)
before ``bot()`` returns: the connection is closed long before the session ends."""

import asyncio


async def bot(args):
    ws = args.websocket
    await ws.send_text("ready")
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            break
    await asyncio.sleep(3.0)
