"""The benchmark's upstream: echo every WebSocket message back, and nothing else.

It runs in the real catflap agent runtime like any ``bot.py``: the session is accepted by the
runtime's ``/ws``, gets its arguments, is reported to the pool, and ends when ``bot()`` returns.
Unlike ``examples/echo`` it sends no greeting, so the first frame a client sees is its own echo.

Two ways to echo, chosen with the environment variable ``CATFLAP_BENCH_ECHO``:

- ``fast`` (default): the echo is written from uvicorn's frame handler, straight to the socket.
  uvicorn's websockets-sansio protocol still parses and unmasks every frame, answers pings and
  handles the close; only the hop through the ASGI queue, the bot task and the frame encoder is
  skipped. This is the issue's "fast path": with both the load client and the upstream on one
  core of a 2-core machine, the plain ASGI loop below costs about 3x more per frame and saturates
  that core at 300 sessions, which would make the relay's latency unmeasurable.
- ``asgi``: ``msg = await ws.receive()`` and ``await ws.send(...)`` with uvicorn's own message
  dicts, the plainest bot possible. Also used when the fast path is not available (another
  uvicorn WebSocket implementation) and for fragmented messages.
"""

import os
from collections.abc import Callable
from typing import Any

_FAST = os.environ.get("CATFLAP_BENCH_ECHO", "fast") != "asgi"


def _header(opcode: int, length: int) -> bytes:
    if length < 126:
        return bytes((0x80 | opcode, length))
    if length < 65536:
        return bytes((0x80 | opcode, 126)) + length.to_bytes(2, "big")
    return bytes((0x80 | opcode, 127)) + length.to_bytes(8, "big")


def _install_fast_path(ws: Any) -> bool:
    """Echo whole frames from uvicorn's frame handlers; False if this uvicorn has none."""
    proto: Any = getattr(ws._receive, "__self__", None)
    transport = getattr(proto, "transport", None)
    if transport is None or not hasattr(proto, "handle_bytes") or not hasattr(proto, "queue"):
        return False
    slow_bytes, slow_text = proto.handle_bytes, proto.handle_text

    def echo(opcode: int, slow: Callable[[Any], None]) -> Callable[[Any], None]:
        def handle(event: Any) -> None:
            if not event.fin:  # fragmented: let uvicorn assemble it; the ASGI loop echoes it
                slow(event)
            elif not proto.close_sent and not transport.is_closing():
                transport.write(_header(opcode, len(event.data)) + event.data)

        return handle

    # Messages uvicorn parsed before this point are already queued: echo them first, in order.
    while not proto.queue.empty():
        message = proto.queue.get_nowait()
        if message["type"] != "websocket.receive":
            proto.queue.put_nowait(message)  # a disconnect: leave it for receive()
            break
        if message.get("text") is not None:
            data = message["text"].encode()
            transport.write(_header(0x1, len(data)) + data)
        else:
            transport.write(_header(0x2, len(message["bytes"])) + message["bytes"])
    proto.handle_bytes = echo(0x2, slow_bytes)
    proto.handle_text = echo(0x1, slow_text)
    # uvicorn pauses reading after queueing each message and resumes in its receive(); the
    # messages taken above bypassed that, so resume here.
    if getattr(proto, "read_paused", False) and proto.queue.empty():
        proto.read_paused = False
        transport.resume_reading()
    return True


async def bot(args: Any) -> None:
    ws = args.websocket
    if _FAST:
        _install_fast_path(ws)
    receive, send = ws.receive, ws.send
    while True:
        message = await receive()
        if message["type"] != "websocket.receive":
            return  # websocket.disconnect
        text = message.get("text")
        if text is None:
            await send({"type": "websocket.send", "bytes": message["bytes"]})
        else:
            await send({"type": "websocket.send", "text": text})
