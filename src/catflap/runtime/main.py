"""``catflap agent``, the runtime's command line: flags -> :class:`AgentOptions` -> exit code.

Also runnable as ``python -m catflap.runtime.main --bot-dir DIR --listen ADDRESS``; the pool
starts it that way (or forks a process that has imported this module and calls :func:`main`).
Every flag, with its default and help, comes from a field of
:class:`~catflap.runtime.process.AgentOptions`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, get_args

import click

from catflap.contract.errors import ConfigError
from catflap.logs import LOG_FORMATS, configure_logging
from catflap.runtime.exits import EXIT_BOT_STUCK, EXIT_CONFIG
from catflap.runtime.process import AgentOptions, RuntimeLogLevel, loop_factory, run_agent

__all__ = ["agent", "main"]

_PROG_NAME = "catflap agent"

_Command = TypeVar("_Command", bound=Callable[..., Any])


def _option(
    field: str, param_type: click.ParamType[Any] | type, metavar: str | None = None
) -> Callable[[_Command], _Command]:
    """``--field-name``, with the default and help of :class:`AgentOptions`'s field."""
    info = AgentOptions.model_fields[field]
    # A required option gets no default at all: click counts even ``default=None`` as given.
    default: dict[str, Any] = (
        {"required": True}
        if info.is_required()
        else {"default": info.default, "show_default": info.default is not None}
    )
    return click.option(
        "--" + field.replace("_", "-"),
        field,
        type=param_type,
        metavar=metavar,
        help=info.description,
        **default,
    )


def _path(*, file_okay: bool = False) -> click.Path:
    return click.Path(path_type=Path, file_okay=file_okay)


@click.command(name="agent", context_settings={"help_option_names": ["-h", "--help"]})
@_option("bot_dir", _path(), "DIR")
@_option("listen", str, "ADDRESS")
@_option("control_fd", int, "FD")
@_option("agent_name", str, "NAME")
@_option("log_level", click.Choice(get_args(RuntimeLogLevel)))
@_option("log_format", click.Choice(LOG_FORMATS))
@_option("log_dir", _path(), "DIR")
@_option("sessions_per_instance", click.IntRange(min=1), "N")
@_option("webrtc_offer_timeout", click.FloatRange(min=0, min_open=True), "SECONDS")
@click.pass_context
def agent(ctx: click.Context, /, **flags: Any) -> None:
    """Run one agent's bot.py behind WS /ws and POST /bot, as Pipecat Cloud's base image does.

    The pool starts one of these per agent instance. With --log-dir, each session's bot
    output goes to its own file; --log-format picks JSON lines or text on stderr.
    """
    ctx.exit(_run(AgentOptions(**flags)))


def _run(options: AgentOptions) -> int:
    # uvicorn's "trace" is below logging's DEBUG; the runtime's own lines stop at debug.
    configure_logging(
        "debug" if options.log_level == "trace" else options.log_level, options.log_format
    )
    runner = asyncio.Runner(loop_factory=loop_factory())
    try:
        code = runner.run(run_agent(options))
    except ConfigError as exc:
        print(f"{_PROG_NAME}: {exc}", file=sys.stderr)
        code = EXIT_CONFIG
    if code == EXIT_BOT_STUCK:
        # asyncio.Runner.close() would wait forever for the bot that ignores cancellation.
        logging.shutdown()
        os._exit(code)
    runner.close()
    return code


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the agent and return its exit code.

    Bad flags print click's usage error and return :data:`~catflap.runtime.exits.EXIT_CONFIG`.
    """
    try:
        code = agent.main(args=argv, prog_name=_PROG_NAME, standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        return EXIT_CONFIG
    except click.Abort as exc:
        # click turns the KeyboardInterrupt of SIGINT into Abort; the caller expects the former.
        raise KeyboardInterrupt from exc
    return int(code or 0)


if __name__ == "__main__":
    raise SystemExit(main())
