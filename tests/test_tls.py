"""``listen_tls`` end to end: ``wss://`` and ``https://`` on the gateway's own port.

A throwaway CA and its server certificates are made in the test with the ``openssl`` CLI;
every client trusts that CA and verifies the certificate and host name, as a telephony
provider or a browser does. The gateways are real (``running_gateway``, and ``catflap serve``
as a subprocess on uvloop for the SIGHUP reload), and so are the agent and the echo bot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from websockets.asyncio.client import ClientConnection, connect

from catflap.cli.startup import listen_failure
from catflap.config import CatflapConfig, load_config
from catflap.contract import limits
from catflap.contract.errors import ConfigError
from catflap.gateway.timings import Timings
from catflap.gateway.tls import TLS12_CIPHERS, server_context

from .conftest import (
    ECHO,
    PUBLIC_KEY,
    RunningGateway,
    catflap_serve,
    raw_request,
    running_gateway,
    seconds,
    upgrade_request,
)

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

AGENTS: dict[str, dict[str, Any]] = {"echo": {"path": ECHO, "scaling": {"min_agents": 1}}}
#: Handshake-only gateways start no agent process.
NO_AGENT: dict[str, dict[str, Any]] = {"echo": {"path": ECHO, "scaling": {"min_agents": 0}}}
TWILIO_CONNECTED = {"event": "connected", "protocol": "Call", "version": "1.0.0"}


def _twilio_start(service_host: str) -> dict[str, Any]:
    stream = "MZ7f3c0d5b2f6e4e0aa1b2c3d4e5f60718"
    return {
        "event": "start",
        "sequenceNumber": "1",
        "start": {
            "accountSid": "AC11111111111111111111111111111111",
            "streamSid": stream,
            "callSid": "CA0123456789abcdef0123456789abcdef",
            "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            "customParameters": {"_pipecatCloudServiceHost": service_host},
        },
        "streamSid": stream,
    }


# --- a throwaway PKI -------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


@dataclass
class Pki:
    """A CA and server certificates it signed, each ``<name>.pem`` + ``<name>.key``."""

    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "ca.pem"

    def cert(self, name: str) -> Path:
        return self.folder / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.folder / f"{name}.key"

    def leaf(self, name: str, serial: int, *, days: int = 2, san: str = "") -> None:
        san = san or "DNS:localhost,IP:127.0.0.1"
        (self.folder / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        _openssl(
            "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", "/CN=localhost",
            cwd=self.folder,
        )  # fmt: skip
        # -days -1: not after is a day before not before, i.e. expired now.
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-set_serial", str(serial), "-days", str(days), "-out", f"{name}.pem",
            "-extfile", f"{name}.ext",
            cwd=self.folder,
        )  # fmt: skip

    def client(self, **settings: Any) -> ssl.SSLContext:
        """A verifying client that trusts this CA (``settings`` set on the context)."""
        context = ssl.create_default_context(cafile=str(self.ca))
        context.set_alpn_protocols(["h2", "http/1.1"])  # as a browser offers
        for name, value in settings.items():
            setattr(context, name, value)
        return context

    def install(self, name: str, cert: Path, key: Path) -> None:
        """Put certificate ``name`` at ``cert``/``key``, each by an atomic rename (as certbot's
        symlink swap): a poll never sees the new certificate beside the old key for long."""
        for source, target in ((self.key(name), key), (self.cert(name), cert)):
            staged = target.with_suffix(".new")
            shutil.copyfile(source, staged)
            os.replace(staged, target)


@pytest.fixture(scope="module")
def pki() -> Iterator[Pki]:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make the test certificates")
    folder = Path(tempfile.mkdtemp(prefix="cftls"))
    try:
        _openssl(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=catflap test CA",
            cwd=folder,
        )  # fmt: skip
        made = Pki(folder)
        made.leaf("first", 1)
        made.leaf("second", 2)
        made.leaf("expired", 3, days=-1)
        made.leaf("elsewhere", 4, san="DNS:elsewhere.example")
        yield made
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _with_tls(cert: Path, key: Path, **gateway: Any) -> Any:
    def adjust(config: CatflapConfig) -> CatflapConfig:
        update = {"listen_tls": "127.0.0.1:0", "tls_cert": cert, "tls_key": key}
        config = config.model_copy(update={**update, "public_url": None})
        if gateway:
            config = config.model_copy(
                update={"gateway": config.gateway.model_copy(update=gateway)}
            )
        return config

    return adjust


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gw(pki: Pki) -> AsyncIterator[RunningGateway]:
    # Its own copy of the first certificate: the reload tests rewrite these files.
    folder = Path(tempfile.mkdtemp(prefix="cftlsgw"))
    cert, key = folder / "fullchain.pem", folder / "privkey.pem"
    pki.install("first", cert, key)
    try:
        async with running_gateway(AGENTS, adjust=_with_tls(cert, key)) as running:
            await running.wait_ready("echo.my-org")
            yield running
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def wss(gw: RunningGateway) -> str:
    return f"wss://127.0.0.1:{gw.gateway.tls_port}"


async def hello(ws: ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(seconds(10)):
        frame = await ws.recv()
    assert isinstance(frame, str)
    result: dict[str, Any] = json.loads(frame)
    return result


async def echoes(ws: ClientConnection, payload: bytes) -> None:
    await ws.send(payload)
    async with asyncio.timeout(seconds(10)):
        assert await ws.recv() == payload


def serial_of(ws: ClientConnection) -> str:
    peer = ws.transport.get_extra_info("ssl_object").getpeercert()
    return str(peer["serialNumber"])


def tls_refusals(gw: RunningGateway, reason: str) -> float:
    value = gw.gateway.metrics.registry.get_sample_value(
        "catflap_handshake_refusals_total", {"status": "tls", "reason": reason}
    )
    return value or 0.0


# --- sessions over TLS --------------------------------------------------------------------------


async def test_a_generic_session_over_wss_relays_on_the_event_loop(
    gw: RunningGateway, pki: Pki
) -> None:
    async with connect(f"{wss(gw)}/ws/generic/echo.my-org", ssl=pki.client()) as ws:
        first = await hello(ws)
        assert first["transport_type"] == "websocket"
        tls_object = ws.transport.get_extra_info("ssl_object")
        assert tls_object.selected_alpn_protocol() == "http/1.1"
        assert tls_object.version() in {"TLSv1.2", "TLSv1.3"}
        for size in (1, 320, 70_000):  # one past the relay's high-water mark too
            await echoes(ws, os.urandom(size))
        tls_relays = [
            relay
            for relay in gw.gateway.relays.values()
            if relay.client.transport.get_extra_info("sslcontext") is not None
        ]
        assert len(tls_relays) == 1
        assert not tls_relays[0].in_lane  # the lane moves socket bytes: here, ciphertext
        async with connect(f"{gw.ws}/ws/generic/echo.my-org") as plain:
            await hello(plain)
            await echoes(plain, b"plain beside TLS")


async def test_a_provider_endpoint_over_wss_replays_the_opening(
    gw: RunningGateway, pki: Pki
) -> None:
    opening = [json.dumps(TWILIO_CONNECTED), json.dumps(_twilio_start("echo.my-org"))]
    async with connect(f"{wss(gw)}/ws/twilio", ssl=pki.client()) as ws:
        for text in opening:
            await ws.send(text)
        assert (await hello(ws))["transport_type"] is None
        async with asyncio.timeout(seconds(10)):
            assert [await ws.recv() for _ in opening] == opening


async def test_start_over_https_returns_a_wss_url_that_works(gw: RunningGateway, pki: Pki) -> None:
    base = f"https://127.0.0.1:{gw.gateway.tls_port}"
    async with httpx.AsyncClient(verify=pki.client()) as client:
        response = await client.post(
            f"{base}/v1/public/echo/start",
            json={"transport": "websocket"},
            headers={"Authorization": f"Bearer {PUBLIC_KEY}"},
        )
        assert (await client.get(f"{base}/livez")).json() == {"status": "ok"}
    assert response.status_code == 200, response.text
    # No public_url: the default is wss:// on listen_tls as configured (port 0 in the test).
    assert response.json()["wsUrl"] == "wss://127.0.0.1:0/ws/generic/echo.my-org"
    url = f"{wss(gw)}/ws/generic/echo.my-org"
    async with connect(url, ssl=pki.client()) as ws:
        await hello(ws)


async def test_public_url_defaults_to_wss_on_listen_tls() -> None:
    config = CatflapConfig(listen_tls="0.0.0.0:443", tls_cert=Path("c"), tls_key=Path("k"))
    assert config.ws_base_url == "wss://0.0.0.0"
    config = config.model_copy(update={"listen_tls": "127.0.0.1:8443"})
    assert config.ws_base_url == "wss://127.0.0.1:8443"
    config = config.model_copy(update={"public_url": "wss://voice.example.com/"})
    assert config.ws_base_url == "wss://voice.example.com"


# --- what the TLS port refuses ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "client", "problem"),
    [
        ("expired", {}, "certificate has expired"),
        ("elsewhere", {}, "Hostname mismatch, certificate is not valid for 'localhost'"),
    ],
    ids=["expired", "wrong-host"],
)
async def test_a_verifying_client_refuses_a_bad_certificate(
    pki: Pki, name: str, client: dict[str, Any], problem: str
) -> None:
    adjust = _with_tls(pki.cert(name), pki.key(name))
    async with running_gateway(NO_AGENT, adjust=adjust) as gw:
        with pytest.raises(ssl.SSLCertVerificationError, match=problem):
            await asyncio.open_connection(
                "127.0.0.1",
                gw.gateway.tls_port,
                ssl=pki.client(**client),
                server_hostname="localhost",
            )


async def test_old_protocols_and_cbc_ciphers_are_refused(gw: RunningGateway, pki: Pki) -> None:
    before = tls_refusals(gw, "tls_handshake_failed")
    tls11 = pki.client()
    with pytest.warns(DeprecationWarning):
        tls11.minimum_version = tls11.maximum_version = ssl.TLSVersion.TLSv1_1
    tls11.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer TLS 1.1 at all
    cbc = pki.client(maximum_version=ssl.TLSVersion.TLSv1_2)
    cbc.set_ciphers("ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA:AES128-SHA")
    for context in (tls11, cbc):
        with pytest.raises(OSError) as refused:
            await asyncio.open_connection("127.0.0.1", gw.gateway.tls_port, ssl=context)
        # Refused by the gateway, not by the client before it sent anything.
        assert getattr(refused.value, "reason", None) != "NO_PROTOCOLS_AVAILABLE"
    assert tls_refusals(gw, "tls_handshake_failed") == before + 2
    tls12 = pki.client(maximum_version=ssl.TLSVersion.TLSv1_2)
    _, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.tls_port, ssl=tls12)
    cipher, version, _ = writer.get_extra_info("ssl_object").cipher()
    assert (version, cipher in TLS12_CIPHERS.split(":")) == ("TLSv1.2", True)
    writer.close()


@pytest.mark.parametrize(
    "request_bytes",
    [upgrade_request("/ws/generic/echo.my-org"), b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n"],
    ids=["upgrade", "api"],
)
async def test_plain_http_on_the_tls_port_gets_400(
    gw: RunningGateway, request_bytes: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, "catflap"):
        response = await raw_request(gw.gateway.tls_port, request_bytes)
    assert response.status == 400
    assert response.json() == {
        "error": "the plain HTTP request was sent to the TLS port; use https:// or wss://",
        "code": "plain_http_on_tls_port",
    }
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_bytes_that_are_neither_tls_nor_http_are_closed(gw: RunningGateway) -> None:
    before = tls_refusals(gw, "not_tls")
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.tls_port)
    writer.write(b"\x00\x01\x02\x03")
    async with asyncio.timeout(seconds(5)):
        # Closed with the garbage unread, the kernel may reset instead: closed either way.
        with contextlib.suppress(ConnectionResetError):
            assert await reader.read() == b""
    writer.close()
    assert tls_refusals(gw, "not_tls") == before + 1


async def test_a_silent_or_stalled_handshake_is_closed_at_the_bound(pki: Pki) -> None:
    assert Timings().tls_handshake == limits.TLS_HANDSHAKE_TIMEOUT_S
    bound = seconds(0.5)
    adjust = _with_tls(pki.cert("first"), pki.key("first"))
    async with running_gateway(NO_AGENT, adjust=adjust, timings={"tls_handshake": bound}) as gw:
        # Nothing at all, then half a ClientHello record header.
        for first in (b"", b"\x16\x03\x01"):
            started = time.monotonic()
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.tls_port)
            writer.write(first)
            async with asyncio.timeout(seconds(5)):
                assert await reader.read() == b""
            took = time.monotonic() - started
            writer.close()
            assert bound * 0.9 <= took < bound + seconds(1.0), took
        assert tls_refusals(gw, "tls_handshake_timeout") == 2
        assert gw.gateway.open_connections() == 0


async def test_handshakes_count_in_max_connections(pki: Pki) -> None:
    adjust = _with_tls(pki.cert("first"), pki.key("first"), max_connections=3)
    async with running_gateway(NO_AGENT, adjust=adjust) as gw:
        port = gw.gateway.tls_port
        silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        async with asyncio.timeout(seconds(5)):
            while gw.gateway.open_connections() < 3:
                await asyncio.sleep(0.01)
        # A fourth: the oldest handshake makes room (it has sent nothing), as an idle plain
        # connection would.
        newcomer = await asyncio.open_connection("127.0.0.1", port, ssl=pki.client())
        async with asyncio.timeout(seconds(5)):
            assert await silent[0][0].read() == b""
        assert gw.gateway.open_connections() == 3
        for _, writer in [*silent, newcomer]:
            writer.close()


# --- certificate reloads -----------------------------------------------------------------------


async def test_a_reload_keeps_live_sessions_and_new_handshakes_get_the_new_certificate(
    gw: RunningGateway, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    tls = gw.gateway.tls
    assert tls is not None
    certificate = tls.certificate
    certificate.poll_interval = seconds(0.1)
    certificate.request_reload()  # wake the watcher so that it polls at the short interval
    async with asyncio.timeout(seconds(5)):
        while certificate.reloads < 1:
            await asyncio.sleep(0.02)
    url = f"{wss(gw)}/ws/generic/echo.my-org"
    async with connect(url, ssl=pki.client()) as before:
        await hello(before)
        assert serial_of(before) == "01"
        pki.install("second", certificate.cert, certificate.key)  # the files change: no signal
        async with asyncio.timeout(seconds(5)):
            while certificate.reloads < 2:
                await asyncio.sleep(0.02)
        async with connect(url, ssl=pki.client()) as after:
            await hello(after)
            assert serial_of(after) == "02"
        await echoes(before, b"still relayed after the reload")
        # A file that does not load: the error is logged, the second certificate stays.
        with caplog.at_level(logging.ERROR, "catflap.gateway"):
            certificate.cert.write_text("-----BEGIN CERTIFICATE-----\nbroken\n")
            certificate.request_reload()
            async with asyncio.timeout(seconds(5)):
                while "not reloaded" not in caplog.text:
                    await asyncio.sleep(0.02)
        assert f"{certificate.cert}: tls_cert: not a valid PEM certificate chain" in caplog.text
        async with connect(url, ssl=pki.client()) as third:
            assert serial_of(third) == "02"
        await echoes(before, b"and after the failed one")
    pki.install("first", certificate.cert, certificate.key)
    certificate.request_reload()
    certificate.poll_interval = limits.TLS_CERT_POLL_INTERVAL_S


def _serve_config(folder: Path, cert: Path, key: Path) -> Path:
    path = folder / "catflap.toml"
    path.write_text(
        'listen = "127.0.0.1:0"\nlisten_tls = "127.0.0.1:0"\n'
        f'tls_cert = "{cert}"\ntls_key = "{key}"\n'
        "[organizations.my-org]\n"
        f'public_keys = ["{PUBLIC_KEY}"]\n'
        "[organizations.my-org.agents.echo]\n"
        f'path = "{ECHO}"\n'
        "[organizations.my-org.agents.echo.scaling]\nmin_agents = 1\n"
    )
    return path


async def _wait_for_line(lines: list[str], pattern: str, *, after: int = 0) -> re.Match[str]:
    async with asyncio.timeout(seconds(30)):
        while True:
            for line in lines[after:]:
                match = re.search(pattern, line)
                if match:
                    return match
            await asyncio.sleep(0.05)


async def test_sighup_reloads_catflap_serve_without_dropping_a_session(pki: Pki) -> None:
    folder = Path(tempfile.mkdtemp(prefix="cftlsserve"))
    cert, key = folder / "fullchain.pem", folder / "privkey.pem"
    pki.install("first", cert, key)
    try:
        config = _serve_config(folder, cert, key)
        with catflap_serve(["--config", str(config), "--log-format", "text"]) as (proc, _, lines):
            port = int((await _wait_for_line(lines, r"listening for TLS on [\d.]+:(\d+)"))[1])
            url = f"wss://127.0.0.1:{port}/ws/generic/echo.my-org"
            async with connect(url, ssl=pki.client(), open_timeout=seconds(30)) as before:
                await hello(before)
                assert serial_of(before) == "01"
                pki.install("second", cert, key)
                mark = len(lines)
                proc.send_signal(signal.SIGHUP)
                await _wait_for_line(lines, "TLS certificate reloaded", after=mark)
                async with connect(url, ssl=pki.client()) as after:
                    await hello(after)
                    assert serial_of(after) == "02"
                await echoes(before, b"relayed across the SIGHUP")
            # On uvloop too: plain HTTP is answered, a TLS 1.1 client refused, nothing logged.
            assert (await raw_request(port, upgrade_request("/ws/generic/x"))).status == 400
            tls11 = pki.client()
            with pytest.warns(DeprecationWarning):
                tls11.minimum_version = tls11.maximum_version = ssl.TLSVersion.TLSv1_1
            tls11.set_ciphers("DEFAULT:@SECLEVEL=0")
            with pytest.raises(OSError):
                await asyncio.open_connection("127.0.0.1", port, ssl=tls11)
            with socket.create_connection(("127.0.0.1", port)) as raw:
                raw.sendall(b"\x16\x03\x01\x00\x05hello")  # a broken ClientHello
                raw.settimeout(seconds(5))
                while raw.recv(100):  # an alert at most, then the end
                    pass
            await asyncio.sleep(0.2)
            assert proc.poll() is None
        text = "\n".join(lines)
        assert "Traceback" not in text and " ERROR " not in text, text
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --- configuration -------------------------------------------------------------------------------


async def test_tls_keys_go_together(tmp_path: Path) -> None:
    base = f'[organizations.my-org.agents.echo]\npath = "{ECHO}"\n'
    cases = {
        'tls_cert = "c.pem"\n': "tls_cert: is set but listen_tls is not",
        'listen_tls = "0.0.0.0:443"\ntls_cert = "c.pem"\n': "tls_key: listen_tls needs tls_key",
        'listen_tls = "443"\ntls_cert = "c"\ntls_key = "k"\n': "listen_tls: expected host:port",
    }
    for head, problem in cases.items():
        path = tmp_path / "catflap.toml"
        path.write_text(head + base)
        with pytest.raises(ConfigError, match=re.escape(problem)):
            load_config(path)
    path.write_text('listen_tls = "0.0.0.0:443"\ntls_cert = "c.pem"\ntls_key = "k.pem"\n' + base)
    loaded = load_config(path)
    assert (loaded.tls_cert, loaded.tls_key) == (tmp_path / "c.pem", tmp_path / "k.pem")


async def test_files_that_do_not_load_say_which_and_why(pki: Pki, tmp_path: Path) -> None:
    first, second = pki.cert("first"), pki.key("second")
    cases = [
        (first, tmp_path / "missing.key", "tls_key: no such file"),
        (first, second, "tls_key: this key does not belong to the certificate"),
        (pki.key("first"), pki.key("first"), "tls_cert: holds no PEM certificate"),
        (first, first, "tls_key: holds no PEM private key"),
    ]
    for cert, key, problem in cases:
        with pytest.raises(ConfigError, match=re.escape(problem)):
            server_context(cert, key)
    encrypted = tmp_path / "encrypted.key"
    _openssl(
        "pkey", "-in", str(pki.key("first")), "-out", str(encrypted), "-aes256",
        "-passout", "pass:secret", cwd=tmp_path,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="the key is encrypted"):
        server_context(first, encrypted)


async def test_a_taken_tls_port_names_listen_tls(pki: Pki) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]

    def adjust(config: CatflapConfig) -> CatflapConfig:
        return _with_tls(pki.cert("first"), pki.key("first"))(config).model_copy(
            update={"listen_tls": f"127.0.0.1:{port}"}
        )

    try:
        with pytest.raises(OSError) as failed:
            async with running_gateway(NO_AGENT, adjust=adjust):
                pass
    finally:
        taken.close()
    message = str(listen_failure(failed.value, "127.0.0.1", 8080, tls=("127.0.0.1", port)))
    assert message.startswith(f"cannot listen on 127.0.0.1:{port}: address already in use;")
    assert message.endswith(
        "choose another address with --listen-tls HOST:PORT (or listen_tls in the config file)"
    )


async def test_catflap_serve_stops_at_start_on_a_mismatched_key(pki: Pki, tmp_path: Path) -> None:
    config = _serve_config(tmp_path, pki.cert("first"), pki.key("second"))
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "catflap", "serve", "--config", str(config)],
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(seconds(60)):
        _, err = await proc.communicate()
    stderr = err.decode()
    assert proc.returncode == 2, stderr
    assert (
        f"catflap: configuration error: {pki.key('second')}: tls_key: this key does not belong "
        f"to the certificate in {pki.cert('first')}; give its own key"
    ) in stderr
    assert "Traceback" not in stderr


async def test_serve_flags_give_listen_tls_and_need_both_files(pki: Pki) -> None:
    argv = [sys.executable, "-m", "catflap", "serve", str(ECHO), "--org", "my-org"]
    argv += ["--listen", "127.0.0.1:0", "--listen-tls", "127.0.0.1:0"]
    proc = await asyncio.create_subprocess_exec(
        *argv, "--tls-cert", str(pki.cert("first")), stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(seconds(60)):
        _, err = await proc.communicate()
    assert proc.returncode == 2, err.decode()
    assert (
        "--listen-tls/--tls-cert/--tls-key: tls_key: listen_tls needs tls_key: the PEM file "
        "with the private key"
    ) in err.decode()
    argv += ["--tls-cert", str(pki.cert("first")), "--tls-key", str(pki.key("first"))]
    with catflap_serve([*argv[4:], "--log-format", "text"]) as (_, _, lines):
        port = int((await _wait_for_line(lines, r"listening for TLS on [\d.]+:(\d+)"))[1])
        url = f"wss://127.0.0.1:{port}/ws/generic/my-agent.my-org"
        async with connect(url, ssl=pki.client(), open_timeout=seconds(30)) as ws:
            await hello(ws)
            await echoes(ws, b"zero-config over wss")
