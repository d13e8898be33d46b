"""The memory steps of catflap.runtime.memory: switching them off, and the glibc knobs."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from catflap.pool import forkserver
from catflap.runtime import memory


def test_every_step_is_on_unless_named_in_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(memory.MEMORY_STEPS_OFF_ENV, raising=False)
    assert all(memory.step_on(step) for step in memory.MEMORY_STEPS)
    monkeypatch.setenv(memory.MEMORY_STEPS_OFF_ENV, "mmap-threshold, preload-runtime")
    off = {step for step in memory.MEMORY_STEPS if not memory.step_on(step)}
    assert off == {"mmap-threshold", "preload-runtime"}
    monkeypatch.setenv(memory.MEMORY_STEPS_OFF_ENV, "all")
    assert not any(memory.step_on(step) for step in memory.MEMORY_STEPS)


def test_an_unknown_step_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown memory step"):
        memory.step_on("mmap")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_mmap_threshold_is_pinned_and_large_blocks_are_given_back_when_freed() -> None:
    # In a process of its own: the threshold stays set for the rest of a process's life.
    script = """
import ctypes, sys
from catflap.pool import forkserver
from catflap.runtime import memory

def rss_kb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4

assert memory.fix_mmap_threshold()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
small = libc.malloc(64)  # keeps the heap's top in use
for _ in range(3):  # glibc alone would raise its threshold after the first free
    block = libc.malloc(4 << 20)
    ctypes.memset(block, 1, 4 << 20)
    before = rss_kb()
    libc.free(block)
    assert before - rss_kb() > 3000, (before, rss_kb())
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr


def test_the_fork_server_preloads_what_the_runtime_imports_once_it_serves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # In a fresh interpreter, where nothing has imported them yet.
    script = """
import sys
from catflap.pool import forkserver
forkserver._preload_runtime_lazy_imports()
print(" ".join(sorted(sys.modules)))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    loaded = set(done.stdout.split())
    assert {"uvicorn.protocols.http.httptools_impl", "uvicorn.lifespan.on"} <= loaded, done.stderr
    assert "pydantic.v1" in loaded
    # And here, for coverage (it follows no fork server); uvicorn's Config sets its loggers'
    # levels, which the other tests must get back.
    for name in ("uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
        monkeypatch.setattr(logging.getLogger(name), "level", logging.getLogger(name).level)
    forkserver._preload_runtime_lazy_imports()
