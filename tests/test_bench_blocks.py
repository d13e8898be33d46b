"""The hostile benchmark's interleaved blocks (bench/blocks.py) and the load client's split of
echoes by block (bench.loadgen.by_block): the arithmetic the p99 target rests on."""

from __future__ import annotations

import asyncio
import sys
import time

from bench.blocks import Blocks
from bench.loadgen import BURST_CPU_LIMIT_S, ForeignWatch, Stats, by_block
from bench.procs import CLOCK_TICKS, ProcessRow, others_cpu_s

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


def test_the_watch_reports_the_intervals_over_the_limit_alone_or_split() -> None:
    watch = ForeignWatch(root=1, epoch_ns=0, step_ns=S)
    limit = BURST_CPU_LIMIT_S
    watch.by_interval = {0: 0.02, 1: limit, 3: limit + 0.01, 4: 0.4, 5: 0.09, 6: 0.08, 8: 0.14}
    watch.by_interval |= {9: 0.03, 11: 0.2, 12: 0.01}
    # 3, 4 and 11 alone (1 is at the limit, not over); 4 + 5 and 5 + 6 split one (each at
    # least the floor); 0 + 1, 8 + 9 and 11 + 12 do not (one of each is under the floor).
    assert watch.disturbed() == {3, 4, 5, 6, 11}
    assert watch.peak_s() == 0.4
    assert ForeignWatch(root=1, epoch_ns=0, step_ns=S).peak_s() == 0.0


def _row(ppid: int, seconds: float, *, started: int = 100, kernel: bool = False) -> ProcessRow:
    return ProcessRow(ppid, started, round(seconds * CLOCK_TICKS), kernel)


def test_other_programs_are_every_process_outside_the_suites_tree_but_the_kernels() -> None:
    before = {
        1: _row(0, 10),  # init
        2: _row(0, 0, kernel=True),  # kthreadd
        10: _row(1, 5),  # the suite
        11: _row(10, 1),  # its load client
        12: _row(11, 0),  # a grandchild
        20: _row(1, 2),  # another program
        21: _row(20, 1),  # its child, which ends in between
        30: _row(2, 0, kernel=True),  # a kernel worker
        50: _row(1, 7),  # another program that ends; its pid is taken by a new one
    }
    after = {
        1: _row(0, 10 + 7.25),  # reaped 50 (7.25 s in all: 0.25 s in between)
        2: _row(0, 0, kernel=True),
        10: _row(1, 6),
        11: _row(10, 3),
        12: _row(11, 2),
        13: _row(10, 4),  # the suite's, born in between
        20: _row(1, 2 + 0.5 + 1.25),  # +0.5 s itself, and 21's 1.25 s in all (0.25 in between)
        30: _row(2, 9, kernel=True),
        40: _row(1, 0.25),  # another program, born in between
        50: _row(1, 0.5, started=900),  # the pid reused: a new process
    }
    # 50 (old): 0.25; 20: 0.5; 21: 0.25; 40: 0.25; 50 (new): 0.5.
    assert others_cpu_s(before, after, root=10) == 1.75
    # From init's point of view everything is its own, the kernel's threads left out still.
    assert others_cpu_s(before, after, root=1) == 0.0


def test_the_watch_sees_a_short_burst_by_a_program_not_the_benchmarks() -> None:
    """A real burner outside the watch's tree burns 0.5 s of CPU starting early in interval 1:
    intervals 1 and 2 together hold it, and every other process on the machine only adds to
    what the watch sees, since the tree it leaves out is a sleeping child of this test."""

    async def watch_a_burst() -> ForeignWatch:
        sleeper = await asyncio.create_subprocess_exec("sleep", "30")
        try:
            epoch = time.monotonic_ns() + S // 5
            watch = ForeignWatch(sleeper.pid, epoch_ns=epoch, step_ns=S)
            task = asyncio.create_task(watch.run(time.monotonic_ns(), epoch + 3 * S))
            await asyncio.sleep((epoch + S + S // 20 - time.monotonic_ns()) / 1e9)
            burner = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                "import time\nwhile time.process_time() < 0.5: pass",
            )
            assert await burner.wait() == 0
            await task
        finally:
            sleeper.kill()
            await sleeper.wait()
        return watch

    watch = asyncio.run(watch_a_burst())
    assert sorted(watch.by_interval) == [0, 1, 2]
    assert watch.by_interval[1] + watch.by_interval[2] >= 0.5, watch.by_interval
    assert {1, 2} & watch.disturbed()
