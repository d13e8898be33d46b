"""Ignores cancellation: the pool must kill its process rather than reuse it."""

import asyncio


async def bot(args):
    await args.websocket.send_text("ready")
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            continue  # a badly written bot swallowing cancellation
