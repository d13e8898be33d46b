"""The hostile benchmark's interleaved blocks (bench/blocks.py) and the load client's split of
echoes by block (bench.loadgen.by_block): the arithmetic the p99 target rests on."""

from __future__ import annotations

from bench.blocks import Blocks
from bench.loadgen import Stats, by_block

S = 1_000_000_000
BLOCKS = Blocks(epoch_ns=100 * S, block_s=2.0, guard_s=0.25)


def test_a_frame_counts_for_the_block_it_was_sent_in_and_guards_count_for_neither() -> None:
    assert BLOCKS.side(99 * S) is None  # before the epoch
    assert BLOCKS.side(100 * S) is None  # the first 0.25 s of a block
    assert BLOCKS.side(100 * S + S // 4 - 1) is None
    assert BLOCKS.side(100 * S + S // 4) == "attack"
    assert BLOCKS.side(102 * S - 1) == "attack"
    assert BLOCKS.side(102 * S + S // 4) == "quiet"
    assert BLOCKS.side(104 * S + S // 2) == "attack"
    assert BLOCKS.block(105 * S) == 2
    assert BLOCKS.block(106 * S + S // 2) == 3


def test_attackers_wait_for_the_next_attack_block() -> None:
    assert BLOCKS.until_attack(99 * S) == 1.0
    assert BLOCKS.until_attack(100 * S) == 0.0
    assert BLOCKS.until_attack(101 * S) == 0.0
    assert BLOCKS.until_attack(102 * S + S // 2) == 1.5
    assert BLOCKS.until_attack(104 * S) == 0.0


def test_the_spec_round_trips() -> None:
    assert Blocks.from_spec(BLOCKS.to_spec()) == BLOCKS
    assert Blocks.from_spec(None) is None


def _stats(samples: list[tuple[float, int]]) -> Stats:
    """Echoes sent at ``t`` seconds after the epoch, each with ``latency`` ns."""
    stats = Stats()
    for t, latency in samples:
        sent = BLOCKS.epoch_ns + int(t * S)
        stats.arrivals.append(sent + latency)
        stats.latencies.append(latency)
    return stats


def test_the_ratio_is_the_median_over_block_pairs_of_their_p99s() -> None:
    # Blocks 0-5: three attack/quiet pairs, 200 echoes each, sent mid-block; then a lone attack
    # block 6 (its quiet partner never came: the window ended), and 50 echoes in guards.
    # Attack blocks' latencies are 2x, 3x and 100x their quiet partner's (a host stall in the
    # last pair): the median pair says 3x whatever one block did.
    factors = {0: 2, 2: 3, 4: 100}
    samples: list[tuple[float, int]] = []
    for block in range(7):
        quiet_latency = 1_000_000 * (2 + block - block % 2)  # a pair's quiet block's
        latency = quiet_latency * factors.get(block, 1) if block % 2 == 0 else quiet_latency
        samples += [(block * 2.0 + 1.0, latency)] * 200
    samples += [(block * 2.0 + 0.1, 7) for block in range(5) for _ in range(10)]
    result = by_block(_stats(samples), BLOCKS)
    assert result["pair_p99_ratios"] == [2.0, 3.0, 100.0]
    assert result["p99_ratio"] == 3.0
    assert result["guarded"] == 50
    assert result["attack"]["count"] == 4 * 200  # the lone block counts in the pooled rows
    assert result["quiet"]["count"] == 3 * 200
    assert result["block_s"] == 2.0 and result["guard_s"] == 0.25


def test_a_pair_with_too_few_echoes_is_left_out() -> None:
    samples = [(1.0, 2_000_000)] * 200 + [(3.0, 1_000_000)] * 99
    result = by_block(_stats(samples), BLOCKS)
    assert result["pair_p99_ratios"] == []
    assert result["p99_ratio"] is None
