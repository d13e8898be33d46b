"""``catflap gateway`` and ``catflap agent-host``: the scale-out mode on one Redis."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import click

from catflap.cli.exits import EXIT_CONFIG, EXIT_STARTUP, run_async
from catflap.cli.flags import with_dashboard
from catflap.cli.serve import dashboard_option, log_format_option, start_pruner
from catflap.cli.startup import listen_failure, raise_open_file_limit
from catflap.config import CatflapConfig, load_config, token_keyring
from catflap.contract.errors import ConfigError, StartupError
from catflap.logs import LogFormat, configure_logging

__all__ = ["agent_host", "gateway"]

log = logging.getLogger("catflap")

_config_option = click.option(
    "--config",
    "config_file",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="The catflap.toml every gateway and agent host of the deployment shares.",
)
_redis_option = click.option(
    "--redis", "redis_url", required=True, help="redis://host:port/db shared by the deployment."
)
_prefix_option = click.option(
    "--prefix", default="catflap", show_default=True, help="Redis key prefix of this deployment."
)
_log_option = click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)


def _load(config_file: Path) -> CatflapConfig:
    try:
        return load_config(config_file)
    except ConfigError as exc:
        click.echo(f"catflap: configuration error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)


async def _until_signalled() -> asyncio.Event:
    """Returns an event set by the second SIGTERM; waits for the first one."""
    first, second = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:  # handlers only set flags
        (second if first.is_set() else first).set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    await first.wait()
    return second


@click.command()
@_config_option
@_redis_option
@click.option("--listen", help="host:port to serve on; overrides the config file.")
@_prefix_option
@_log_option
@log_format_option
@dashboard_option
def gateway(
    config_file: Path,
    redis_url: str,
    listen: str | None,
    prefix: str,
    log_level: str,
    log_format: LogFormat,
    dashboard: bool,
) -> None:
    """Run one gateway of a cluster: relay and control API, dispatching through Redis.

    The logs API reads the session lines agent hosts ship to Redis (no shared disk needed).
    """
    configure_logging(log_level, log_format)
    cfg = with_dashboard(_load(config_file), dashboard)
    if listen:
        cfg = cfg.model_copy(update={"listen": listen})
    try:
        keyring, generated = token_keyring()
    except ConfigError as exc:
        click.echo(f"catflap: configuration error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    if generated:
        log.warning("CATFLAP_TOKEN_KEYS is not set: tokens minted here fail on other gateways")
    raise_open_file_limit()
    try:
        run_async(_gateway(cfg, keyring, redis_url, prefix))
    except ConfigError as exc:  # the TLS certificate and key, read when the gateway is built
        click.echo(f"catflap: configuration error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    except StartupError as exc:
        click.echo(f"catflap: {exc}", err=True)
        sys.exit(EXIT_STARTUP)
    except OSError as exc:
        click.echo(f"catflap: could not start: {exc}", err=True)
        sys.exit(EXIT_STARTUP)


async def _gateway(cfg: CatflapConfig, keyring: object, redis_url: str, prefix: str) -> None:
    from catflap.auth.redis_replay import RedisReplayStore
    from catflap.auth.tokens import KeyRing
    from catflap.cluster.client import connect
    from catflap.cluster.dispatch import RedisPool
    from catflap.cluster.keys import Keys
    from catflap.cluster.liveness import GatewayLiveness
    from catflap.cluster.logship import RedisLogSource
    from catflap.cluster.readiness import cluster_dependencies
    from catflap.cluster.store import RedisSessionStore
    from catflap.compose import Overrides, build_gateway
    from catflap.secretsets.redisstore import RedisSecretStore
    from catflap.sessions.store import SessionStore, open_store

    assert isinstance(keyring, KeyRing)
    client = connect(redis_url)
    keys = Keys(prefix)
    store: SessionStore = (
        open_store(cfg.database_url, cfg.state_dir)
        if cfg.database_url
        else RedisSessionStore(client, keys)
    )
    # This gateway's heartbeat and session list, and the reaper of dead gateways' records.
    liveness = GatewayLiveness(client, keys, store)
    overrides = Overrides(
        keyring=keyring,
        pool=RedisPool(
            client,
            keys,
            cfg.agents(),
            liveness=liveness,
            ready_timeout=cfg.gateway.agent_ready_timeout,
        ),
        store=store,
        replay=RedisReplayStore(client, keys),
        secrets=RedisSecretStore(client, keys),
        # /readyz: Redis, and PostgreSQL when the records live there.
        dependencies=cluster_dependencies(client, store if cfg.database_url else None),
        logs=RedisLogSource(client, keys),
    )
    gw = await build_gateway(cfg, overrides)
    host, port = cfg.host_port
    try:  # before anything else starts, so a taken port leaves nothing behind
        await gw.start(host, port)
    except OSError as exc:
        await gw.close()
        await store.close()
        await client.aclose()
        raise listen_failure(exc, host, port, tls=cfg.tls_host_port) from None
    liveness.start()
    log.info("= gateway %s in the cluster (prefix %s)", liveness.gateway_id, prefix)
    # SIGHUP reloads the TLS certificate (listen_tls), as in `catflap serve`.
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, gw.reload_tls)
    second = await _until_signalled()
    second_task = asyncio.ensure_future(second.wait())
    second_task.add_done_callback(lambda _: gw.drain_now())
    await gw.shutdown()
    second_task.cancel()
    await gw.close()
    await liveness.close()
    await store.close()
    await client.aclose()


@click.command(name="agent-host")
@_config_option
@_redis_option
@click.option("--agent", "agent_key", required=True, help="The agent to run, as agent.org.")
@click.option(
    "--slots",
    type=click.IntRange(min=1),
    required=True,
    help="Instances this host may run at most.",
)
@click.option(
    "--warm",
    type=click.IntRange(min=0),
    help="Idle instances kept running on top of the busy ones, within --slots. "
    "[default: the agent's min_agents]",
)
@click.option(
    "--advertise",
    default="127.0.0.1",
    show_default=True,
    help="Address gateways use to reach this host's instances.",
)
@click.option(
    "--log-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Where sessions' log files go.  [default: [logs] dir, else <state_dir>/logs, "
    "which is .catflap/logs unless the config file says otherwise]",
)
@_prefix_option
@_log_option
@log_format_option
def agent_host(
    config_file: Path,
    redis_url: str,
    agent_key: str,
    slots: int,
    warm: int | None,
    advertise: str,
    log_dir: Path | None,
    prefix: str,
    log_level: str,
    log_format: LogFormat,
) -> None:
    """Run one agent's instances on this machine and register them in Redis.

    Session logs go to --log-dir and are pruned every minute ([logs] limits); their lines
    are also shipped to Redis, where every gateway's logs API reads them.
    """
    configure_logging(log_level, log_format)
    cfg = _load(config_file)
    spec = next((a for a in cfg.agents() if a.key == agent_key), None)
    if spec is None:
        known = ", ".join(a.key for a in cfg.agents()) or "none"
        click.echo(f"catflap: no agent {agent_key!r} in {config_file} (known: {known})", err=True)
        sys.exit(EXIT_CONFIG)
    warm_count = spec.config.scaling.min_agents if warm is None else warm
    raise_open_file_limit()  # the instances started here inherit it
    run_async(
        _agent_host(
            cfg,
            spec,
            redis_url,
            prefix,
            slots,
            warm_count,
            advertise,
            _HostLogging(log_level, log_format, log_dir or cfg.log_dir),
        )
    )


@dataclass(frozen=True)
class _HostLogging:
    level: str
    format: LogFormat
    dir: Path


async def _agent_host(
    cfg: CatflapConfig,
    spec: object,
    redis_url: str,
    prefix: str,
    slots: int,
    warm: int,
    advertise: str,
    logging_: _HostLogging,
) -> None:
    from catflap.cluster.client import connect
    from catflap.cluster.host import AgentHost
    from catflap.cluster.keys import Keys
    from catflap.cluster.logship import LogShipper
    from catflap.config import AgentSpec
    from catflap.pool.forkserver import ForkServerLauncher
    from catflap.pool.launcher import SubprocessLauncher
    from catflap.secretsets.inject import AgentSecrets
    from catflap.secretsets.redisstore import RedisSecretStore

    assert isinstance(spec, AgentSpec)
    client = connect(redis_url)
    with tempfile.TemporaryDirectory(prefix="catflap-host-") as workdir:
        launcher_class = ForkServerLauncher if cfg.gateway.fork_server else SubprocessLauncher
        launcher = launcher_class(
            Path(workdir),
            log_level=logging_.level,
            tcp_host=advertise,
            log_dir=logging_.dir,
            log_format=logging_.format,
            # The deployment's sets, in Redis; an agent whose pod brings its keys in its own
            # environment (a Kubernetes Secret) names them in pass_env instead.
            secrets=AgentSecrets(RedisSecretStore(client, Keys(prefix))),
        )
        host = AgentHost(
            client,
            Keys(prefix),
            spec,
            launcher,
            slots=slots,
            warm=warm,
            ready_timeout=cfg.gateway.agent_ready_timeout,
            log_shipper=LogShipper(
                client,
                Keys(prefix),
                logging_.dir.resolve(),
                org=spec.service_host.org,
                agent=spec.service_host.agent,
            ),
        )
        host.start()
        pruner = start_pruner(cfg, logging_.dir)
        log.info(
            "= agent host %s serving %s with %d slot(s), %d warm",
            host.host_id,
            spec.key,
            slots,
            warm,
        )
        second = await _until_signalled()
        log.info("x draining (send the signal again to stop at once)")
        pruner.cancel()
        with contextlib.suppress(Exception):
            await host.close(drain_timeout=cfg.gateway.drain_timeout, stop_now=second)
        await client.aclose()
