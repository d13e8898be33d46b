"""Sends 64 KiB binary frames as fast as the socket takes them, never reading."""

import asyncio


async def bot(args):
    chunk = b"\x00" * 65536
    try:
        while True:
            await args.websocket.send_bytes(chunk)
            # uvicorn's send does not yield while the kernel takes bytes; yield so the
            # runtime still answers the pool's liveness pings.
            await asyncio.sleep(0)
    except Exception:
        await asyncio.sleep(0)  # the client is gone; return normally
