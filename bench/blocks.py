"""Alternating attack and quiet blocks within one run: the hostile scenario's interleaved run.

Why: on a shared VM the machine itself drifts. Two neighbouring quiet runs of 15 s had p99s of
1.5 and 17.7 ms, so a quiet run and an attacked run compared as wholes measure the host as much
as the attack. In an interleaved run the attackers attack during even blocks (1 s) and pause
during odd ones, and the load client files each echo by the block its frame was *sent* in: both
sides see the same host, the same gateway and the same sessions, a few seconds apart, many
times over. The comparison is the one the whole runs' rounds make, with many short rounds: the
median, over the attack blocks, of each one's p99 over the mean of its two quiet neighbours'
(so that a drift within the run favours neither side), so that a
stall that is not the attack's weighs as one round, not as the whole comparison; blocks in
which other programs took a burst of CPU are left out of both sides besides (on the reference
VM, RabbitMQ's node starts a short-lived Erlang VM once a minute, 0.2-0.4 s of CPU at once:
``bench.loadgen.ForeignWatch``); the pooled p99s are reported beside it. Only blocks wholly
inside the load client's window count. Echoes
sent within ``guard_s`` of a quiet block's start are left out, so that attacks still in flight
when it begins are not counted as quiet; an attack block counts from its start, the attackers'
synchronised burst included. Attacks that last longer than a block (kind 3's stalled requests,
10 s) go on holding their idle connections through quiet blocks.

Both processes read ``CLOCK_MONOTONIC`` (``time.monotonic_ns``; the load client converts its
``perf_counter_ns`` stamps, the same clock on Linux), so one epoch in the spec is enough.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["Blocks"]

Side = Literal["attack", "quiet"]


@dataclass(frozen=True)
class Blocks:
    #: ``time.monotonic_ns()`` at the start of block 0 (an attack block).
    epoch_ns: int
    block_s: float = 1.0
    guard_s: float = 0.25

    @classmethod
    def starting_now(cls, block_s: float = 1.0, guard_s: float = 0.25) -> Blocks:
        return cls(time.monotonic_ns(), block_s, guard_s)

    @classmethod
    def from_spec(cls, spec: dict[str, Any] | None) -> Blocks | None:
        if not spec:
            return None
        return cls(int(spec["epoch_ns"]), float(spec["block_s"]), float(spec["guard_s"]))

    def to_spec(self) -> dict[str, Any]:
        return {"epoch_ns": self.epoch_ns, "block_s": self.block_s, "guard_s": self.guard_s}

    def block(self, t_ns: int) -> int | None:
        """The block a frame sent at ``t_ns`` counts for (even: attack, odd: quiet); None
        before the epoch or in a quiet block's guard."""
        since = t_ns - self.epoch_ns
        if since < 0:
            return None
        index, into = divmod(since, int(self.block_s * 1e9))
        return None if index % 2 == 1 and into < self.guard_s * 1e9 else index

    def start_ns(self, index: int) -> int:
        return self.epoch_ns + index * int(self.block_s * 1e9)

    def side(self, t_ns: int) -> Side | None:
        """The side a frame sent at ``t_ns`` counts for; None before the epoch or in a guard."""
        index = self.block(t_ns)
        return None if index is None else ("attack" if index % 2 == 0 else "quiet")

    def until_attack(self, t_ns: int) -> float:
        """Seconds from ``t_ns`` to the next attack block's start; 0 inside an attack block."""
        since = t_ns - self.epoch_ns
        block_ns = int(self.block_s * 1e9)
        if since < 0:
            return -since / 1e9
        index, into = divmod(since, block_ns)
        return 0.0 if index % 2 == 0 else (block_ns - into) / 1e9
