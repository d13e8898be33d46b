"""catflap's configuration: what it may hold (:mod:`.models`) and how it is read (:mod:`.loading`).

The rest of catflap imports from here; the two modules are this package's inside.
"""

from catflap.config.loading import (
    TOKEN_KEYS_ENV,
    check_tls,
    generated_public_key,
    load_config,
    read_pcc_deploy,
    token_keyring,
    zero_config,
)
from catflap.config.models import (
    DEFAULT_LISTEN,
    AgentConfig,
    AgentSpec,
    CatflapConfig,
    GatewaySettings,
    IceServer,
    LogsConfig,
    OrgConfig,
    PccDeploy,
    ScalingConfig,
    WebRTCConfig,
)

__all__ = [
    "DEFAULT_LISTEN",
    "TOKEN_KEYS_ENV",
    "AgentConfig",
    "AgentSpec",
    "CatflapConfig",
    "GatewaySettings",
    "IceServer",
    "LogsConfig",
    "OrgConfig",
    "PccDeploy",
    "ScalingConfig",
    "WebRTCConfig",
    "check_tls",
    "generated_public_key",
    "load_config",
    "read_pcc_deploy",
    "token_keyring",
    "zero_config",
]
