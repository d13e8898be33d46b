"""Agent, organisation and service-host syntax.

A service host is ``{agent}.{org}``. Agent names follow Pipecat Cloud's
``CreateServiceRequest.serviceName`` pattern; organisation names are DNS-label-like. Both are
lower-case ASCII only: every check uses explicit ``[a-z0-9]`` classes, :data:`re.ASCII` and
:func:`re.fullmatch` (``re.match`` with ``$`` would accept a trailing newline).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NewType

from catflap.contract import errors, limits

__all__ = [
    "AGENT_NAME_PATTERN",
    "ORG_NAME_PATTERN",
    "SECRET_NAME_PATTERN",
    "AgentName",
    "OrgName",
    "ServiceHost",
    "agent_name_problem",
    "org_name_problem",
    "parse_service_host",
    "secret_name_problem",
]

AgentName = NewType("AgentName", str)
OrgName = NewType("OrgName", str)

#: PCC's ``serviceName`` pattern. Note that it needs at least two characters.
AGENT_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])$"
#: The same shape, but a single character is allowed too.
ORG_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

#: PCC's pattern for secret set names and for the names of the secrets in a set (they become
#: environment variable names); at most ``SECRET_NAME_MAX_LEN`` characters.
SECRET_NAME_PATTERN = r"^[a-zA-Z0-9_-]+$"

_AGENT_RE = re.compile(AGENT_NAME_PATTERN, re.ASCII)
_ORG_RE = re.compile(ORG_NAME_PATTERN, re.ASCII)
_SECRET_RE = re.compile(SECRET_NAME_PATTERN, re.ASCII)
_ALLOWED_CHARS_RE = re.compile(r"[-a-z0-9]*", re.ASCII)
_UPPER_RE = re.compile(r"[A-Z]", re.ASCII)

#: Longest name quoted back in an error message (the rest is elided).
_QUOTE_MAX = 80


def _quote(name: str) -> str:
    if len(name) > _QUOTE_MAX:
        return repr(name[:_QUOTE_MAX]) + "..."
    return repr(name)


def _name_problem(
    kind: str, name: str, pattern: re.Pattern[str], max_len: int, min_len: int
) -> str | None:
    if len(name) <= max_len and pattern.fullmatch(name):
        return None
    if not name:
        reason = f"{kind} name is empty"
    elif len(name) > max_len:
        reason = f"{kind} name is {len(name)} characters long"
    elif not name.isascii():
        reason = f"{kind} name {_quote(name)} contains non-ASCII characters"
    elif _UPPER_RE.search(name):
        reason = f"{kind} name {_quote(name)} contains upper-case letters; names are lower-case"
    elif not _ALLOWED_CHARS_RE.fullmatch(name):
        reason = f"{kind} name {_quote(name)} contains characters other than a-z, 0-9 and '-'"
    elif len(name) < min_len:
        reason = f"{kind} name {_quote(name)} is shorter than {min_len} characters"
    else:
        reason = f"{kind} name {_quote(name)} starts or ends with '-'"
    rule = f"{pattern.pattern} and be at most {max_len} characters"
    return f"{reason}: it must match {rule}"


def agent_name_problem(name: str) -> str | None:
    """``None`` if ``name`` is a valid agent name, else a sentence naming the broken rule."""
    return _name_problem("agent", name, _AGENT_RE, limits.AGENT_NAME_MAX_LEN, 2)


def org_name_problem(name: str) -> str | None:
    """``None`` if ``name`` is a valid organisation name, else a sentence naming the rule."""
    return _name_problem("organisation", name, _ORG_RE, limits.ORG_NAME_MAX_LEN, 1)


def secret_name_problem(kind: str, name: str) -> str | None:
    """``None`` if ``name`` is a valid secret set or secret name, else a sentence naming the
    rule. ``kind`` is what the name names (``secret set``, ``secret``)."""
    if 1 <= len(name) <= limits.SECRET_NAME_MAX_LEN and _SECRET_RE.fullmatch(name):
        return None
    if not name:
        reason = f"{kind} name is empty"
    elif len(name) > limits.SECRET_NAME_MAX_LEN:
        reason = f"{kind} name is {len(name)} characters long"
    else:
        reason = (
            f"{kind} name {_quote(name)} contains characters other than a-z, A-Z, 0-9, '_' and '-'"
        )
    example = "MY_API_KEY" if kind == "secret" else "my-secrets"
    # No brackets in the sentence: Pipecat Cloud's CLI prints API errors as rich markup,
    # which would swallow a "[a-zA-Z0-9_-]" whole.
    return (
        f"{reason}: it must be 1 to {limits.SECRET_NAME_MAX_LEN} characters long, each a letter "
        f"(a-z, A-Z), a digit (0-9), '_' or '-', e.g. {example}"
    )


@dataclass(frozen=True, slots=True)
class ServiceHost:
    """A parsed ``{agent}.{org}`` service host."""

    agent: AgentName
    org: OrgName

    def __str__(self) -> str:
        return f"{self.agent}.{self.org}"


def parse_service_host(text: str) -> ServiceHost:
    """Parse ``{agent}.{org}``; raise :class:`~catflap.contract.errors.InvalidServiceHost`."""
    if len(text) > limits.SERVICE_HOST_MAX_LEN:
        raise errors.InvalidServiceHost(
            f"serviceHost is {len(text)} characters long; at most "
            f"{limits.SERVICE_HOST_MAX_LEN} are allowed: pass '{{agent}}.{{org}}', "
            "e.g. 'my-agent.my-org'"
        )
    dots = text.count(".")
    if dots != 1:
        raise errors.InvalidServiceHost(
            f"serviceHost {_quote(text)} has {dots} '.' characters: it must be "
            "'{agent}.{org}' with exactly one '.', e.g. 'my-agent.my-org'"
        )
    agent, org = text.split(".")
    problem = agent_name_problem(agent) or org_name_problem(org)
    if problem is not None:
        raise errors.InvalidServiceHost(f"invalid serviceHost {_quote(text)}: {problem}")
    return ServiceHost(AgentName(agent), OrgName(org))
