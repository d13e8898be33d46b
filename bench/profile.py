"""Profile a process under load from the outside, and boil the profile down to a few lines.

The preferred tool is Linux ``perf`` (Debian ``linux-perf``): ``perf record -g -p PID`` samples
on-CPU time only, kernel included, so it shows how a relay's CPU splits between the kernel's
socket work, uvloop and the Python interpreter. Python 3.11 has no perf trampolines, so Python
functions appear as ``_PyEval_EvalFrameDefault``.

The fallback is py-spy (``--native --idle``, speedscope output). On this VM py-spy attributed
almost every sample of the gateway's loop thread to ``epoll_pwait`` even while the process used
40 % of a core, so its shares are reported but should not be trusted for a uvloop relay.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

__all__ = ["Recorder", "recorder_for", "summarize"]

_ROW = re.compile(r"^\s+([\d.]+)%\s+(.+?)\s*$")
_SAMPLES = re.compile(r"^# Samples: ([\d.]+)([KM]?)\s+of event")


def _tool(name: str) -> str | None:
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else shutil.which(name)


class Recorder:
    """Run a profiler against ``pid`` for ``duration`` s, starting after ``delay`` s (a thread)."""

    def __init__(self, kind: str, argv: list[str], out: Path, *, delay: float, cpus: set[int]):
        self.kind = kind
        self.out = out
        self.error = ""
        self._argv = argv
        self._delay = delay
        self._cpus = cpus
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Recorder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join(120)

    def _run(self) -> None:
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
        if done.returncode != 0 or not self.out.exists():
            self.error = (done.stderr or done.stdout or "no output")[-500:]


def recorder_for(
    pid: int, out_base: Path, *, delay: float, duration: float, cpus: set[int]
) -> Recorder | None:
    """A perf recorder if perf works here, else py-spy, else None."""
    seconds = str(max(1, int(duration)))
    perf = _tool("perf")
    if perf is not None:
        out = out_base.with_suffix(".perf.data")
        argv = [perf, "record", "-F", "1999", "-g", "-p", str(pid), "-o", str(out)]
        return Recorder("perf", [*argv, "--", "sleep", seconds], out, delay=delay, cpus=cpus)
    spy = _tool("py-spy")
    if spy is not None:
        out = out_base.with_suffix(".speedscope.json")
        argv = [spy, "record", "--pid", str(pid), "--duration", seconds, "--rate", "200"]
        argv += ["--format", "speedscope", "--output", str(out), "--native", "--idle"]
        return Recorder("py-spy", argv, out, delay=delay, cpus=cpus)
    return None


def summarize(recorder: Recorder, *, top: int = 12) -> dict[str, Any]:
    """The profile's main shares, by library and by function."""
    if recorder.error:
        return {"tool": recorder.kind, "error": recorder.error}
    if recorder.kind == "perf":
        return _summarize_perf(recorder.out, top)
    return _summarize_speedscope(recorder.out, top)


def _perf_report(path: Path, sort: str) -> tuple[int, list[list[Any]]]:
    done = subprocess.run(
        ["perf", "report", "-i", str(path), "--stdio", "--no-children", "-g", "none"]
        + ["--sort", sort, "--percent-limit", "0.5"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    samples = 0
    rows: list[list[Any]] = []
    for line in done.stdout.splitlines():
        if (count := _SAMPLES.match(line)) is not None:
            scale = {"": 1, "K": 1_000, "M": 1_000_000}[count.group(2)]
            samples = int(float(count.group(1)) * scale)
        elif (m := _ROW.match(line)) is not None:
            rows.append([" ".join(m.group(2).split()), float(m.group(1))])
    return samples, rows


def _summarize_perf(path: Path, top: int) -> dict[str, Any]:
    samples, by_dso = _perf_report(path, "dso")
    _, by_symbol = _perf_report(path, "dso,sym")
    return {
        "tool": "perf",
        "file": path.name,
        "samples": samples,
        "by_library_pct": by_dso[:top],
        "top_functions_pct": by_symbol[:top],
    }


def _summarize_speedscope(path: Path, top: int) -> dict[str, Any]:
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
        return {"tool": "py-spy", "error": "no event-loop thread in the profile"}
    own: Counter[str] = Counter()
    total = 0.0
    for stack, weight in zip(best["samples"], best["weights"], strict=True):
        total += weight
        if stack:
            own[names[stack[-1]]] += weight
    return {
        "tool": "py-spy",
        "file": path.name,
        "samples": len(best["samples"]),
        "top_functions_pct": [
            [name, round(100 * w / total, 1)] for name, w in own.most_common(top)
        ],
    }
