"""The shape of the configuration: pydantic models of ``catflap.toml`` and ``pcc-deploy.toml``.

Defaults come from :mod:`catflap.contract.limits`. The models check what one value or one table
can check; reading the files, merging an agent folder's ``pcc-deploy.toml`` under
``catflap.toml`` and the checks that need the disk are :mod:`catflap.config.loading`'s.
"""

from __future__ import annotations

import ipaddress
import re
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
from catflap.contract.names import AgentName, OrgName, ServiceHost, secret_name_problem

__all__ = [
    "BOT_FILE",
    "DAILY_API_URL_DEFAULT",
    "DEFAULT_LISTEN",
    "ENABLE_KRISP_REFUSED",
    "PCC_CLOUD_ONLY",
    "PCC_DEPLOY_FILE",
    "PCC_READ_KEYS",
    "AgentConfig",
    "AgentEnvironment",
    "AgentSpec",
    "CatflapConfig",
    "GatewaySettings",
    "IceServer",
    "LogsConfig",
    "OrgConfig",
    "PccDeploy",
    "PccScaling",
    "ScalingConfig",
    "WebRTCConfig",
    "split_listen",
]

DEFAULT_LISTEN = "127.0.0.1:8080"
#: Daily's REST API, where ``createDailyRoom`` sessions get their room and meeting token.
DAILY_API_URL_DEFAULT = "https://api.daily.co/v1"
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


class IceServer(_Strict):
    """One STUN or TURN server of ``[webrtc] ice_servers`` (the fields of WebRTC's
    ``RTCIceServer`` and of PCC's ``iceConfig.iceServers``)."""

    #: ``stun:``, ``stuns:``, ``turn:`` or ``turns:`` URLs; one string is a list of one.
    urls: list[Annotated[str, Field(pattern=r"^(stun|stuns|turn|turns):[!-~]+$")]] = Field(
        min_length=1
    )
    username: str | None = None
    #: A SecretStr: no repr, log line or error message shows it. It goes to the agent's
    #: runtime (``ICE_CONFIG_URL``) and, when a client asks, to the client (``iceConfig``).
    credential: SecretStr | None = None

    @field_validator("urls", mode="before")
    @classmethod
    def _one_url_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    def to_wire(self) -> dict[str, Any]:
        """PCC's ``{"urls": [...], "username", "credential"}``, credential included."""
        server: dict[str, Any] = {"urls": list(self.urls)}
        if self.username is not None:
            server["username"] = self.username
        if self.credential is not None:
            server["credential"] = self.credential.get_secret_value()
        return server


class WebRTCConfig(_Strict):
    """``[webrtc]`` (and an agent's ``[organizations.X.agents.Y.webrtc]``, which replaces it):
    the ICE servers of SmallWebRTC sessions."""

    #: Given to the agent's runtime for its peer connections, and to clients that ask
    #: (``enableDefaultIceServers``). Empty: host candidates only, for clients that reach the
    #: agent host's address directly (a LAN, a public host with its UDP ports open).
    ice_servers: list[IceServer] = []
    #: Seconds a session waits for the client's offer before it ends as
    #: ``agent_start_timeout`` (PCC's base image: 120).
    offer_timeout: float = Field(default=limits.WEBRTC_OFFER_TIMEOUT_S, gt=0)


class AgentEnvironment(_Strict):
    """What an agent's instances get in their environment besides the allow-list
    (:data:`catflap.pool.environment.INSTANCE_ENV_ALLOWED`); AgentConfig's own base class, so
    these keys stand apart from the rest."""

    #: The organisation's secret set whose secrets become environment variables of this
    #: agent's instances (PCC's ``secret_set``; ``catflap secrets set NAME KEY=VALUE``). An
    #: instance is not started while the set does not exist.
    secret_set: str | None = None
    #: Names (or ``PREFIX*``) of variables of catflap's own environment passed on to this
    #: agent's instances, e.g. an agent host whose pod takes its bot's keys from a Kubernetes
    #: Secret (``envFrom``). Nothing else of catflap's environment reaches an instance.
    pass_env: list[str] = []

    @field_validator("secret_set")
    @classmethod
    def _secret_set_is_a_name(cls, value: str | None) -> str | None:
        if value is not None:
            problem = secret_name_problem("secret set", value)
            if problem:
                raise ValueError(problem)
        return value

    @field_validator("pass_env")
    @classmethod
    def _pass_env_are_names(cls, value: list[str]) -> list[str]:
        for pattern in value:
            name = pattern.removesuffix("*")
            if not name or "*" in name or "=" in name or "\0" in name:
                raise ValueError(
                    f"{pattern!r} is not a variable name or a PREFIX* pattern (e.g. OPENAI_API_KEY "
                    "or DEEPGRAM_*)"
                )
        return value


class AgentConfig(AgentEnvironment):
    path: Path
    websocket_auth: WebsocketAuth = "none"
    max_session_duration: SessionDuration = limits.MAX_SESSION_DURATION_DEFAULT_S
    #: ``websocket`` makes generic sessions arrive with ``args.transport_type == "websocket"``;
    #: ``auto`` leaves it ``None`` so that ``create_transport`` detects a telephony provider
    #: (for telephony bots that reach the generic endpoint with a path token).
    generic_transport_type: Literal["websocket", "auto"] = "websocket"
    scaling: ScalingConfig = ScalingConfig()
    #: The agent's ``[webrtc]``; catflap.toml's top-level ``[webrtc]`` when it has none.
    webrtc: WebRTCConfig = WebRTCConfig()


class OrgConfig(_Strict):
    public_keys: list[str] = []
    private_keys: list[str] = []
    agents: dict[str, AgentConfig] = {}
    #: The organization's Daily API key, for ``/start`` with ``createDailyRoom: true`` or
    #: ``transport: "daily"``. A SecretStr: no repr, log line or error message shows it.
    daily_api_key: SecretStr | None = None
    #: Or the name of an environment variable holding it, read at each Daily ``/start`` (so a
    #: rotated key needs no config change, and the file holds no secret).
    daily_api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    #: Base URL of Daily's REST API (``POST {daily_api_url}/rooms``, ``/meeting-tokens``).
    daily_api_url: str = Field(default=DAILY_API_URL_DEFAULT, pattern=r"^https?://[!-~]+$")

    @field_validator("daily_api_key")
    @classmethod
    def _daily_api_key_is_a_token(cls, value: SecretStr | None) -> SecretStr | None:
        # Never quoted: it travels in Daily's Authorization header, so printable ASCII only.
        if value is not None and not _is_header_token(value.get_secret_value()):
            raise ValueError("must be printable ASCII without spaces (Daily's API key)")
        return value

    @model_validator(mode="after")
    def _one_daily_key_source(self) -> OrgConfig:
        if self.daily_api_key is not None and self.daily_api_key_env is not None:
            raise ValueError("set daily_api_key or daily_api_key_env, not both")
        return self


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
    #: ``CAP_SYS_NICE`` or ``RLIMIT_NICE``; without them the gateway warns and keeps the
    #: process's nice value.
    relay_thread_nice: int = Field(default=-10, ge=-20, le=19)
    #: The time slice in µs the fast lane thread asks the kernel for (Linux 6.12+; older
    #: kernels ignore it): a short one lets the thread preempt the event loop the moment a
    #: frame arrives. 0 keeps the kernel's default (0.7 ms × (1 + log2 CPUs), at most 8: 1.4 ms
    #: on 2 CPUs, 2.8 ms from 8); otherwise 100 (the kernel's smallest) to 100,000. Needs no
    #: privilege.
    relay_thread_slice_us: int = Field(default=100, ge=0, le=100_000)
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
    #: New sessions one client address (an IPv4 address, an IPv6 /64) may start per second,
    #: a token bucket as nginx's ``limit_req``; past it 429 ``too_many_starts``. 0: no bound.
    #: Behind a load balancer every connection comes from its address: exempt it, or set 0.
    session_starts_per_source: float = Field(
        default=limits.SESSION_STARTS_PER_SOURCE_DEFAULT, ge=0, allow_inf_nan=False
    )
    #: Starts one address may make at once above that rate (the bucket's size).
    session_starts_burst: int = Field(default=limits.SESSION_STARTS_BURST_DEFAULT, ge=1)
    #: Networks (CIDR, e.g. ``"10.0.0.0/8"``, ``"2001:db8::/32"``; a bare address is a /32 or
    #: /128) never limited: the load balancer's address, a telephony provider's ranges.
    session_starts_exempt: list[str] = Field(default_factory=list)

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

    @field_validator("session_starts_exempt")
    @classmethod
    def _exempt_are_networks(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry)
            except ValueError as exc:
                raise ValueError(
                    f"{entry!r} is not a network in CIDR notation ({exc}); write e.g. "
                    '"10.0.0.0/8", "203.0.113.7" or "2001:db8::/32"'
                ) from None
        return value

    @property
    def exempt_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """``session_starts_exempt`` as networks."""
        return [ipaddress.ip_network(entry) for entry in self.session_starts_exempt]

    @property
    def metrics_host_port(self) -> tuple[str, int] | None:
        """``metrics_listen`` as ``(host, port)``, or None when ``/metrics`` is on the main port."""
        return None if self.metrics_listen is None else split_listen(self.metrics_listen)

    @field_validator("relay_thread_slice_us")
    @classmethod
    def _a_slice_the_kernel_takes(cls, value: int) -> int:
        # The kernel raises a smaller request to 100 µs: say so rather than report a slice
        # the thread does not get.
        if 0 < value < 100:
            raise ValueError("must be 0 (the kernel's default) or at least 100 (µs)")
        return value


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
    #: Every agent's ``[webrtc]``, unless the agent has its own.
    webrtc: WebRTCConfig = WebRTCConfig()
    organizations: dict[str, OrgConfig] = {}

    @model_validator(mode="before")
    @classmethod
    def _agents_inherit_webrtc(cls, data: Any) -> Any:
        # Copied into each agent before validation, so that AgentSpec.config.webrtc is the one
        # that applies, wherever the agent's config travels (the pool, an agent host).
        if not isinstance(data, dict) or "webrtc" not in data:
            return data
        for org in (data.get("organizations") or {}).values():
            agents = org.get("agents") if isinstance(org, dict) else None
            for agent in (agents or {}).values():
                if isinstance(agent, dict) and "webrtc" not in agent:
                    agent["webrtc"] = data["webrtc"]
        return data

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


#: Keys of ``pcc-deploy.toml`` that pipecatcloud 1.4.0 accepts but that mean nothing on a
#: self-hosted machine (images, builds, registries, regions, sizing, Krisp): catflap checks
#: them as that CLI does, then ignores them and says so in its log. The other keys
#: (:data:`PCC_READ_KEYS`) it reads. Any key in neither is refused, as that CLI refuses it.
PCC_CLOUD_ONLY = (
    "image",
    "build_id",
    "image_credentials",
    "region",
    "agent_profile",
    "architecture",
    "docker",
    "build",
    "krisp_viva",
    "resources",
    "git",
)
#: The keys of ``pcc-deploy.toml`` catflap reads (into the agent's settings).
PCC_READ_KEYS = ("agent_name", "websocket_auth", "max_session_duration", "scaling", "secret_set")

#: pipecatcloud 1.4.0's words for ``enable_krisp``, which it refuses since ``[krisp_viva]``.
ENABLE_KRISP_REFUSED = (
    "'enable_krisp' is no longer supported. Krisp is now configured via the [krisp_viva] "
    "section in pcc-deploy.toml. Remove 'enable_krisp' from your config."
)
#: A Kubernetes quantity, as pipecatcloud checks ``[resources]`` (``K8S_QUANTITY_PATTERN``).
_K8S_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
#: One ``owner`` or ``repo`` segment of ``[git] repo``, as pipecatcloud's ``github_utils``.
_REPO_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")


class PccScaling(_Strict):
    """``[scaling]`` of ``pcc-deploy.toml``: the two keys PCC has."""

    min_agents: MinAgents | None = None
    max_agents: MaxAgents | None = None

    @model_validator(mode="after")
    def _min_not_above_max(self) -> PccScaling:
        if (
            self.min_agents is not None
            and self.max_agents is not None
            and self.max_agents < self.min_agents
        ):
            raise ValueError("max_agents must be greater than or equal to min_agents")
        return self


class PccKrispViva(_Strict):
    """``[krisp_viva]``: PCC's hosted noise filter (cloud-only)."""

    audio_filter: Literal["tel", "pro"] | None = None


class PccResources(_Strict):
    """``[resources]``: CPU and memory of a self-hosted PCC region's pods (cloud-only)."""

    cpu: str | int | float | None = None
    memory: str | int | None = None

    @model_validator(mode="after")
    def _both_quantities(self) -> PccResources:
        if (self.cpu is None) != (self.memory is None):
            raise ValueError("resources requires both 'cpu' and 'memory'")
        for name, value in (("cpu", self.cpu), ("memory", self.memory)):
            if value is not None and not _K8S_QUANTITY.match(str(value)):
                raise ValueError(
                    f"Invalid {name} quantity '{value}' (expected e.g. '500m', '2', '4Gi')"
                )
        return self


class PccGit(_Strict):
    """``[git]``: build the agent from a GitHub repository (cloud-only)."""

    repo: str | None = None
    branch: str | None = None
    dockerfile_path: str | None = None
    subdirectory: str | None = None

    @model_validator(mode="after")
    def _repo_and_branch(self) -> PccGit:
        if self.repo is not None and not _is_repo_full_name(self.repo):
            raise ValueError(f"Invalid repo '{self.repo}'. Expected the form 'owner/repo'.")
        if self.branch is not None and not all(
            part and not re.fullmatch(r"\.+", part) for part in self.branch.split("/")
        ):
            raise ValueError(
                f"Invalid branch '{self.branch}'. A branch must be a valid git ref with no "
                "empty or dot-only segments."
            )
        if (self.repo is None) != (self.branch is None):
            raise ValueError("A GitHub source requires both 'repo' and 'branch'")
        return self


def _is_repo_full_name(repo: str) -> bool:
    parts = repo.split("/")
    return len(parts) == 2 and all(
        _REPO_SEGMENT.match(part) and not re.fullmatch(r"\.+", part) for part in parts
    )


class PccBuildExclude(BaseModel):
    """``[build.exclude]``; pipecatcloud reads ``patterns`` and ignores other keys."""

    model_config = ConfigDict(extra="allow", frozen=True)

    patterns: list[str] = []


class PccBuild(BaseModel):
    """``[build]``: PCC's cloud build (cloud-only); pipecatcloud ignores keys it does not know
    here, so catflap does too."""

    model_config = ConfigDict(extra="allow", frozen=True)

    context_dir: str = "."
    dockerfile: str = "Dockerfile"
    exclude: PccBuildExclude = PccBuildExclude()


class PccDeploy(_Strict):
    """An agent folder's ``pcc-deploy.toml``, checked as pipecatcloud 1.4.0 checks it.

    The keys catflap reads (:data:`PCC_READ_KEYS`) stay unset when the file does not set them
    (``model_dump(exclude_unset=True)``), so that catflap.toml's keys and catflap's defaults
    fill them; the cloud-only ones (:data:`PCC_CLOUD_ONLY`) are checked and then ignored.
    catflap is stricter than that CLI on types (``region = 5`` is refused here, by PCC's API
    there) and on ``websocket_auth``, whose value it uses.
    """

    agent_name: str | None = None
    websocket_auth: WebsocketAuth | None = None
    max_session_duration: SessionDuration | None = None
    scaling: PccScaling | None = None
    secret_set: str | None = None
    # --- cloud-only: checked, then ignored ---
    image: str | None = None
    build_id: str | None = None
    image_credentials: str | None = None
    region: str | None = None
    agent_profile: str | None = None
    architecture: Literal["amd64", "arm64"] | None = None
    docker: dict[str, Any] | None = None
    build: PccBuild | None = None
    krisp_viva: PccKrispViva | None = None
    resources: PccResources | None = None
    git: PccGit | None = None

    #: Refused whatever its value, with pipecatcloud's message (a field, so that the error
    #: names this key).
    enable_krisp: Any = Field(default=None, exclude=True)

    @field_validator("enable_krisp")
    @classmethod
    def _refuse_enable_krisp(cls, value: Any) -> Any:
        raise ValueError(ENABLE_KRISP_REFUSED)

    @field_validator("secret_set")
    @classmethod
    def _secret_set_is_a_name(cls, value: str | None) -> str | None:
        problem = None if value is None else secret_name_problem("secret set", value)
        if problem:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _exclusive_keys(self) -> PccDeploy:
        # pipecatcloud's DeployConfigParams.__attrs_post_init__, in its order and words.
        if self.image is not None and ":" not in self.image:
            raise ValueError("Provided image must include tag e.g. my-image:latest")
        if self.image is not None and self.build_id is not None:
            raise ValueError("Cannot specify both 'image' and 'build_id'")
        git_set = self.git is not None and self.git.repo is not None
        if git_set and (self.image is not None or self.build_id is not None):
            raise ValueError("Cannot specify a GitHub source together with 'image' or 'build_id'")
        resources_set = self.resources is not None and self.resources.cpu is not None
        if self.agent_profile is not None and resources_set:
            raise ValueError("Cannot specify both 'agent_profile' and 'resources'")
        return self

    def ignored_keys(self) -> list[str]:
        """The cloud-only keys this file sets, in :data:`PCC_CLOUD_ONLY`'s order (tables as
        ``[name]``), for the log line that says catflap ignores them."""
        return [
            f"[{key}]" if key in _PCC_TABLES else key
            for key in PCC_CLOUD_ONLY
            if key in self.model_fields_set
        ]


_PCC_TABLES = frozenset({"docker", "build", "krisp_viva", "resources", "git"})


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


def _is_header_token(value: str) -> bool:
    """Whether ``value`` can be sent as a bearer credential: 1 to 1024 printable ASCII
    characters without spaces (other bytes are not reliably kept as sent in a header)."""
    return 1 <= len(value) <= 1024 and all("!" <= c <= "~" for c in value)


def split_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:8080`` too) as ``(host, port)``.

    Raises:
        ValueError: not a host and a port from 0 to 65535.
    """
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected host:port such as {DEFAULT_LISTEN!r}, got {listen!r}")
    return host.strip("[]"), int(port)
