"""Writes to every output a bot has: ``logging``, ``loguru``, ``print`` and stderr.

On connect it logs one line of each kind, from the session's task and from a task and a thread
the bot starts (both inherit the session), sends the session id, then echoes text frames. A text
frame ``log:N`` logs N numbered lines with ``logging`` and echoes ``"logged N"``.
"""

import asyncio
import logging
import sys

from loguru import logger

log = logging.getLogger("chatty")
log.setLevel(logging.INFO)


def _from_thread(session_id):
    log.info("logging from a thread of %s", session_id)


async def bot(args):
    ws = args.websocket
    sid = args.session_id
    log.info("logging line of %s", sid)
    logger.info("loguru line of {}", sid)
    print(f"print line of {sid}")
    print(f"stderr line of {sid}", file=sys.stderr)
    try:
        raise ValueError("handled error")
    except ValueError:
        log.exception("logging an exception")
    await asyncio.create_task(asyncio.sleep(0))
    await asyncio.to_thread(_from_thread, sid)
    await ws.send_text(sid)
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        text = message.get("text") or ""
        if text.startswith("log:"):
            count = int(text[4:])
            for number in range(count):
                log.info("numbered line %d", number)
            await ws.send_text(f"logged {count}")
        else:
            await ws.send_text(text)
