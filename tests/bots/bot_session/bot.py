"""A bot for sessions without a transport: writes what it received, then does what the body says.

The body names a file (``out``) that gets one JSON line: the arguments' class name, the session
id and the body, and, for a session in a Daily room, its ``room_url`` and ``token``. ``then`` is
``return`` (the default), ``wait`` (sleep until stopped or out of time), ``crash`` (the process
exits at once), ``raise`` (``bot()`` raises) or ``sleep:<seconds>`` (then return). ``mb`` makes
the bot hold that many megabytes, every page written, until it ends.
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
    ballast = b"\x01" * (int(body.get("mb", 0)) * 1024 * 1024)  # noqa: F841 - held on purpose
    then = body.get("then", "return")
    if then == "wait":
        await asyncio.sleep(3600)
    elif then == "crash":
        os._exit(1)
    elif then == "raise":
        raise RuntimeError("the bot failed on purpose")
    elif then.startswith("sleep:"):
        await asyncio.sleep(float(then.split(":", 1)[1]))
