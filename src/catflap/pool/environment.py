"""The environment an agent instance starts with: an allow-list of the gateway's, plus its own.

An instance does not inherit the environment of the process that starts it (``catflap serve``
or ``catflap agent-host``): that environment holds catflap's own keys (``CATFLAP_TOKEN_KEYS``,
``CATFLAP_SECRETS_KEY``), database passwords, and whatever the operator's shell exported, and
one agent must see nothing of another's. An instance gets, in this order, later ones winning:

1. the variables :data:`INSTANCE_ENV_ALLOWED` names, from the starting process (what Python,
   the locale and TLS need);
2. the variables its agent's ``pass_env`` names, from the starting process (an agent host whose
   pod gets its bot's keys from a Kubernetes Secret);
3. its agent's secret set (``secret_set``), read when the instance is launched, so a changed
   set reaches new instances and running ones keep what they started with, as on PCC.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Awaitable, Callable, Iterable, Mapping

from catflap.config import AgentSpec

__all__ = ["INSTANCE_ENV_ALLOWED", "SecretSource", "instance_environment", "passed_through"]

#: The starting process's variables every instance inherits: names, or prefixes ending in
#: ``*``. What an interpreter and a bot's libraries need to run as they would in PCC's image:
#: the search path and home, the locale and time zone, the temporary folder, the Python
#: interpreter's own settings (``PYTHONPATH``, ``PYTHONUNBUFFERED``, ...) and virtualenv, the
#: CA bundle for TLS, and the log levels PCC's base image and loguru read. The catflap runtime
#: itself reads no environment variable (its options come on its command line). Nothing else is
#: passed: not ``CATFLAP_*``, not proxies (they may hold credentials; name them in ``pass_env``).
INSTANCE_ENV_ALLOWED: tuple[str, ...] = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LANGUAGE",
    "LC_*",
    "TZ",
    "TMPDIR",
    "TERM",
    "PYTHON*",
    "VIRTUAL_ENV",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "PIPECAT_LOG_LEVEL",
    "LOGURU_*",
)

#: Reads the secret set of an agent (``secret_set``) as environment variables; none when the
#: agent names no set. Raises when the set is named but cannot be read, so that the instance is
#: not started without the keys its bot needs.
SecretSource = Callable[[AgentSpec], Awaitable[Mapping[str, str]]]


def passed_through(environ: Mapping[str, str], patterns: Iterable[str]) -> dict[str, str]:
    """The variables of ``environ`` that ``patterns`` name (``NAME`` or ``PREFIX*``)."""
    wanted = tuple(patterns)
    return {
        name: value
        for name, value in environ.items()
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in wanted)
    }


def instance_environment(
    environ: Mapping[str, str], agent: AgentSpec, secrets: Mapping[str, str]
) -> dict[str, str]:
    """An instance's whole environment: the allow-list, the agent's ``pass_env``, its secrets.

    Args:
        environ: The starting process's environment (``os.environ``).
        agent: The agent the instance runs; its ``pass_env`` is read.
        secrets: The agent's secret set (:data:`SecretSource`), empty without one.
    """
    env = passed_through(environ, INSTANCE_ENV_ALLOWED)
    env.update(passed_through(environ, agent.config.pass_env))
    env.update(secrets)
    return env
