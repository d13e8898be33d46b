"""The shape of the configuration: pydantic models of ``catflap.toml`` and ``pcc-deploy.toml``.

Defaults come from :mod:`catflap.contract.limits`. The models check what one value or one table
can check; reading the files, merging an agent folder's ``pcc-deploy.toml`` under
``catflap.toml`` and the checks that need the disk are :mod:`catflap.config.loading`'s.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from catflap.contract import limits
from catflap.contract.names import AgentName, OrgName, ServiceHost

__all__ = [
    "BOT_FILE",
    "DEFAULT_LISTEN",
    "PCC_DEPLOY_FILE",
    "AgentConfig",
    "AgentSpec",
    "CatflapConfig",
    "GatewaySettings",
    "LogsConfig",
    "OrgConfig",
    "PccDeploy",
    "PccScaling",
    "ScalingConfig",
    "split_listen",
]

DEFAULT_LISTEN = "127.0.0.1:8080"
BOT_FILE = "bot.py"
PCC_DEPLOY_FILE = "pcc-deploy.toml"

# One definition of each value both files may set, so that both check it the same way.
WebsocketAuth = Literal["none", "token"]
SessionDuration = Annotated[
    int, Field(ge=limits.MAX_SESSION_DURATION_MIN_S, le=limits.MAX_SESSION_DURATION_MAX_S)
]
MinAgents = Annotated[int, Field(ge=0)]
MaxAgents = Annotated[int, Field(ge=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScalingConfig(_Strict):
    min_agents: MinAgents = limits.MIN_AGENTS_DEFAULT
    max_agents: MaxAgents = limits.MAX_AGENTS_DEFAULT
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
    websocket_auth: WebsocketAuth = "none"
    max_session_duration: SessionDuration = limits.MAX_SESSION_DURATION_DEFAULT_S
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
    #: The fast lane thread's nice value: below the event loop's 0, so that relayed frames are
    #: not delayed by whatever else the gateway does (a flood of hostile connections). Needs
    #: ``CAP_SYS_NICE`` or ``RLIMIT_NICE``; without them the gateway warns and runs at 0.
    relay_thread_nice: int = Field(default=-10, ge=-20, le=19)
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
            split_listen(value)
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
        return None if self.metrics_listen is None else split_listen(self.metrics_listen)


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
    #: ``host:port`` of a second listener that speaks TLS (``wss://``, ``https://``), with the
    #: same routes as ``listen``; it needs ``tls_cert`` and ``tls_key``.
    listen_tls: str | None = None
    #: PEM: the server certificate first, then the intermediates (certbot's ``fullchain.pem``).
    #: Reloaded on SIGHUP and when the file changes. Relative paths are below the config file.
    tls_cert: Path | None = None
    #: PEM: the private key of ``tls_cert``, unencrypted (certbot's ``privkey.pem``).
    tls_key: Path | None = None
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
        return split_listen(self.listen)

    @property
    def tls_host_port(self) -> tuple[str, int] | None:
        """``listen_tls`` as ``(host, port)``, or None when there is no TLS listener."""
        return None if self.listen_tls is None else split_listen(self.listen_tls)

    @property
    def ws_base_url(self) -> str:
        """Base of the ``wsUrl`` that ``/start`` returns, without a trailing slash: the
        ``public_url``, else ``wss://`` on ``listen_tls`` when it is set, else ``ws://``."""
        if self.public_url:
            return self.public_url.rstrip("/")
        tls = self.tls_host_port
        if tls is not None:
            host, port = tls
            return f"wss://{host}" if port == 443 else f"wss://{host}:{port}"
        host, port = self.host_port
        return f"ws://{host}:{port}"

    def agents(self) -> Iterator[AgentSpec]:
        for org, org_cfg in self.organizations.items():
            for name, agent in org_cfg.agents.items():
                yield AgentSpec(ServiceHost(AgentName(name), OrgName(org)), agent)


#: Keys of ``pcc-deploy.toml`` that PCC's CLI accepts but that mean nothing on a self-hosted
#: machine (images, regions, builds): catflap skips them. Any key neither read nor skipped is
#: refused, as PCC's CLI refuses it.
PCC_CLOUD_ONLY = frozenset(
    {
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
)


class PccScaling(_Strict):
    """``[scaling]`` of ``pcc-deploy.toml``: the two keys PCC has."""

    min_agents: MinAgents | None = None
    max_agents: MaxAgents | None = None


class PccDeploy(_Strict):
    """The keys of an agent folder's ``pcc-deploy.toml`` that catflap reads.

    Unset keys stay unset (``model_dump(exclude_unset=True)``), so that catflap.toml's keys and
    catflap's defaults fill them. Cloud-only keys (:data:`PCC_CLOUD_ONLY`) are dropped before
    validation; any other key is an error.
    """

    agent_name: str | None = None
    websocket_auth: WebsocketAuth | None = None
    max_session_duration: SessionDuration | None = None
    scaling: PccScaling | None = None

    @model_validator(mode="before")
    @classmethod
    def _skip_cloud_only_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if key not in PCC_CLOUD_ONLY}
        return data


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


def split_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:8080`` too) as ``(host, port)``.

    Raises:
        ValueError: not a host and a port from 0 to 65535.
    """
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected host:port such as {DEFAULT_LISTEN!r}, got {listen!r}")
    return host.strip("[]"), int(port)
