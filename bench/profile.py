"""Profile a process under load with py-spy, and boil the profile down to a few lines.

py-spy samples from outside (no code change in the gateway). ``--native`` includes C frames, so
time in uvloop and in the kernel (``read``/``write`` syscalls) shows up instead of being lumped
into ``Runner.run``; ``--idle`` keeps samples taken while the loop waits in ``epoll``, so the
shares add up to wall time. The summary covers the event-loop thread only.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

__all__ = ["Spy", "py_spy", "summarize_speedscope"]


def py_spy() -> str | None:
    """The py-spy binary next to this Python, or on PATH; None when not installed."""
    import sys

    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


class Spy:
    """Record ``pid`` for ``duration`` s, starting after ``delay`` s (in a thread)."""

    def __init__(
        self, binary: str, pid: int, out: Path, *, delay: float, duration: float, cpus: set[int]
    ) -> None:
        self.out = out
        self.error = ""
        self._argv = [
            binary,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(max(1, int(duration))),
            "--rate",
            "200",
            "--format",
            "speedscope",
            "--output",
            str(out),
            "--native",
            "--idle",
        ]
        self._delay = delay
        self._cpus = cpus
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Spy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join(120)

    def _run(self) -> None:
        import os

        time.sleep(self._delay)
        try:
            done = subprocess.run(
                self._argv,
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
                preexec_fn=lambda: os.sched_setaffinity(0, self._cpus),
            )
        except (OSError, subprocess.SubprocessError) as exc:
            self.error = repr(exc)
            return
        if done.returncode != 0:
            self.error = (done.stderr or done.stdout)[-500:]


def summarize_speedscope(path: Path, *, top: int = 15) -> dict[str, Any]:
    """Self and inclusive shares of the busiest thread's frames (the event loop's)."""
    doc = json.loads(path.read_text())
    names = [
        f["name"] + (f" ({Path(f['file']).name})" if f.get("file") else "")
        for f in doc["shared"]["frames"]
    ]
    best: dict[str, Any] | None = None
    for profile in doc["profiles"]:
        frames = {i for stack in profile["samples"] for i in stack}
        is_loop = any("Runner.run" in names[i] or "run_forever" in names[i] for i in frames)
        if is_loop and (best is None or len(profile["samples"]) > len(best["samples"])):
            best = profile
    if best is None:
        return {"error": "no event-loop thread in the profile"}
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0.0
    for stack, weight in zip(best["samples"], best["weights"], strict=True):
        total += weight
        if stack:
            own[names[stack[-1]]] += weight
        for name in {names[i] for i in stack}:
            inclusive[name] += weight
    idle = sum(w for n, w in own.items() if n.startswith("epoll_"))

    def share(counter: Counter[str]) -> list[list[Any]]:
        return [[name, round(100 * w / total, 1)] for name, w in counter.most_common(top)]

    return {
        "samples": len(best["samples"]),
        "idle_pct": round(100 * idle / total, 1) if total else 0.0,
        "self_pct": share(own),
        "inclusive_pct": share(Counter({n: w for n, w in inclusive.items() if w < 0.999 * total})),
    }
