"""``python -m bench [SCENARIO] [--sessions N] [--seconds T] [--out DIR] [--quick]``.

Runs catflap side by side with nginx and a direct connection on loopback and writes
``<out>/<date>-<scenario>.json``, ``<out>/latest.md`` and the latency-vs-sessions PNG.
See ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import scenarios
from bench.attackers import ATTACKS
from bench.contestants import ensure_nginx, nginx_version
from bench.instance_memory import instance_memory
from bench.procs import raise_nofile, set_quiet_budget
from bench.report import (
    machine_info,
    plot_instance_memory,
    plot_sweep,
    write_latest,
    write_result,
)

__all__ = ["main"]

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "results"

SCENARIOS: dict[str, tuple[Callable[[scenarios.Settings], dict[str, Any]], str]] = {
    "telephony": (scenarios.telephony, "N sessions x 320 B every 20 ms, echoed: CPU, latency"),
    "telephony-tls": (
        scenarios.telephony_tls,
        "telephony over wss://: catflap's listen_tls vs nginx terminating TLS",
    ),
    "throughput": (scenarios.throughput, "100 connections in a closed loop, 400 B and 8 KiB"),
    "start": (scenarios.start, "warm session starts (p50/p99, rate) and Pipecat cold starts"),
    "memory": (scenarios.memory, "gateway RSS with 0, 1,000 and 5,000 idle sessions"),
    "instance-memory": (
        instance_memory,
        "USS/PSS/RSS per idle and live VAD-bot instance, fork server vs fresh, PNG",
    ),
    "sweep": (scenarios.sweep, "latency vs sessions (100..1,000), catflap vs nginx, PNG"),
    "hostile": (scenarios.hostile, "200 telephony sessions via catflap, quiet vs 50 attackers"),
    "dispatch": (
        scenarios.dispatch,
        "500 session starts in 5 s, 2 gateways x 3 agent hosts on Redis: p50/p99, spread",
    ),
}

#: Scenarios that run catflap only.
NO_NGINX = {"hostile", "instance-memory", "dispatch"}


def _parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {name:<15} {doc}" for name, (_, doc) in SCENARIOS.items())
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="catflap benchmark suite: catflap vs nginx vs a direct connection.",
        epilog=f"scenarios:\n  {'all':<15} every scenario below, in this order\n{listing}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "scenario",
        nargs="?",
        default="all",
        choices=["all", *SCENARIOS],
        help="what to run (default: all)",
    )
    parser.add_argument(
        "--sessions",
        type=int,
        help="telephony and hostile sessions (default 300 and 200; 20 with --quick)",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        help="seconds per telephony, throughput and hostile run (default 10, 10 and 15; "
        "1, 1 and 2 with --quick)",
    )
    parser.add_argument(
        "--attackers",
        type=int,
        help="attacker connections in the hostile scenario (default 50; 10 with --quick)",
    )
    parser.add_argument(
        "--attacks",
        help="comma-separated attack variants for the hostile scenario (default: all; "
        "names in bench/attackers.py, e.g. twilio-ping-60KB,close-declares-16MiB)",
    )
    parser.add_argument(
        "--attack-pause",
        type=float,
        default=0.0,
        help="seconds each attacker waits between two attacks (default 0: back to back)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="results folder (default bench/results; a temporary folder with --quick)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        help="telephony runs per contestant, and hostile quiet/attacked pairs (default 3); "
        "medians reported",
    )
    parser.add_argument(
        "--echo",
        choices=["fast", "asgi"],
        default="fast",
        help="upstream bot's echo path: fast (uvicorn frame handler) or asgi (receive/send loop)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after the telephony rounds, one more run per relay under perf (or py-spy)",
    )
    parser.add_argument(
        "--quiet-budget",
        type=float,
        default=120.0,
        help="seconds the suite may spend in total waiting for other programs' load to pass "
        "and repeating runs they disturbed (default 120; 0 with --quick)",
    )
    parser.add_argument(
        "--event-loop-relay",
        action="store_true",
        help="run catflap with [gateway] native_relay = false (no fast lane), for comparison",
    )
    parser.add_argument(
        "--relay-thread-nice",
        type=int,
        help="catflap's [gateway] relay_thread_nice (default: catflap's, -10); 0 for comparison",
    )
    parser.add_argument(
        "--relay-thread-slice-us",
        type=int,
        help="catflap's [gateway] relay_thread_slice_us (default: catflap's, 100); 0 for the "
        "kernel's default, for comparison",
    )
    parser.add_argument(
        "--attackers-on",
        choices=scenarios.ATTACKERS_ON,
        default=scenarios.ATTACKERS_ON[0],
        help="the core the hostile scenario's attackers and attacked instance run on (default "
        "relay: the gateway's; see ATTACKERS_ON in bench/scenarios.py)",
    )
    parser.add_argument(
        "--workdir-on",
        choices=scenarios.WORKDIR_ON,
        default=scenarios.WORKDIR_ON[0],
        help="where each run's folder (the gateway's state_dir, sockets, logs) goes, in every "
        "scenario but instance-memory: memory (/dev/shm, the default) or disk, for comparison "
        "(see WORKDIR_ON in bench/scenarios.py)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test (< 60 s): tiny loads; fails if a scenario fails or loses a frame",
    )
    return parser


def _lost(name: str, data: dict[str, Any]) -> int:
    """Frames lost in a result (telephony, throughput, sweep), for --quick's check."""
    if name in ("telephony", "telephony-tls"):
        return sum(r["lost"] for r in data["contestants"].values())
    if name == "throughput":
        return sum(r["lost"] for by in data["sizes"].values() for r in by.values())
    if name == "sweep":
        return sum(r["lost"] for lvl in data["levels"] for r in lvl["by"].values())
    if name == "hostile":
        return sum(r["lost"] for r in data["runs"].values())
    return 0


def _failed(name: str, data: dict[str, Any]) -> str:
    """Why a scenario's result is incomplete (sessions that did not start), or ''."""
    if name == "start":
        bad = [k for k, r in data["warm"].items() if r["ok"] != r["count"]]
        if data["cold"]["ok"] != data["cold"]["count"]:
            bad.append("pipecat cold")
        return f"failed starts: {', '.join(bad)}" if bad else ""
    if name == "memory":
        return "connect failures" if data["connect_failures"] else ""
    if name == "hostile":
        return "; ".join(_hostile_problems(data))
    if name == "instance-memory":
        return "; ".join(_instance_memory_problems(data))
    if name == "dispatch":
        # 429 is the contract's answer once every slot of max_agents instances is taken or
        # promised to a waiting session (the burst outruns the cold starts); anything else
        # (503, an error, no answer) is a failure.
        failed = {k: v for k, v in data["statuses"].items() if k not in ("101", "429")}
        if failed:
            return f"{sum(failed.values())} of {data['count']} starts failed: {data['statuses']}"
    return ""


def _instance_memory_problems(data: dict[str, Any]) -> list[str]:
    """Variants whose instances died meanwhile, or whose live sessions got no echo back."""
    problems = []
    for v in [*data["variants"], *data["shared_instance"]["variants"]]:
        if v.get("instances_replaced"):
            problems.append(f"{v['name']}: an instance died and was replaced during the run")
        silent = sum(1 for r in v["rounds"] for echoed in r["live"]["echoed_bytes"] if echoed == 0)
        if silent:
            problems.append(f"{v['name']}: {silent} live session(s) got no echo back")
    return problems


def _hostile_problems(data: dict[str, Any]) -> list[str]:
    """Sessions that did not open, and attacks the gateway did not answer as expected."""
    problems = [
        f"{label} run: {r['connect_failures']} sessions did not open"
        for label, r in data["runs"].items()
        if r.get("connect_failures")
    ]
    attack = data["runs"]["hostile"].get("attack", {})
    if attack.get("stopped_by") not in (None, "stdin closed"):
        problems.append(f"the attackers stopped by {attack['stopped_by']}, before the run ended")
    for name, v in attack.get("variants", {}).items():
        # "expected" names every right answer, joined with " or " (bench/attackers.py).
        right = v["expected"].split(" or ")
        other = {k: n for k, n in v["outcomes"].items() if k not in right}
        if other:
            problems.append(f"{name}: expected {v['expected']}, also got {other}")
        if v.get("not_closed_after_answer"):
            problems.append(f"{name}: {v['not_closed_after_answer']} answered but not closed")
    if data["runs"]["hostile"].get("fds_back_s") is None:
        problems.append("the gateway's open fds did not come back within 5 s of the attack")
    return problems


def main(argv: list[str] | None = None) -> int:
    """Run the chosen scenarios, write results, and return the exit code."""
    args = _parser().parse_args(argv)
    settings = scenarios.Settings.quick_mode() if args.quick else scenarios.Settings()
    if args.sessions is not None:
        settings.sessions = settings.hostile_sessions = args.sessions
    if args.seconds is not None:
        settings.seconds = settings.hostile_seconds = args.seconds
    if args.attackers is not None:
        settings.attackers = args.attackers
    settings.attack_pause = args.attack_pause
    if args.attacks:
        settings.attack_variants = tuple(v.strip() for v in args.attacks.split(",") if v.strip())
        known = {a.name for a in ATTACKS}
        if unknown := sorted(set(settings.attack_variants) - known):
            _parser().error(f"unknown attacks {unknown}; known: {', '.join(sorted(known))}")
    if args.rounds is not None:
        settings.rounds = settings.hostile_rounds = args.rounds
    settings.echo = args.echo
    settings.native_relay = not args.event_loop_relay
    settings.relay_thread_nice = args.relay_thread_nice
    settings.relay_thread_slice_us = args.relay_thread_slice_us
    settings.attackers_on = args.attackers_on
    settings.workdir_on = args.workdir_on
    os.environ["CATFLAP_BENCH_ECHO"] = args.echo  # read by bench/bots/fast-echo/bot.py
    set_quiet_budget(0.0 if args.quick else args.quiet_budget)
    out: Path = args.out or (
        Path(tempfile.mkdtemp(prefix="catflap-bench-")) if args.quick else DEFAULT_OUT
    )
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    raise_nofile()
    if set(names) - NO_NGINX:
        settings.nginx_binary = ensure_nginx()
        nginx = nginx_version(settings.nginx_binary)
    else:
        nginx = "not used"
    meta = machine_info(REPO, nginx)
    folders = scenarios.workdir_parent(settings.workdir_on) or tempfile.gettempdir()
    meta["run_folders"] = str(folders)
    if args.profile:
        settings.profile_dir = out / "profiles"
    problems: list[str] = []
    crashed = 0
    began = time.monotonic()
    for name in names:
        run, _ = SCENARIOS[name]
        t0 = time.monotonic()
        try:
            data = run(settings)
        except Exception as exc:
            traceback.print_exc()
            crashed += 1
            problems.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        data["elapsed_s"] = round(time.monotonic() - t0, 1)
        if name == "sweep":
            try:
                data["plot"] = plot_sweep(out, data, meta["date"][:10])
            except Exception as exc:  # a plot must not cost the measurements
                problems.append(f"sweep: no plot ({type(exc).__name__}: {exc})")
        if name == "instance-memory":
            try:
                data["plot"] = plot_instance_memory(out, data, meta["date"][:10])
            except Exception as exc:  # a plot must not cost the measurements
                problems.append(f"instance-memory: no plot ({type(exc).__name__}: {exc})")
        path = write_result(out, name, meta, data)
        scenarios.log(f"{name}: done in {data['elapsed_s']:g} s -> {path}")
        if lost := _lost(name, data):
            problems.append(f"{name}: {lost} frames lost")
        if why := _failed(name, data):
            problems.append(f"{name}: {why}")
    latest = write_latest(out)
    scenarios.log(f"wrote {latest} in {time.monotonic() - began:.0f} s")
    print(latest.read_text())
    for problem in problems:
        print(f"bench: PROBLEM: {problem}", file=sys.stderr)
    if args.quick:
        return 1 if problems else 0
    return 1 if crashed else 0


if __name__ == "__main__":
    raise SystemExit(main())
