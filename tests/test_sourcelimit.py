"""The per-address start rate: a token bucket per source, on a clock the test moves."""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from catflap.config import GatewaySettings
from catflap.contract import limits
from catflap.contract.errors import TooManyStarts
from catflap.gateway.sourcelimit import StartRateLimiter, source_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(
    clock: Clock,
    *,
    rate: float = 2.0,
    burst: int = 5,
    exempt: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
    max_sources: int = limits.SESSION_START_SOURCES_MAX,
) -> StartRateLimiter:
    return StartRateLimiter(
        rate=rate, burst=burst, exempt=exempt, max_sources=max_sources, clock=clock
    )


def admitted(limit: StartRateLimiter, address: str, tries: int) -> int:
    count = 0
    for _ in range(tries):
        try:
            limit.check(address)
        except TooManyStarts:
            continue
        count += 1
    return count


def refusal(limit: StartRateLimiter, address: str) -> TooManyStarts:
    with pytest.raises(TooManyStarts) as caught:
        limit.check(address)
    return caught.value


def test_a_source_gets_exactly_its_burst_at_once_then_429() -> None:
    clock = Clock()
    limit = limiter(clock)
    assert admitted(limit, "203.0.113.7", 5) == 5
    refused = refusal(limit, "203.0.113.7")
    assert (refused.status, refused.code) == (429, "too_many_starts")
    assert refused.headers == (("retry-after", "1"),)
    assert refused.message == (
        "this address started over 2 sessions a second; retry after 1 s (Retry-After) "
        "or raise [gateway] session_starts_per_source"
    )
    assert refused.to_body() == {"error": refused.message, "code": "too_many_starts"}


def test_the_bucket_refills_at_the_rate_exactly() -> None:
    clock = Clock()
    limit = limiter(clock)
    assert admitted(limit, "203.0.113.7", 5) == 5
    clock.now += 0.375  # 0.75 of a start: not yet
    refusal(limit, "203.0.113.7")
    clock.now += 0.125
    limit.check("203.0.113.7")
    refusal(limit, "203.0.113.7")
    clock.now += 10.0  # long idle: back to the burst, never more
    assert admitted(limit, "203.0.113.7", 10) == 5


def test_refused_starts_take_nothing() -> None:
    clock = Clock()
    limit = limiter(clock)
    assert admitted(limit, "203.0.113.7", 5) == 5
    for _ in range(100):
        refusal(limit, "203.0.113.7")  # a flood of refusals does not push the refill back
    clock.now += 0.5
    limit.check("203.0.113.7")


@pytest.mark.parametrize(
    ("rate", "elapsed", "retry_after"),
    [(2.0, 0.0, 1), (0.5, 0.0, 2), (0.5, 1.0, 1), (0.1, 0.0, 10), (0.1, 9.5, 1), (0.3, 0.0, 4)],
)
def test_retry_after_is_the_seconds_until_a_start_rounded_up(
    rate: float, elapsed: float, retry_after: int
) -> None:
    clock = Clock()
    limit = limiter(clock, rate=rate, burst=1)
    limit.check("198.51.100.1")
    clock.now += elapsed
    refused = refusal(limit, "198.51.100.1")
    assert refused.retry_after == retry_after
    assert refused.headers == (("retry-after", str(retry_after)),)
    # ...and it is true: one start is back after exactly that long, none before it.
    clock.now += retry_after
    limit.check("198.51.100.1")


def test_sources_have_their_own_buckets() -> None:
    clock = Clock()
    limit = limiter(clock)
    assert admitted(limit, "203.0.113.7", 8) == 5
    assert admitted(limit, "203.0.113.8", 8) == 5
    assert admitted(limit, "::ffff:203.0.113.9", 8) == 5
    # A dual-stack socket's IPv4-mapped address is that IPv4 address.
    refusal(limit, "203.0.113.9")


def test_ipv6_counts_by_its_slash_64() -> None:
    clock = Clock()
    limit = limiter(clock)
    same_64 = [f"2001:db8:1:2::{n:x}" for n in range(1, 6)]
    for address in same_64:
        limit.check(address)
    refusal(limit, "2001:db8:1:2:ffff:ffff:ffff:ffff")
    refusal(limit, "2001:db8:1:2::1%eth0")  # a scope id changes nothing
    assert admitted(limit, "2001:db8:1:3::1", 5) == 5  # the next /64 is another source
    assert len(limit) == 2
    assert source_key("2001:db8:1:2::1") == source_key("2001:db8:1:2:abcd::1")
    assert source_key("2001:db8:1:2::1") != source_key("2001:db8:1:3::1")
    # The /64 0::/64 holds ::ffff:0:0/96 too, but mapped addresses are IPv4 keys.
    assert (
        source_key("::ffff:10.0.0.1")
        == source_key("10.0.0.1")
        == int(ipaddress.ip_address("10.0.0.1"))
    )
    assert source_key("::a00:1") != source_key("10.0.0.1")


def test_exempt_networks_are_never_limited_and_not_tracked() -> None:
    clock = Clock()
    exempt = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32")]
    limit = limiter(clock, exempt=exempt)
    assert admitted(limit, "10.200.3.4", 1000) == 1000
    assert admitted(limit, "::ffff:10.1.1.1", 1000) == 1000
    assert admitted(limit, "2001:db8:ffff::1", 1000) == 1000
    assert len(limit) == 0
    assert admitted(limit, "11.0.0.1", 10) == 5


def test_what_is_not_an_ip_address_is_not_limited() -> None:
    limit = limiter(Clock())
    for address in (None, "", "not-an-address", "/run/catflap.sock"):
        assert admitted(limit, address, 20) == 20  # type: ignore[arg-type]
    assert len(limit) == 0


def test_rate_zero_turns_it_off() -> None:
    limit = limiter(Clock(), rate=0.0, burst=1)
    assert not limit.enabled
    assert admitted(limit, "203.0.113.7", 10_000) == 10_000
    assert len(limit) == 0


def test_tracked_sources_never_exceed_the_bound_least_recently_seen_go_first() -> None:
    clock = Clock()
    limit = limiter(clock, rate=0.001, burst=1, max_sources=100)
    limit.check("192.0.2.1")
    for n in range(1, 1000):
        clock.now += 0.001
        limit.check(f"10.0.{n // 256}.{n % 256}")
        if n % 10 == 0:
            refusal(limit, "192.0.2.1")  # seen again: kept, and still limited
        assert len(limit) <= 100
    assert len(limit) == 100
    refusal(limit, "192.0.2.1")
    # The oldest of the others was forgotten: it starts again with a full bucket.
    limit.check("10.0.0.1")


def test_the_default_bound_is_the_documented_one() -> None:
    limit = StartRateLimiter()
    assert (limit.rate, limit.burst, limit.max_sources) == (
        limits.SESSION_STARTS_PER_SOURCE_DEFAULT,
        limits.SESSION_STARTS_BURST_DEFAULT,
        limits.SESSION_START_SOURCES_MAX,
    )
    clock = Clock()
    limit = StartRateLimiter(clock=clock, burst=1, max_sources=limits.SESSION_START_SOURCES_MAX)
    for n in range(limits.SESSION_START_SOURCES_MAX + 500):
        limit.check(f"10.{n >> 16}.{(n >> 8) & 255}.{n & 255}")
    assert len(limit) == limits.SESSION_START_SOURCES_MAX


def test_from_settings_reads_the_gateway_section() -> None:
    clock = Clock()
    gateway = GatewaySettings(
        session_starts_per_source=0.5, session_starts_burst=2, session_starts_exempt=["::1"]
    )
    limit = StartRateLimiter.from_settings(gateway, clock=clock)
    assert (limit.rate, limit.burst) == (0.5, 2)
    assert admitted(limit, "::1", 50) == 50
    assert admitted(limit, "127.0.0.1", 50) == 2
    assert refusal(limit, "127.0.0.1").retry_after == 2


def test_a_bucket_of_less_than_one_start_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        StartRateLimiter(burst=0)
    with pytest.raises(ValueError, match="at least 1"):
        StartRateLimiter(max_sources=0)


def test_a_clock_that_steps_back_refills_nothing() -> None:
    clock = Clock()
    limit = limiter(clock)
    assert admitted(limit, "203.0.113.7", 5) == 5
    clock.now -= 100.0
    refusal(limit, "203.0.113.7")
    clock.now += 100.5  # 0.5 s past the last check seen, at 2/s: one start
    limit.check("203.0.113.7")


_ADDRESSES = ["198.51.100.1", "198.51.100.2", "2001:db8::1", "2001:db8::2", "2001:db8:0:1::1"]


@settings(max_examples=200, deadline=None)
@given(
    rate=st.sampled_from([0.5, 1.0, 2.0, 3.0, 20.0]),
    burst=st.integers(min_value=1, max_value=20),
    calls=st.lists(
        st.tuples(st.floats(min_value=0.0, max_value=2.0), st.sampled_from(_ADDRESSES)),
        max_size=300,
    ),
)
def test_a_source_never_starts_more_than_burst_plus_rate_times_elapsed(
    rate: float, burst: int, calls: list[tuple[float, str]]
) -> None:
    clock = Clock()
    limit = StartRateLimiter(rate=rate, burst=burst, clock=clock)
    first: dict[int, float] = {}
    started: dict[int, int] = {}
    for step, address in calls:
        clock.now += step
        key = source_key(address)
        assert key is not None
        first.setdefault(key, clock.now)
        try:
            limit.check(address)
        except TooManyStarts as refused:
            # Refused only when under one start is left, and Retry-After is when one is back.
            assert refused.retry_after >= 1
            continue
        started[key] = started.get(key, 0) + 1
        elapsed = clock.now - first[key]
        assert started[key] <= math.floor(burst + rate * elapsed + 1e-9)
