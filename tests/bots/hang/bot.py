"""Blocks its whole event loop on request, as a bot calling a blocking API would."""

import time


async def bot(args):
    ws = args.websocket
    await ws.send_text("ready")
    message = await ws.receive()
    if message.get("text") == "__hang__":
        time.sleep(3600)  # noqa: ASYNC251 - blocking the loop is the point of this bot
