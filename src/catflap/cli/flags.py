"""Flags over the configuration: the ``CatflapConfig`` a command runs, from its command line.

``catflap serve`` takes either a ``catflap.toml`` (``--config``; ``--listen`` and friends
override it) or a bot folder (zero-config mode, one agent); ``--database-url``/``--state-dir``
apply to both, and the URL is checked here, before anything starts.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from catflap.config import (
    CatflapConfig,
    check_tls,
    generated_public_key,
    load_config,
    zero_config,
)
from catflap.sessions.store import check_database_url

__all__ = ["serve_config", "with_api_docs", "with_dashboard"]

log = logging.getLogger("catflap")


def serve_config(
    folder: Path | None,
    config_file: Path | None,
    org: str | None,
    listen: str | None,
    public_url: str | None,
    public_keys: tuple[str, ...],
    private_keys: tuple[str, ...],
    database_url: str | None = None,
    state_dir: Path | None = None,
    pass_env: tuple[str, ...] = (),
    tls: tuple[str | None, Path | None, Path | None] = (None, None, None),
) -> CatflapConfig:
    """The configuration of ``catflap serve``: a config file with flags over it, or zero-config
    from a bot folder.

    Args:
        tls: ``--listen-tls``, ``--tls-cert``, ``--tls-key`` (each None when not given).

    Raises:
        click.UsageError: the flags contradict each other, or a required one is missing.
        ConfigError: the config file or the database URL is invalid.
    """
    if config_file is not None:
        if folder is not None:
            raise click.UsageError("give either a bot folder or --config, not both")
        if pass_env:
            raise click.UsageError(
                "--pass-env is for a bot folder; with --config, set pass_env in the agent's table"
            )
        cfg = load_config(config_file)
        updates = {k: v for k, v in (("listen", listen), ("public_url", public_url)) if v}
        cfg = cfg.model_copy(update=updates) if updates else cfg
        cfg = _with_tls(cfg, tls, str(config_file))
        return _with_storage(cfg, database_url, state_dir, str(config_file))
    if folder is None:
        raise click.UsageError("give a folder with bot.py, or --config catflap.toml")
    if not org:
        raise click.UsageError("zero-config mode needs --org (the organization name)")
    keys = list(public_keys)
    if not keys:
        keys = [generated_public_key()]
        log.warning(
            "no --public-key given; generated %s for this run (POST /start needs it)", keys[0]
        )
    cfg = zero_config(
        folder,
        org=org,
        listen=listen or "127.0.0.1:8080",
        public_url=public_url,
        public_keys=keys,
        private_keys=list(private_keys),
        pass_env=list(pass_env),
    )
    cfg = _with_tls(cfg, tls, str(folder))
    return _with_storage(cfg, database_url, state_dir, str(folder))


def _with_tls(
    cfg: CatflapConfig, tls: tuple[str | None, Path | None, Path | None], source: str
) -> CatflapConfig:
    """Apply ``--listen-tls``/``--tls-cert``/``--tls-key`` and check that they go together."""
    names = ("listen_tls", "tls_cert", "tls_key")
    updates = {name: value for name, value in zip(names, tls, strict=True) if value}
    if not updates:
        return cfg
    cfg = cfg.model_copy(update=updates)
    check_tls(cfg, f"{source} with --listen-tls/--tls-cert/--tls-key")
    return cfg


def _with_storage(
    cfg: CatflapConfig, database_url: str | None, state_dir: Path | None, source: str
) -> CatflapConfig:
    """Apply ``--database-url``/``--state-dir`` and check the URL catflap must open."""
    storage = {"database_url": database_url, "state_dir": state_dir}
    updates = {key: value for key, value in storage.items() if value}
    if updates:
        cfg = cfg.model_copy(update=updates)
    if cfg.database_url:
        check_database_url(cfg.database_url, source="--database-url" if database_url else source)
    return cfg


def with_dashboard(cfg: CatflapConfig, dashboard: bool) -> CatflapConfig:
    """``cfg`` with the live view switched on when ``--dashboard`` was given."""
    if not dashboard:
        return cfg
    return cfg.model_copy(update={"gateway": cfg.gateway.model_copy(update={"dashboard": True})})


def with_api_docs(cfg: CatflapConfig, api_docs: bool) -> CatflapConfig:
    """``cfg`` with Swagger UI and ReDoc switched on when ``--api-docs`` was given."""
    if not api_docs:
        return cfg
    return cfg.model_copy(update={"gateway": cfg.gateway.model_copy(update={"api_docs": True})})
