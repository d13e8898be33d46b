"""`catflap serve` as a user runs it, driven with the documented Pipecat Cloud snippets."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
from websockets.sync.client import connect

from .conftest import ECHO, catflap_serve, seconds

pytestmark = pytest.mark.slow  # end to end: real gateways, agent processes

CATFLAP = [sys.executable, "-m", "catflap"]


@contextmanager
def serve(
    *args: str, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """Run `catflap serve ... --listen 127.0.0.1:0`; yield the process and its port."""
    with catflap_serve([*args, "--listen", "127.0.0.1:0"], env=env) as (proc, port, _):
        yield proc, port


def test_zero_config_serve_echoes_and_exits_0_on_sigterm() -> None:
    with serve(str(ECHO), "--org", "my-org") as (proc, port):
        with connect(
            f"ws://127.0.0.1:{port}/ws/generic/my-agent.my-org", open_timeout=seconds(30)
        ) as ws:
            first = json.loads(ws.recv(timeout=seconds(10)))
            assert first["body"] is None
            ws.send("hi")
            assert ws.recv(timeout=seconds(5)) == "hi"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=seconds(15)) == 0


def test_documented_token_flow_with_config_file(tmp_path: Path) -> None:
    config = tmp_path / "catflap.toml"
    config.write_text(
        '[organizations.my-org]\npublic_keys = ["pk_test_123"]\n'
        f'[organizations.my-org.agents.my-agent]\npath = "{ECHO}"\nwebsocket_auth = "token"\n'
    )
    env = {"CATFLAP_TOKEN_KEYS": "k1:first-secret,k0:older-secret"}
    with serve("--config", str(config), "--public-url", "wss://voice.example.com", env=env) as (
        _,
        port,
    ):
        # The Pipecat Cloud docs' snippet, with only the host changed:
        response = requests.post(
            f"http://127.0.0.1:{port}/v1/public/my-agent/start",
            headers={"Authorization": "Bearer pk_test_123"},
            json={"transport": "websocket", "body": {"caller_id": "abc123"}},
            timeout=seconds(10),
        )
        assert response.status_code == 200
        data = response.json()
        assert data["wsUrl"] == "wss://voice.example.com/ws/generic/my-agent.my-org"
        url = f"ws://127.0.0.1:{port}/ws/generic/my-agent.my-org?body={data['body']}"
        with connect(
            url,
            additional_headers={"Authorization": f"Bearer {data['token']}"},
            open_timeout=seconds(30),
        ) as ws:
            first = json.loads(ws.recv(timeout=seconds(10)))
        assert first == {
            "session_id": data["sessionId"],
            "body": {"caller_id": "abc123"},
            "transport_type": "websocket",
        }


def test_bad_config_exits_2_naming_file_and_key(tmp_path: Path) -> None:
    config = tmp_path / "catflap.toml"
    config.write_text(f'[organizations.my-org.agents.my-agent]\npath = "{ECHO}"\ncolour = 1\n')
    result = subprocess.run(
        [*CATFLAP, "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=seconds(30),
    )
    assert result.returncode == 2
    assert f"{config}: organizations.my-org.agents.my-agent.colour: unknown key" in result.stderr


def test_serve_dashboard_flag_serves_the_live_view() -> None:
    with serve(str(ECHO), "--org", "my-org", "--dashboard") as (_, port):
        page = requests.get(f"http://127.0.0.1:{port}/dashboard", timeout=seconds(10))
        assert page.status_code == 200 and "catflap live view" in page.text
        state = requests.get(f"http://127.0.0.1:{port}/v1/dashboard/state", timeout=seconds(10))
        assert state.status_code == 401
    with serve(str(ECHO), "--org", "my-org") as (_, port):
        off = requests.get(f"http://127.0.0.1:{port}/dashboard", timeout=seconds(10))
        assert off.status_code == 404
