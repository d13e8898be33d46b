"""The ``catflap`` command line: one module per command group.

``main(argv)`` parses arguments, builds the config and turns typed errors into named exit
codes (:mod:`catflap.cli.exits`); nothing below the CLI calls ``sys.exit``.
"""

from __future__ import annotations

import contextlib
import sys

import click

from catflap.cli.bench import bench
from catflap.cli.cluster import agent_host, gateway
from catflap.cli.logs import logs
from catflap.cli.serve import serve
from catflap.cli.sessions import sessions
from catflap.cli.telephony import telephony_xml

__all__ = ["cli", "main"]


@click.group()
@click.version_option(package_name="catflap")
def cli() -> None:
    """catflap: self-hosted, Pipecat-Cloud-compatible WebSocket sessions."""


@click.command(
    context_settings={
        "ignore_unknown_options": True,
        "allow_extra_args": True,
        "help_option_names": [],
    }
)
@click.pass_context
def agent(ctx: click.Context) -> None:
    """Run one agent runtime (the pool starts these; `catflap agent --help` for options)."""
    from catflap.runtime.main import main as runtime_main

    sys.exit(runtime_main(list(ctx.args)))


cli.add_command(serve)
cli.add_command(agent)
cli.add_command(sessions)
cli.add_command(logs)
cli.add_command(gateway)
cli.add_command(agent_host)
cli.add_command(telephony_xml)
cli.add_command(bench)


def main(argv: list[str] | None = None) -> None:
    with contextlib.suppress(KeyboardInterrupt):
        cli.main(args=argv, prog_name="catflap")
