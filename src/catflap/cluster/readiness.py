"""Whether a cluster gateway can take new sessions: Redis (and PostgreSQL) answer.

A gateway's ``/readyz`` calls a :class:`Dependencies` on every probe. Each check runs within
:data:`~catflap.contract.limits.READINESS_CHECK_TIMEOUT_S`, all at once; the answer names the
ones that failed. Live sessions need neither (frames never pass through Redis), so a gateway
that is not ready keeps relaying them: it only stops being sent new ones.

The reason a check failed goes to the log, once per change (not once per probe), and never to
the HTTP answer, which anyone who reaches ``/readyz`` can read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping

import redis.asyncio as aioredis

from catflap.contract import limits
from catflap.sessions.store import SessionStore

__all__ = ["Dependencies", "cluster_dependencies"]

log = logging.getLogger("catflap.cluster")

#: A session id no record has (the nil UUID): reading it is a real round trip to the store.
_NO_SESSION = "00000000-0000-0000-0000-000000000000"

Check = Callable[[], Awaitable[object]]


class Dependencies:
    """The services new sessions need, checked on demand; calling it gives the names of the
    ones that do not answer (empty: ready)."""

    def __init__(
        self, checks: Mapping[str, Check], *, timeout: float = limits.READINESS_CHECK_TIMEOUT_S
    ) -> None:
        self._checks = dict(checks)
        self._timeout = timeout
        #: What failed at the last call, to log changes only.
        self._down: set[str] = set()

    async def _one(self, name: str, check: Check) -> str | None:
        """None when ``check`` answered in time, else why not."""
        try:
            async with asyncio.timeout(self._timeout):
                await check()
        except TimeoutError:
            return f"no answer within {self._timeout:g} s"
        except Exception as exc:  # any failure means "not usable"; the kind goes to the log
            return f"{type(exc).__name__}: {exc}"
        return None

    async def __call__(self) -> list[str]:
        names = list(self._checks)
        problems = await asyncio.gather(*(self._one(n, self._checks[n]) for n in names))
        down = {name for name, problem in zip(names, problems, strict=True) if problem}
        for name, problem in zip(names, problems, strict=True):
            if problem and name not in self._down:
                log.error(
                    "! %s unreachable (%s): /readyz answers 503 until it is back; "
                    "live sessions go on",
                    name,
                    problem,
                )
            elif not problem and name in self._down:
                log.info("= %s reachable again: /readyz answers 200", name)
        self._down = down
        return sorted(down)


def cluster_dependencies(
    client: aioredis.Redis,
    store: SessionStore | None,
    *,
    timeout: float = limits.READINESS_CHECK_TIMEOUT_S,
) -> Dependencies:
    """Redis, and ``store`` when records live outside Redis (``database_url``)."""

    async def ping() -> None:
        await client.ping()

    checks: dict[str, Check] = {"redis": ping}
    if store is not None:
        checks["database"] = lambda: store.get(_NO_SESSION)
    return Dependencies(checks, timeout=timeout)
