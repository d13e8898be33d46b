"""The one way catflap opens its cluster Redis: bounded in time, and retried on a dead connection.

Every process of a cluster (gateway, agent host, ``catflap secrets --redis``) calls
:func:`connect`, so they agree on timeouts and on what is retried: redis-py's own ``Retry``
with :data:`~catflap.contract.limits.REDIS_CONNECTION_RETRIES` attempts, on connection errors
only. That is what lets the first command after a Redis restart (every pooled connection
dead) succeed instead of failing once per connection.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from catflap.contract import limits

__all__ = ["connect"]


def connect(url: str) -> aioredis.Redis:
    """A client for ``url`` (``redis://`` or ``rediss://``); it connects on first use."""
    return aioredis.Redis.from_url(
        url,
        socket_timeout=limits.REDIS_SOCKET_TIMEOUT_S,
        socket_connect_timeout=limits.REDIS_SOCKET_TIMEOUT_S,
        retry=Retry(
            ExponentialBackoff(cap=limits.REDIS_RETRY_BACKOFF_MAX_S, base=0.05),
            limits.REDIS_CONNECTION_RETRIES,
            supported_errors=(RedisConnectionError,),
        ),
    )
