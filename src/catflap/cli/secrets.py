"""``catflap secrets``: an organisation's secret sets, which become agents' environment variables.

The commands write the store a gateway reads when it starts an instance: the encrypted file in
the state dir (``catflap serve``), or the cluster's Redis (``--redis``). They print names only:
no command shows a value, and a value given on the command line is also visible in the shell's
history and to ``ps``, so ``--file`` reads them from a file instead.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import click

from catflap.cli.exits import EXIT_API, EXIT_CONFIG
from catflap.config import CatflapConfig, load_config
from catflap.contract.errors import ConfigError, RequestRejected, SecretStoreError
from catflap.secretsets.cipher import generate_key
from catflap.secretsets.store import SecretStore

__all__ = ["parse_assignments", "secrets"]

T = TypeVar("T")

_DEFAULT_STATE_DIR = Path(".catflap")


def _warn(message: str) -> None:
    click.echo(f"catflap: warning: {message}", err=True)


def parse_assignments(items: tuple[str, ...]) -> dict[str, str]:
    """``KEY=VALUE`` arguments as a mapping; the value is kept exactly (``=`` in it too).

    Raises:
        click.BadParameter: an item has no ``=``.
    """
    secrets: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            # The item may be a value typed without its name: never echo it.
            raise click.BadParameter(
                f"argument {len(secrets) + 1} is not KEY=VALUE (e.g. OPENAI_API_KEY=sk-...)",
                param_hint="KEY=VALUE",
            )
        secrets[key] = value
    return secrets


def _read_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines, as ``pipecat cloud secrets set --file`` reads them: blank lines and
    ``#`` comments skipped, a value in double quotes unquoted."""
    secrets: dict[str, str] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise click.BadParameter(f"{path}, line {number}: not KEY=VALUE", param_hint="--file")
        value = value.strip()
        if len(value) >= 2 and value.startswith('"') and value.endswith('"'):
            value = value[1:-1]
        secrets[key.strip()] = value
    return secrets


class _Target:
    """Which organisation and which store a command acts on."""

    def __init__(
        self,
        org: str | None,
        config_file: Path | None,
        state_dir: Path | None,
        redis_url: str | None,
        prefix: str,
    ) -> None:
        config: CatflapConfig | None = None
        if config_file is not None:
            try:
                config = load_config(config_file)
            except ConfigError as exc:
                click.echo(f"catflap: configuration error: {exc}", err=True)
                sys.exit(EXIT_CONFIG)
        if org is None:
            orgs = sorted(config.organizations) if config is not None else []
            if len(orgs) != 1:
                known = f" (the config file has {', '.join(orgs) or 'none'})" if config else ""
                raise click.UsageError(f"give the organization with --org{known}")
            org = orgs[0]
        self.org = org
        if state_dir is None:
            state_dir = config.state_dir if config is not None else _DEFAULT_STATE_DIR
        self.state_dir = state_dir
        self.redis_url = redis_url
        self.prefix = prefix

    def run(self, action: Callable[[SecretStore], Awaitable[T]]) -> T:
        """Run ``action`` on the store; a refusal or a store error ends the command."""

        async def main() -> T:
            if self.redis_url is None:
                from catflap.secretsets.filestore import FileSecretStore

                store: SecretStore = FileSecretStore(self.state_dir, warn=_warn)
                try:
                    return await action(store)
                finally:
                    await store.close()
            from catflap.cluster.client import connect
            from catflap.cluster.keys import Keys
            from catflap.secretsets.redisstore import RedisSecretStore

            client = connect(self.redis_url)
            try:
                return await action(RedisSecretStore(client, Keys(self.prefix)))
            finally:
                await client.aclose()

        try:
            return asyncio.run(main())
        except (RequestRejected, SecretStoreError) as exc:
            click.echo(f"catflap: {exc}", err=True)
            sys.exit(EXIT_API)


def _target_options(command: Callable[..., None]) -> Callable[..., None]:
    for option in reversed(
        [
            click.option("--org", help="The organization [default: the config file's only one]."),
            click.option(
                "--config",
                "config_file",
                type=click.Path(path_type=Path, dir_okay=False, exists=True),
                help="catflap.toml: its state_dir and, with one organization, its name.",
            ),
            click.option(
                "--state-dir",
                type=click.Path(path_type=Path, file_okay=False),
                help="The state dir `catflap serve` uses [default: the config's, else .catflap].",
            ),
            click.option(
                "--redis",
                "redis_url",
                help="Cluster mode: the deployment's redis://host:port/db instead of a state dir.",
            ),
            click.option(
                "--prefix", default="catflap", show_default=True, help="Redis key prefix."
            ),
        ]
    ):
        command = option(command)
    return command


@click.group()
def secrets() -> None:
    """An organization's secret sets: environment variables of the agents that name them.

    An agent selects a set with `secret_set = "NAME"` (pcc-deploy.toml, or its table in
    catflap.toml). Values are encrypted at rest with CATFLAP_SECRETS_KEY. A change reaches the
    instances started after it; running ones keep what they started with. No command prints
    a value.
    """


@secrets.command(name="set")
@click.argument("name")
@click.argument("assignments", nargs=-1, metavar="KEY=VALUE...")
@click.option(
    "--file",
    "-f",
    "from_file",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="Read KEY=VALUE lines from this file (keeps values out of shell history and ps).",
)
@_target_options
def set_secrets(
    name: str,
    assignments: tuple[str, ...],
    from_file: Path | None,
    org: str | None,
    config_file: Path | None,
    state_dir: Path | None,
    redis_url: str | None,
    prefix: str,
) -> None:
    """Create secret set NAME, or add KEY=VALUE secrets to it (replacing same-named ones)."""
    if bool(assignments) == (from_file is not None):
        raise click.UsageError("give KEY=VALUE arguments or --file FILE (one of the two)")
    values = _read_file(from_file) if from_file is not None else parse_assignments(assignments)
    target = _Target(org, config_file, state_dir, redis_url, prefix)
    created = target.run(lambda store: store.put(target.org, name, values))
    verb = "created" if created else "updated"
    click.echo(
        f"secret set {name!r} {verb} in organization {target.org!r}: {', '.join(sorted(values))}"
    )
    if not created:
        click.echo("instances started from now on get it; running ones keep their old values")


@secrets.command(name="list")
@click.argument("name", required=False)
@_target_options
def list_secrets(
    name: str | None,
    org: str | None,
    config_file: Path | None,
    state_dir: Path | None,
    redis_url: str | None,
    prefix: str,
) -> None:
    """List the organization's secret sets, or the secret names in set NAME (never values)."""
    target = _Target(org, config_file, state_dir, redis_url, prefix)
    if name is None:
        names = target.run(lambda store: store.set_names(target.org))
        if not names:
            click.echo(f"organization {target.org!r} has no secret sets", err=True)
        for set_name in names:
            click.echo(set_name)
        return
    keys = target.run(lambda store: store.keys(target.org, name))
    if keys is None:
        click.echo(f"catflap: organization {target.org!r} has no secret set {name!r}", err=True)
        sys.exit(EXIT_API)
    for key in keys:
        click.echo(key)


@secrets.command(name="unset")
@click.argument("name")
@click.argument("key", required=False)
@_target_options
def unset_secrets(
    name: str,
    key: str | None,
    org: str | None,
    config_file: Path | None,
    state_dir: Path | None,
    redis_url: str | None,
    prefix: str,
) -> None:
    """Delete secret KEY from set NAME, or the whole set without KEY."""
    target = _Target(org, config_file, state_dir, redis_url, prefix)
    target.run(lambda store: store.delete(target.org, name, key))
    if key is None:
        click.echo(f"secret set {name!r} deleted from organization {target.org!r}")
    else:
        click.echo(f"secret {key!r} deleted from secret set {name!r}")


@secrets.command(name="generate-key")
def generate_key_command() -> None:
    """Print a new key for CATFLAP_SECRETS_KEY (keep it in a secret manager)."""
    click.echo(generate_key())
