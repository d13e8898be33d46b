"""Single use for session tokens: each ``jti`` is accepted once until its ``exp``.

A store only has to remember a jti until the token expires, because
:func:`~catflap.auth.tokens.verify_token` refuses the token from then on anyway. That keeps
memory bounded by (tokens minted per second x TTL) and maps onto Redis as
``SET replay:<jti> 1 NX EXAT <exp>``.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from typing import Protocol

from catflap.auth.tokens import TokenClaims, TokenFailure, rejection

__all__ = ["MemoryReplayStore", "ReplayStore", "consume_or_reject"]


class ReplayStore(Protocol):
    """Remembers used token ids until they expire."""

    async def consume(self, jti: str, exp: int) -> bool:
        """Mark ``jti`` used until ``exp`` (unix seconds).

        Args:
            jti: The token id.
            exp: The token's expiry; the store may forget ``jti`` from this second on.

        Returns:
            ``True`` on first use; ``False`` if ``jti`` was consumed before and has not yet
            expired. Check and mark are one atomic step.
        """
        ...

    async def release(self, jti: str) -> None:
        """Forget that ``jti`` was consumed, so the same token may be used again.

        For a token whose session never started: refused for capacity (429) or readiness
        (503), or its client left first. Releasing a jti that is unknown or already expired
        does nothing. Best effort: a store that cannot reach its storage logs that and returns,
        and the token stays spent (the safe side: the client asks ``/start`` for another).

        Args:
            jti: The token id passed to :meth:`consume` before.
        """
        ...


class MemoryReplayStore:
    """In-process :class:`ReplayStore` for a single gateway.

    Expired entries are dropped on every :meth:`consume` and :func:`len` (a heap ordered by
    ``exp`` makes that cheap), so memory holds only live jtis, never an ever-growing set.
    :meth:`consume` does not await, so it is atomic within one event loop.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        """Create an empty store.

        Args:
            clock: Returns the current unix time in seconds; inject a fake one in tests.
        """
        self._clock = clock
        self._expiry: dict[str, int] = {}
        self._heap: list[tuple[int, str]] = []

    def _prune(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            exp, jti = heapq.heappop(heap)
            if self._expiry.get(jti) == exp:
                del self._expiry[jti]

    async def consume(self, jti: str, exp: int) -> bool:
        """Mark ``jti`` used until ``exp``; see :meth:`ReplayStore.consume`.

        A token already past ``exp`` is not remembered (there is nothing left to protect) and
        returns ``True``; :func:`~catflap.auth.tokens.verify_token` refuses such tokens before
        they get here.
        """
        now = self._clock()
        self._prune(now)
        if jti in self._expiry:
            return False
        if exp > now:
            self._expiry[jti] = exp
            heapq.heappush(self._heap, (exp, jti))
        return True

    async def release(self, jti: str) -> None:
        """Forget ``jti``; see :meth:`ReplayStore.release`.

        Its heap entry stays until its ``exp``: :meth:`_prune` skips entries whose jti is gone
        or was consumed again with another ``exp``, so the heap stays bounded by the consumes
        of one token lifetime.
        """
        self._expiry.pop(jti, None)

    def __len__(self) -> int:
        """Number of jtis currently remembered (expired ones are dropped first)."""
        self._prune(self._clock())
        return len(self._expiry)


async def consume_or_reject(store: ReplayStore, claims: TokenClaims) -> None:
    """Consume ``claims.jti`` in ``store``, refusing a token that was already used.

    Call this after :func:`~catflap.auth.tokens.verify_token` succeeded, so that a forged or
    expired token never burns a jti.

    Args:
        store: Where used jtis are remembered.
        claims: The verified claims.

    Raises:
        TokenRejected: 403 ``token_replayed`` if the jti was already consumed.
    """
    if not await store.consume(claims.jti, claims.exp):
        raise rejection(TokenFailure.REPLAYED)
