"""``catflap telephony-xml``: ready-to-paste TwiML, TeXML or Plivo XML for an agent."""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import click

from catflap.api.telephony import TELEPHONY_TRANSPORTS, provider_ws_url, provider_xml
from catflap.cli.exits import EXIT_CONFIG
from catflap.config import load_config
from catflap.contract.errors import ConfigError, InvalidServiceHost
from catflap.contract.names import parse_service_host

__all__ = ["telephony_xml"]


@click.command(name="telephony-xml")
@click.argument("provider", type=click.Choice(TELEPHONY_TRANSPORTS))
@click.argument("service_host", metavar="AGENT.ORG")
@click.option("--url", help="Public WebSocket base of the deployment, e.g. wss://voice.example.com")
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Take the base from public_url in this catflap.toml.",
)
@click.option("--token", help="A session token from POST /start (token-auth agents).")
@click.option("--body", "body_json", help="JSON for ?body= (Telnyx, Plivo, Exotel).")
def telephony_xml(
    provider: str,
    service_host: str,
    url: str | None,
    config_file: Path | None,
    token: str | None,
    body_json: str | None,
) -> None:
    """Print the provider markup that streams a call to AGENT.ORG."""
    try:
        parse_service_host(service_host)
    except InvalidServiceHost as exc:
        raise click.BadParameter(exc.message, param_hint="AGENT.ORG") from None
    if url is None and config_file is not None:
        try:
            url = load_config(config_file).ws_base_url
        except ConfigError as exc:
            click.echo(f"catflap: configuration error: {exc}", err=True)
            sys.exit(EXIT_CONFIG)
    if url is None:
        raise click.UsageError("give --url wss://your-host (or --config with public_url)")
    if not url.startswith("wss://"):
        click.echo("catflap: warning: providers require wss:// URLs", err=True)
    body_b64 = None
    if body_json is not None:
        try:
            json.loads(body_json)
        except ValueError:
            raise click.BadParameter("not valid JSON", param_hint="--body") from None
        body_b64 = base64.b64encode(body_json.encode()).decode()
    ws_url = provider_ws_url(url, provider, service_host, token=token, body_b64=body_b64)
    click.echo(provider_xml(provider, ws_url, service_host), nl=False)
