"""Import a folder's ``bot.py`` as the top-level module ``bot``, as PCC's base image does.

The folder goes first on ``sys.path`` (so ``bot.py`` can import its sibling modules) and becomes
the working directory (so relative paths in the bot resolve as they do in the container, whose
working directory is ``/app``).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from catflap.contract.errors import CatflapError

__all__ = ["BotImportError", "LoadedBot", "load_bot"]


class BotImportError(CatflapError):
    """``bot.py`` could not be imported or has no ``async def bot(args)``.

    ``str(exc)`` is the text to show the user: the formatted traceback when the import raised,
    otherwise a one-line explanation.
    """


@dataclass(frozen=True)
class LoadedBot:
    """The imported module and the hooks the runtime calls."""

    module: ModuleType
    #: ``async def bot(args)``: one session.
    bot: Callable[[Any], Awaitable[None]]
    #: Optional ``readyz()``, sync or async, returning ``bool`` or ``{"ready": bool, ...}``.
    readyz: Callable[[], Any] | None
    #: Optional ``select_subprotocol(offered: list[str]) -> str | None`` (a catflap extension).
    select_subprotocol: Callable[[list[str]], str | None] | None


def _is_async_callable(obj: object) -> bool:
    return inspect.iscoroutinefunction(obj) or inspect.iscoroutinefunction(
        getattr(obj, "__call__", None)  # noqa: B004 - an instance with an async __call__
    )


def load_bot(bot_dir: Path) -> LoadedBot:
    """Import ``bot_dir/bot.py`` as module ``bot``; changes ``sys.path`` and the working dir.

    Args:
        bot_dir: The agent's folder (absolute or relative to the current directory).

    Raises:
        BotImportError: there is no ``bot.py``, importing it raised (ImportError, SyntaxError,
            anything else), or it has no async callable ``bot``.
    """
    bot_dir = bot_dir.resolve()
    if not (bot_dir / "bot.py").is_file():
        raise BotImportError(f"{bot_dir} has no bot.py")
    sys.path.insert(0, str(bot_dir))
    os.chdir(bot_dir)
    # A stale "bot" from an earlier import (or another folder) must not be reused.
    sys.modules.pop("bot", None)
    importlib.invalidate_caches()
    try:
        module = importlib.import_module("bot")
    except BaseException as exc:  # a bot may even call sys.exit() at import time
        if isinstance(exc, KeyboardInterrupt):
            raise
        text = "".join(traceback.format_exception(exc))
        raise BotImportError(text) from exc
    bot = getattr(module, "bot", None)
    if bot is None:
        raise BotImportError(f"{bot_dir / 'bot.py'} defines no bot(): add `async def bot(args)`")
    if not _is_async_callable(bot):
        raise BotImportError(
            f"{bot_dir / 'bot.py'}: bot must be an async function (`async def bot(args)`), "
            f"got {type(bot).__name__}"
        )
    readyz = getattr(module, "readyz", None)
    select = getattr(module, "select_subprotocol", None)
    return LoadedBot(
        module=module,
        bot=bot,
        readyz=readyz if callable(readyz) else None,
        select_subprotocol=select if callable(select) else None,
    )
