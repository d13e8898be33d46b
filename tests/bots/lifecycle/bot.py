"""Ends the way the client asks, so a test knows which status each record must get.

Sends ``{"pid", "session_id"}`` first (as ``exclusive`` does), then echoes; ``"return"`` makes
``bot()`` return (``completed``), ``"raise"`` makes it raise (``bot_error``); a client that
closes first gives ``client_closed``.
"""

import json
import os


async def bot(args):
    ws = args.websocket
    await ws.send_text(json.dumps({"pid": os.getpid(), "session_id": args.session_id}))
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        text = message.get("text")
        if text == "return":
            return
        if text == "raise":
            raise RuntimeError("asked to fail")
        await ws.send_text(text if text is not None else "")
