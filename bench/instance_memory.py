"""The ``instance-memory`` scenario: what one agent instance costs, idle and with a live session.

Each session runs in an instance process of its own, so the instance's private memory is what
one more session costs. The bot is ``bench/bots/vad-echo`` (``examples/pipecat-echo`` plus a
Silero VAD, as every voice bot has). For each variant, one gateway with ``instances`` warm
instances of that bot:

1. **idle**: once every instance is ready and has settled, each instance's USS, PSS and RSS
   (``/proc/PID/smaps_rollup``; USS = ``Private_Clean + Private_Dirty``);
2. **live**: one real WebSocket session per instance through the gateway, each sending 20 ms of
   16 kHz audio (pipecat protobuf frames) every 20 ms and receiving the echo, so that Silero
   scores every frame; memory is sampled every second and the last sample is reported;
3. **after**: the sessions closed and the instances idle again (the same instances serve the
   next round: ``rounds`` rounds).

The variants switch the memory steps of :mod:`catflap.runtime.memory` off one at a time
(environment ``CATFLAP_MEMORY_OFF``), fork server and fresh interpreter side by side in one run.
A second part runs ``per_instance`` sessions at once on a single instance, ``rounds`` times,
with the release between sessions on and off.

Sessions per GiB are worked out two ways: ``1024 / USS`` (the marginal cost: one more session,
once the fork server is paid for) and ``1024 / (sum of PSS / instances)`` (everything the
agent uses, fork server included, shared by ``instances`` sessions).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import statistics
import struct
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import contestants as cs
from bench.procs import agent_instances_of, children_of, cores, smaps_kb
from catflap.runtime.memory import MEMORY_STEPS

__all__ = ["VAD_ECHO", "VARIANTS", "Variant", "instance_memory"]

VAD_ECHO = Path(__file__).resolve().parent / "bots" / "vad-echo"
AGENT = "vad"
#: Issue 15's targets for a fork-server instance of the VAD bot (MiB of USS).
TARGET_IDLE_MIB = 20.0
TARGET_LIVE_MIB = 40.0
SAMPLE_RATE = 16000
CHUNK_S = 0.02


@dataclass(frozen=True)
class Variant:
    """One gateway configuration: fork server or not, and which memory steps are off."""

    name: str
    label: str
    fork_server: bool
    off: tuple[str, ...] = ()

    def env(self) -> dict[str, str]:
        return {"CATFLAP_MEMORY_OFF": ",".join(self.off)}


#: In the order the steps were added; each fork variant adds one step to the one before.
VARIANTS = (
    Variant("fresh-before", "fresh interpreter, no release", False, MEMORY_STEPS),
    Variant(
        "fresh",
        "fresh interpreter (`fork_server = false`), release and mmap threshold on (default)",
        False,
    ),
    Variant(
        "fork-before", "fork server as before (bot.py run in it; no freeze)", True, MEMORY_STEPS
    ),
    Variant(
        "fork-scan",
        "+ fork server imports bot.py's imports, not bot.py",
        True,
        ("freeze", "warm-native", "release", "mmap-threshold", "preload-runtime"),
    ),
    Variant(
        "fork-freeze",
        "+ gc.collect() + gc.freeze() before each fork",
        True,
        ("warm-native", "release", "mmap-threshold", "preload-runtime"),
    ),
    Variant(
        "fork-warm",
        "+ onnxruntime warmed in the fork server",
        True,
        ("release", "mmap-threshold", "preload-runtime"),
    ),
    Variant(
        "fork-release",
        "+ release after each session (gc + malloc_trim)",
        True,
        ("mmap-threshold", "preload-runtime"),
    ),
    Variant(
        "fork-mmap",
        "+ glibc's mmap threshold pinned at 128 KiB in each instance",
        True,
        ("preload-runtime",),
    ),
    Variant(
        "fork",
        "+ fork server imports what the runtime imports once serving (uvicorn, pydantic.v1): "
        "default",
        True,
    ),
)

#: The shared-instance part: release between sessions off and on, fork server and fresh.
SHARED_VARIANTS = (
    Variant("fork-no-release", "fork server, no release", True, ("release",)),
    Variant("fork", "fork server, release on (default)", True),
    Variant("fresh-no-release", "fresh interpreter, no release", False, ("release",)),
    Variant("fresh", "fresh interpreter, release on (default)", False),
)


def _log(message: str) -> None:
    from bench.scenarios import log

    log(message)


# --- the live sessions' audio -------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def audio_frame(pcm: bytes, sample_rate: int = SAMPLE_RATE) -> bytes:
    """A pipecat protobuf ``Frame{audio: AudioRawFrame{audio, sample_rate, num_channels=1}}``."""
    inner = b"\x1a" + _varint(len(pcm)) + pcm + b"\x20" + _varint(sample_rate) + b"\x28\x01"
    return b"\x12" + _varint(len(inner)) + inner


def speech_like_chunks(seconds: float = 2.0) -> list[bytes]:
    """20 ms chunks of 16-bit PCM: a second of voiced, syllable-paced tones, then near-silence.

    Silero scores every 32 ms window whatever it holds; the bursts make it change state, so the
    VAD's speech-start and speech-stop frames flow through the pipeline as in a real call.
    """
    per_chunk = int(SAMPLE_RATE * CHUNK_S)
    total = int(SAMPLE_RATE * seconds)
    samples = []
    for i in range(total):
        t = i / SAMPLE_RATE
        if t < seconds / 2:
            envelope = 0.5 * (1 - math.cos(2 * math.pi * 4 * t))  # 4 syllables a second
            voice = sum(
                math.sin(2 * math.pi * f * t) / k for k, f in enumerate((140, 280, 420, 700), 1)
            )
            value = 6000 * envelope * voice
        else:
            value = 40 * math.sin(2 * math.pi * 50 * t)
        samples.append(max(-32768, min(32767, int(value))))
    pcm = struct.pack(f"<{total}h", *samples)
    size = per_chunk * 2
    return [pcm[i : i + size] for i in range(0, len(pcm), size)]


async def _session(url: str, frames: list[bytes], stop: asyncio.Event, got: list[int]) -> None:
    """One live session: send a frame every 20 ms until ``stop``; count echoed bytes."""
    from websockets.asyncio.client import connect

    async with connect(url, max_size=2**20, open_timeout=60) as ws:

        async def read() -> None:
            async for message in ws:
                got[0] += len(message)

        reader = asyncio.create_task(read())
        loop = asyncio.get_running_loop()
        start = loop.time()
        i = 0
        try:
            while not stop.is_set():
                await ws.send(frames[i % len(frames)])
                i += 1
                delay = start + i * CHUNK_S - loop.time()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader


# --- measuring ----------------------------------------------------------------------------------


def _mib(kb: float) -> float:
    return round(kb / 1024, 1)


def _measure(pids: list[int]) -> list[dict[str, Any]]:
    out = []
    for pid in pids:
        with contextlib.suppress(OSError):
            sizes = smaps_kb(pid)
            out.append(
                {"pid": pid, **{k.replace("_kb", "_mib"): _mib(v) for k, v in sizes.items()}}
            )
    return out


def _summary(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Median, min and max of USS, PSS and RSS (MiB) over the instances."""
    out: dict[str, Any] = {"instances": len(samples)}
    for name in ("uss", "pss", "rss"):
        values = [s[f"{name}_mib"] for s in samples]
        if values:
            out[f"{name}_mib"] = round(statistics.median(values), 1)
            out[f"{name}_min_mib"] = min(values)
            out[f"{name}_max_mib"] = max(values)
    return out


def _ready_instances(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    # Ready instances are "idle" (no session) or "busy"; "starting" ones are not ready yet.
    pattern = rf'catflap_pool_instances{{agent="{AGENT}\.[^"]*",state="(idle|busy)"}} ([0-9.]+)'
    return sum(int(float(m.group(2))) for m in re.finditer(pattern, text))


def _wait_ready(gateway: cs.Gateway, count: int, *, timeout: float = 120.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not gateway.child.alive():
            raise RuntimeError(f"the gateway exited:\n{gateway.child.log_tail()}")
        with contextlib.suppress(OSError):
            if _ready_instances(gateway.port) >= count:
                pids = gateway.agents()
                if len(pids) >= count:
                    return pids
        time.sleep(0.2)
    raise TimeoutError(f"{count} instances were not ready within {timeout:g} s")


def _fork_servers(gateway_pid: int) -> list[int]:
    found = []
    for pid in children_of(gateway_pid):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"catflap.pool.forkserver" in f.read():
                found.append(pid)
    return found


async def _live(
    url: str, sessions: int, seconds: float, pids: list[int], frames: list[bytes]
) -> dict[str, Any]:
    """``sessions`` live sessions for ``seconds``; memory sampled each second while they run."""
    stop = asyncio.Event()
    got = [[0] for _ in range(sessions)]
    tasks = [asyncio.create_task(_session(url, frames, stop, g)) for g in got]
    series: list[list[dict[str, Any]]] = []
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await asyncio.sleep(1.0)
            failed = [t for t in tasks if t.done()]
            if failed:
                failed[0].result()  # raises what ended a session early
                raise RuntimeError("a live session ended early")
            series.append(_measure(pids))
    finally:
        stop.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise RuntimeError(f"live sessions failed: {errors[0]!r}")
    last = series[-1] if series else []
    return {
        "summary": _summary(last),
        "per_instance": last,
        "uss_series_mib": [[s["uss_mib"] for s in sample] for sample in series],
        "echoed_bytes": [g[0] for g in got],
    }


@contextlib.contextmanager
def _gateway(
    workdir: Path, variant: Variant, instances: int, per_instance: int
) -> Iterator[cs.Gateway]:
    load, relay = cores()
    agent = {
        "path": VAD_ECHO,
        "websocket_auth": "none",
        # The fork server and the instances see only what pass_env names: without it the
        # variants' CATFLAP_MEMORY_OFF never reached them (every row measured the defaults).
        "pass_env": ["CATFLAP_MEMORY_OFF"],
        "scaling": {
            "min_agents": instances,
            "max_agents": instances,
            "sessions_per_instance": per_instance,
            "idle_timeout": 300,
        },
    }
    with cs.catflap_gateway(
        workdir,
        {AGENT: agent},
        relay_cpus=relay,
        load_cpus=load,
        name=f"catflap-{variant.name}",
        fork_server=variant.fork_server,
        env=variant.env(),
    ) as gateway:
        yield gateway


def run_variant(
    variant: Variant,
    *,
    instances: int,
    per_instance: int,
    sessions: int,
    rounds: int,
    live_seconds: float,
    settle: float,
) -> dict[str, Any]:
    """Idle, then ``rounds`` of (live, after) for one variant; see the module docstring."""
    frames = [audio_frame(chunk) for chunk in speech_like_chunks()]
    with (
        tempfile.TemporaryDirectory(prefix="cfm") as tmp,
        _gateway(Path(tmp), variant, instances, per_instance) as gateway,
    ):
        pids = _wait_ready(gateway, instances)
        time.sleep(settle)
        servers = _fork_servers(gateway.child.pid)
        idle = _measure(pids)
        result: dict[str, Any] = {
            "name": variant.name,
            "label": variant.label,
            "fork_server": variant.fork_server,
            "steps_off": list(variant.off),
            "idle": {"summary": _summary(idle), "per_instance": idle},
            "fork_server_process": _measure(servers),
            "rounds": [],
        }
        url = f"ws://127.0.0.1:{gateway.port}{gateway.path(AGENT)}"
        for n in range(rounds):
            _log(f"instance-memory: {variant.name}: round {n + 1}, {sessions} live session(s)")
            live = asyncio.run(_live(url, sessions, live_seconds, pids, frames))
            live["fork_server_process"] = _measure(servers)
            time.sleep(settle)
            after = _measure(pids)
            result["rounds"].append(
                {"live": live, "after": {"summary": _summary(after), "per_instance": after}}
            )
        if sorted(agent_instances_of(gateway.child.pid)) != sorted(pids):
            result["instances_replaced"] = True  # an instance died and was replaced meanwhile
    _derive(result, instances)
    return result


def _derive(result: dict[str, Any], instances: int) -> None:
    """Sessions per GiB, from the first round's live memory."""
    live = result["rounds"][0]["live"]
    uss = live["summary"].get("uss_mib")
    pss_total = sum(s["pss_mib"] for s in live["per_instance"])
    pss_total += sum(s["pss_mib"] for s in live["fork_server_process"])
    result["live_pss_total_mib"] = round(pss_total, 1)
    result["sessions_per_gib_uss"] = int(1024 // uss) if uss else None
    per_session = pss_total / instances if instances else 0
    result["sessions_per_gib_total"] = int(1024 // per_session) if per_session else None


def _targets(variants: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {v["name"]: v for v in variants}
    fork = by.get("fork")
    if fork is None:
        return []
    idle = fork["idle"]["summary"]["uss_max_mib"]
    live = max(r["live"]["summary"]["uss_max_mib"] for r in fork["rounds"])
    return [
        {
            "target": f"fork-server instance of the VAD bot, idle: USS ≤ {TARGET_IDLE_MIB:g} MiB",
            "measured": f"{idle} MiB (the largest of {fork['idle']['summary']['instances']})",
            "met": idle <= TARGET_IDLE_MIB,
        },
        {
            "target": f"… with a live session: USS ≤ {TARGET_LIVE_MIB:g} MiB",
            "measured": f"{live} MiB (the largest, every round)",
            "met": live <= TARGET_LIVE_MIB,
        },
    ]


def instance_memory(settings: Any) -> dict[str, Any]:
    """The scenario (the module docstring says what); ``settings``: bench Settings."""
    quick = bool(settings.quick)
    instances = 2 if quick else 4
    rounds = 1 if quick else 2
    live_seconds = 3.0 if quick else 8.0
    settle = 1.0 if quick else 3.0
    chosen = [v for v in VARIANTS if v.name in ("fresh", "fork")] if quick else list(VARIANTS)
    variants = []
    for variant in chosen:
        _log(f"instance-memory: {variant.name} ({variant.label}), {instances} instances")
        variants.append(
            run_variant(
                variant,
                instances=instances,
                per_instance=1,
                sessions=instances,
                rounds=rounds,
                live_seconds=live_seconds,
                settle=settle,
            )
        )
    per_instance = 2 if quick else 4
    shared_chosen = SHARED_VARIANTS[:2] if quick else SHARED_VARIANTS
    shared = []
    for variant in shared_chosen:
        _log(f"instance-memory: one instance, {per_instance} sessions at once: {variant.name}")
        shared.append(
            run_variant(
                variant,
                instances=1,
                per_instance=per_instance,
                sessions=per_instance,
                rounds=rounds + 1,
                live_seconds=live_seconds,
                settle=settle,
            )
        )
    return {
        "bot": str(VAD_ECHO.relative_to(VAD_ECHO.parent.parent.parent)),
        "instances": instances,
        "rounds": rounds,
        "live_seconds": live_seconds,
        "settle_s": settle,
        "audio": "16 kHz mono PCM, 20 ms per frame (640 B), pipecat protobuf, echoed",
        "variants": variants,
        "shared_instance": {"sessions_per_instance": per_instance, "variants": shared},
        "targets": _targets(variants),
    }
