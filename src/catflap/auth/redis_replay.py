"""Single-use tokens across gateways: ``SET jti <nonce> NX EXAT exp`` on the shared Redis."""

from __future__ import annotations

import logging
import secrets

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from catflap.cluster.keys import Keys
from catflap.contract.errors import RedisUnreachable

__all__ = ["RedisReplayStore"]

log = logging.getLogger("catflap.cluster")


class RedisReplayStore:
    """A :class:`~catflap.auth.replay.ReplayStore` shared by every gateway.

    The first ``SET NX`` wins; the key expires exactly when the token would, so memory stays
    bounded by the tokens minted in the last five minutes.
    """

    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self._redis = client
        self._keys = keys

    async def consume(self, jti: str, exp: int) -> bool:
        """True on the first use of ``jti``.

        Raises:
            RedisUnreachable: 503, Redis is unreachable (a token is never accepted blind).
        """
        # The value is this attempt's own: the client sends a command again when its
        # connection died (catflap.cluster.client), and a SET that ran before the answer was
        # lost must not make its own retry look like a replay.
        mine = secrets.token_bytes(16)
        key = self._keys.jti(jti)
        try:
            first = await self._redis.set(key, mine, nx=True, exat=exp)
            if first:
                return True
            return bool(await self._redis.get(key) == mine)
        except (RedisError, OSError) as exc:
            log.error("! Redis unreachable while spending a token (%s)", exc)
            raise RedisUnreachable() from None

    async def release(self, jti: str) -> None:
        """Forget ``jti`` (``DEL``), so its token opens a session after all.

        Redis being unreachable is logged, not raised: the caller is already refusing the
        session (429, 503, client gone) and that answer must not turn into another one. The
        token then stays spent until its ``exp``, which only costs the client a new ``/start``.
        """
        try:
            await self._redis.delete(self._keys.jti(jti))
        except (RedisError, OSError) as exc:
            log.warning("! Redis unreachable while releasing a token; it stays spent (%s)", exc)
