"""``catflap serve``: the gateway, the control API and a warm pool on this machine.

The command line becomes a configuration in :mod:`catflap.cli.flags`; what runs is wired by
:func:`catflap.compose.build_gateway`. This module holds the command and its run: signals,
listening, the log pruner, the drain.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import tempfile
from pathlib import Path

import click

from catflap.cli.exits import EXIT_CONFIG, EXIT_STARTUP, run_async
from catflap.cli.flags import serve_config, with_api_docs, with_dashboard
from catflap.cli.startup import listen_failure, raise_open_file_limit
from catflap.config import CatflapConfig, token_keyring
from catflap.contract.errors import ConfigError, StartupError
from catflap.logs import LOG_FORMATS, LogFormat, configure_logging

__all__ = ["dashboard_option", "log_format_option", "serve", "start_pruner"]

log = logging.getLogger("catflap")


log_format_option = click.option(
    "--log-format",
    type=click.Choice(LOG_FORMATS),
    default=LOG_FORMATS[0],
    show_default=True,
    help="Log lines on stderr (gateway and agents) as JSON objects or plain text.",
)
dashboard_option = click.option(
    "--dashboard",
    is_flag=True,
    help="Serve the live view at /dashboard (it asks for a private key).",
)


def start_pruner(cfg: CatflapConfig, log_dir: Path) -> asyncio.Task[None]:
    """Keep ``log_dir`` within ``[logs]`` retention_days and max_total_mb, every minute."""
    from catflap.logstore import LogStore, prune_forever

    log.info(
        "= session logs in %s (kept %g days, %g MiB at most)",
        log_dir,
        cfg.logs.retention_days,
        cfg.logs.max_total_mb,
    )
    return asyncio.create_task(
        prune_forever(
            LogStore(log_dir),
            retention_days=cfg.logs.retention_days,
            max_total_mb=cfg.logs.max_total_mb,
        ),
        name="log pruner",
    )


@click.command()
@click.argument("folder", required=False, type=click.Path(path_type=Path, file_okay=False))
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="catflap.toml with several agents and organizations.",
)
@click.option("--org", help="Organization name (zero-config mode).")
@click.option("--listen", help="host:port for /ws/... and /v1/... [default: 127.0.0.1:8080]")
@click.option(
    "--listen-tls",
    help="host:port of a TLS listener (wss://, https://), e.g. 0.0.0.0:443; needs --tls-cert "
    "and --tls-key (or listen_tls, tls_cert, tls_key in the config file).",
)
@click.option(
    "--tls-cert",
    type=click.Path(path_type=Path, dir_okay=False),
    help="PEM certificate chain (certbot's fullchain.pem); reloaded on SIGHUP and on change.",
)
@click.option(
    "--tls-key",
    type=click.Path(path_type=Path, dir_okay=False),
    help="PEM private key of --tls-cert, unencrypted (certbot's privkey.pem).",
)
@click.option(
    "--public-url",
    help="Base of the wsUrl /start returns, e.g. wss://voice.example.com  "
    "[default: wss:// on --listen-tls when given, else ws:// on --listen]",
)
@click.option("--public-key", "public_keys", multiple=True, help="Public API key (repeatable).")
@click.option("--private-key", "private_keys", multiple=True, help="Private API key (repeatable).")
@click.option(
    "--database-url",
    help="Keep session records in PostgreSQL (postgresql://user@host/db) or in one SQLite file "
    "(sqlite:///path); overrides database_url in the config file.",
)
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Folder for session records (sessions.sqlite3, when there is no database URL), spent "
    "tokens (replay.sqlite3) and session logs (logs/, unless [logs] dir is set); overrides "
    "state_dir in the config file.  "
    "[default: .catflap]",
)
@click.option(
    "--pass-env",
    "pass_env",
    multiple=True,
    metavar="NAME",
    help="Pass this variable of catflap's environment (or PREFIX*) to the agent's instances "
    "(repeatable; bot folder only). Nothing else of it reaches them: prefer "
    "`catflap secrets set` and secret_set for keys.",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
@log_format_option
@dashboard_option
@click.option(
    "--api-docs",
    is_flag=True,
    help="Serve Swagger UI at /docs and ReDoc at /redoc (they load third-party scripts).",
)
def serve(
    folder: Path | None,
    config_file: Path | None,
    org: str | None,
    listen: str | None,
    listen_tls: str | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    public_url: str | None,
    public_keys: tuple[str, ...],
    private_keys: tuple[str, ...],
    database_url: str | None,
    state_dir: Path | None,
    pass_env: tuple[str, ...],
    log_level: str,
    log_format: LogFormat,
    dashboard: bool,
    api_docs: bool,
) -> None:
    """Run the gateway, the control API and a warm pool of agents on this machine.

    Session logs go to <state_dir>/logs (or [logs] dir) and are pruned every minute.
    """
    configure_logging(log_level, log_format)
    try:
        cfg = serve_config(
            folder,
            config_file,
            org,
            listen,
            public_url,
            public_keys,
            private_keys,
            database_url=database_url,
            state_dir=state_dir,
            pass_env=pass_env,
            tls=(listen_tls, tls_cert, tls_key),
        )
        cfg = with_api_docs(with_dashboard(cfg, dashboard), api_docs)
        keyring, generated = token_keyring()
    except ConfigError as exc:
        click.echo(f"catflap: configuration error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    if generated:
        log.warning(
            "CATFLAP_TOKEN_KEYS is not set: using a random signing key; tokens "
            "won't survive a restart or work across gateways"
        )
    else:
        from catflap.compose import REPLAY_FILE

        # Info, not a warning: one gateway with fixed keys is the normal case, and correct.
        log.info(
            "= single-use tokens are enforced per state_dir (spent ones in %s): gateways that "
            "share CATFLAP_TOKEN_KEYS on other machines must run as `catflap gateway --redis`",
            cfg.state_dir / REPLAY_FILE,
        )
    raise_open_file_limit()
    try:
        run_async(_serve(cfg, keyring, log_level, log_format))
    except ConfigError as exc:  # the TLS certificate and key, read when the gateway is built
        click.echo(f"catflap: configuration error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    except StartupError as exc:
        click.echo(f"catflap: {exc}", err=True)
        sys.exit(EXIT_STARTUP)
    except OSError as exc:
        click.echo(f"catflap: could not start: {exc}", err=True)
        sys.exit(EXIT_STARTUP)


async def _serve(
    cfg: CatflapConfig, keyring: object, log_level: str, log_format: LogFormat
) -> None:
    from catflap.auth.tokens import KeyRing
    from catflap.compose import AgentLaunch, Overrides, build_gateway

    assert isinstance(keyring, KeyRing)
    with tempfile.TemporaryDirectory(prefix="catflap-") as socket_dir:
        launch = AgentLaunch(Path(socket_dir), log_level=log_level, log_format=log_format)
        gateway = await build_gateway(cfg, Overrides(keyring=keyring), launch=launch)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        terms = 0

        def on_signal() -> None:  # handlers only set flags; the main flow acts on them
            nonlocal terms
            terms += 1
            if terms == 1:
                stop.set()
            else:
                gateway.drain_now()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        # SIGHUP reloads the TLS certificate (an ACME client's deploy hook sends it).
        loop.add_signal_handler(signal.SIGHUP, gateway.reload_tls)
        host, port = cfg.host_port
        try:
            await gateway.start(host, port)
        except OSError as exc:
            await gateway.close()
            raise listen_failure(exc, host, port, tls=cfg.tls_host_port) from None
        pruner = start_pruner(cfg, cfg.log_dir)
        for agent in cfg.agents():
            log.info("agent %s: ws://%s:%d/ws/generic/%s", agent.key, host, gateway.port, agent.key)
            if cfg.tls_host_port is not None:
                log.info("agent %s: %s/ws/generic/%s", agent.key, cfg.ws_base_url, agent.key)
        if cfg.gateway.dashboard:
            log.info("= live view at http://%s:%d/dashboard", host, gateway.port)
        await stop.wait()
        log.info("x shutting down (send the signal again to close every session now)")
        await gateway.shutdown()
        pruner.cancel()
        await gateway.close()
