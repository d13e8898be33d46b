"""A bot that reports environment variables into its session log, then returns.

The body's ``names`` (default ``MY_SECRET`` and ``SOME_GATEWAY_ONLY_VAR``) are printed one per
line as ``NAME=value`` (``NAME is not set`` when absent). With ``"digest": true`` it prints
``NAME sha256=<hex>`` instead, so a test can prove the bot saw a value without the value itself
reaching any log. ``settings.VALUE_AT_IMPORT`` is the value its sibling module read when it was
imported (``SETTING_AT_IMPORT=...``): with a fork server, sibling modules import in the child,
after its environment is in place.
"""

import hashlib
import os

import settings


async def bot(args):
    body = args.body or {}
    names = body.get("names", ["MY_SECRET", "SOME_GATEWAY_ONLY_VAR"])
    for name in names:
        value = os.environ.get(name)
        if value is None:
            print(f"{name} is not set")
        elif body.get("digest"):
            print(f"{name} sha256={hashlib.sha256(value.encode()).hexdigest()}")
        else:
            print(f"{name}={value}")
    if not body.get("digest"):
        print(f"SETTING_AT_IMPORT={settings.VALUE_AT_IMPORT}")
