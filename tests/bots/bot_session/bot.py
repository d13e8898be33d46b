"""A bot for sessions without a transport: writes what it received, then does what the body says.

The body names a file (``out``) that gets one JSON line: the arguments' class name, the session
id and the body, and, for a session in a Daily room, its ``room_url`` and ``token``. ``then`` is
``return`` (the default), ``wait`` (sleep until stopped or out of time), ``crash`` (the process
exits at once) or ``sleep:<seconds>`` (then return).
"""

import asyncio
import json
import os


async def bot(args):
    body = args.body
    received = {"type": type(args).__name__, "session_id": args.session_id, "body": body}
    for daily in ("room_url", "token"):
        if hasattr(args, daily):
            received[daily] = getattr(args, daily)
    with open(body["out"], "a", encoding="utf-8") as out:
        out.write(json.dumps(received) + "\n")
    then = body.get("then", "return")
    if then == "wait":
        await asyncio.sleep(3600)
    elif then == "crash":
        os._exit(1)
    elif then.startswith("sleep:"):
        await asyncio.sleep(float(then.split(":", 1)[1]))
