"""How fast one client address may start sessions: a token bucket per source, as nginx's
``limit_req``.

Every session start costs an agent instance real work (``bot()``'s setup, and in production
LLM and TTS calls), and ``websocket_auth = "none"`` lets anyone start one. The other bounds
(``max_agents``, ``max_connections``) cap how many run at once, not how fast one peer churns
through them, so a peer looping "upgrade, hang up" could keep the agents busy starting bots it
never uses. Here each source has a bucket of ``burst`` starts that refills at ``rate`` a second;
a start that finds it empty is refused with 429 ``too_many_starts`` before any token is spent or
slot reserved, so a refusal costs the gateway a dictionary lookup and nothing else.

A source is the TCP peer's address: an IPv4 address, or an IPv6 address's /64, since one host
(one customer line) usually holds a whole /64 and could otherwise take a fresh address per
start. At most ``max_sources`` buckets are kept; past that the least recently seen is forgotten
(nginx does the same when its zone is full), so many addresses cannot grow the table. Exempt
networks (a load balancer, a telephony provider's ranges) are never limited, nor is a peer
without an IP address (a Unix socket).
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from catflap.config import GatewaySettings
from catflap.contract import limits
from catflap.contract.errors import TooManyStarts

__all__ = ["StartRateLimiter", "source_key"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
#: IPv6 keys are their /64 prefix plus this, so they never equal an IPv4 key (below 2**32).
_IPV6_KEY = 1 << 64


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``address`` as an IP address (an IPv4-mapped IPv6 one as its IPv4 address), or None."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # a dual-stack socket's view of an IPv4 peer
    return ip


def source_key(address: str) -> int | None:
    """The bucket an address counts in: the IPv4 address, or the IPv6 address's /64; None when
    ``address`` is not an IP address."""
    ip = _ip(address)
    return None if ip is None else _key(ip)


def _key(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
    if isinstance(ip, ipaddress.IPv4Address):
        return int(ip)
    return _IPV6_KEY | (int(ip) >> 64)


class _Bucket:
    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


class StartRateLimiter:
    """Token buckets of session starts, one per source.

    Args:
        rate: starts a second a source regains; 0 (or less) turns the limiter off.
        burst: starts a source may make at once (its bucket's size), at least 1.
        exempt: networks never limited.
        max_sources: buckets kept at most; the least recently seen goes first.
        clock: monotonic seconds (``time.monotonic``); a test moves its own.
    """

    def __init__(
        self,
        *,
        rate: float = limits.SESSION_STARTS_PER_SOURCE_DEFAULT,
        burst: int = limits.SESSION_STARTS_BURST_DEFAULT,
        exempt: Iterable[Network] = (),
        max_sources: int = limits.SESSION_START_SOURCES_MAX,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if burst < 1 or max_sources < 1:
            raise ValueError("burst and max_sources must be at least 1")
        self.rate = rate
        self.burst = burst
        self.max_sources = max_sources
        self._exempt = tuple(exempt)
        self._clock = clock
        self._buckets: OrderedDict[int, _Bucket] = OrderedDict()

    @classmethod
    def from_settings(
        cls, settings: GatewaySettings, *, clock: Callable[[], float] = time.monotonic
    ) -> StartRateLimiter:
        """The limiter ``[gateway]`` configures."""
        return cls(
            rate=settings.session_starts_per_source,
            burst=settings.session_starts_burst,
            exempt=settings.exempt_networks,
            clock=clock,
        )

    def __len__(self) -> int:
        """Sources tracked now (at most ``max_sources``)."""
        return len(self._buckets)

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def check(self, address: str | None) -> None:
        """Take one start from ``address``'s bucket.

        Call it only for a request that would start a session, once every other check that
        needs no slot or token has passed: a refused start takes nothing, an admitted one
        takes its token whether or not the session then starts.

        Raises:
            TooManyStarts: 429, the bucket is empty; ``Retry-After`` is the whole seconds
                until it holds a start again (at least 1).
        """
        if self.rate <= 0 or address is None:
            return
        ip = _ip(address)
        if ip is None or any(ip in network for network in self._exempt):
            return
        key = _key(ip)
        now = self._clock()
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            if len(buckets) >= self.max_sources:
                buckets.popitem(last=False)
            bucket = buckets[key] = _Bucket(float(self.burst), now)
        else:
            # A refused source is seen too: one that keeps trying stays tracked, and limited.
            buckets.move_to_end(key)
            if now > bucket.stamp:  # a clock that steps back refills nothing
                elapsed = now - bucket.stamp
                bucket.tokens = min(float(self.burst), bucket.tokens + elapsed * self.rate)
                bucket.stamp = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return
        retry_after = max(1, math.ceil((1.0 - bucket.tokens) / self.rate))
        raise TooManyStarts(
            f"this address started over {self.rate:g} sessions a second; retry after "
            f"{retry_after} s (Retry-After) or raise [gateway] session_starts_per_source",
            retry_after=retry_after,
        )
