"""The hostile benchmark's interleaved blocks (bench/blocks.py) and the load client's split of
echoes by block (bench.loadgen.by_block): the arithmetic the p99 target rests on."""

from __future__ import annotations

import asyncio
import os
import time

from bench.blocks import Blocks
from bench.loadgen import BURST_CPU_LIMIT_S, ForeignWatch, Stats, by_block
from bench.procs import CLOCK_TICKS, others_cpu_s

S = 1_000_000_000
MS = 1_000_000
BLOCKS = Blocks(epoch_ns=100 * S, block_s=2.0, guard_s=0.25)


def test_a_frame_counts_for_the_block_it_was_sent_in_and_quiet_guards_for_neither() -> None:
    assert BLOCKS.side(99 * S) is None  # before the epoch
    assert BLOCKS.side(100 * S) == "attack"  # an attack block counts from its start
    assert BLOCKS.side(102 * S - 1) == "attack"
    assert BLOCKS.side(102 * S) is None  # the first 0.25 s of a quiet block
    assert BLOCKS.side(102 * S + S // 4 - 1) is None
    assert BLOCKS.side(102 * S + S // 4) == "quiet"
    assert BLOCKS.side(104 * S + S // 2) == "attack"
    assert BLOCKS.block(105 * S) == 2
    assert BLOCKS.block(106 * S + S // 2) == 3
    assert BLOCKS.start_ns(3) == 106 * S


def test_attackers_wait_for_the_next_attack_block() -> None:
    assert BLOCKS.until_attack(99 * S) == 1.0
    assert BLOCKS.until_attack(100 * S) == 0.0
    assert BLOCKS.until_attack(101 * S) == 0.0
    assert BLOCKS.until_attack(102 * S + S // 2) == 1.5
    assert BLOCKS.until_attack(104 * S) == 0.0


def test_the_spec_round_trips() -> None:
    assert Blocks.from_spec(BLOCKS.to_spec()) == BLOCKS
    assert Blocks.from_spec(None) is None


def _split(
    samples: list[tuple[float, int]],
    window_s: tuple[float, float],
    disturbed: set[int] | None = None,
) -> dict[str, object]:
    """by_block over echoes sent ``t`` s after the epoch with ``latency`` ns each, the load
    client's window from ``window_s[0]`` to ``window_s[1]`` s after the epoch (the two clocks
    are read apart, so a bound exactly on a block edge is given a millisecond of slack)."""
    # The load client stamps with perf_counter_ns, the blocks use monotonic_ns.
    to_perf = time.perf_counter_ns() - time.monotonic_ns()
    stats = Stats()
    for t, latency in samples:
        sent = BLOCKS.epoch_ns + int(t * S) + to_perf
        stats.arrivals.append(sent + latency)
        stats.latencies.append(latency)
    window = tuple(BLOCKS.epoch_ns + int(w * S) + to_perf for w in window_s)
    return by_block(stats, BLOCKS, (window[0], window[1]), disturbed)


def test_each_attack_block_is_compared_with_the_mean_of_its_quiet_neighbours() -> None:
    # Blocks 0-10 (22 s); quiet block i's echoes take i ms, so attack block i's neighbours
    # average i ms, and attack block i takes factor x i ms. Blocks 0 and 10 lack a neighbour.
    factors = {0: 50, 2: 2, 4: 3, 6: 4, 8: 100, 10: 50}
    samples: list[tuple[float, int]] = []
    for block in range(11):
        latency = block * MS if block % 2 else factors[block] * block * MS + MS
        samples += [(block * 2.0 + 1.0, latency)] * 200
    samples += [(block * 2.0 + 0.1, 7) for block in (1, 3, 5) for _ in range(10)]  # quiet guards
    result = _split(samples, (-0.001, 22.001))
    ratios = result["pair_p99_ratios"]
    assert ratios == sorted(ratios) and len(ratios) == 4
    # Attack block i: (factor x i + 1) ms over i ms.
    assert ratios == [round((f * i + 1) / i, 3) for i, f in sorted(factors.items()) if 0 < i < 10]
    assert result["p99_ratio"] == round((ratios[1] + ratios[2]) / 2, 3)
    assert result["attack_above"] == 4
    assert result["left_out"] == 30
    assert result["attack"]["count"] == 6 * 200  # every whole attack block counts when pooled
    assert result["quiet"]["count"] == 5 * 200


def test_blocks_cut_by_the_window_and_thin_blocks_are_left_out() -> None:
    samples = [(block * 2.0 + 1.5, 1 + block * MS) for block in range(5) for _ in range(200)]
    samples += [(9.0, 3 * MS)] * 99  # block 4 gets 99 more: still counted, it has 299
    result = _split(samples, (0.5, 10.001))  # block 0 starts before the window
    assert result["left_out"] == 200
    assert result["attack"]["count"] == 200 + 299  # blocks 2 and 4
    assert len(result["pair_p99_ratios"]) == 1  # block 2, between quiet blocks 1 and 3
    # Attack block 2 between quiet blocks 1 (200 echoes) and 3 (99: too few for a p99).
    thin = [(3.0, MS)] * 200 + [(5.0, MS)] * 200 + [(7.0, MS)] * 99
    assert _split(thin, (0.0, 8.001))["pair_p99_ratios"] == []
    assert _split(thin + [(7.0, MS)], (0.0, 8.001))["pair_p99_ratios"] == [1.0]


def test_blocks_other_programs_burst_in_are_left_out_on_both_sides() -> None:
    # Blocks 0-8; attack block 4 stalls (100 ms) and quiet block 5 too: both in a burst.
    samples: list[tuple[float, int]] = []
    for block in range(9):
        latency = 100 * MS if block in (4, 5) else (2 * MS if block % 2 == 0 else MS)
        samples += [(block * 2.0 + 1.0, latency)] * 200
    clean = _split(samples, (-0.001, 18.001))
    assert clean["burst_blocks"] == {"attack": 0, "quiet": 0}
    assert clean["attack"]["max"] == 100_000.0
    result = _split(samples, (-0.001, 18.001), disturbed={4, 5, 99})
    assert result["burst_blocks"] == {"attack": 1, "quiet": 1}
    assert result["left_out"] == 400
    assert result["attack"]["count"] == 4 * 200 and result["quiet"]["count"] == 3 * 200
    assert result["attack"]["max"] == 2000.0 and result["quiet"]["max"] == 1000.0
    # Attack block 2 (quiet 1 and 3) is compared; 6 lost its neighbour 5, 4 is out.
    assert result["pair_p99_ratios"] == [2.0]


def test_the_watch_reports_the_intervals_over_the_limit() -> None:
    watch = ForeignWatch(root=1, epoch_ns=0, step_ns=S)
    watch.by_interval = {0: 0.02, 1: BURST_CPU_LIMIT_S, 2: BURST_CPU_LIMIT_S + 0.01, 3: 0.4}
    assert watch.disturbed() == {2, 3}
    assert watch.peak_s() == 0.4
    assert ForeignWatch(root=1, epoch_ns=0, step_ns=S).peak_s() == 0.0


def test_other_programs_are_every_process_outside_the_suites_tree_but_the_kernels() -> None:
    hz = CLOCK_TICKS
    # pid: (ppid, ticks of itself and its reaped children, kernel thread)
    before = {
        1: (0, 10 * hz, False),  # init
        2: (0, 0, True),  # kthreadd
        10: (1, 5 * hz, False),  # the suite
        11: (10, 1 * hz, False),  # its load client
        12: (11, 0, False),  # a grandchild
        20: (1, 2 * hz, False),  # another program
        21: (20, 0, False),  # its child, which ends in between
        30: (2, 0, True),  # a kernel worker
    }
    after = {
        1: (0, 10 * hz, False),
        2: (0, 0, True),
        10: (1, 6 * hz, False),
        11: (10, 3 * hz, False),
        12: (11, 2 * hz, False),
        13: (10, 4 * hz, False),  # the suite's, born in between
        20: (1, 2 * hz + hz // 2, False),  # +0.5 s, 0.25 s of it its ended child's
        30: (2, 9 * hz, True),
        40: (1, hz // 4, False),  # another program, born in between
    }
    assert others_cpu_s(before, after, root=10) == 0.75
    # From init's point of view everything is its own, the kernel's threads left out still.
    assert others_cpu_s(before, after, root=1) == 0.0


def test_the_watch_sees_a_short_burst_by_a_program_not_the_benchmarks() -> None:
    """A real burner outside the benchmark's processes (reparented to init by a shell that
    exits at once) burns ~0.6 s within one 1 s interval: that interval is over the limit,
    however busy the machine is otherwise (other load only adds to it)."""

    async def watch_a_burst() -> ForeignWatch:
        # This test's parent (pytest, or its workers' parent) stands for the suite.
        epoch = time.monotonic_ns() + S // 5
        watch = ForeignWatch(os.getppid(), epoch_ns=epoch, step_ns=S)
        task = asyncio.create_task(watch.run(epoch + 3 * S))
        await asyncio.sleep((epoch + S + S // 10 - time.monotonic_ns()) / 1e9)  # interval 1
        shell = await asyncio.create_subprocess_exec(
            "sh",
            "-c",
            "timeout 0.6 sh -c 'while :; do :; done' >/dev/null 2>&1 &",
            start_new_session=True,
        )
        assert await shell.wait() == 0
        await task
        return watch

    watch = asyncio.run(watch_a_burst())
    assert sorted(watch.by_interval) == [0, 1, 2]
    assert watch.by_interval[1] >= 0.45, watch.by_interval
    assert 1 in watch.disturbed()
