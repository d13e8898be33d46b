"""The dispatch benchmark's bot: says which process runs the session, then waits for the end.

The first frame, ``{"pid": ..., "session_id": ...}``, is what the client times (start latency)
and how it counts sessions per agent host (each host's instances are its descendants).
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
