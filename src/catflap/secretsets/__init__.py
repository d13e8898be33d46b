"""Secret sets: PCC's per-organisation environment variables for agents, encrypted at rest.

:mod:`.store` is the interface and its checks, :mod:`.cipher` the key, :mod:`.filestore` and
:mod:`.redisstore` the two stores, :mod:`.inject` what the launcher asks for. The instance's
environment itself (what else it inherits) is :mod:`catflap.pool.environment`'s.
"""

from catflap.secretsets.cipher import SECRETS_KEY_ENV, SecretCipher, generate_key
from catflap.secretsets.filestore import FileSecretStore
from catflap.secretsets.inject import AgentSecrets
from catflap.secretsets.store import SecretStore

__all__ = [
    "SECRETS_KEY_ENV",
    "AgentSecrets",
    "FileSecretStore",
    "SecretCipher",
    "SecretStore",
    "generate_key",
]
