"""An agent's secret set as the launcher asks for it, when it starts one of its instances."""

from __future__ import annotations

from catflap.config import AgentSpec
from catflap.contract.errors import SecretSetNotFound
from catflap.secretsets.store import SecretStore

__all__ = ["AgentSecrets"]


class AgentSecrets:
    """A :data:`~catflap.pool.environment.SecretSource` over a store: the secrets of the set
    an agent's ``secret_set`` names, in the agent's organisation, read anew at every start."""

    def __init__(self, store: SecretStore) -> None:
        self.store = store

    async def __call__(self, agent: AgentSpec) -> dict[str, str]:
        """The agent's secrets; none when it names no set.

        Raises:
            SecretSetNotFound: the set it names does not exist (the instance is then not
                started, as PCC refuses to deploy with a set that is not ready).
            SecretStoreError: the store cannot be read.
        """
        name = agent.config.secret_set
        if name is None:
            return {}
        org = agent.service_host.org
        secrets = await self.store.values(org, name)
        if secrets is None:
            raise SecretSetNotFound(
                f"agent {agent.key} uses secret set {name!r} (secret_set), which organization "
                f"{org!r} does not have: create it with `catflap secrets set {name} KEY=VALUE "
                f"--org {org}`, or remove secret_set"
            )
        return secrets
