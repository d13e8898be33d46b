"""Processes for the benchmark: start them pinned and bounded, read their CPU and memory, kill them.

Every process the suite starts goes through :func:`spawn`, which puts it in its own process
group (so that :meth:`Child.stop` can end it together with anything it started, such as the
gateway's agent instances), pins it to a set of cores, raises its file-descriptor limit and asks
the kernel to kill it if the suite itself dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, NamedTuple

__all__ = [
    "LOAD_CORE",
    "RELAY_CORE",
    "Child",
    "MemoryWatch",
    "agent_instances_of",
    "children_of",
    "cpu_ticks",
    "fd_count",
    "free_port",
    "pin",
    "raise_nofile",
    "reset_peak_rss",
    "rss_kb",
    "smaps_kb",
    "spawn",
    "thread_count",
]

#: Core for the load client and the upstream echo; the relay gets the other one (anchors §2.3).
LOAD_CORE = 0
RELAY_CORE = 1
_PR_SET_PDEATHSIG = 1
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cores() -> tuple[set[int], set[int]]:
    """(load cores, relay cores); on a one-core machine both are that core."""
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        return set(available), set(available)
    return {available[LOAD_CORE]}, {available[RELAY_CORE]}


def raise_nofile() -> int:
    """Raise this process's RLIMIT_NOFILE soft limit to the hard limit; returns the new limit."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def pin(pid: int, cpus: set[int]) -> None:
    """Pin every thread of ``pid`` to ``cpus`` (threads started later inherit the main one's)."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return
    for tid in tids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.sched_setaffinity(tid, cpus)


def _preexec(cpus: set[int] | None) -> Callable[[], None]:
    def setup() -> None:
        raise_nofile()
        if cpus:
            os.sched_setaffinity(0, cpus)
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    return setup


@dataclass
class Child:
    """A process started by :func:`spawn`; its process group is killed by :meth:`stop`."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path | None = None
    stopped: bool = field(default=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self, *, grace: float = 5.0) -> None:
        """SIGTERM the process, wait up to ``grace`` s, then SIGKILL its whole process group."""
        if self.stopped:
            return
        self.stopped = True
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)  # the group: agents, nginx workers
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(grace)


def spawn(
    name: str,
    argv: Sequence[str],
    *,
    cpus: set[int] | None,
    log_path: Path | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    stdout: int | IO[bytes] | None = None,
    stdin: int | None = None,
) -> Child:
    """Start ``argv`` in a new process group, pinned to ``cpus``, stderr to ``log_path``."""
    log = open(log_path, "wb") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115
    try:
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL if stdin is None else stdin,
            stdout=stdout if stdout is not None else log,
            stderr=log,
            cwd=cwd,
            env=env,
            start_new_session=True,
            preexec_fn=_preexec(cpus),  # the orchestrator is single-threaded
        )
    finally:
        if log_path is not None and not isinstance(log, int):
            log.close()
    return Child(name, popen, log_path)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, *, timeout: float, child: Child | None = None) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child is not None and not child.alive():
            raise RuntimeError(f"{child.name} exited early:\n{child.log_tail()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:g} s")


def cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid`` in clock ticks (``/proc/<pid>/stat`` fields 14 and 15)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    fields = data[data.rindex(b")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def rss_kb(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (``VmRSS`` of ``/proc/<pid>/status``)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def smaps_kb(pid: int) -> dict[str, int]:
    """USS, PSS and RSS of ``pid`` in KiB, from ``/proc/<pid>/smaps_rollup``.

    USS (unique set size) is ``Private_Clean + Private_Dirty``: the memory that goes away when
    the process exits, i.e. what one more instance costs. PSS charges each shared page to its
    sharers in equal parts, so the PSS of all processes adds up to what they use together.
    """
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            name, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                fields[name] = int(parts[0])
    return {
        "uss_kb": fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0),
        "pss_kb": fields.get("Pss", 0),
        "rss_kb": fields.get("Rss", 0),
        "private_dirty_kb": fields.get("Private_Dirty", 0),
        "anonymous_kb": fields.get("Anonymous", 0),
    }


def thread_count(pid: int) -> int:
    """Threads of ``pid`` (entries of ``/proc/<pid>/task``)."""
    return len(os.listdir(f"/proc/{pid}/task"))


def peak_rss_kb(pid: int) -> int:
    """Peak resident set size of ``pid`` in KiB (``VmHWM``), since :func:`reset_peak_rss`."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def reset_peak_rss(pid: int) -> bool:
    """Reset ``VmHWM`` of ``pid`` to its current RSS (``5`` to ``/proc/<pid>/clear_refs``)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def fd_count(pid: int) -> int:
    """Open file descriptors of ``pid`` (sockets included)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


class MemoryWatch:
    """A thread that samples a process's RSS (every ``every`` s) and open fds (every 5th
    sample) while it runs, pinned to ``cpus``; the kernel's own peak (``VmHWM``, reset when
    the watch starts) is read when it stops, so a spike between samples is not missed."""

    def __init__(self, pid: int, *, cpus: set[int] | None = None, every: float = 0.02) -> None:
        self.pid = pid
        self.cpus = cpus
        self.every = every
        self.hwm_reset = False
        self.start_kb = self.sampled_peak_kb = self.end_kb = self.hwm_kb = 0
        self.start_fds = self.peak_fds = self.end_fds = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-watch", daemon=True)

    def _run(self) -> None:
        if self.cpus:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, self.cpus)  # this thread only
        tick = 0
        while not self._stop.wait(self.every):
            try:
                self.sampled_peak_kb = max(self.sampled_peak_kb, rss_kb(self.pid))
                if tick % 5 == 0:
                    self.peak_fds = max(self.peak_fds, fd_count(self.pid))
            except OSError:
                return
            self.samples += 1
            tick += 1

    def __enter__(self) -> MemoryWatch:
        self.hwm_reset = reset_peak_rss(self.pid)
        self.start_kb = self.sampled_peak_kb = rss_kb(self.pid)
        self.start_fds = self.peak_fds = fd_count(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(OSError):
            self.end_kb = rss_kb(self.pid)
            self.end_fds = fd_count(self.pid)
            self.hwm_kb = peak_rss_kb(self.pid) if self.hwm_reset else 0
        self.sampled_peak_kb = max(self.sampled_peak_kb, self.end_kb)
        self.peak_fds = max(self.peak_fds, self.end_fds)

    @property
    def peak_kb(self) -> int:
        """The peak: ``VmHWM`` when it could be reset, else the highest sample."""
        return max(self.hwm_kb, self.sampled_peak_kb)

    def result(self) -> dict[str, int | bool]:
        return {
            "start_kb": self.start_kb,
            "peak_kb": self.peak_kb,
            "sampled_peak_kb": self.sampled_peak_kb,
            "vmhwm_kb": self.hwm_kb,
            "vmhwm_reset": self.hwm_reset,
            "end_kb": self.end_kb,
            "samples": self.samples,
            "start_fds": self.start_fds,
            "peak_fds": self.peak_fds,
            "end_fds": self.end_fds,
        }


def agent_instances_of(gateway_pid: int) -> list[int]:
    """The agent runtime processes a gateway started: its own children, or (fork server, the
    default) the children of its fork servers."""
    found = []
    for child in children_of(gateway_pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if b"catflap.pool.forkserver" in cmdline:
            found += children_of(child)
        else:
            found.append(child)
    return sorted(found)


def _children_by_parent() -> dict[int, list[int]]:
    """Every process's direct children, keyed by parent pid, from one scan of ``/proc``."""
    return _children(process_table())


def _children(table: dict[int, ProcessRow]) -> dict[int, list[int]]:
    parents: dict[int, list[int]] = {}
    for pid, row in table.items():
        parents.setdefault(row.ppid, []).append(pid)
    return parents


#: ``PF_KTHREAD`` in ``/proc/<pid>/stat``'s flags: a kernel thread.
_PF_KTHREAD = 0x00200000

#: A run during which other programs used more than this share of a core was disturbed (the
#: suite repeats it while its quiet budget lasts, and the report says so).
FOREIGN_CPU_LIMIT = 0.05

#: Other programs' CPU within one interval of a run (a block of the hostile scenario's
#: interleaved run, else a second) above which that interval was disturbed, in CPU seconds.
#: Why per interval as well as over the whole window (5 % of a core): on the reference VM,
#: RabbitMQ's node starts a short-lived Erlang VM once a minute that takes 0.2-0.4 s of CPU
#: across both cores within a fraction of a second and stalls every echo meanwhile (``perf
#: sched timehist``), yet over a 15 s run that is 2 % of a core. Between such bursts the
#: machine's services take 0.01-0.03 s a second, hence 0.15.
BURST_CPU_LIMIT_S = 0.15


class ProcessRow(NamedTuple):
    """One process in a :func:`process_table` scan."""

    ppid: int
    #: Clock ticks since boot at which it started: with the pid, who it is (pids are reused).
    started: int
    #: CPU ticks of itself and of its reaped children (utime + stime + cutime + cstime).
    ticks: int
    kernel_thread: bool


def process_table() -> dict[int, ProcessRow]:
    """Every process, from one scan of ``/proc``."""
    table: dict[int, ProcessRow] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        # proc(5): after the command's closing parenthesis, 1 is ppid, 6 flags, 11-14 utime,
        # stime, cutime, cstime, 19 starttime.
        fields = data[data.rindex(b")") + 2 :].split()
        table[int(entry)] = ProcessRow(
            ppid=int(fields[1]),
            started=int(fields[19]),
            ticks=sum(int(fields[i]) for i in (11, 12, 13, 14)),
            kernel_thread=bool(int(fields[6]) & _PF_KTHREAD),
        )
    return table


def others_cpu_s(before: dict[int, ProcessRow], after: dict[int, ProcessRow], root: int) -> float:
    """CPU seconds that processes outside ``root``'s tree used between two
    :func:`process_table` scans: other programs, not the kernel's threads (whose work here is
    mostly the benchmark's own traffic).

    A process born in between counts whole. One that ended in between is in its parent's
    reaped-children ticks with everything it ever used, so what it had used by the first scan
    is taken off again (one that nobody reaped yet, or whose parent ended too, is missed).
    """
    ours = {root, *_below(root, after)}
    ticks = 0
    for pid, row in after.items():
        if pid in ours or row.kernel_thread:
            continue
        was = before.get(pid)
        same = was is not None and was.started == row.started
        ticks += row.ticks - was.ticks if same and was is not None else row.ticks
    for pid, row in before.items():
        now = after.get(pid)
        ended = now is None or now.started != row.started
        if ended and pid not in ours and not row.kernel_thread and row.ppid in after:
            ticks -= row.ticks
    return max(0, ticks) / CLOCK_TICKS


def _below(root: int, table: dict[int, ProcessRow]) -> set[int]:
    children = _children(table)
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid``, from a scan of ``/proc``."""
    return sorted(_children_by_parent().get(pid, []))


def descendants_of(pid: int) -> list[int]:
    """Every process below ``pid`` (children, grandchildren, ...), from one scan of ``/proc``."""
    return sorted(_below(pid, process_table()))


def cpu_times() -> dict[str, tuple[int, int, int, int]]:
    """Per-CPU (busy, steal, total, interrupt) ticks from ``/proc/stat`` (key ``cpu`` is the
    sum); interrupt (irq + softirq) is part of busy."""
    out: dict[str, tuple[int, int, int, int]] = {}
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu"):
                break
            name, *values = line.split()
            user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in values[:8])
            busy = user + nice + system + irq + softirq
            out[name] = (busy, steal, busy + idle + iowait + steal, irq + softirq)
    return out


def machine_load(before: dict[str, tuple[int, int, int, int]]) -> dict[str, float]:
    """Busy and steal fraction per CPU since ``before`` (a :func:`cpu_times` sample), and the
    CPU seconds spent busy and in interrupts (the kernel's network stack, for loopback traffic)."""
    after = cpu_times()
    load: dict[str, float] = {}
    for name, (busy, steal, total, _) in after.items():
        if name not in before:
            continue
        b0, s0, t0, _ = before[name]
        span = max(1, total - t0)
        load[f"{name}_busy"] = round((busy - b0) / span, 3)
        if steal - s0:
            load[f"{name}_steal"] = round((steal - s0) / span, 3)
    load["busy_cpu_s"] = round((after["cpu"][0] - before["cpu"][0]) / CLOCK_TICKS, 3)
    load["interrupt_cpu_s"] = round((after["cpu"][3] - before["cpu"][3]) / CLOCK_TICKS, 3)
    return load


#: Seconds the whole suite may spend waiting for a quiet machine (see :func:`wait_quiet`).
_quiet_budget = [120.0]


def set_quiet_budget(seconds: float) -> None:
    _quiet_budget[0] = seconds


def spend_quiet_budget(seconds: float) -> bool:
    """Charge a repeated run to the budget; False (nothing charged) if it does not fit."""
    if _quiet_budget[0] < seconds:
        return False
    _quiet_budget[0] -= seconds
    return True


def wait_quiet(*, threshold: float = 0.15, patience: float = 10.0) -> float | None:
    """Wait until the whole machine is less than ``threshold`` busy over one second.

    Other work on a shared 2-core VM wrecks latency figures, so each run starts on a quiet
    machine when it can. Waits at most ``patience`` s, and at most what is left of the suite's
    budget (:func:`set_quiet_budget`); returns the last busy fraction (None: not measured).
    """
    if _quiet_budget[0] <= 0:
        return None
    started = time.monotonic()
    deadline = started + min(patience, _quiet_budget[0])
    while True:
        before = cpu_times()
        time.sleep(1.0)
        busy = machine_load(before)["cpu_busy"]
        if busy < threshold or time.monotonic() > deadline:
            waited = time.monotonic() - started
            if waited > 1.5:  # the first, measuring second is not counted as waiting
                _quiet_budget[0] -= waited
            return busy
