"""Reports its pid and how many sessions run in this process right now, then echoes.

With one session per instance, ``concurrent`` must always be 1: the cluster tests use it to
prove that no two gateways ever put two sessions on one instance.
"""

import json
import os

ACTIVE = 0


async def bot(args):
    global ACTIVE
    ACTIVE += 1
    try:
        ws = args.websocket
        await ws.send_text(
            json.dumps({"pid": os.getpid(), "concurrent": ACTIVE, "session_id": args.session_id})
        )
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is not None:
                await ws.send_text(message["text"])
            else:
                await ws.send_bytes(message["bytes"])
    finally:
        ACTIVE -= 1
