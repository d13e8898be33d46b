"""README's "Operating with the Pipecat Cloud CLI" table, row by row, against a real
``catflap serve``: every row's first command is run with the real CLI (the rows that
tests/test_pcc_cli.py and tests/test_pcc_cli_secrets.py run in depth are named, not rerun), and a
row this file does not know fails, so a new row gets checked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import BOTS, PRIVATE_KEY, PUBLIC_KEY, ROOT, catflap_serve, seconds, write_config

pytest.importorskip("pipecatcloud.cli.entry_point")

pytestmark = pytest.mark.slow

_CLI = (
    "import sys; from pipecatcloud.cli.entry_point import entrypoint_cli_typer as app; "
    "sys.argv[0] = 'pipecat cloud'; app()"
)
#: Rows run in depth elsewhere.
COVERED = {
    "`agent list`", "`agent status AGENT`", "`agent start AGENT --force [--data JSON]`",
    "`agent sessions AGENT [--end-state S]`", "`agent stop AGENT --session-id ID --force`",
    "`agent logs AGENT [--session-id ID] [-n N]`",
    "`secrets set NAME KEY=VALUE ... [--file F] --skip`", "`secrets list [NAME]`",
    "`secrets unset NAME KEY --skip`, `secrets delete NAME --skip`",
}  # fmt: skip
#: Row -> (a command of it, its exit code, a line fragment it prints).
RUN = {
    "`organizations list`": (["organizations", "list"], 0, "my-org\tmy-org\tactive"),
    "`organizations properties list`": (
        ["organizations", "properties", "list"], 0, "defaultRegion\tself-hosted",
    ),
    "`secrets image-pull-secret ...`, `secrets reference ...`": (
        ["secrets", "image-pull-secret", "p", "https://index.docker.io/v1/", "u:p", "--skip"],
        1, "does not do image pull secrets",
    ),
    "`deploy`, `agent delete`, `agent deployments`, `agent link/unlink/deploy`, `build ...`, "
    "`github ...`": (["build", "list"], 1, "does not do cloud builds"),
    "`regions ...`, `spend-limit ...`, `agent profiles ...`, `organizations keys ...`, "
    "`organizations registry-keys ...`, `auth login`, `auth whoami`": (
        ["spend-limit", "show"], 1, "does not do the spend limit",
    ),
}  # fmt: skip


def _rows() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Operating with the Pipecat Cloud CLI")[1].split("\n## ")[0]
    table = section.split("| `pipecat cloud ...` | with catflap |\n|---|---|\n")[1]
    return [line.split(" | ")[0].removeprefix("| ") for line in table.splitlines() if line]


def test_every_row_of_the_readme_table_is_true(tmp_path: Path) -> None:
    rows = _rows()
    assert set(rows) == COVERED | set(RUN), set(rows) ^ (COVERED | set(RUN))
    config = write_config(tmp_path, {"botsession": {"path": BOTS / "bot_session"}})
    home = tmp_path / "home"
    home.mkdir()
    with catflap_serve(["--config", str(config), "--state-dir", str(tmp_path / "st")]) as (
        _,
        port,
        _lines,
    ):
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIPECAT_") and k != "HOME"}
        env |= {
            "HOME": str(home),
            "PIPECAT_API_HOST": f"http://127.0.0.1:{port}",
            "PIPECAT_TOKEN": PRIVATE_KEY,
            "PIPECAT_ORG": "my-org",
            "PIPECAT_DEFAULT_PUBLIC_KEY": PUBLIC_KEY,
        }
        for row, (argv, code, fragment) in RUN.items():
            done = subprocess.run(
                [sys.executable, "-c", _CLI, "--output", "plain", *argv],
                env=env,
                capture_output=True,
                text=True,
                timeout=seconds(60),
                check=False,
                stdin=subprocess.DEVNULL,
            )
            out = done.stdout + done.stderr
            assert (done.returncode, fragment in out) == (code, True), (row, out)
