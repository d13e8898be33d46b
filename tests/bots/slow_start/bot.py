"""A bot whose import takes 2 s: every cold start of it is slow enough for a client to leave
while it waits (catflap's fork server imports bot.py again in each instance)."""

import time

time.sleep(2.0)


async def bot(args):
    ws = args.websocket
    await ws.send_text("ready")
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("bytes") is not None:
            await ws.send_bytes(message["bytes"])
        else:
            await ws.send_text(message["text"])
