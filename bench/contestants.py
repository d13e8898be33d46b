"""The contestants and their upstream, each a context manager that starts and always stops it.

- ``direct``: the load client talks to the upstream itself (the physical floor);
- ``nginx``: Debian's nginx, one worker, as a WebSocket reverse proxy in front of the upstream;
- ``catflap``: ``catflap serve`` with a generated config whose agent runs the same fast echo bot.

With :class:`TlsFiles` (the ``telephony-tls`` scenario) nginx and catflap terminate TLS with the
same self-signed certificate (ECDSA P-256) and the same protocols and TLS 1.2 ciphers, those of
:mod:`catflap.gateway.tls`; the load client trusts it and verifies it.

The upstream of ``direct`` and ``nginx`` is a standalone catflap agent runtime
(``python -m catflap.runtime.main``) serving ``bench/bots/fast-echo`` on TCP; catflap's gateway
starts its own instance of the same runtime and bot, and reaches it over a Unix socket.

Placement (anchors §2.3): the relay (nginx, the gateway) runs alone on the relay core; the load
client and every upstream run on the load core.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.loadgen import OP_BINARY, FrameTemplate, control_frame, upgrade_request
from bench.procs import Child, agent_instances_of, children_of, free_port, pin, spawn, wait_port
from catflap.gateway.tls import TLS12_CIPHERS

__all__ = [
    "FAST_ECHO",
    "PIPECAT_ECHO",
    "Endpoint",
    "TlsFiles",
    "catflap_gateway",
    "ensure_nginx",
    "nginx",
    "nginx_version",
    "probe",
    "upstream",
]

REPO = Path(__file__).resolve().parent.parent
FAST_ECHO = REPO / "bench" / "bots" / "fast-echo"
PIPECAT_ECHO = REPO / "examples" / "pipecat-echo"
#: The runtime serves the agent side of the contract on this path.
AGENT_PATH = "/ws"
ORG = "bench-org"
START_TIMEOUT_S = 60.0


@dataclass
class Endpoint:
    """Where a contestant listens and which processes to watch."""

    name: str
    port: int
    path: str
    #: CPU of these is the relay's (nginx: master + worker; catflap: the gateway).
    relay_pids: list[int] = field(default_factory=list)
    #: The echo upstream's process (for direct, the only process measured).
    upstream_pid: int = 0
    child: Child | None = None

    def cpu_pids(self) -> dict[str, int]:
        pids = {f"relay{i}": pid for i, pid in enumerate(self.relay_pids)}
        pids["upstream"] = self.upstream_pid
        return pids


def _runtime_argv(bot_dir: Path, listen: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "catflap.runtime.main",
        "--bot-dir",
        str(bot_dir),
        "--listen",
        listen,
        "--log-level",
        "warning",
    ]


@contextlib.contextmanager
def upstream(workdir: Path, cpus: set[int]) -> Iterator[Endpoint]:
    """A standalone agent runtime with the fast echo bot on ``tcp:127.0.0.1:<any>``."""
    child = spawn(
        "upstream",
        _runtime_argv(FAST_ECHO, "tcp:127.0.0.1:0"),
        cpus=cpus,
        log_path=workdir / "upstream.log",
        cwd=FAST_ECHO,
        stdout=subprocess.PIPE,
    )
    try:
        port = _read_listen_port(child)
        endpoint = Endpoint("direct", port, AGENT_PATH, [], child.pid, child)
        probe(port, AGENT_PATH)
        yield endpoint
    finally:
        child.stop()


def _read_listen_port(child: Child) -> int:
    """The runtime prints ``catflap agent listening on tcp:HOST:PORT`` once it serves."""
    assert child.popen.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT_S
    line = b""
    while time.monotonic() < deadline and not line.endswith(b"\n"):
        ready, _, _ = select.select([child.popen.stdout], [], [], 0.2)
        if ready:
            chunk = os.read(child.popen.stdout.fileno(), 4096)
            if not chunk:
                break
            line += chunk
    text = line.decode(errors="replace").strip()
    if "listening on tcp:" not in text:
        raise RuntimeError(f"the upstream runtime did not start ({text!r}):\n{child.log_tail()}")
    return int(text.rsplit(":", 1)[1])


# --- TLS --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """A self-signed certificate for ``127.0.0.1``: the server's chain, its key, and the CA the
    load client trusts (the certificate itself)."""

    cert: Path
    key: Path

    @classmethod
    def make(cls, workdir: Path) -> TlsFiles:
        """ECDSA P-256, as ACME clients issue by default now; made with the ``openssl`` CLI."""
        cert, key = workdir / "tls-cert.pem", workdir / "tls-key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
            + ["-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2"]
            + ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        return cls(cert, key)

    def client(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.cert))
        context.set_alpn_protocols(["http/1.1"])
        return context


# --- nginx ------------------------------------------------------------------------------------


def ensure_nginx() -> str:
    """The nginx binary; installs Debian's ``nginx-light`` with apt-get when it is missing."""
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else "")
    if found:
        return found
    if shutil.which("apt-get") is None:
        raise RuntimeError("nginx is not installed and apt-get is not available")
    print("bench: nginx missing; installing Debian's nginx-light with apt-get", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "nginx-light"]
    if subprocess.run(install, env=env, timeout=600, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, timeout=600, check=True)
        subprocess.run(install, env=env, timeout=600, check=True)
    found = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(found).exists():
        raise RuntimeError("apt-get installed nginx-light but no nginx binary was found")
    return found


def nginx_version(binary: str) -> str:
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10, check=False)
    return (out.stderr or out.stdout).strip().removeprefix("nginx version: ")


_NGINX_CONF = """\
worker_processes 1;
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {dir}/tmp-body;
    proxy_temp_path {dir}/tmp-proxy;
    fastcgi_temp_path {dir}/tmp-fastcgi;
    uwsgi_temp_path {dir}/tmp-uwsgi;
    scgi_temp_path {dir}/tmp-scgi;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    server {{
        listen 127.0.0.1:{port}{listen_tls} backlog=4096;
{tls}        location / {{
            proxy_pass http://127.0.0.1:{upstream_port};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_buffering off;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
    }}
}}
"""


#: catflap's TLS settings (catflap.gateway.tls), in nginx's words.
_NGINX_TLS = """\
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_ciphers {ciphers};
        ssl_prefer_server_ciphers off;
"""


@contextlib.contextmanager
def nginx(
    binary: str, workdir: Path, up: Endpoint, cpus: set[int], *, tls: TlsFiles | None = None
) -> Iterator[Endpoint]:
    """nginx, one worker, proxying WebSocket upgrades to ``up``; pinned to ``cpus``. With
    ``tls``, its port speaks TLS (``listen ... ssl``)."""
    conf_dir = workdir / "nginx"
    conf_dir.mkdir(exist_ok=True)
    port = free_port()
    conf = conf_dir / "nginx.conf"
    tls_lines = ""
    if tls is not None:
        tls_lines = _NGINX_TLS.format(cert=tls.cert, key=tls.key, ciphers=TLS12_CIPHERS)
    conf.write_text(
        _NGINX_CONF.format(
            dir=conf_dir,
            port=port,
            upstream_port=up.port,
            listen_tls=" ssl" if tls is not None else "",
            tls=tls_lines,
        )
    )
    child = spawn(
        "nginx",
        [binary, "-p", str(conf_dir), "-e", str(conf_dir / "error.log"), "-c", str(conf)],
        cpus=cpus,
        log_path=conf_dir / "stderr.log",
    )
    try:
        wait_port(port, timeout=START_TIMEOUT_S, child=child)
        workers = _wait_children(child.pid, 1)
        probe(port, AGENT_PATH, tls=None if tls is None else tls.client())
        yield Endpoint("nginx", port, AGENT_PATH, [child.pid, *workers], up.upstream_pid, child)
    finally:
        child.stop()
        if child.log_path is not None:
            err = conf_dir / "error.log"
            if err.exists() and err.stat().st_size:
                child.log_path.write_bytes(child.log_path.read_bytes() + err.read_bytes())


def _wait_children(pid: int, count: int, *, timeout: float = START_TIMEOUT_S) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = children_of(pid)
        if len(found) >= count:
            return found
        time.sleep(0.05)
    raise TimeoutError(f"process {pid} has fewer than {count} children after {timeout:g} s")


# --- catflap ----------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    return json.dumps(str(value)) if isinstance(value, Path) else json.dumps(value)


def gateway_config(
    agents: dict[str, dict[str, Any]],
    port: int,
    *,
    native_relay: bool = True,
    relay_thread_nice: int | None = None,
    relay_thread_slice_us: int | None = None,
    tls: tuple[int, TlsFiles] | None = None,
    fork_server: bool = True,
) -> str:
    """A ``catflap.toml`` with one organization (``bench-org``) and the given agents;
    ``relay_thread_nice`` and ``relay_thread_slice_us`` None keep catflap's defaults; ``tls``:
    a ``listen_tls`` port and its certificate."""
    lines = [f'listen = "127.0.0.1:{port}"']
    if tls is not None:
        lines += [
            f'listen_tls = "127.0.0.1:{tls[0]}"',
            f"tls_cert = {_toml_value(tls[1].cert)}",
            f"tls_key = {_toml_value(tls[1].key)}",
        ]
    lines += [
        "[gateway]",
        "agent_ready_timeout = 60",
        "drain_timeout = 1",
        f"native_relay = {'true' if native_relay else 'false'}",
        *([] if relay_thread_nice is None else [f"relay_thread_nice = {relay_thread_nice}"]),
        *(
            []
            if relay_thread_slice_us is None
            else [f"relay_thread_slice_us = {relay_thread_slice_us}"]
        ),
        f"fork_server = {'true' if fork_server else 'false'}",
        # Every bench client connects from 127.0.0.1, hundreds of starts a second: exempt it
        # from the per-address start rate, which would otherwise refuse most of the load. (An
        # attacker bound to another loopback address would meet the limit.)
        'session_starts_exempt = ["127.0.0.1/32"]',
        f"[organizations.{ORG}]",
        'public_keys = ["pk_bench"]',
    ]
    for name, settings in agents.items():
        # Instances see none of catflap's environment but what pass_env names: the fast-echo
        # bot reads CATFLAP_BENCH_ECHO.
        settings = {"pass_env": ["CATFLAP_BENCH_ECHO"], **settings}
        scaling = settings.pop("scaling", {})
        lines.append(f"[organizations.{ORG}.agents.{name}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in settings.items()]
        lines.append(f"[organizations.{ORG}.agents.{name}.scaling]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in scaling.items()]
    return "\n".join(lines) + "\n"


@dataclass
class Gateway:
    """A running ``catflap serve``."""

    child: Child
    port: int
    load_cpus: set[int]
    #: The ``listen_tls`` port, when there is one: sessions of :meth:`endpoint` go there.
    tls_port: int | None = None

    def path(self, agent: str) -> str:
        return f"/ws/generic/{agent}.{ORG}"

    def agents(self) -> list[int]:
        """The pids of the agent instances the gateway started."""
        return agent_instances_of(self.child.pid)

    def pin_agents(self, *, leave: Path | None = None) -> list[int]:
        """Move every agent instance to the load core (they inherit the gateway's core), but
        those of the bot at ``leave``; returns the pids moved."""
        pids, left = [], 0
        for pid in self.agents():
            if leave is not None:
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        argv = f.read().split(b"\0")
                except OSError:
                    continue
                # A fork server's children keep its command line, which names the bot's folder
                # as catflap resolved it.
                if any(Path(os.fsdecode(arg)).resolve() == leave.resolve() for arg in argv if arg):
                    left += 1
                    continue
            pin(pid, self.load_cpus)
            pids.append(pid)
        if leave is not None and not left:
            raise RuntimeError(f"no agent instance of {leave} found to leave on the gateway's core")
        return pids

    def endpoint(self, agent: str, *, leave: Path | None = None) -> Endpoint:
        pids = self.pin_agents(leave=leave)
        port = self.port if self.tls_port is None else self.tls_port
        return Endpoint("catflap", port, self.path(agent), [self.child.pid], pids[0] if pids else 0)


@contextlib.contextmanager
def catflap_gateway(
    workdir: Path,
    agents: dict[str, dict[str, Any]],
    *,
    relay_cpus: set[int],
    load_cpus: set[int],
    name: str = "catflap",
    native_relay: bool = True,
    relay_thread_nice: int | None = None,
    relay_thread_slice_us: int | None = None,
    tls: TlsFiles | None = None,
    fork_server: bool = True,
    env: dict[str, str] | None = None,
) -> Iterator[Gateway]:
    """``python -m catflap serve --config <generated>`` on a free port, pinned to ``relay_cpus``;
    with ``tls``, on a ``listen_tls`` port beside it too.

    ``env`` is added to this process's environment for the gateway (and so for its fork
    servers and agent instances).
    """
    port = free_port()
    tls_port = None if tls is None else free_port()
    config = workdir / f"{name}.toml"
    tls_listen = None if tls is None or tls_port is None else (tls_port, tls)
    config.write_text(
        gateway_config(
            agents,
            port,
            native_relay=native_relay,
            relay_thread_nice=relay_thread_nice,
            relay_thread_slice_us=relay_thread_slice_us,
            tls=tls_listen,
            fork_server=fork_server,
        )
    )
    child = spawn(
        name,
        [sys.executable, "-m", "catflap", "serve", "--config", str(config)]
        + ["--log-level", "warning"],
        cpus=relay_cpus,
        log_path=workdir / f"{name}.log",
        cwd=workdir,
        env=None if env is None else {**os.environ, **env},
    )
    try:
        wait_port(port, timeout=START_TIMEOUT_S, child=child)
        if tls_port is not None:
            wait_port(tls_port, timeout=START_TIMEOUT_S, child=child)
        yield Gateway(child, port, load_cpus, tls_port)
    finally:
        child.stop()


# --- probing ----------------------------------------------------------------------------------


def probe(
    port: int,
    path: str,
    *,
    payload: bytes | None = None,
    timeout: float = START_TIMEOUT_S,
    tls: ssl.SSLContext | None = None,
) -> float:
    """Open one session (over TLS with ``tls``), send one binary frame and wait for any data
    frame back.

    Retries refusals (503 while an agent starts) until ``timeout``; returns the seconds it took.
    """
    deadline = time.monotonic() + timeout
    started = time.monotonic()
    last = ""
    while time.monotonic() < deadline:
        try:
            if _probe_once(port, path, payload, deadline - time.monotonic(), tls):
                return time.monotonic() - started
            last = "no echo"
        except OSError as exc:
            last = repr(exc)
        time.sleep(0.1)
    raise TimeoutError(f"no echo through 127.0.0.1:{port}{path} within {timeout:g} s ({last})")


def _probe_once(
    port: int, path: str, payload: bytes | None, timeout: float, tls: ssl.SSLContext | None
) -> bool:
    key = os.urandom(4)
    with contextlib.ExitStack() as stack:
        sock = stack.enter_context(
            socket.create_connection(("127.0.0.1", port), timeout=max(0.1, timeout))
        )
        if tls is not None:
            sock = stack.enter_context(tls.wrap_socket(sock, server_hostname="127.0.0.1"))
        sock.sendall(upgrade_request("127.0.0.1", port, path))
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(65536)
            if not chunk:
                return False
            head += chunk
        if not head.startswith(b"HTTP/1.1 101"):
            return False
        if payload is None:
            frame = FrameTemplate(64, key).frame(1, 0)
        else:
            frame = control_frame(OP_BINARY, payload, key)
        sock.sendall(frame)
        rest = head.split(b"\r\n\r\n", 1)[1]
        while len(rest) < 2:
            chunk = sock.recv(65536)
            if not chunk:
                return False
            rest += chunk
        ok = rest[0] & 0x0F in (0x1, 0x2)
        sock.sendall(control_frame(0x8, b"\x03\xe8", key))
        return ok
