"""The load client: WebSocket sessions on raw asyncio protocols (uvloop), no WebSocket library.

It must cost less than what it measures, so the hot path is a handful of byte operations:

- the HTTP upgrade is written by hand and the reply read up to ``\\r\\n\\r\\n`` (status 101
  checked);
- outgoing frames are pre-encoded and masked once per connection (a fixed mask key per
  connection); only the first 16 payload bytes, an 8-byte sequence number and an 8-byte
  ``perf_counter_ns`` send timestamp, are patched in (XOR with the mask) before each write;
- echoed frames (unmasked, server to client) are parsed for their header only; the sequence
  number and timestamp are read back from the payload, so latency = receive time - send time,
  both taken in this process.

Run as ``python -m bench.loadgen`` with a JSON spec on stdin; it prints one JSON result line on
stdout. The orchestrator (:mod:`bench.scenarios`) pins it to the load core. Modes:
``telephony`` (paced frames), ``closed`` (closed loop), ``start`` (session starts) and ``idle``
(hold idle sessions and sample the relay's memory).
"""

from __future__ import annotations

import array
import asyncio
import base64
import contextlib
import json
import os
import ssl
import statistics
import struct
import sys
import time
from collections.abc import Callable
from typing import Any, cast

from bench.blocks import Blocks
from bench.procs import (
    BURST_CPU_LIMIT_S,
    ProcessRow,
    cpu_ticks,
    cpu_times,
    descendants_of,
    machine_load,
    others_cpu_s,
    process_table,
    raise_nofile,
    rss_kb,
)

__all__ = ["FrameTemplate", "Stats", "WSClient", "main", "percentiles"]

_now = time.perf_counter_ns
_SEQ_TS = struct.Struct("!QQ")
_CLOSE_1000 = struct.pack("!H", 1000)
OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x2, 0x8, 0x9, 0xA


def _mask(payload: bytes, key: bytes) -> bytes:
    """RFC 6455 masking (XOR with the 4-byte key), done once per template, not per frame."""
    n = len(payload)
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def _header(opcode: int, length: int, key: bytes) -> bytes:
    if length < 126:
        head = bytes((0x80 | opcode, 0x80 | length))
    elif length < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + length.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + length.to_bytes(8, "big")
    return head + key


class FrameTemplate:
    """A pre-masked client frame of ``size`` bytes whose first 16 payload bytes carry seq + ts."""

    __slots__ = ("key", "mask16", "prefix", "tail")

    def __init__(self, size: int, key: bytes, opcode: int = OP_BINARY) -> None:
        if size < 16:
            raise ValueError("frames carry a 16-byte sequence number and timestamp")
        self.key = key
        self.prefix = _header(opcode, size, key)
        # 16 is a multiple of 4, so the filler is masked with the key in the same phase.
        self.tail = _mask(bytes((0xA5,)) * (size - 16), key)
        self.mask16 = int.from_bytes(key * 4, "big")

    def frame(self, seq: int, ts: int) -> bytes:
        field = (((seq << 64) | ts) ^ self.mask16).to_bytes(16, "big")
        return self.prefix + field + self.tail


def control_frame(opcode: int, payload: bytes, key: bytes) -> bytes:
    """A masked control frame (close, pong) from the client."""
    return _header(opcode, len(payload), key) + _mask(payload, key)


class Stats:
    """Counters shared by every session of one run."""

    __slots__ = ("arrivals", "latencies", "received", "record", "sent")

    def __init__(self) -> None:
        self.sent = 0
        self.received = 0
        #: Echo latencies in ns, only while ``record`` is true, and when each echo arrived.
        self.latencies = array.array("q")
        self.arrivals = array.array("q")
        self.record = True

    def reset(self) -> None:
        self.latencies = array.array("q")
        self.arrivals = array.array("q")


class WSClient(asyncio.Protocol):
    """One client WebSocket session: upgrade, send frames, match echoes."""

    __slots__ = (
        "buf",
        "closed",
        "closing",
        "first_data",
        "head_buf",
        "loop",
        "on_message",
        "request",
        "seq",
        "stats",
        "status",
        "t_101",
        "t_request",
        "template",
        "transport",
        "upgraded",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        request: bytes,
        template: FrameTemplate,
        stats: Stats,
    ) -> None:
        self.loop = loop
        self.request = request
        self.template = template
        self.stats = stats
        self.transport: asyncio.Transport | None = None
        self.head_buf = bytearray()
        self.buf = bytearray()
        self.seq = 0
        self.status = 0
        self.t_request = 0
        self.t_101 = 0
        self.upgraded: asyncio.Future[int] = loop.create_future()
        self.first_data: asyncio.Future[int] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.closing = False
        #: Called after each echoed data frame (closed-loop mode sends the next one from here).
        self.on_message: Callable[[WSClient], None] | None = None

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.t_request = _now()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if not self.upgraded.done():
            self._read_head(data)
            return
        buf = self.buf
        if buf:
            buf += data
            used = self._frames(buf)
            del buf[:used]
        else:
            used = self._frames(data)
            if used < len(data):
                buf += data[used:]

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.upgraded.done():
            self.upgraded.set_result(0)
        if not self.first_data.done():
            self.first_data.set_result(0)
        if not self.closed.done():
            self.closed.set_result(None)

    # --- protocol ---------------------------------------------------------------------------

    def _read_head(self, data: bytes) -> None:
        self.head_buf += data
        end = self.head_buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.head_buf) > 65536:
                self.abort()
            return
        self.t_101 = _now()
        line = bytes(self.head_buf[: self.head_buf.find(b"\r\n")]).split(b" ", 2)
        self.status = int(line[1]) if len(line) > 1 and line[1].isdigit() else 0
        rest = bytes(self.head_buf[end + 4 :])
        self.head_buf = bytearray()
        self.upgraded.set_result(self.status)
        if self.status != 101:
            self.abort()
        elif rest:
            self.data_received(rest)

    def _frames(self, data: bytes | bytearray) -> int:
        """Consume whole frames from ``data``; returns how many bytes were used."""
        n = len(data)
        pos = 0
        now = 0
        stats = self.stats
        while n - pos >= 2:
            b1 = data[pos + 1]
            length = b1 & 0x7F
            head = 2
            if length == 126:
                if n - pos < 4:
                    break
                length = (data[pos + 2] << 8) | data[pos + 3]
                head = 4
            elif length == 127:
                if n - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                head = 10
            if b1 & 0x80:
                head += 4  # servers do not mask; tolerated, payload not read then
            end = pos + head + length
            if end > n:
                break
            opcode = data[pos] & 0x0F
            if opcode in (OP_BINARY, OP_TEXT):
                stats.received += 1
                if stats.record and length >= 16 and not b1 & 0x80:
                    if not now:
                        now = _now()
                    stats.latencies.append(now - _SEQ_TS.unpack_from(data, pos + head)[1])
                    stats.arrivals.append(now)
                if not self.first_data.done():
                    self.first_data.set_result(_now())
                if self.on_message is not None:
                    self.on_message(self)
            elif opcode == OP_PING:
                pong = control_frame(OP_PONG, bytes(data[pos + head : end]), self.template.key)
                self._write(pong)
            elif opcode == OP_CLOSE:
                if not self.closing:
                    self.closing = True
                    self._write(control_frame(OP_CLOSE, _CLOSE_1000, self.template.key))
                if self.transport is not None:
                    self.transport.close()
            pos = end
        return pos

    # --- actions ------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def send(self) -> None:
        """Send the next numbered frame, stamped with the current time."""
        transport = self.transport
        if transport is None or self.closing or transport.is_closing():
            return
        self.seq += 1
        transport.write(self.template.frame(self.seq, _now()))
        self.stats.sent += 1

    def send_raw(self, frame: bytes) -> None:
        self._write(frame)
        self.stats.sent += 1

    def close(self) -> None:
        """Start the close handshake (1000); :attr:`closed` resolves when the socket is gone."""
        if not self.closing:
            self.closing = True
            self._write(control_frame(OP_CLOSE, _CLOSE_1000, self.template.key))

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


# --- helpers --------------------------------------------------------------------------------


def percentiles(samples_ns: array.array[int] | list[int]) -> dict[str, float]:
    """p50/p90/p99/p999/max/mean in µs (nearest rank); empty dict without samples."""
    if not samples_ns:
        return {}
    ordered = sorted(samples_ns)
    n = len(ordered)

    def rank(q: float) -> float:
        return ordered[min(n - 1, max(0, int(q * n + 0.5) - 1))] / 1000

    return {
        "p50": round(rank(0.50), 1),
        "p90": round(rank(0.90), 1),
        "p99": round(rank(0.99), 1),
        "p999": round(rank(0.999), 1),
        "max": round(ordered[-1] / 1000, 1),
        "mean": round(sum(ordered) / n / 1000, 1),
        "count": n,
    }


def upgrade_request(host: str, port: int, path: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode("latin-1")


class Target:
    """Where sessions go and what they send."""

    def __init__(self, spec: dict[str, Any], stats: Stats) -> None:
        self.host: str = spec.get("host", "127.0.0.1")
        self.port: int = int(spec["port"])
        self.path: str = spec["path"]
        self.size: int = int(spec.get("size", 320))
        self.stats = stats
        self.loop = asyncio.get_running_loop()
        #: ``wss://``: trust this CA (PEM) and verify the server's certificate for ``host``.
        self.tls: ssl.SSLContext | None = None
        if spec.get("tls_ca"):
            self.tls = ssl.create_default_context(cafile=spec["tls_ca"])
            self.tls.set_alpn_protocols(["http/1.1"])
        #: What the first TLS session negotiated: version and cipher.
        self.negotiated: dict[str, Any] | None = None

    async def open(self, *, timeout: float = 30.0) -> WSClient:  # noqa: ASYNC109
        """Connect and upgrade one session; the client's status is 101 on success."""
        client = WSClient(
            self.loop,
            upgrade_request(self.host, self.port, self.path),
            FrameTemplate(self.size, os.urandom(4)),
            self.stats,
        )
        async with asyncio.timeout(timeout):
            if self.tls is None:
                await self.loop.create_connection(lambda: client, self.host, self.port)
            else:
                transport, _ = await self.loop.create_connection(
                    lambda: client, self.host, self.port, ssl=self.tls, server_hostname=self.host
                )
                if self.negotiated is None:
                    tls = transport.get_extra_info("ssl_object")
                    cipher, version, bits = tls.cipher()
                    self.negotiated = {"version": version, "cipher": cipher, "bits": bits}
            await client.upgraded
        return client

    async def open_many(self, count: int, *, concurrency: int = 50) -> tuple[list[WSClient], int]:
        """Open ``count`` sessions, at most ``concurrency`` handshakes at a time."""
        gate = asyncio.Semaphore(concurrency)
        clients: list[WSClient] = []
        failures = 0

        async def one() -> None:
            nonlocal failures
            async with gate:
                try:
                    client = await self.open()
                except (OSError, TimeoutError):
                    failures += 1
                    return
            if client.status == 101:
                clients.append(client)
            else:
                failures += 1

        await asyncio.gather(*(one() for _ in range(count)))
        return clients, failures


async def close_all(clients: list[WSClient], *, timeout: float = 5.0) -> int:  # noqa: ASYNC109
    """Close handshake on every session; abort the ones still open after ``timeout``."""
    for client in clients:
        client.close()
    pending = [c.closed for c in clients if not c.closed.done()]
    if pending:
        await asyncio.wait(pending, timeout=timeout)
    lingering = 0
    for client in clients:
        if not client.closed.done():
            lingering += 1
            client.abort()
    return lingering


def sample_cpu(pids: dict[str, int]) -> dict[str, int]:
    ticks: dict[str, int] = {}
    for label, pid in pids.items():
        with contextlib.suppress(OSError):
            ticks[label] = cpu_ticks(pid)
    return ticks


def sample_trees(trees: dict[str, int], skip: set[int]) -> dict[str, dict[int, int]]:
    """CPU ticks of every process below each root in ``trees`` (label -> root pid), but the
    ``skip`` ones (measured on their own)."""
    out: dict[str, dict[int, int]] = {}
    for label, root in trees.items():
        ticks: dict[int, int] = {}
        for pid in descendants_of(root):
            if pid not in skip:
                with contextlib.suppress(OSError):
                    ticks[pid] = cpu_ticks(pid)
        out[label] = ticks
    return out


def tree_delta(
    before: dict[str, dict[int, int]], after: dict[str, dict[int, int]]
) -> dict[str, float]:
    """CPU seconds per tree between two :func:`sample_trees`: a process born in between counts
    whole (all its CPU is in the window); one that died in between is lost (unknowable)."""
    hz = os.sysconf("SC_CLK_TCK")
    return {
        label: sum(t - before.get(label, {}).get(pid, 0) for pid, t in ticks.items()) / hz
        for label, ticks in after.items()
    }


async def _drain(stats: Stats, limit: float) -> None:
    """Wait up to ``limit`` s for every echo still in flight (polled every 5 ms)."""
    for _ in range(int(limit / 0.005)):
        if stats.received >= stats.sent:
            return
        await asyncio.sleep(0.005)


def _machine(
    before: dict[str, tuple[int, int, int, int]],
    table: dict[int, ProcessRow],
    root: int,
) -> dict[str, float]:
    """Machine-wide CPU over the window (``before``: :func:`~bench.procs.cpu_times` at its
    start), and how much of it other programs used: every process outside the suite's tree
    (``root``), from the process table at the window's start (``table``; see
    :class:`ForeignWatch` for why not the machine's busy time less the suite's).

    Interrupt time (softirq: the kernel's loopback network stack) belongs to no process's
    utime/stime; it is the cost of the benchmark's own traffic (under attack, gigabytes of
    it), and reported apart (``interrupt_cpu_s``).
    """
    load = machine_load(before)
    load["foreign_cpu_s"] = round(others_cpu_s(table, process_table(), root), 3)
    return load


class ForeignWatch:
    """Other programs' CPU interval by interval over the send window: every process outside
    the benchmark's own tree (``root``, the suite's process: the load client, the relays, their
    instances and the attackers are all below it), read from each process's own ticks
    (:func:`~bench.procs.others_cpu_s`).

    Not the machine's busy time less the benchmark's processes' (as the whole window's share
    was read before 2026-12-03): a process's ticks are its exact run time while ``/proc/stat``
    samples at the tick and leaves out steal, so under load the difference came out at 0 even
    through a 0.3 s Erlang VM burst.

    Each interval starts at ``epoch_ns + k * step_ns`` (``time.monotonic_ns``): with blocks,
    the blocks' own epoch and length, so that interval ``k`` is block ``k``. A scan of ~100
    processes holds the load client's loop for ~2.5 ms once an interval, in attack and quiet
    blocks alike (echoes that arrive meanwhile are read that much later).
    """

    #: A burst split over two neighbouring intervals counts for both when together they pass
    #: the limit and each holds at least this much of it (CPU seconds).
    STRADDLE_FLOOR_S = 0.05

    def __init__(self, root: int, epoch_ns: int, step_ns: int) -> None:
        self.root, self.epoch_ns, self.step_ns = root, epoch_ns, step_ns
        #: Interval index -> other programs' CPU seconds in it.
        self.by_interval: dict[int, float] = {}

    async def run(self, from_ns: int, until_ns: int) -> None:
        """Scan at every interval boundary from the first at or after ``from_ns`` to the last
        at or before ``until_ns``; returns after the last."""
        index = max(0, -(-(from_ns - self.epoch_ns) // self.step_ns))
        await self._sleep_until(self.epoch_ns + index * self.step_ns)
        before = process_table()
        while (end := self.epoch_ns + (index + 1) * self.step_ns) <= until_ns:
            await self._sleep_until(end)
            after = process_table()
            self.by_interval[index] = round(others_cpu_s(before, after, self.root), 3)
            before, index = after, index + 1

    @staticmethod
    async def _sleep_until(t_ns: int) -> None:
        await asyncio.sleep(max(0, t_ns - time.monotonic_ns()) / 1e9)

    def disturbed(self) -> set[int]:
        """The intervals in which other programs took more than
        :data:`~bench.procs.BURST_CPU_LIMIT_S`, or a burst over it was split with a neighbour."""
        cpu = self.by_interval
        over = {i for i, s in cpu.items() if s > BURST_CPU_LIMIT_S}
        for i, s in cpu.items():
            t = cpu.get(i + 1)
            if t is not None and s + t > BURST_CPU_LIMIT_S and min(s, t) >= self.STRADDLE_FLOOR_S:
                over |= {i, i + 1}
        return over

    def peak_s(self) -> float:
        return max(self.by_interval.values(), default=0.0)


def cpu_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, float]:
    """CPU seconds used per process between two samples."""
    hz = os.sysconf("SC_CLK_TCK")
    return {k: (after[k] - before[k]) / hz for k in before if k in after}


# --- modes ----------------------------------------------------------------------------------


async def run_telephony(spec: dict[str, Any]) -> dict[str, Any]:
    """N sessions, each sending one frame every ``interval`` s for ``seconds``, echoed."""
    stats = Stats()
    target = Target(spec, stats)
    loop = target.loop
    sessions, seconds = int(spec["sessions"]), float(spec["seconds"])
    interval = float(spec.get("interval", 0.02))
    pids = {**spec.get("cpu_pids", {}), "loadgen": os.getpid()}
    clients, failures = await target.open_many(sessions)
    # Stagger sessions over 1 ms slots of one interval, so sends are spread, not bursts.
    slot = float(spec.get("slot", 0.001))
    nslots = max(1, round(interval / slot))
    buckets: list[list[WSClient]] = [[] for _ in range(nslots)]
    for i, client in enumerate(clients):
        buckets[i % nslots].append(client)
    await asyncio.sleep(0.5)  # let handshake stragglers settle before the window opens
    stats.reset()
    # The gateway's own instances (e.g. the ones attack sessions land on) are the system
    # under test, not other programs: their CPU is measured, not counted as foreign.
    trees, skip = spec.get("cpu_trees", {}), set(pids.values())
    blocks = Blocks.from_spec(spec.get("blocks"))
    # The suite's own process started this one: everything it runs is below it.
    suite = os.getppid()
    cpu0, tree0 = sample_cpu(pids), sample_trees(trees, skip)
    machine0, table0 = cpu_times(), process_table()
    t0 = loop.time()
    t0_ns = _now()
    end = t0 + seconds
    # Other programs' CPU block by block (with blocks), else second by second from t0, over
    # the same window as by_block's (perf_counter_ns and monotonic_ns: the same clock).
    start_mono = t0_ns + time.monotonic_ns() - _now()
    watch = (
        ForeignWatch(suite, blocks.epoch_ns, int(blocks.block_s * 1e9))
        if blocks is not None
        else ForeignWatch(suite, start_mono, 1_000_000_000)
    )
    watching = asyncio.create_task(watch.run(start_mono, start_mono + int(seconds * 1e9)))
    tick = 0
    while True:
        at = t0 + tick * slot
        if at >= end:
            break
        delay = at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        for client in buckets[tick % nslots]:
            client.send()
        tick += 1
    sent_end = loop.time()
    end_ns = t0_ns + int(seconds * 1e9)
    await _drain(stats, float(spec.get("drain", 3.0)))
    t1 = loop.time()
    await watching  # its last scan is at the window's end, which has passed
    cpu = cpu_delta(cpu0, sample_cpu(pids))
    cpu.update(tree_delta(tree0, sample_trees(trees, skip)))
    machine = _machine(machine0, table0, suite)
    machine["foreign_peak_s"] = watch.peak_s()
    machine["foreign_by_interval"] = watch.by_interval
    alive = sum(not c.closed.done() for c in clients)
    lingering = await close_all(clients)
    return {
        "sessions": sessions,
        "connected": len(clients),
        "connect_failures": failures,
        "alive_at_end": alive,
        "seconds": seconds,
        "window_s": round(t1 - t0, 3),
        "send_overrun_s": round(sent_end - end, 3),
        "sent": stats.sent,
        "received": stats.received,
        "lost": stats.sent - stats.received,
        "latency_us": percentiles(stats.latencies),
        "timeline": timeline(stats, t0_ns, float(spec.get("timeline_step", 1.0))),
        **(
            {}
            if blocks is None
            else {"blocks": by_block(stats, blocks, (t0_ns, end_ns), watch.disturbed())}
        ),
        "t0_ns": t0_ns,
        "cpu_s": cpu,
        "machine": machine,
        "close_lingering": lingering,
        "tls": target.negotiated,
    }


def by_block(
    stats: Stats, blocks: Blocks, window_ns: tuple[int, int], disturbed: set[int] | None = None
) -> dict[str, Any]:
    """Echo latency percentiles of the frames sent in attack blocks and in quiet blocks (see
    :mod:`bench.blocks`), counting only blocks wholly inside ``window_ns`` (when frames were
    sent, ``perf_counter_ns``) and not ``disturbed`` (other programs' bursts: see
    :class:`ForeignWatch`), and how many echoes fell in a guard or a left-out block."""
    # perf_counter_ns and monotonic_ns are both CLOCK_MONOTONIC on Linux; the offset is ~0 but
    # costs nothing to apply.
    offset = time.monotonic_ns() - _now()
    start, end = window_ns[0] + offset, window_ns[1] + offset
    block_ns = int(blocks.block_s * 1e9)
    per_block: dict[int, list[int]] = {}
    guarded = 0
    for arrived, latency in zip(stats.arrivals, stats.latencies, strict=True):
        index = blocks.block(arrived - latency + offset)
        if index is None:
            guarded += 1
        else:
            per_block.setdefault(index, []).append(latency)
    cut = [i for i in per_block if not start <= blocks.start_ns(i) <= end - block_ns]
    left_out = guarded + sum(len(per_block.pop(i)) for i in cut)
    burst = sorted(i for i in per_block if i in (disturbed or set()))
    left_out += sum(len(per_block.pop(i)) for i in burst)
    p99 = {i: percentiles(v)["p99"] for i, v in per_block.items() if len(v) >= 100}
    # Each attack block (even) against the mean of its two quiet neighbours.
    ratios = sorted(
        round(p99[i] / ((p99[i - 1] + p99[i + 1]) / 2), 3)
        for i in p99
        if i % 2 == 0 and i - 1 in p99 and i + 1 in p99
    )
    median = round(statistics.median(ratios), 3) if ratios else None
    return {
        **blocks.to_spec(),
        "attack": percentiles([x for i, v in per_block.items() if i % 2 == 0 for x in v]),
        "quiet": percentiles([x for i, v in per_block.items() if i % 2 == 1 for x in v]),
        "pair_p99_ratios": ratios,
        "p99_ratio": median,
        "attack_above": sum(r > 1 for r in ratios),
        "left_out": left_out,
        #: Blocks left out because other programs took more than BURST_CPU_LIMIT_S in them.
        "burst_blocks": {
            "attack": sum(i % 2 == 0 for i in burst),
            "quiet": sum(i % 2 == 1 for i in burst),
        },
    }


def timeline(stats: Stats, t0_ns: int, step_s: float = 1.0) -> list[dict[str, float]]:
    """Echo latency p50/p99 per ``step_s`` of arrival time: shows a queue building up."""
    buckets: dict[int, list[int]] = {}
    step = int(step_s * 1e9)
    for arrived, latency in zip(stats.arrivals, stats.latencies, strict=True):
        buckets.setdefault((arrived - t0_ns) // step, []).append(latency)
    out = []
    for k in sorted(buckets):
        p = percentiles(buckets[k])
        out.append({"t_s": round(k * step_s, 1), "p50": p["p50"], "p99": p["p99"], "n": p["count"]})
    return out


async def run_closed(spec: dict[str, Any]) -> dict[str, Any]:
    """``connections`` sessions in a closed loop: each sends its next message on the echo."""
    stats = Stats()
    target = Target(spec, stats)
    loop = target.loop
    seconds = float(spec["seconds"])
    pids = {**spec.get("cpu_pids", {}), "loadgen": os.getpid()}
    clients, failures = await target.open_many(int(spec["connections"]))
    running = True

    def again(client: WSClient) -> None:
        if running:
            client.send()

    for client in clients:
        client.on_message = again
    await asyncio.sleep(0.3)
    cpu0 = sample_cpu(pids)
    machine0, table0 = cpu_times(), process_table()
    t0 = loop.time()
    for client in clients:
        client.send()
    await asyncio.sleep(seconds)
    running = False
    done = stats.received
    elapsed = loop.time() - t0
    cpu = cpu_delta(cpu0, sample_cpu(pids))
    machine = _machine(machine0, table0, os.getppid())
    await _drain(stats, 3.0)
    lost = stats.sent - stats.received
    lingering = await close_all(clients)
    return {
        "connections": len(clients),
        "connect_failures": failures,
        "size": target.size,
        "seconds": round(elapsed, 3),
        "messages": done,
        "messages_per_s": round(done / elapsed, 1),
        "lost": lost,
        "latency_us": percentiles(stats.latencies),
        "cpu_s": cpu,
        "machine": machine,
        "close_lingering": lingering,
    }


async def _one_start(target: Target, first: bytes | None, timeout: float) -> dict[str, float]:  # noqa: ASYNC109
    """One session: connect, upgrade, one frame and its echo, close. Times in µs."""
    t0 = _now()
    client = await target.open(timeout=timeout)
    result: dict[str, float] = {
        "status": client.status,
        "connect_us": (client.t_request - t0) / 1000,
        "upgrade_us": (client.t_101 - client.t_request) / 1000,
    }
    if client.status != 101:
        return result
    try:
        if first is None:
            client.send()
        else:
            client.send_raw(control_frame(OP_BINARY, first, client.template.key))
        async with asyncio.timeout(timeout):
            got = await client.first_data
        if got:
            result["first_frame_us"] = (got - client.t_request) / 1000
        client.close()
        async with asyncio.timeout(5.0):
            await client.closed
    except TimeoutError:
        client.abort()
    return result


async def run_start(spec: dict[str, Any]) -> dict[str, Any]:
    """Sequential session starts, then (optionally) a sustained start rate with N starters."""
    stats = Stats()
    stats.record = False  # replies may not carry our timestamps (a Pipecat bot's do not)
    target = Target(spec, stats)
    loop = target.loop
    first = bytes.fromhex(spec["first_frame_hex"]) if spec.get("first_frame_hex") else None
    timeout = float(spec.get("timeout", 30.0))
    samples: list[dict[str, float]] = []
    for _ in range(int(spec.get("count", 500))):
        try:
            samples.append(await _one_start(target, first, timeout))
        except (OSError, TimeoutError) as exc:
            samples.append({"status": 0, "error": type(exc).__name__})  # type: ignore[dict-item]
    ok = [s for s in samples if s.get("status") == 101 and "first_frame_us" in s]
    result: dict[str, Any] = {
        "count": len(samples),
        "ok": len(ok),
        "statuses": sorted({int(s.get("status", 0)) for s in samples}),
        "upgrade_us": percentiles([int(s["upgrade_us"] * 1000) for s in ok]),
        "first_frame_us": percentiles([int(s["first_frame_us"] * 1000) for s in ok]),
        "connect_us": percentiles([int(s["connect_us"] * 1000) for s in ok]),
    }
    if spec.get("raw_samples"):
        result["samples"] = samples
    starters, rate_s = int(spec.get("starters", 0)), float(spec.get("rate_seconds", 0))
    if starters and rate_s:
        done = failed = 0
        deadline = loop.time() + rate_s

        async def starter() -> None:
            nonlocal done, failed
            while loop.time() < deadline:
                try:
                    one = await _one_start(target, first, timeout)
                except (OSError, TimeoutError):
                    failed += 1
                    continue
                if one.get("status") == 101 and "first_frame_us" in one:
                    done += 1
                else:
                    failed += 1

        t0 = loop.time()
        await asyncio.gather(*(starter() for _ in range(starters)))
        elapsed = loop.time() - t0
        result["rate"] = {
            "starters": starters,
            "seconds": round(elapsed, 3),
            "sessions": done,
            "failed": failed,
            "sessions_per_s": round(done / elapsed, 1),
        }
    return result


async def run_idle(spec: dict[str, Any]) -> dict[str, Any]:
    """Hold idle sessions at each level and sample the RSS of the given processes."""
    stats = Stats()
    stats.record = False
    target = Target(spec, stats)
    settle = float(spec.get("settle", 3.0))
    pids: dict[str, int] = spec.get("rss_pids", {})
    # Warm-up: exercise the session path once, so the baseline is not a cold process.
    warm, _ = await target.open_many(int(spec.get("warmup", 100)))
    await close_all(warm)
    await asyncio.sleep(settle)
    levels: list[dict[str, Any]] = [{"sessions": 0, "rss_kb": _rss(pids)}]
    clients: list[WSClient] = []
    failures = 0
    try:
        for level in spec["levels"]:
            more, failed = await target.open_many(int(level) - len(clients), concurrency=64)
            clients += more
            failures += failed
            await asyncio.sleep(settle)
            alive = sum(not c.closed.done() for c in clients)
            levels.append({"sessions": alive, "rss_kb": _rss(pids)})
    finally:
        lingering = await close_all(clients, timeout=15.0)
    return {"levels": levels, "connect_failures": failures, "close_lingering": lingering}


def _rss(pids: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for label, pid in pids.items():
        with contextlib.suppress(OSError):
            out[label] = rss_kb(pid)
    return out


_MODES = {"telephony": run_telephony, "closed": run_closed, "start": run_start, "idle": run_idle}


def main() -> int:
    """Read the spec from stdin, run it on uvloop, print the result as one JSON line."""
    raise_nofile()
    spec = json.loads(sys.stdin.read())
    mode = _MODES[spec["mode"]]
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        result = runner.run(asyncio.wait_for(mode(spec), float(spec.get("deadline", 300))))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
