"""Results on disk: one JSON per scenario, ``latest.md`` and the latency-vs-sessions PNG.

``latest.md`` is rebuilt from the newest JSON of each scenario in the results folder, so running
one scenario refreshes its section and keeps the others (each section names its own command).
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.procs import BURST_CPU_LIMIT_S, FOREIGN_CPU_LIMIT

__all__ = [
    "evaluate_targets",
    "machine_info",
    "plot_instance_memory",
    "plot_sweep",
    "write_latest",
    "write_result",
]

SCENARIOS = (
    "telephony",
    "telephony-tls",
    "throughput",
    "start",
    "memory",
    "instance-memory",
    "sweep",
    "hostile",
    "dispatch",
)
PLOT_NAME = "latency-vs-sessions.png"
INSTANCE_PLOT_NAME = "instance-memory.png"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_revision(repo: Path) -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev + ("-dirty" if dirty else "")


def machine_info(repo: Path, nginx: str) -> dict[str, Any]:
    """Date, machine and versions, for every result file."""
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "uvloop": _version("uvloop"),
        "uvicorn": _version("uvicorn"),
        "websockets": _version("websockets"),
        "nginx": nginx,
        "catflap": _version("catflap"),
        "pipecat_ai": _version("pipecat-ai"),
        "git": _git_revision(repo),
        "command": " ".join(["python -m bench", *sys.argv[1:]]),
    }


def write_result(out: Path, scenario: str, meta: dict[str, Any], data: dict[str, Any]) -> Path:
    """Write ``<out>/<date>-<scenario>.json``."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{meta['date'][:10]}-{scenario}.json"
    payload = {"scenario": scenario, "meta": meta, "results": data}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def _latest(out: Path) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(out.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        scenario = doc.get("scenario")
        newer = scenario not in found or doc["meta"]["date"] >= found[scenario]["meta"]["date"]
        if scenario in SCENARIOS and newer:
            found[scenario] = doc
    return found


def _fmt(value: Any, digits: int | None = None) -> str:
    if value is None or value == "":
        return "–"
    if isinstance(value, float):
        if digits is None:
            digits = 2 if abs(value) < 10 else 1 if abs(value) < 1000 else 0
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return lines


def _telephony_md(res: dict[str, Any]) -> list[str]:
    rows = []
    for name, r in res["contestants"].items():
        lat = r.get("latency_us", {})
        rows.append(
            [
                name,
                r.get("cpu_label", ""),
                r.get("cpu_us_per_frame"),
                r.get("cpu_vs_nginx"),
                lat.get("p50"),
                lat.get("p99"),
                lat.get("p999"),
                r.get("lost"),
                r.get("upstream_cpu_us_per_frame"),
                _pct(r.get("relay_core_busy")),
                _pct(r.get("load_core_busy")),
                max((x or 0.0 for x in r.get("foreign_cpu_s", [])), default=None),
            ]
        )
    header = [
        "contestant",
        "CPU measured",
        "µs CPU / forwarded frame",
        "× nginx",
        "p50 µs",
        "p99 µs",
        "p999 µs",
        "frames lost",
        "upstream µs / frame",
        "relay core",
        "load core",
        "other CPU s (max)",
    ]
    text = [
        f"{res['sessions']} sessions × 320 B every 20 ms for {res['seconds']:g} s, echoed; "
        f"medians of {res.get('rounds', 1)} round(s), ratios to nginx taken round by round. "
        f"Upstream echo: `{res.get('echo', 'fast')}`. {res.get('agent_hop', '')}.",
        "",
    ]
    lines = text + _table(header, rows)
    for name, prof in (res.get("profile") or {}).items():
        if not isinstance(prof, dict) or "top_functions_pct" not in prof:
            continue
        libs = prof.get("by_library_pct") or []
        funcs = prof["top_functions_pct"][:6]
        lines += [
            "",
            f"Profile of {name} ({prof['tool']}, {prof['samples']} samples, extra run): "
            + ("by library " + ", ".join(f"{n} {p} %" for n, p in libs[:5]) + "; " if libs else "")
            + "top functions "
            + ", ".join(f"{n} {p} %" for n, p in funcs)
            + ".",
        ]
    return lines


def _pct(fraction: float | None) -> str | None:
    return None if fraction is None else f"{100 * fraction:.0f} %"


def _throughput_md(res: dict[str, Any]) -> list[str]:
    rows = []
    for size, by in res["sizes"].items():
        for name, r in by.items():
            rows.append(
                [
                    size,
                    name,
                    r.get("messages_per_s"),
                    r.get("vs_direct"),
                    r.get("vs_nginx"),
                    r.get("latency_us", {}).get("p50"),
                    r.get("relay_cpu_us_per_frame"),
                    _pct(r.get("relay_core_busy")),
                    _pct(r.get("load_core_busy")),
                    r.get("lost"),
                ]
            )
    header = [
        "size",
        "contestant",
        "messages/s",
        "× direct",
        "× nginx",
        "p50 RTT µs",
        "relay µs / frame",
        "relay core",
        "load core",
        "lost",
    ]
    text = [f"{res['connections']} connections, closed loop, {res['seconds']:g} s per run.", ""]
    return text + _table(header, rows)


def _start_md(res: dict[str, Any]) -> list[str]:
    rows = []
    for name, r in res.get("warm", {}).items():
        up, first = r.get("upgrade_us", {}), r.get("first_frame_us", {})
        rate = r.get("rate", {})
        rows.append(
            [
                name,
                f"{r.get('ok')}/{r.get('count')}",
                _ms(up.get("p50")),
                _ms(up.get("p99")),
                _ms(first.get("p50")),
                _ms(first.get("p99")),
                rate.get("sessions_per_s"),
            ]
        )
    header = [
        "warm start",
        "ok",
        "upgrade→101 p50 ms",
        "p99 ms",
        "upgrade→first echo p50 ms",
        "p99 ms",
        "sessions/s",
    ]
    lines = _table(header, rows)
    cold = res.get("cold", {})
    if cold:
        lines += ["", "Real Pipecat bot (`examples/pipecat-echo`) through catflap:", ""]
        crow = []
        for label, key in (("cold start", "cold"), ("warm instance", "pipecat_warm")):
            block = res.get(key, {})
            if not block:
                continue
            up, first = block.get("upgrade_us", {}), block.get("first_frame_us", {})
            crow.append(
                [
                    label,
                    f"{block.get('ok')}/{block.get('count')}",
                    _ms(up.get("p50")),
                    _ms(up.get("max")),
                    _ms(first.get("p50")),
                    _ms(first.get("max")),
                ]
            )
        lines += _table(
            ["pipecat-echo", "ok", "upgrade→101 p50 ms", "max ms", "→bot frame p50 ms", "max ms"],
            crow,
        )
    return lines


def _ms(us: float | None) -> float | None:
    return None if us is None else round(us / 1000, 2)


def _memory_md(res: dict[str, Any]) -> list[str]:
    rows = [
        [
            lvl["sessions"],
            lvl["rss_kb"].get("gateway"),
            lvl.get("gateway_kb_per_session"),
            lvl["rss_kb"].get("agent"),
            lvl.get("agent_kb_per_session"),
        ]
        for lvl in res["levels"]
    ]
    header = [
        "idle sessions",
        "gateway RSS KiB",
        "gateway KiB / session",
        "agent RSS KiB",
        "agent KiB / session",
    ]
    lines = _table(header, rows)
    lines += [
        "",
        f"Gateway: **{_fmt(res.get('gateway_kb_per_session'), 2)} KiB per session** "
        f"(ΔRSS 0 → {res['levels'][-1]['sessions']:,}); "
        f"agent: {_fmt(res.get('agent_kb_per_session'), 2)} KiB per session.",
    ]
    return lines


def _instance_memory_md(res: dict[str, Any]) -> list[str]:
    rows = []
    for v in res["variants"]:
        idle, live = v["idle"]["summary"], v["rounds"][0]["live"]["summary"]
        live_max = max(r["live"]["summary"].get("uss_max_mib", 0) for r in v["rounds"])
        rows.append(
            [
                f"`{v['name']}`: {v['label']}",
                idle.get("uss_mib"),
                idle.get("pss_mib"),
                idle.get("rss_mib"),
                live.get("uss_mib"),
                live.get("pss_mib"),
                live.get("rss_mib"),
                live_max,
                _mib_of(v.get("fork_server_process")),
                v.get("sessions_per_gib_uss"),
                v.get("sessions_per_gib_total"),
            ]
        )
    header = [
        "variant",
        "idle USS MiB",
        "idle PSS",
        "idle RSS",
        "live USS MiB",
        "live PSS",
        "live RSS",
        "live USS max, all rounds",
        "fork server PSS",
        "sessions / GiB (USS)",
        "sessions / GiB (PSS, all)",
    ]
    lines = [
        f"Bot `{res['bot']}` (`examples/pipecat-echo` plus Silero VAD). Per variant one gateway "
        f"with {res['instances']} warm instances (`sessions_per_instance = 1`); idle: every "
        f"instance ready and settled {res['settle_s']:g} s; live: one WebSocket session per "
        f"instance for {res['live_seconds']:g} s ({res['audio']}), the last per-second sample. "
        "Medians over the instances of `/proc/PID/smaps_rollup` (USS = private clean + private "
        "dirty). Each fork-server row adds one memory step to the row above "
        "(`CATFLAP_MEMORY_OFF` switches the others off); `fresh` and `fork` are the defaults.",
        "",
        *_table(header, rows),
        "",
        "Sessions per GiB: **(USS)** = 1024 / median live USS, the marginal cost of one more "
        "session once the gateway and fork server are paid for; **(PSS, all)** = 1024 / "
        f"((sum of the {res['instances']} live instances' PSS + the fork server's PSS) / "
        f"{res['instances']}), everything the agent uses shared by that many sessions.",
    ]
    shared = res.get("shared_instance") or {}
    if shared.get("variants"):
        n = shared["sessions_per_instance"]
        srows = []
        for v in shared["variants"]:
            idle = v["idle"]["summary"].get("uss_mib")
            for i, r in enumerate(v["rounds"], 1):
                live = r["live"]["summary"].get("uss_mib")
                after = r["after"]["summary"].get("uss_mib")
                srows.append(
                    [
                        f"`{v['name']}`: {v['label']}",
                        i,
                        idle,
                        live,
                        None if live is None else round(live / n, 1),
                        after,
                        None if after is None or idle is None else round(after - idle, 1),
                    ]
                )
        lines += [
            "",
            f"One instance with `sessions_per_instance = {n}`: {n} sessions at once, round "
            "after round on the same instance; `after` is the instance idle again once a round's "
            "sessions closed (release between sessions = `gc.collect()` + `malloc_trim(0)`).",
            "",
            *_table(
                [
                    "variant",
                    "round",
                    "idle USS MiB (before round 1)",
                    "live USS MiB",
                    "live USS / session",
                    "after USS MiB",
                    "after − idle MiB",
                ],
                srows,
            ),
        ]
    if res.get("plot"):
        lines += ["", f"![instance memory]({res['plot']})"]
    return lines


def _mib_of(samples: list[dict[str, Any]] | None) -> float | None:
    """The summed PSS (MiB) of a list of process samples, or None when there are none."""
    if not samples:
        return None
    return round(sum(float(s["pss_mib"]) for s in samples), 1)


def _sweep_md(res: dict[str, Any]) -> list[str]:
    rows = []
    for level in res["levels"]:
        row: list[Any] = [level["sessions"]]
        for name in res["contestants"]:
            r = level["by"].get(name, {})
            lat = r.get("latency_us", {})
            row += [lat.get("p50"), lat.get("p99"), r.get("cpu_us_per_frame"), r.get("lost")]
        rows.append(row)
    header = ["sessions"]
    for name in res["contestants"]:
        header += [f"{name} p50 µs", f"{name} p99 µs", f"{name} µs/frame", f"{name} lost"]
    lines = [f"{res['seconds']:g} s per point.", "", *_table(header, rows)]
    if res.get("plot"):
        lines += ["", f"![latency vs sessions]({res['plot']})"]
    return lines


def _mib(kb: int | None) -> float | None:
    return None if kb is None else round(kb / 1024, 1)


_RUN_LABELS = {
    "quiet": "quiet (no attackers)",
    "hostile": "under attack",
    "after": "quiet, after the attack",
}


#: A run whose CPUs lost more than this share of their time to the hypervisor (steal) was
#: disturbed too: a neighbour on the host, invisible to ``/proc`` as a program.
STEAL_LIMIT = 0.03

#: The interleaved comparison measures the load side, not the gateway, when the load client
#: and the bench bot keep their core busier than this: at 200 sessions with the load core 68-84 %
#: busy (a slow hour of the reference VM), echo stalls of 100-250 ms came in attack blocks with
#: the load core saturated, and the lane thread at SCHED_FIFO did not remove them; at 100
#: sessions (load core 43-48 %) none came (2026-12-03, docs/benchmarks.md).
LOAD_CORE_LIMIT = 0.6


def _run_disturbance(r: dict[str, Any]) -> str:
    foreign = float(r.get("foreign_cpu_s") or 0.0)
    steal = float(r.get("steal") or 0.0)
    why = []
    peak = float(r.get("foreign_peak_s") or 0.0)
    if foreign > FOREIGN_CPU_LIMIT * float(r.get("window_s") or 1.0):
        why.append(f"other programs {foreign:g} s of CPU")
    elif peak > BURST_CPU_LIMIT_S:
        why.append(f"other programs {peak:g} s of CPU in one interval")
    if steal > STEAL_LIMIT:
        why.append(f"steal {steal:.0%}")
    return ", ".join(why)


def _disturbed(res: dict[str, Any]) -> str:
    """Why the quiet / under-attack latency comparison is not clean ('' when it is)."""
    rounds = res.get("rounds") or [
        {
            label: {
                **res["runs"][label],
                "foreign_cpu_s": res["runs"][label]["machine"].get("foreign_cpu_s"),
                "foreign_peak_s": res["runs"][label]["machine"].get("foreign_peak_s"),
            }
            for label in ("quiet", "hostile")
        }
    ]
    parts, disturbed_rounds = [], set()
    for i, rnd in enumerate(rounds, 1):
        for label in ("quiet", "hostile"):
            why = _run_disturbance(rnd[label])
            if why:
                parts.append(f"round {i} {_RUN_LABELS[label]}: {why}")
                disturbed_rounds.add(i)
    # The median of the rounds' ratios stays clean while fewer than half of them were disturbed.
    if 2 * len(disturbed_rounds) < len(rounds):
        return ""
    return "; ".join(parts) + ": not a clean comparison"


def _rounds_md(res: dict[str, Any]) -> list[str]:
    rows = []
    for i, rnd in enumerate(res.get("rounds", []), 1):
        q, h = rnd["quiet"], rnd["hostile"]
        rows.append(
            [
                i,
                " → ".join(_RUN_LABELS[label] for label in rnd["order"]),
                q["latency_us"].get("p99"),
                h["latency_us"].get("p99"),
                rnd["p99_ratio"],
                " / ".join(_fmt(r.get("blocks_p99_ratio")) for r in (q, h)),
                f"{q['lost']:,} / {h['lost']:,}",
                _run_disturbance(q) or "–",
                _run_disturbance(h) or "–",
            ]
        )
    if not rows:
        return []
    return [
        "",
        "Rounds (the tables above show round "
        f"{res.get('representative_round', 1)}, the median one):",
        "",
        *_table(
            [
                "round",
                "order",
                "quiet p99 µs",
                "under attack p99 µs",
                "ratio",
                "block split quiet / attacked",
                "frames lost quiet / attacked",
                "quiet run disturbed by",
                "attacked run disturbed by",
            ],
            rows,
        ),
    ]


def _burst_note(burst: dict[str, int] | None) -> str:
    """The blocks left out for other programs' bursts (older results have no such count)."""
    if burst is None:
        return ""
    return (
        f", and blocks in which other programs took more than {BURST_CPU_LIMIT_S:g} s of CPU "
        f"({burst['attack']} attack, {burst['quiet']} quiet; see BURST_CPU_LIMIT_S),"
    )


def _interleaved_md(res: dict[str, Any]) -> list[str]:
    run = res.get("interleaved")
    if not run or not run.get("blocks"):
        return []
    blocks = run["blocks"]
    rows = [
        [
            side,
            *(blocks[side].get(k) for k in ("p50", "p99", "p999", "max")),
            blocks[side].get("count"),
        ]
        for side in ("attack", "quiet")
    ]
    lost = f"{run['lost']:,} of {run['sent']:,}"
    return [
        "",
        f"Interleaved run ({run['seconds']:g} s; the attackers attack in even "
        f"{blocks['block_s']:g} s blocks and pause in odd ones; each echo counts for the block "
        f"its frame was sent in, the first {blocks['guard_s']:g} s of every quiet block and "
        "blocks cut by the window's ends"
        + _burst_note(blocks.get("burst_blocks"))
        + f" left out ({blocks['left_out']:,} echoes); frames lost {lost}). "
        "The latency target is the median, over the attack blocks, of each one's p99 over the "
        "mean of its two quiet neighbours' "
        f"({', '.join(f'{r:.2f}' for r in blocks.get('pair_p99_ratios', []))}); the rows "
        "below pool every block of a side. The rounds table's block split is the same "
        "statistic for runs whose blocks are alike (no attackers, or attackers throughout): "
        "the noise floor.",
        "",
        *_table(["blocks", "p50 µs", "p99 µs", "p999 µs", "max µs", "echoes"], rows),
    ]


def _hostile_targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The scenario's targets, with the latency one marked when other programs disturbed it."""
    why = _disturbed(res)
    targets = []
    for t in res.get("targets", []):
        t = dict(t)
        if t.get("interleaved"):
            # Both sides of the interleaved run share the host, steal included: only other
            # programs' CPU during it makes its comparison unclean.
            run = res.get("interleaved", {})
            whys = [
                _run_disturbance(
                    {
                        **run,
                        "steal": 0.0,
                        "foreign_cpu_s": run.get("machine", {}).get("foreign_cpu_s"),
                    }
                )
            ]
            if float(run.get("load_core_busy") or 0.0) > LOAD_CORE_LIMIT:
                whys.append(f"load core {run['load_core_busy']:.0%} busy: the load side saturates")
            why = "; ".join(w for w in whys if w)
            why = f"interleaved run: {why}" if why else ""
        if why and str(t["target"]).startswith("p99"):
            t["measured"] = f"{t['measured']}; {why}"
            t["disturbed"] = True
        targets.append(t)
    return targets


def _met(t: dict[str, Any]) -> str:
    met = "yes" if t["met"] else "**no**"
    return f"{met} (disturbed)" if t.get("disturbed") else met


def _workdir_note(where: str | None) -> str:
    """Where the run folders were, for results that say (older ones do not)."""
    if where == "memory":
        return "; the gateway's state_dir and logs in memory (tmpfs: see WORKDIR_ON)"
    if where == "disk":
        return "; the gateway's state_dir and logs on the VM's disk"
    return ""


def _hostile_md(res: dict[str, Any]) -> list[str]:
    runs = res["runs"]
    quiet_peak = runs["quiet"]["gateway_memory"]["peak_kb"]
    rows = []
    for label, r in runs.items():
        lat, mem = r.get("latency_us", {}), r["gateway_memory"]
        rows.append(
            [
                _RUN_LABELS.get(label, label),
                lat.get("p50"),
                lat.get("p99"),
                lat.get("p999"),
                f"{r['lost']:,} / {r['sent']:,}",
                _mib(mem["start_kb"]),
                _mib(mem["peak_kb"]),
                _fmt((mem["peak_kb"] - quiet_peak) / 1024, 1),
                f"{mem['start_fds']} / {mem['peak_fds']}",
                r.get("cpu_us_per_frame"),
                _pct(r.get("relay_core_busy")),
                _pct(r.get("load_core_busy")),
                _pct(r.get("attackers_core_busy")),
                r["machine"].get("foreign_cpu_s"),
                r["machine"].get("interrupt_cpu_s"),
            ]
        )
    header = [
        "run",
        "p50 µs",
        "p99 µs",
        "p999 µs",
        "frames lost / sent",
        "gateway RSS at start MiB",
        "peak MiB",
        "peak − quiet MiB",
        "gateway fds start / peak",
        "gateway µs CPU / frame",
        "relay core",
        "load core",
        "attackers",
        "other CPU s",
        "kernel network CPU s",
    ]
    pause = res.get("attack_pause_s") or 0
    variants = res.get("attack_variants", "all")
    lines = [
        f"{res['sessions']} sessions × 320 B every 20 ms for {res['seconds']:g} s through catflap "
        f"(one gateway, one warm agent instance), {len(res.get('rounds', [])) or 1} round(s) "
        f"of a quiet run and a run under attack by {res['attackers']} attacker connections "
        f"(the order alternating; attackers from {res.get('attack_ramp_s', 1):g} s before "
        f"the load client starts until it is done; "
        + ("back to back" if not pause else f"{pause:g} s between attacks")
        + ("" if variants == "all" else f"; only {', '.join(variants)}")
        + (
            "; the attackers at SCHED_IDLE and the attacked agent's instance on the "
            + ("load client's core" if res.get("attackers_on") == "load" else "gateway's core")
        )
        + _workdir_note(res.get("workdir_on"))
        + "), then quiet again. Gateway CPU per frame is all of the gateway's CPU (the "
        "attacks' included) over the legitimate frames it forwarded; the CPU of the gateway's "
        "agent instances is measured too (not counted as other programs'); peak RSS is "
        "`VmHWM`, reset before each run.",
        "",
        *_table(header, rows),
    ]
    attack = runs["hostile"].get("attack", {})
    arows = []
    for name, v in attack.get("variants", {}).items():
        outcomes = ", ".join(f"{k} × {n:,}" for k, n in v["outcomes"].items()) or "–"
        answer = v.get("answer_ms", {})
        arows.append(
            [
                v["kind"],
                f"`{name}`",
                v["attackers"],
                v["done"],
                v["per_s"],
                v["expected"],
                outcomes,
                ("yes" if v["as_expected"] == v["done"] else "**no**") if v["done"] else "–",
                answer.get("p50"),
                answer.get("max"),
                v["cut_short"],
                _fmt(round(v["bytes_sent"] / 2**20, 1)),
            ]
        )
    if arows:
        lines += [
            "",
            f"Attacks ({attack.get('seconds', 0):g} s, attackers' CPU "
            f"{attack.get('cpu_s', 0):g} s; an attack in flight when they stop is cut short, "
            "not counted as done):",
            "",
            *_table(
                [
                    "kind",
                    "attack",
                    "attackers",
                    "done",
                    "per s",
                    "expected",
                    "outcomes seen",
                    "all as expected",
                    "answer p50 ms",
                    "max ms",
                    "cut short",
                    "MiB sent",
                ],
                arows,
            ),
        ]
    lines += _rounds_md(res) + _interleaved_md(res)
    fds = runs["hostile"].get("fds_back_s")
    problems = res.get("gateway_log_problems", {})
    lines += [
        "",
        "After the attack the gateway's open fds were back to their count before it "
        + (f"in {fds:g} s" if fds is not None else "**not within 5 s**")
        + f"; gateway log lines with errors: {problems.get('count', 0)}.",
    ]
    targets = _hostile_targets(res)
    if targets:
        lines += [""] + _table(
            ["target", "measured", "met"],
            [[t["target"], t["measured"], _met(t)] for t in targets],
        )
    return lines


def _telephony_tls_md(res: dict[str, Any]) -> list[str]:
    negotiated = res.get("negotiated") or {}
    seen = ", ".join(f"{name} {n['version']} {n['cipher']}" for name, n in negotiated.items() if n)
    lines = [
        "Over `wss://`: each relay terminates TLS itself (catflap with `listen_tls`, on the event "
        f"loop: TLS sessions never enter the fast lane). Negotiated: {seen or '–'}.",
        "",
    ]
    if res.get("busy_machine_note"):
        lines += [f"**{res['busy_machine_note']}**", ""]
    return lines + _telephony_md(res)


def _dispatch_md(res: dict[str, Any]) -> list[str]:
    spec = res.get("spec", {})
    start = res.get("start_us", {})
    lines = [
        f"{res.get('count')} session starts in {_fmt(spec.get('seconds'))} s over "
        f"{spec.get('gateways')} gateways × {spec.get('hosts')} agent hosts on one Redis "
        f"(`--slots {spec.get('slots')} --warm {spec.get('warm')}`, "
        f"{spec.get('sessions_per_instance')} sessions per instance, each held "
        f"{_fmt(spec.get('hold_s'))} s); {res.get('cold_starts')} instances cold-started "
        "during the run. A 429 is the contract's answer when every slot of `max_agents` "
        "instances is taken or promised to a waiting session: the burst outran the cold "
        "starts. Start latencies are those of the 101s.",
        "",
    ]
    lines += _table(
        ["ok", "statuses", "start p50 ms", "p90 ms", "p99 ms", "max ms", "load s"],
        [
            [
                f"{res.get('ok')}/{res.get('count')}",
                ", ".join(f"{k}: {v}" for k, v in res.get("statuses", {}).items()),
                _ms(start.get("p50")),
                _ms(start.get("p90")),
                _ms(start.get("p99")),
                _ms(start.get("max")),
                res.get("load_s"),
            ]
        ],
    )
    ok = res.get("ok") or 0
    lines += [""]
    lines += _table(
        ["agent host", "sessions", "share", "instances at the end"],
        [
            [h["host"], h["sessions"], _pct(h["sessions"] / ok if ok else None), h["instances"]]
            for h in res.get("per_host", [])
        ],
    )
    return lines


_SECTIONS = {
    "telephony": ("Telephony", _telephony_md),
    "telephony-tls": ("Telephony over TLS", _telephony_tls_md),
    "throughput": ("Throughput", _throughput_md),
    "start": ("Session start", _start_md),
    "memory": ("Memory", _memory_md),
    "instance-memory": ("Instance memory", _instance_memory_md),
    "sweep": ("Latency vs sessions", _sweep_md),
    "hostile": ("Under attack", _hostile_md),
    "dispatch": ("Cluster dispatch", _dispatch_md),
}


def evaluate_targets(latest: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue #5's targets, checked against the newest results (ratios within one run)."""
    targets: list[dict[str, Any]] = []

    def add(target: str, measured: str, met: bool, disturbed: bool = False) -> None:
        targets.append({"target": target, "measured": measured, "met": met, "disturbed": disturbed})

    if "telephony-tls" in latest:
        res = latest["telephony-tls"]["results"]
        cat, ngx = res["contestants"]["catflap"], res["contestants"]["nginx"]
        ratio = cat.get("cpu_vs_nginx")
        if ratio is not None:
            add(
                "TLS: gateway CPU per forwarded frame ≤ 1.0× nginx terminating TLS",
                f"{cat['cpu_us_per_frame']} µs vs {ngx['cpu_us_per_frame']} µs = {ratio}×",
                ratio <= 1.0,
            )
    if "telephony" in latest:
        res = latest["telephony"]["results"]
        cat, ngx = res["contestants"]["catflap"], res["contestants"]["nginx"]
        ratio = cat.get("cpu_vs_nginx")
        if ratio is not None:
            add(
                "gateway CPU per forwarded frame ≤ 1.0× nginx (stretch ≤ 0.9×)",
                f"{cat['cpu_us_per_frame']} µs vs {ngx['cpu_us_per_frame']} µs = {ratio}×",
                ratio <= 1.0,
            )
        cp99, np99 = cat["latency_us"].get("p99"), ngx["latency_us"].get("p99")
        delta = cat.get("p99_minus_nginx_us")
        if cp99 is not None and np99 is not None and delta is not None:
            add(
                f"p99 echo latency at {res['sessions']} sessions ≤ nginx's + 1 ms",
                f"{cp99 / 1000:.2f} ms vs {np99 / 1000:.2f} ms (median of per-round "
                f"differences {delta / 1000:+.2f} ms)",
                delta <= 1000,
            )
    if "start" in latest:
        res = latest["start"]["results"]
        warm = res.get("warm", {}).get("catflap", {})
        first = warm.get("first_frame_us", {})
        if first:
            add(
                "warm start p50 ≤ 5 ms, p99 ≤ 20 ms (upgrade request → first echoed frame)",
                f"p50 {first['p50'] / 1000:.2f} ms, p99 {first['p99'] / 1000:.2f} ms",
                first["p50"] <= 5000 and first["p99"] <= 20000,
            )
        cold = res.get("cold", {}).get("first_frame_us", {})
        if cold:
            add(
                "cold start with the real Pipecat bot ≤ 1 s (upgrade request → first bot frame)",
                f"median {cold['p50'] / 1e6:.2f} s, max {cold['max'] / 1e6:.2f} s "
                f"({cold['count']} samples)",
                cold["p50"] <= 1e6,
            )
    if "hostile" in latest:
        for t in _hostile_targets(latest["hostile"]["results"]):
            add(
                f"hardening: {t['target']}",
                t["measured"],
                bool(t["met"]),
                bool(t.get("disturbed")),
            )
    if "instance-memory" in latest:
        for t in latest["instance-memory"]["results"].get("targets", []):
            add(f"instance memory: {t['target']}", t["measured"], bool(t["met"]))
    if "memory" in latest:
        res = latest["memory"]["results"]
        kb = res.get("gateway_kb_per_session")
        if kb is not None:
            add(
                "gateway memory ≤ 20 KB per relayed session",
                f"{kb:.2f} KiB/session at {res['levels'][-1]['sessions']:,} sessions",
                kb * 1024 <= 20 * 1000,
            )
    return targets


def write_latest(out: Path) -> Path:
    """Rebuild ``<out>/latest.md`` from the newest result of each scenario."""
    out.mkdir(parents=True, exist_ok=True)
    latest = _latest(out)
    targets = evaluate_targets(latest)
    lines = ["# catflap benchmark: latest results", ""]
    if latest:
        meta = dict(max((d["meta"] for d in latest.values()), key=lambda m: str(m["date"])))
        with_nginx = [d["meta"] for d in latest.values() if d["meta"].get("nginx") != "not used"]
        if with_nginx:  # the hostile scenario runs catflap only
            meta["nginx"] = max(with_nginx, key=lambda m: str(m["date"]))["nginx"]
        lines += _table(
            ["date", "nproc", "CPU", "Python", "uvloop", "nginx", "catflap", "git", "command"],
            [
                [
                    meta["date"],
                    meta["nproc"],
                    meta["cpu_model"],
                    meta["python"],
                    meta["uvloop"],
                    meta["nginx"],
                    meta["catflap"],
                    meta["git"],
                    f"`{meta['command']}`",
                ]
            ],
        )
        lines += [
            "",
            f"uvicorn {meta['uvicorn']}, websockets {meta['websockets']}, "
            f"pipecat-ai {meta['pipecat_ai']}, kernel {meta['kernel']}. Loopback only; the relay "
            "is pinned to one core, the load client and the upstream echo to the other. "
            "The table names the newest result; each section below names its own date, "
            "command and git revision. See `docs/benchmarks.md` for what each number means.",
        ]
    if targets:
        lines += [
            "",
            "## Targets",
            "",
            "Issue #5's, the hardening issue's (`hardening:`), issue #15's (`instance memory:`).",
            "",
        ]
        lines += _table(
            ["target", "measured", "met"],
            [[t["target"], t["measured"], _met(t)] for t in targets],
        )
    for scenario in SCENARIOS:
        doc = latest.get(scenario)
        if doc is None:
            continue
        title, render = _SECTIONS[scenario]
        lines += ["", f"## {title}", ""]
        lines += [
            f"{doc['meta']['date']}, `{doc['meta']['command']}`, git {doc['meta']['git']}",
            "",
        ]
        lines += render(doc["results"])
    path = out / "latest.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def plot_sweep(out: Path, res: dict[str, Any], date: str) -> str | None:
    """Draw p50/p99 echo latency vs sessions per contestant; returns the PNG's file name."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{date}-sweep.png"
    try:
        _plot_matplotlib(path, res)
    except ImportError:
        try:
            _plot_pillow(path, res)
        except ImportError:
            return None
    shutil.copyfile(path, out / PLOT_NAME)
    return PLOT_NAME


def plot_instance_memory(out: Path, res: dict[str, Any], date: str) -> str | None:
    """Bars of idle and live USS/PSS per variant, the targets, and the shared instance's rounds.

    Returns the PNG's file name (``instance-memory.png``, also kept as ``<date>-…``), or None
    without matplotlib.
    """
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{date}-instance-memory.png"
    variants = res["variants"]
    shared = (res.get("shared_instance") or {}).get("variants") or []
    fig, axes = plt.subplots(
        1, 2 if shared else 1, figsize=(12 if shared else 8, 4.6), dpi=110, squeeze=False
    )
    ax = axes[0][0]
    names = [v["name"] for v in variants]
    xs = range(len(names))
    width = 0.2
    bars = (
        ("idle USS", lambda v: v["idle"]["summary"].get("uss_mib"), "tab:blue", ""),
        ("idle PSS", lambda v: v["idle"]["summary"].get("pss_mib"), "tab:blue", "//"),
        ("live USS", lambda v: v["rounds"][0]["live"]["summary"].get("uss_mib"), "tab:orange", ""),
        (
            "live PSS",
            lambda v: v["rounds"][0]["live"]["summary"].get("pss_mib"),
            "tab:orange",
            "//",
        ),
    )
    for i, (label, get, colour, hatch) in enumerate(bars):
        ys = [get(v) or 0.0 for v in variants]
        offset = (i - 1.5) * width
        ax.bar(
            [x + offset for x in xs],
            ys,
            width,
            label=label,
            color=colour,
            alpha=0.55 if hatch else 0.9,
            hatch=hatch,
            edgecolor="white" if not hatch else colour,
        )
    for value, colour, label in ((20.0, "tab:blue", "idle target"), (40.0, "tab:orange", "live")):
        ax.axhline(value, color=colour, ls="--", lw=1, label=f"{label} ≤ {value:g} MiB USS")
    ax.set_xticks(list(xs), names, rotation=25, ha="right")
    ax.set_ylabel("MiB per instance (median)")
    ax.set_title("VAD bot instance: idle and with a live session")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    if shared:
        ax2 = axes[0][1]
        n = res["shared_instance"]["sessions_per_instance"]
        for v in shared:
            ys = [v["idle"]["summary"].get("uss_mib") or 0.0]
            labels = ["idle"]
            for i, r in enumerate(v["rounds"], 1):
                ys += [
                    r["live"]["summary"].get("uss_mib") or 0.0,
                    r["after"]["summary"].get("uss_mib") or 0.0,
                ]
                labels += [f"live {i}", f"after {i}"]
            ax2.plot(range(len(ys)), ys, "-o", markersize=4, label=v["name"])
        ax2.set_xticks(range(len(labels)), labels, rotation=25, ha="right")
        ax2.set_ylabel("instance USS (MiB)")
        ax2.set_title(f"One instance, {n} sessions at once per round")
        ax2.grid(True, alpha=0.3)
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    shutil.copyfile(path, out / INSTANCE_PLOT_NAME)
    return INSTANCE_PLOT_NAME


def _series(res: dict[str, Any], name: str, key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for level in res["levels"]:
        lat = level["by"].get(name, {}).get("latency_us", {})
        if key in lat:
            xs.append(int(level["sessions"]))
            ys.append(float(lat[key]) / 1000)
    return xs, ys


def _first_saturated(res: dict[str, Any], threshold: float = 0.9) -> int | None:
    """The smallest session count at which the load core (client + upstream) was saturated."""
    for level in res["levels"]:
        if any((r.get("load_core_busy") or 0) >= threshold for r in level["by"].values()):
            return int(level["sessions"])
    return None


def _plot_matplotlib(path: Path, res: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"catflap": "tab:orange", "nginx": "tab:green", "direct": "tab:gray"}
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for name in res["contestants"]:
        for key, style in (("p50", "-o"), ("p99", "--s")):
            xs, ys = _series(res, name, key)
            ax.plot(xs, ys, style, color=colours.get(name), label=f"{name} {key}", markersize=4)
    saturated = _first_saturated(res)
    if saturated is not None:
        top = max(int(level["sessions"]) for level in res["levels"])
        ax.axvspan(
            saturated, top, color="0.85", alpha=0.5, lw=0, zorder=0, label="load core ≥ 90 % busy"
        )
    ax.set_xlabel("concurrent sessions (320 B every 20 ms, echoed)")
    ax.set_ylabel("echo latency (ms)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(f"Echo latency vs sessions ({res['seconds']:g} s per point)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_pillow(path: Path, res: dict[str, Any]) -> None:
    """Fallback without matplotlib: a bare line chart drawn with Pillow (linear axes)."""
    from PIL import Image, ImageDraw

    width, height, margin = 720, 420, 50
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    series = []
    colours = {"catflap": (230, 120, 20), "nginx": (40, 150, 40), "direct": (120, 120, 120)}
    for name in res["contestants"]:
        for key in ("p50", "p99"):
            xs, ys = _series(res, name, key)
            series.append((f"{name} {key}", colours.get(name, (0, 0, 0)), xs, ys))
    xmax = max((max(s[2]) for s in series if s[2]), default=1)
    ymax = max((max(s[3]) for s in series if s[3]), default=1.0)

    def point(x: float, y: float) -> tuple[float, float]:
        return (
            margin + (width - 2 * margin) * x / xmax,
            height - margin - (height - 2 * margin) * y / ymax,
        )

    draw.line([point(0, 0), point(xmax, 0)], fill="black")
    draw.line([point(0, 0), point(0, ymax)], fill="black")
    draw.text((margin, 10), f"echo latency (ms, max {ymax:.1f}) vs sessions (max {xmax})", "black")
    for i, (label, colour, xs, ys) in enumerate(series):
        if len(xs) > 1:
            draw.line([point(x, y) for x, y in zip(xs, ys, strict=True)], fill=colour, width=2)
        draw.text((width - 160, 30 + 14 * i), label, colour)
    img.save(path)
