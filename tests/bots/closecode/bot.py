"""Reports the close code and reason it receives to the file named in ``args.body["report"]``."""

import json


async def bot(args):
    ws = args.websocket
    await ws.send_text("ready")
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            with open(args.body["report"], "w") as fh:
                json.dump({"code": message.get("code"), "reason": message.get("reason")}, fh)
            return
