"""Pipecat Cloud's own CLI (``pipecat cloud secrets set/list/unset/delete``) against a real
``catflap serve``, as tests/test_pcc_cli.py drives it: what it prints and its exit codes, an
instance started after ``set`` seeing the value, and the value in no line of the gateway's log."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from catflap.secretsets.cipher import SECRETS_KEY_ENV, generate_key

from .conftest import BOTS, PRIVATE_KEY, PUBLIC_KEY, catflap_serve, seconds, write_config

pytest.importorskip("pipecatcloud.cli.entry_point")

pytestmark = pytest.mark.slow

_CLI = (
    "import sys; from pipecatcloud.cli.entry_point import entrypoint_cli_typer as app; "
    "sys.argv[0] = 'pipecat cloud'; app()"
)
VALUE = "cli-sekrit-9e8d7c6b5a4f3e2d1c"


def test_pipecat_cloud_secrets_set_list_unset_delete(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"envbot": {"path": BOTS / "env_report", "secret_set": "keys"}})
    home = tmp_path / "home"
    home.mkdir()
    args = ["--config", str(config), "--state-dir", str(tmp_path / "state")]
    with catflap_serve(args, env={SECRETS_KEY_ENV: generate_key()}) as (_, port, lines):
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIPECAT_") and k != "HOME"}
        env |= {
            "HOME": str(home),
            "PIPECAT_API_HOST": f"http://127.0.0.1:{port}",
            "PIPECAT_TOKEN": PRIVATE_KEY,
            "PIPECAT_ORG": "my-org",
            "PIPECAT_DEFAULT_PUBLIC_KEY": PUBLIC_KEY,
        }

        def cli(*argv: str) -> tuple[int, list[str]]:
            done = subprocess.run(
                [sys.executable, "-c", _CLI, "--output", "plain", *argv],
                env=env,
                capture_output=True,
                text=True,
                timeout=seconds(60),
                check=False,
                stdin=subprocess.DEVNULL,
            )
            return done.returncode, (done.stdout + done.stderr).splitlines()

        code, out = cli("secrets", "list")
        assert code == 1 and any("No secret sets for organization 'my-org'" in x for x in out)
        code, out = cli("secrets", "set", "keys", f"MY_SECRET={VALUE}", "OTHER=x", "--skip")
        assert code == 0, out
        assert any("Secret set 'keys' created successfully in self-hosted" in x for x in out)
        code, out = cli("secrets", "list")
        assert code == 0, out
        assert out[out.index("Secret Set Name\tRegion\tStatus\tType") + 1] == (
            "keys\tself-hosted\tready\tSecret Set"
        )
        code, out = cli("secrets", "list", "keys")
        assert code == 0, out
        assert out[out.index("Secret keys for set keys (status: ready)") :] == [
            "Secret keys for set keys (status: ready)",
            "Key",
            "MY_SECRET",
            "OTHER",
        ]
        code, out = cli("secrets", "unset", "keys", "OTHER", "--skip")
        assert code == 0, out
        assert any("Secret 'OTHER' deleted successfully from secret set 'keys'" in x for x in out)
        code, out = cli("secrets", "unset", "keys", "OTHER", "--skip")
        assert code == 1 and any("Key not found in set 'keys'" in x for x in out)

        # An instance started now gets the set (it prints a digest, never the value).
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=seconds(30)) as client:
            started = client.post(
                "/v1/public/envbot/start",
                json={"body": {"names": ["MY_SECRET", "OTHER"], "digest": True}},
                headers={"authorization": f"Bearer {PUBLIC_KEY}"},
            )
            assert started.status_code == 200, started.text
            session_id = started.json()["sessionId"]
            auth = {"authorization": f"Bearer {PRIVATE_KEY}"}
            deadline = time.monotonic() + seconds(20)
            printed: list[str] = []
            while time.monotonic() < deadline:
                logs = client.get(
                    "/v1/agents/envbot/logs", params={"sessionId": session_id}, headers=auth
                )
                printed = [line["log"] for line in logs.json().get("logs", [])]
                if any("MY_SECRET sha256=" in p for p in printed):
                    break
                time.sleep(0.2)
        digest = hashlib.sha256(VALUE.encode()).hexdigest()
        assert f"MY_SECRET sha256={digest}" in printed, printed
        assert "OTHER is not set" in printed

        code, out = cli("secrets", "delete", "keys", "--skip")
        assert code == 0 and any("Secret set 'keys' deleted successfully" in x for x in out)
        code, out = cli("secrets", "list", "keys")
        assert code == 1
        assert any("No secrets sets with name 'keys' found in 'my-org'" in x for x in out)
        gateway_log = list(lines)
    assert not [line for line in gateway_log if VALUE in line]
    assert any("secret set 'keys' of organization 'my-org' created" in x for x in gateway_log)
