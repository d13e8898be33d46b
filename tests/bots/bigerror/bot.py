"""Raises with a 500 KB message: the session record must keep only a marked start of it."""

ERROR_CHARS = 500_000


async def bot(args):
    await args.websocket.send_text("raising")
    raise RuntimeError("x" * ERROR_CHARS)
