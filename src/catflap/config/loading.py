"""Loading the configuration: ``catflap.toml``, an agent folder's ``pcc-deploy.toml``, zero-config.

Precedence for an agent's settings: keys in ``catflap.toml`` override the folder's
``pcc-deploy.toml``, which overrides catflap's defaults (taken from
:mod:`catflap.contract.limits`). Every problem is reported as a :class:`ConfigError` naming the
file, the dotted key and what is wrong, before anything starts; a ``pcc-deploy.toml`` with
several problems gets them all in one error.
"""

from __future__ import annotations

import logging
import os
import secrets
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from catflap.auth.tokens import KeyRing
from catflap.config.models import (
    BOT_FILE,
    DEFAULT_LISTEN,
    PCC_DEPLOY_FILE,
    PCC_READ_KEYS,
    CatflapConfig,
    PccDeploy,
    split_listen,
)
from catflap.contract.errors import ConfigError
from catflap.contract.names import agent_name_problem, org_name_problem

__all__ = [
    "TOKEN_KEYS_ENV",
    "check_tls",
    "generated_public_key",
    "load_config",
    "read_pcc_deploy",
    "token_keyring",
    "zero_config",
]

log = logging.getLogger("catflap")

#: Env var holding the token key ring: ``kid1:secret1,kid0:secret0`` (first signs, all verify).
TOKEN_KEYS_ENV = "CATFLAP_TOKEN_KEYS"


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(str(path), "(file)", "file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), "(syntax)", f"not valid TOML: {exc}") from None


def _problems(exc: ValidationError, *, unknown_key: str) -> list[tuple[str, str]]:
    """Each error pydantic found, as ``(dotted key, problem)``, in the order it found them."""
    problems = []
    for error in exc.errors():
        problem = error["msg"]
        if error["type"] == "value_error":
            problem = problem.removeprefix("Value error, ")
        elif error["type"] == "extra_forbidden":
            problem = unknown_key if len(error["loc"]) == 1 else "unknown key"
        elif error["type"] == "model_type":
            problem = "must be a table"
        key = ".".join(str(part) for part in error["loc"]) or "(top level)"
        problems.append((key, problem))
    return problems


def _dotted_keys(table: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Every key of a TOML table and its sub-tables, dotted, in the order they stand."""
    keys = []
    for key, value in table.items():
        keys.append(prefix + key)
        if isinstance(value, dict):
            keys += _dotted_keys(value, f"{prefix}{key}.")
    return keys


def read_pcc_deploy(folder: Path) -> dict[str, Any]:
    """The keys an agent folder's ``pcc-deploy.toml`` sets (none when there is no such file).

    Raises:
        ConfigError: naming the file and every bad key or value in it; with more than one, the
            key is ``(N problems)`` and the problem lists ``key: problem`` for each, in the
            file's order.
    """
    path = folder / PCC_DEPLOY_FILE
    if not path.is_file():
        return {}
    raw = _read_toml(path)
    try:
        deploy = PccDeploy.model_validate(raw)
    except ValidationError as exc:
        problems = _problems(exc, unknown_key="unknown key (pcc-deploy.toml does not accept it)")
        # pydantic lists unknown keys last; the reader wants them in the file's order.
        order = {key: index for index, key in enumerate(_dotted_keys(raw))}
        problems.sort(key=lambda found: order.get(found[0], len(order)))
        if len(problems) == 1:
            raise ConfigError(str(path), *problems[0]) from None
        listed = "; ".join(f"{key}: {problem}" for key, problem in problems)
        raise ConfigError(str(path), f"({len(problems)} problems)", listed) from None
    ignored = deploy.ignored_keys()
    if ignored:
        log.info(
            "%s: catflap ignores %s self-hosted (Pipecat Cloud's images, builds, regions and "
            "sizing); it reads %s",
            path,
            ", ".join(ignored),
            ", ".join(PCC_READ_KEYS),
        )
    return deploy.model_dump(exclude_unset=True, include=set(PCC_READ_KEYS))


def _merge_agent(folder_defaults: Mapping[str, Any], explicit: Mapping[str, Any]) -> dict[str, Any]:
    merged = {k: v for k, v in folder_defaults.items() if k != "agent_name"}
    for key, value in explicit.items():
        if key == "scaling" and isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def _validate(source: str, raw: dict[str, Any]) -> CatflapConfig:
    try:
        return CatflapConfig.model_validate(raw)
    except ValidationError as exc:
        key, problem = _problems(exc, unknown_key="unknown key")[0]
        raise ConfigError(source, key, problem) from None


def _check_semantics(source: str, cfg: CatflapConfig) -> None:
    """Checks pydantic cannot express: names, files on disk, unique keys, URLs."""
    try:
        split_listen(cfg.listen)
    except ValueError as exc:
        raise ConfigError(source, "listen", str(exc)) from None
    if cfg.public_url is not None and not cfg.public_url.startswith(("ws://", "wss://")):
        raise ConfigError(source, "public_url", "must start with ws:// or wss://")
    check_tls(cfg, source)
    owners: dict[str, str] = {}
    for org, org_cfg in cfg.organizations.items():
        problem = org_name_problem(org)
        if problem:
            raise ConfigError(source, f"organizations.{org}", f"bad organization name: {problem}")
        for kind in ("public_keys", "private_keys"):
            for key in getattr(org_cfg, kind):
                if not key:
                    raise ConfigError(source, f"organizations.{org}.{kind}", "empty key")
                if key in owners:
                    raise ConfigError(
                        source,
                        f"organizations.{org}.{kind}",
                        f"key is already used by organization {owners[key]!r}; keys must be unique",
                    )
                owners[key] = org
        for name, agent in org_cfg.agents.items():
            where = f"organizations.{org}.agents.{name}"
            problem = agent_name_problem(name)
            if problem:
                raise ConfigError(source, where, f"bad agent name: {problem}")
            if not (agent.path / BOT_FILE).is_file():
                raise ConfigError(source, f"{where}.path", f"no {BOT_FILE} in {agent.path}")


def check_tls(cfg: CatflapConfig, source: str) -> None:
    """``listen_tls``, ``tls_cert`` and ``tls_key`` go together. Whether the files hold a
    certificate and its key is :mod:`catflap.gateway.tls`'s check, when the gateway starts.

    Raises:
        ConfigError: one of them without the others, or ``listen_tls`` not ``host:port``.
    """
    if cfg.listen_tls is None:
        for key in ("tls_cert", "tls_key"):
            if getattr(cfg, key) is not None:
                raise ConfigError(
                    source, key, 'is set but listen_tls is not; add listen_tls = "0.0.0.0:443"'
                )
        return
    try:
        split_listen(cfg.listen_tls)
    except ValueError as exc:
        raise ConfigError(source, "listen_tls", str(exc)) from None
    for key, what in (("tls_cert", "certificate chain"), ("tls_key", "private key")):
        if getattr(cfg, key) is None:
            raise ConfigError(source, key, f"listen_tls needs {key}: the PEM file with the {what}")


def load_config(path: Path) -> CatflapConfig:
    """Load and validate ``catflap.toml``.

    Raises:
        ConfigError: naming the file, the dotted key and the problem.
    """
    raw = _read_toml(path)
    base = path.parent
    if isinstance(raw.get("state_dir"), str):
        raw["state_dir"] = base / raw["state_dir"]
    for key in ("tls_cert", "tls_key"):
        if isinstance(raw.get(key), str):
            raw[key] = base / raw[key]
    logs_raw = raw.get("logs")
    if isinstance(logs_raw, dict) and isinstance(logs_raw.get("dir"), str):
        logs_raw["dir"] = base / logs_raw["dir"]
    for org, org_raw in (raw.get("organizations") or {}).items():
        if not isinstance(org_raw, dict):
            continue
        for name, agent_raw in (org_raw.get("agents") or {}).items():
            where = f"organizations.{org}.agents.{name}"
            if not isinstance(agent_raw, dict) or "path" not in agent_raw:
                raise ConfigError(str(path), f"{where}.path", "missing: the folder with bot.py")
            folder = (base / str(agent_raw["path"])).resolve()
            merged = _merge_agent(read_pcc_deploy(folder), agent_raw)
            merged["path"] = folder
            org_raw["agents"][name] = merged
    cfg = _validate(str(path), raw)
    _check_semantics(str(path), cfg)
    return cfg


def zero_config(
    folder: Path,
    *,
    org: str,
    listen: str = DEFAULT_LISTEN,
    public_url: str | None = None,
    public_keys: list[str] | None = None,
    private_keys: list[str] | None = None,
    pass_env: list[str] | None = None,
) -> CatflapConfig:
    """A one-agent config from a folder with ``bot.py`` (``catflap serve ./bot --org my-org``).

    The agent is named by ``pcc-deploy.toml``'s ``agent_name``, or else by the folder name;
    ``pass_env`` is its ``pass_env`` (``--pass-env``).

    Raises:
        ConfigError: the folder has no bot.py, or a name is invalid.
    """
    folder = folder.resolve()
    source = str(folder)
    if not (folder / BOT_FILE).is_file():
        raise ConfigError(source, "path", f"no {BOT_FILE} in {folder}")
    deploy = read_pcc_deploy(folder)
    name = str(deploy.get("agent_name") or folder.name)
    problem = agent_name_problem(name)
    if problem:
        raise ConfigError(
            source,
            "agent_name",
            f"{name!r} is not a valid agent name ({problem}); set agent_name in pcc-deploy.toml",
        )
    raw = {
        "listen": listen,
        "public_url": public_url,
        "organizations": {
            org: {
                "public_keys": public_keys or [],
                "private_keys": private_keys or [],
                "agents": {
                    name: {**_merge_agent(deploy, {}), "path": folder, "pass_env": pass_env or []}
                },
            }
        },
    }
    cfg = _validate(source, raw)
    _check_semantics(source, cfg)
    return cfg


def token_keyring(environ: Mapping[str, str] = os.environ) -> tuple[KeyRing, bool]:
    """The signing key ring from ``CATFLAP_TOKEN_KEYS``, or a fresh random one.

    Returns:
        The ring, and whether it was generated (tokens then won't survive a restart).

    Raises:
        ConfigError: the variable is set but malformed.
    """
    value = environ.get(TOKEN_KEYS_ENV, "").strip()
    if not value:
        return KeyRing.generate(), True
    try:
        return KeyRing.from_env(value), False
    except ValueError as exc:
        raise ConfigError(f"${TOKEN_KEYS_ENV}", TOKEN_KEYS_ENV, str(exc)) from None


def generated_public_key() -> str:
    """A public key for a zero-config run that was given none (``pk_`` and 24 random chars)."""
    return "pk_" + secrets.token_urlsafe(18)
