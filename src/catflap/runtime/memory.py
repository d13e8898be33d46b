"""Keeping instances small: what the fork server does before it forks, and what an instance
gives back between sessions.

Each session runs in an instance process of its own, so an instance's private memory (USS) is
what one more session costs. A forked instance shares its parent's pages until it writes to
them; CPython writes to far more than it seems:

- every reference taken to an inherited object writes its reference count;
- a garbage collection writes the GC header of every object it traverses, and the first full
  collection in a child traverses all of them, so it copies nearly every page of the heap.

The fork server therefore collects once and *freezes* (:func:`freeze_for_fork`): ``gc.freeze()``
moves every object it holds to a permanent generation that collections in the child never
traverse. It also warms native libraries whose first use allocates process-wide state
(:func:`warm_shared_state`: onnxruntime's environment and kernel registries), so that the
child inherits that state read-only instead of building a private copy with its first model.

The fork server also imports what the runtime would import only once it serves (uvicorn's
protocols, FastAPI's lazy imports; ``preload-runtime``). Instances and the fork server pin
glibc's mmap threshold (:func:`fix_mmap_threshold`), so that the large temporary buffers a
native library allocates and frees (onnxruntime loading a model) go back to the kernel when
freed instead of staying in the heap.

An instance releases memory after every session (:func:`release_memory`): a collection (a
session's pipeline is full of reference cycles) and glibc's ``malloc_trim(0)``, which hands
free heap pages back to the kernel, as Pipecat Cloud's base image does between sessions.

Each measure can be switched off with the environment variable :data:`MEMORY_STEPS_OFF_ENV`
(a comma-separated list of :data:`MEMORY_STEPS`), read by the fork server and the runtime.
That is for measuring each step on its own (``python -m bench instance-memory``); in
production every step stays on.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import logging
import os
import sys
import time
from collections.abc import Callable
from functools import cache
from typing import Any, Final

__all__ = [
    "MEMORY_STEPS",
    "MEMORY_STEPS_OFF_ENV",
    "fix_mmap_threshold",
    "freeze_for_fork",
    "release_memory",
    "step_on",
    "warm_shared_state",
]

logger = logging.getLogger("catflap.runtime")

#: Names a comma-separated list of :data:`MEMORY_STEPS` to switch off (benchmarks only).
MEMORY_STEPS_OFF_ENV: Final = "CATFLAP_MEMORY_OFF"

#: The measures, each of which can be switched off on its own:
#:
#: - ``scan-imports``: the fork server imports the modules ``bot.py`` imports, found by reading
#:   it, instead of importing ``bot.py`` itself (no bot code runs in the fork server);
#: - ``freeze``: ``gc.collect()`` then ``gc.freeze()`` in the fork server before each fork;
#: - ``warm-native``: :func:`warm_shared_state` in the fork server;
#: - ``preload-runtime``: the fork server imports what the runtime imports only when it starts
#:   serving (uvicorn's protocols, FastAPI's ``pydantic.v1``; ``catflap.pool.forkserver``);
#: - ``release``: :func:`release_memory` in the instance after each session;
#: - ``mmap-threshold``: :func:`fix_mmap_threshold` in the instance before it imports ``bot.py``.
MEMORY_STEPS: Final = (
    "scan-imports",
    "freeze",
    "warm-native",
    "release",
    "mmap-threshold",
    "preload-runtime",
)

#: glibc's ``mallopt`` parameters (malloc.h): the mmap threshold and the trim threshold.
_M_MMAP_THRESHOLD: Final = -3
_M_TRIM_THRESHOLD: Final = -1

#: Allocations at least this large get a mapping of their own, given back whole by ``free``.
#: glibc's own initial value (128 KiB); setting it explicitly keeps glibc from raising it.
MMAP_THRESHOLD_BYTES: Final = 128 * 1024

#: Free memory at the top of a heap beyond this much goes back to the kernel. Not glibc's
#: 128 KiB: with it, the Silero VAD's executor thread gave its arena's top back (``madvise``)
#: and faulted it in again at every 32 ms window (379 calls in 10 s of one live session);
#: from 256 KiB on there were none, and an instance's USS was the same (29.9 MiB live).
TRIM_THRESHOLD_BYTES: Final = 512 * 1024


def step_on(step: str) -> bool:
    """Whether ``step`` (one of :data:`MEMORY_STEPS`) is on; all are unless switched off."""
    if step not in MEMORY_STEPS:
        raise ValueError(f"unknown memory step {step!r}; known: {', '.join(MEMORY_STEPS)}")
    off = {s.strip() for s in os.environ.get(MEMORY_STEPS_OFF_ENV, "").split(",")}
    return step not in off and "all" not in off


def freeze_for_fork() -> None:
    """Collect, then freeze every object this process holds, so that children keep sharing them.

    Called in the fork server before each fork: the first call freezes the preloaded modules,
    later ones only what the fork loop allocated since (a few objects), so each is quick.
    """
    gc.collect()
    gc.freeze()


def warm_shared_state() -> list[str]:
    """Build, once and before forking, the process-wide state of the native libraries that are
    imported already; returns what was warmed.

    onnxruntime (Silero VAD, smart-turn) creates its environment, logging manager and CPU
    kernel registries with the first ``InferenceSession``. Built in the fork server, the
    children share them; built in each child, they cost every instance about 10 MB. The
    session made here uses one thread (none besides the caller) and is dropped at once.
    Nothing the bot creates is made here: every instance still builds its own models.
    """
    warmed = []
    for name, warm in _WARMERS.items():
        if name not in sys.modules:
            continue
        try:
            warm()
        except Exception as exc:  # a warm-up only saves memory; never fail a start over it
            logger.debug("could not warm %s: %r", name, exc)
        else:
            warmed.append(name)
    return warmed


def _warm_onnxruntime() -> None:
    onnxruntime: Any = sys.modules["onnxruntime"]  # imported already (untyped)

    # Any model builds the process-wide state; onnxruntime's own sample is the smallest.
    model = _onnxruntime_sample_model() or _silero_model_path()
    if model is None:
        return
    options = onnxruntime.SessionOptions()
    options.inter_op_num_threads = 1
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(
        model, sess_options=options, providers=["CPUExecutionProvider"]
    )
    del session


def _silero_model_path() -> str | None:
    """Pipecat's Silero VAD model, when pipecat ships one: the model every voice bot loads."""
    from importlib import resources

    with contextlib.suppress(ImportError, OSError, TypeError, ValueError):
        path = resources.files("pipecat.audio.vad.data").joinpath("silero_vad.onnx")
        if path.is_file():
            return str(path)
    return None


def _onnxruntime_sample_model() -> str | None:
    from importlib import resources

    with contextlib.suppress(ImportError, OSError, TypeError, ValueError):
        path = resources.files("onnxruntime.datasets").joinpath("sigmoid.onnx")
        if path.is_file():
            return str(path)
    return None


_WARMERS: dict[str, Callable[[], None]] = {"onnxruntime": _warm_onnxruntime}


def release_memory() -> float:
    """Collect garbage and give free heap pages back to the kernel; returns the seconds it took.

    Called by the runtime after each session: what the session's objects held goes back to
    the kernel, not only to the allocator, so an instance that has served sessions costs about
    what a fresh one does. It blocks the event loop (about 10–30 ms for a Pipecat instance);
    sessions still running on the instance wait that long once per session end.
    """
    started = time.perf_counter()
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
    return time.perf_counter() - started


def fix_mmap_threshold() -> bool:
    """Pin glibc's mmap and trim thresholds (:data:`MMAP_THRESHOLD_BYTES`,
    :data:`TRIM_THRESHOLD_BYTES`); whether they could be set.

    glibc serves allocations of 128 KiB and more with a mapping of their own, but raises that
    threshold (up to 32 MiB) each time such a block is freed, so later large blocks come from
    the heap; freed, they stay there, below live objects, where glibc cannot give them back
    (``malloc_trim`` can, but only runs between sessions). onnxruntime building Silero's
    session (a 2.3 MB model) allocates and frees blocks of a few MB: measured in a forked
    instance of ``bench/bots/vad-echo``, ``SileroVADAnalyzer()`` made the instance 17 MiB
    larger with the threshold left to glibc and 12 MiB with it pinned, and an instance with a
    live session measured 34.5 MiB instead of 39.5 MiB (USS). Setting the value explicitly
    turns the raising off (``mallopt(3)``); the cost is an ``mmap``/``munmap`` pair for each
    block of 128 KiB or more, which a session's per-frame work does not allocate (strace of
    an instance through 10 s of a live session: one ``mmap``, no ``munmap``).

    Called in each instance before it imports ``bot.py``, and in the fork server before it
    preloads: its children then inherit a heap in which the preloading left fewer freed large
    blocks, and thresholds glibc has not raised (measured as above, with the fork server's
    pinned too: idle 13.0 -> 12.7 MiB, live 30.7 -> 30.2 to 30.7 MiB).
    """
    mallopt = _mallopt()
    if mallopt is None:
        return False
    # Both: glibc raises the trim threshold with the mmap threshold (to twice as much), and a
    # forked instance inherits its fork server's.
    return (
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
        and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    )


@cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``; None on other C libraries (musl, macOS), which have none."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


@cache
def _mallopt() -> Callable[[int, int], int] | None:
    """glibc's ``mallopt``; None on other C libraries (musl has none, macOS's differs)."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt  # type: ignore[no-any-return]
