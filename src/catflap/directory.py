"""The agent directory: which agents exist, and which organisation a public key belongs to.

Built once from the configuration and read by every step that resolves a name: the upgrade
check (``{agent}.{org}``), the public ``/start`` endpoint (public key → org) and the sessions
API. A lookup is a dict read; nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Iterator

from catflap.config import AgentSpec, CatflapConfig
from catflap.contract.names import ServiceHost

__all__ = ["AgentDirectory"]


class AgentDirectory:
    """Every configured agent by ``agent.org``, and every public key's organisation."""

    def __init__(self, config: CatflapConfig) -> None:
        self._agents = {agent.key: agent for agent in config.agents()}
        self._public_keys: dict[str, str] = {}
        for org, org_cfg in config.organizations.items():
            for key in org_cfg.public_keys:
                self._public_keys.setdefault(key, org)  # the first organisation listing it

    def __call__(self, service_host: ServiceHost) -> AgentSpec | None:
        """The agent a ``serviceHost`` names, if it exists (the upgrade check's lookup)."""
        return self._agents.get(str(service_host))

    def agent(self, org: str, agent: str) -> AgentSpec | None:
        return self._agents.get(f"{agent}.{org}")

    def org_for_public_key(self, key: str) -> str | None:
        return self._public_keys.get(key)

    def __iter__(self) -> Iterator[AgentSpec]:
        return iter(self._agents.values())
