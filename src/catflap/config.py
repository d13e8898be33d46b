"""Configuration: ``catflap.toml``, an agent folder's ``pcc-deploy.toml``, and zero-config mode.

Precedence for an agent's settings: keys in ``catflap.toml`` override the folder's
``pcc-deploy.toml``, which overrides catflap's defaults (taken from
:mod:`catflap.contract.limits`). Every problem is reported as a :class:`ConfigError` naming the
file, the dotted key and what is wrong, before anything starts.
"""

from __future__ import annotations

import os
import secrets
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from catflap.auth.tokens import KeyRing
from catflap.contract import limits
from catflap.contract.errors import ConfigError
from catflap.contract.names import (
    AgentName,
    OrgName,
    ServiceHost,
    agent_name_problem,
    org_name_problem,
)

__all__ = [
    "DEFAULT_LISTEN",
    "AgentConfig",
    "AgentSpec",
    "CatflapConfig",
    "GatewaySettings",
    "LogsConfig",
    "OrgConfig",
    "ScalingConfig",
    "load_config",
    "zero_config",
]

DEFAULT_LISTEN = "127.0.0.1:8080"
#: Env var holding the token key ring: ``kid1:secret1,kid0:secret0`` (first signs, all verify).
TOKEN_KEYS_ENV = "CATFLAP_TOKEN_KEYS"
BOT_FILE = "bot.py"
PCC_DEPLOY_FILE = "pcc-deploy.toml"

# Keys of pcc-deploy.toml that PCC's CLI accepts. catflap reads the ones that mean something on
# a self-hosted machine and ignores the cloud-only ones (image, region, ...); anything else is
# refused, as PCC's CLI refuses it.
_PCC_READ = {"agent_name", "websocket_auth", "max_session_duration", "scaling"}
_PCC_IGNORED = {
    "image",
    "build_id",
    "image_credentials",
    "secret_set",
    "region",
    "agent_profile",
    "enable_krisp",
    "krisp_viva",
    "build",
    "docker",
    "resources",
    "architecture",
}
_PCC_SCALING = {"min_agents", "max_agents"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScalingConfig(_Strict):
    min_agents: int = Field(default=limits.MIN_AGENTS_DEFAULT, ge=0)
    max_agents: int = Field(default=limits.MAX_AGENTS_DEFAULT, ge=1)
    #: Concurrent sessions one instance may hold. PCC runs exactly one; light bots and
    #: benchmarks may share an instance.
    sessions_per_instance: int = Field(default=1, ge=1)
    #: Idle instances above ``min_agents`` are stopped after this many seconds.
    idle_timeout: float = Field(default=limits.IDLE_REAP_S, gt=0)

    @model_validator(mode="after")
    def _min_not_above_max(self) -> ScalingConfig:
        if self.min_agents > self.max_agents:
            raise ValueError(
                f"min_agents ({self.min_agents}) is larger than max_agents ({self.max_agents})"
            )
        return self


class AgentConfig(_Strict):
    path: Path
    websocket_auth: Literal["none", "token"] = "none"
    max_session_duration: int = Field(
        default=limits.MAX_SESSION_DURATION_DEFAULT_S,
        ge=limits.MAX_SESSION_DURATION_MIN_S,
        le=limits.MAX_SESSION_DURATION_MAX_S,
    )
    #: ``websocket`` makes generic sessions arrive with ``args.transport_type == "websocket"``;
    #: ``auto`` leaves it ``None`` so that ``create_transport`` detects a telephony provider
    #: (for telephony bots that reach the generic endpoint with a path token).
    generic_transport_type: Literal["websocket", "auto"] = "websocket"
    scaling: ScalingConfig = ScalingConfig()


class OrgConfig(_Strict):
    public_keys: list[str] = []
    private_keys: list[str] = []
    agents: dict[str, AgentConfig] = {}


class GatewaySettings(_Strict):
    """Process-wide knobs of the gateway, with defaults from :mod:`catflap.contract.limits`."""

    agent_ready_timeout: float = Field(default=limits.AGENT_READY_TIMEOUT_S, gt=0)
    drain_timeout: float = Field(default=limits.DRAIN_TIMEOUT_S, ge=0)
    #: Start instances by forking a process that has already imported the runtime and the
    #: bot's dependencies (cold starts in ~0.1 s instead of an interpreter boot plus imports).
    #: False starts every instance as a fresh interpreter.
    fork_server: bool = True
    #: Move steady-state relay bytes on a native thread (the fast lane, a C extension built at
    #: install time) instead of the event loop. Without the extension, or false: event loop.
    native_relay: bool = True
    provider_handshake_timeout: float = Field(default=limits.PROVIDER_HANDSHAKE_TIMEOUT_S, gt=0)
    #: Serve the live view at ``/dashboard`` (``--dashboard``); off unless asked for.
    dashboard: bool = False
    #: Open client connections at most; past it new ones get 503 (``too_many_connections``).
    max_connections: int = Field(default=limits.MAX_CONNECTIONS_DEFAULT, ge=1)
    #: ``host:port`` of a separate listener for ``/metrics`` (e.g. ``127.0.0.1:9090``); when
    #: set, the main port does not serve ``/metrics`` (404). Without either this or
    #: ``metrics_key``, the main port serves ``/metrics`` to loopback clients only.
    metrics_listen: str | None = None
    #: When set, ``/metrics`` needs ``Authorization: Bearer <metrics_key>``. A SecretStr, so
    #: that no repr, log line or error message of the config ever shows it.
    metrics_key: SecretStr | None = None
    #: Serve ``/docs`` and ``/redoc`` (Swagger UI and ReDoc); off by default, since they load
    #: scripts onto the gateway's origin. ``/openapi.json`` is always served.
    api_docs: bool = False

    @field_validator("metrics_listen")
    @classmethod
    def _metrics_listen_is_host_port(cls, value: str | None) -> str | None:
        if value is not None:
            _split_listen(value)
        return value

    @field_validator("metrics_key")
    @classmethod
    def _metrics_key_is_a_token(cls, value: SecretStr | None) -> SecretStr | None:
        # The message never quotes the key. Printable ASCII without spaces: it travels in an
        # Authorization header, where other bytes are not reliably kept as sent.
        if value is not None:
            key = value.get_secret_value()
            if not 16 <= len(key) <= 1024 or not all("!" <= c <= "~" for c in key):
                raise ValueError(
                    "must be 16 to 1024 printable ASCII characters without spaces "
                    "(e.g. the output of `openssl rand -hex 32`)"
                )
        return value

    @property
    def metrics_host_port(self) -> tuple[str, int] | None:
        """``metrics_listen`` as ``(host, port)``, or None when ``/metrics`` is on the main port."""
        return None if self.metrics_listen is None else _split_listen(self.metrics_listen)


class LogsConfig(_Strict):
    """``[logs]``: where session log files live and how long they stay."""

    #: Session log files (``<dir>/<org>/<agent>/<session_id>.jsonl``); ``<state_dir>/logs``
    #: when not set. Relative paths are below the config file's folder.
    dir: Path | None = None
    #: Files older than this many days are deleted.
    retention_days: float = Field(default=limits.LOG_RETENTION_DAYS_DEFAULT, gt=0)
    #: Above this many MiB in all, the oldest files are deleted.
    max_total_mb: float = Field(default=limits.LOG_MAX_TOTAL_MB_DEFAULT, gt=0)


class CatflapConfig(_Strict):
    listen: str = DEFAULT_LISTEN
    public_url: str | None = None
    #: Session records (SQLite) and other state; relative paths are below the config file's
    #: folder (or the working directory in zero-config mode).
    state_dir: Path = Path(".catflap")
    #: ``postgresql://...`` to keep session records in PostgreSQL instead of SQLite.
    database_url: str | None = None
    gateway: GatewaySettings = GatewaySettings()
    logs: LogsConfig = LogsConfig()
    organizations: dict[str, OrgConfig] = {}

    @property
    def log_dir(self) -> Path:
        """Where the agents' session log files live: ``[logs] dir``, else ``<state_dir>/logs``."""
        return self.logs.dir if self.logs.dir is not None else self.state_dir / "logs"

    @property
    def host_port(self) -> tuple[str, int]:
        return _split_listen(self.listen)

    @property
    def ws_base_url(self) -> str:
        """Base of the ``wsUrl`` that ``/start`` returns, without a trailing slash."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host, port = self.host_port
        return f"ws://{host}:{port}"

    def agents(self) -> Iterator[AgentSpec]:
        for org, org_cfg in self.organizations.items():
            for name, agent in org_cfg.agents.items():
                yield AgentSpec(ServiceHost(AgentName(name), OrgName(org)), agent)


class AgentSpec:
    """One agent as the gateway and pool see it: its service host plus its settings."""

    __slots__ = ("config", "service_host")

    def __init__(self, service_host: ServiceHost, config: AgentConfig) -> None:
        self.service_host = service_host
        self.config = config

    @property
    def key(self) -> str:
        return str(self.service_host)

    def __repr__(self) -> str:
        return f"AgentSpec({self.key})"


def _split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected host:port such as {DEFAULT_LISTEN!r}, got {listen!r}")
    return host.strip("[]"), int(port)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(str(path), "(file)", "file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), "(syntax)", f"not valid TOML: {exc}") from None


def _read_pcc_deploy(folder: Path) -> dict[str, Any]:
    """The subset of ``pcc-deploy.toml`` that catflap uses, validated key by key."""
    path = folder / PCC_DEPLOY_FILE
    if not path.is_file():
        return {}
    data = _read_toml(path)
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in _PCC_IGNORED:
            continue
        if key not in _PCC_READ:
            raise ConfigError(str(path), key, "unknown key (pcc-deploy.toml does not accept it)")
        if key == "scaling":
            if not isinstance(value, dict):
                raise ConfigError(str(path), key, "must be a table")
            unknown = set(value) - _PCC_SCALING
            if unknown:
                raise ConfigError(str(path), f"scaling.{sorted(unknown)[0]}", "unknown key")
        out[key] = value
    return out


def _merge_agent(folder_defaults: Mapping[str, Any], explicit: Mapping[str, Any]) -> dict[str, Any]:
    merged = {k: v for k, v in folder_defaults.items() if k != "agent_name"}
    for key, value in explicit.items():
        if key == "scaling" and isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def _format_loc(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def _validate(source: str, raw: dict[str, Any]) -> CatflapConfig:
    try:
        return CatflapConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        problem = first["msg"]
        if first["type"] == "extra_forbidden":
            problem = "unknown key"
        raise ConfigError(source, _format_loc(first["loc"]), problem) from None


def _check_semantics(source: str, cfg: CatflapConfig) -> None:
    """Checks pydantic cannot express: names, files on disk, unique keys, URLs."""
    try:
        _split_listen(cfg.listen)
    except ValueError as exc:
        raise ConfigError(source, "listen", str(exc)) from None
    if cfg.public_url is not None and not cfg.public_url.startswith(("ws://", "wss://")):
        raise ConfigError(source, "public_url", "must start with ws:// or wss://")
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


def load_config(path: Path) -> CatflapConfig:
    """Load and validate ``catflap.toml``.

    Raises:
        ConfigError: naming the file, the dotted key and the problem.
    """
    raw = _read_toml(path)
    base = path.parent
    if isinstance(raw.get("state_dir"), str):
        raw["state_dir"] = base / raw["state_dir"]
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
            merged = _merge_agent(_read_pcc_deploy(folder), agent_raw)
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
) -> CatflapConfig:
    """A one-agent config from a folder with ``bot.py`` (``catflap serve ./bot --org my-org``).

    The agent is named by ``pcc-deploy.toml``'s ``agent_name``, or else by the folder name.

    Raises:
        ConfigError: the folder has no bot.py, or a name is invalid.
    """
    folder = folder.resolve()
    source = str(folder)
    if not (folder / BOT_FILE).is_file():
        raise ConfigError(source, "path", f"no {BOT_FILE} in {folder}")
    deploy = _read_pcc_deploy(folder)
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
                "agents": {name: {**_merge_agent(deploy, {}), "path": folder}},
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
    return "pk_" + secrets.token_urlsafe(18)
