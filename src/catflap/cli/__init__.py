"""The ``catflap`` command line: one module per command group.

``main(argv)`` parses arguments, builds the config and turns typed errors into named exit
codes (:mod:`catflap.cli.exits`); nothing below the CLI calls ``sys.exit``.
"""

from __future__ import annotations

import contextlib

import click

from catflap.cli.bench import bench
from catflap.cli.cluster import agent_host, gateway
from catflap.cli.logs import logs
from catflap.cli.secrets import secrets
from catflap.cli.serve import serve
from catflap.cli.sessions import sessions
from catflap.cli.telephony import telephony_xml

__all__ = ["cli", "main"]


class _Commands(click.Group):
    """catflap's commands; ``agent`` (the agent runtime) is imported only when it is used.

    The runtime imports FastAPI, uvicorn and Prometheus: that would double the start-up time of
    every other command, ``catflap sessions ...`` included.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), "agent"])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name == "agent":
            from catflap.runtime.main import agent

            return agent
        return super().get_command(ctx, cmd_name)


@click.group(cls=_Commands)
@click.version_option(package_name="catflap")
def cli() -> None:
    """catflap: self-hosted, Pipecat-Cloud-compatible WebSocket sessions."""


cli.add_command(serve)
cli.add_command(sessions)
cli.add_command(secrets)
cli.add_command(logs)
cli.add_command(gateway)
cli.add_command(agent_host)
cli.add_command(telephony_xml)
cli.add_command(bench)


def main(argv: list[str] | None = None) -> None:
    with contextlib.suppress(KeyboardInterrupt):
        cli.main(args=argv, prog_name="catflap")
