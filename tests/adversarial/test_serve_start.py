"""``catflap serve`` at start: a taken port fails at once with nothing started, and the open-file
budget is raised to the hard limit (for the gateway and the agents it starts)."""

from __future__ import annotations

import errno
import os
import resource
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from catflap.cli.exits import EXIT_STARTUP
from catflap.cli.startup import listen_failure

from ..conftest import catflap_serve, die_with_test_process, seconds
from .conftest import TOKEN_KEYS, HostileGateway, hostile_config, wait_until_serving

pytestmark = pytest.mark.slow  # end to end: real gateways, agent processes

#: Every process catflap serve starts inherits its environment (the fork server, and the
#: instances forked from it, alike), so this variable finds them in /proc even after the
#: gateway is gone: orphans are re-parented, but keep their environment.
MARKER = "ADVERSARIAL_TEST_START_MARKER"


def marked_processes(marker: str) -> list[int]:
    """Pids of the live processes whose environment holds ``MARKER=marker``."""
    wanted = f"{MARKER}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # gone meanwhile, or not ours
            continue
        if state != "Z" and wanted in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def open_file_limits(pid: int) -> tuple[str, str]:
    """(soft, hard) of "Max open files" in /proc/<pid>/limits, as written there."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return soft, hard
    raise AssertionError(f"no open-file limit for pid {pid}")


def serve_env(marker: str) -> dict[str, str]:
    return {**os.environ, "CATFLAP_TOKEN_KEYS": TOKEN_KEYS, MARKER: marker}


class ProcessWatch:
    """Polls /proc every 10 ms on a thread for processes marked with ``marker``: anything
    catflap starts lives far longer than that (an interpreter boot). ``seen`` includes the
    watched process itself, which may be seen before its pid is known: callers remove it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker
        self.seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.seen.update(marked_processes(self.marker))
            self._stop.wait(0.01)

    def __enter__(self) -> ProcessWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_a_taken_port_exits_at_once_and_starts_no_agent(tmp_path: Path) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    # The open agent keeps min_agents = 1: a pool started before the bind would spawn at once.
    config = hostile_config(tmp_path)
    marker = uuid.uuid4().hex
    started = time.monotonic()
    try:
        with ProcessWatch(marker) as watch:
            proc = subprocess.Popen(
                [sys.executable, "-m", "catflap", "serve", "--config", str(config)]
                + ["--listen", f"127.0.0.1:{port}", "--log-format", "text"],
                stderr=subprocess.PIPE,
                text=True,
                env=serve_env(marker),
                preexec_fn=die_with_test_process,
            )
            try:
                _, stderr = proc.communicate(timeout=seconds(60))
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            took = time.monotonic() - started
            time.sleep(0.5)  # a child started at the last moment would show up now
    finally:
        holder.close()
    assert proc.returncode == EXIT_STARTUP, stderr
    assert took < seconds(15), f"took {took:.1f} s"
    assert f"cannot listen on 127.0.0.1:{port}: address already in use" in stderr, stderr
    assert "--listen HOST:PORT" in stderr
    assert "Traceback" not in stderr
    # Nothing ran: no listener, no pool, no instance, no fork server, no process at all.
    for sign in ("gateway listening", "instance", "session logs in", "Pipecat"):
        assert sign not in stderr, (sign, stderr)
    started_by_it = watch.seen - {proc.pid}
    assert started_by_it == set(), f"processes started by catflap serve: {started_by_it}"


def test_serve_raises_its_open_file_limit_to_the_hard_limit(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 512:
        pytest.skip(f"hard open-file limit {hard} leaves nothing to raise from")
    low = 256  # start low, so the test sees catflap raise it (soft is often = hard already)

    def lowered() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
        die_with_test_process()

    config = hostile_config(tmp_path)
    marker = uuid.uuid4().hex
    with catflap_serve(["--config", str(config)], env=serve_env(marker), preexec=lowered) as (
        proc,
        port,
        lines,
    ):
        gw = HostileGateway(proc.pid, port, tmp_path, lines)
        wait_until_serving(gw)  # an instance of the open agent is up
        expected = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
        assert open_file_limits(proc.pid) == (expected, expected)
        assert f"open files: {expected} (RLIMIT_NOFILE soft limit raised from {low})" in (
            gw.log_text()
        )
        agents = [pid for pid in marked_processes(marker) if pid != proc.pid]
        # The fork server and the instance: this also shows marked_processes finds agents.
        assert len(agents) >= 2, agents
        for pid in agents:
            assert open_file_limits(pid) == (expected, expected), pid


def test_a_cluster_gateway_on_a_taken_port_exits_at_once(tmp_path: Path) -> None:
    """``catflap gateway`` binds before its pool starts too (it needs no Redis to fail)."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        done = subprocess.run(
            [sys.executable, "-m", "catflap", "gateway", "--config", str(hostile_config(tmp_path))]
            + ["--redis", "redis://127.0.0.1:6379/0", "--listen", f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=seconds(60),
            env=serve_env(uuid.uuid4().hex),
            preexec_fn=die_with_test_process,
        )
    finally:
        holder.close()
    assert done.returncode == EXIT_STARTUP, done.stderr
    assert f"cannot listen on 127.0.0.1:{port}: address already in use" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_message_names_the_metrics_listener_when_its_port_is_taken() -> None:
    exc = OSError(
        errno.EADDRINUSE,
        "error while attempting to bind on address ('127.0.0.1', 9090): address already in use",
    )
    message = str(listen_failure(exc, "127.0.0.1", 8080, option="--listen HOST:PORT"))
    assert message.startswith("cannot listen on 127.0.0.1:9090: address already in use;")
    assert "[gateway] metrics_listen" in message and "--listen" not in message
    privileged = OSError(errno.EACCES, "error while attempting to bind on address ('::', 80)")
    message = str(listen_failure(privileged, "::", 80, option="--listen HOST:PORT"))
    assert message.startswith("cannot listen on [::]:80: permission denied;")
    assert "CAP_NET_BIND_SERVICE" in message and "--listen HOST:PORT" in message


def test_raise_open_file_limit_raises_the_soft_limit_to_the_hard_one() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"hard open-file limit {hard} leaves nothing to raise from")

    def lowered() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    probe = (
        "import resource; from catflap.cli.startup import raise_open_file_limit; "
        "print(raise_open_file_limit(), *resource.getrlimit(resource.RLIMIT_NOFILE))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=seconds(30),
        preexec_fn=lowered,
    )
    assert done.returncode == 0, done.stderr
    returned, soft, hard_after = (int(word) for word in done.stdout.split())
    assert returned == soft == hard_after == hard
