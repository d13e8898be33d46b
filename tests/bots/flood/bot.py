"""Sends 64 KiB binary frames as fast as the socket takes them, never reading."""

import asyncio


async def bot(args):
    chunk = b"\x00" * 65536
    try:
        while True:
            await args.websocket.send_bytes(chunk)
    except Exception:
        await asyncio.sleep(0)  # the client is gone; return normally
