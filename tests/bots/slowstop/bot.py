"""Takes 1 s to unwind when cancelled (hanging up a call, flushing a transcript), then, as the
last thing ``bot()`` does, writes ``{marker_dir}/{session_id}.ended`` (``marker_dir`` from the
session's body): a test reads it to know that ``bot()`` had ended by a given moment."""

import asyncio
import json
import os

UNWIND_S = 1.0


async def bot(args):
    ws = args.websocket
    await ws.send_text(json.dumps({"session_id": args.session_id, "pid": os.getpid()}))
    try:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
    except asyncio.CancelledError:
        await asyncio.sleep(UNWIND_S)
        raise
    finally:
        marker_dir = (args.body or {}).get("marker_dir")
        if marker_dir:
            with open(os.path.join(marker_dir, f"{args.session_id}.ended"), "w") as marker:
                marker.write("ended")
