"""The smallest PCC-style bot: echo every WebSocket frame back, byte for byte.

It needs nothing but Starlette's WebSocket API (``args.websocket``). On connect it sends one
JSON text frame describing the session::

    {"session_id": ..., "body": ..., "transport_type": ...}

then echoes text frames as text and binary frames as binary until the client disconnects.

Test hooks (used by catflap's own tests; harmless to keep or delete when you copy this file):

- ``__raise__``: ``bot()`` raises ``RuntimeError("echo bot asked to raise")``.
- ``__close__:CODE:REASON``: the bot closes the socket with that code and reason and returns.
- ``__sleep_forever__``: the bot stops reading and sleeps until it is cancelled.
"""

import asyncio
import json


async def bot(args):
    ws = args.websocket
    hello = {
        "session_id": args.session_id,
        "body": args.body,
        "transport_type": args.transport_type,
    }
    await ws.send_text(json.dumps(hello, separators=(",", ":")))
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        text = message.get("text")
        if text is None:
            await ws.send_bytes(message["bytes"])
        elif text == "__raise__":
            raise RuntimeError("echo bot asked to raise")
        elif text.startswith("__close__:"):
            _, code, reason = text.split(":", 2)
            await ws.close(code=int(code), reason=reason)
            return
        elif text == "__sleep_forever__":
            await asyncio.Event().wait()  # never set; cancellation still ends it
        else:
            await ws.send_text(text)
