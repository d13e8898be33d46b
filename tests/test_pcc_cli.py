"""Pipecat Cloud's own CLI (``pipecatcloud`` 1.4's ``pipecat cloud ...``) operates a real
``catflap serve`` unchanged: the CLI runs as a subprocess with only ``PIPECAT_API_HOST``,
``PIPECAT_TOKEN`` (the organization's private key), ``PIPECAT_ORG`` and
``PIPECAT_DEFAULT_PUBLIC_KEY`` set, and a HOME of its own; what it prints is checked, in its
plain and JSON output modes. The records' ``endState`` and ``resourceMetrics`` are checked on
sessions the CLI started."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import BOTS, PRIVATE_KEY, PUBLIC_KEY, catflap_serve, seconds, write_config

pytest.importorskip("pipecatcloud.cli.entry_point")

pytestmark = pytest.mark.slow

AGENT = "botsession"
#: The ``pipecat cloud`` command group. ``pipecat`` (pipecat-ai's CLI) mounts this same Typer
#: app as its ``cloud`` subcommand; run directly, it needs none of pipecat-ai's ``cli`` extra.
_CLI = (
    "import sys; from pipecatcloud.cli.entry_point import entrypoint_cli_typer as app; "
    "sys.argv[0] = 'pipecat cloud'; app()"
)
MB = 1024 * 1024


@dataclass
class Served:
    http: str
    env: dict[str, str]
    out: Path

    def cli(self, *args: str, output: str = "plain") -> subprocess.CompletedProcess[str]:
        """``pipecat cloud --output OUTPUT ARGS``, bounded in time."""
        return subprocess.run(
            [sys.executable, "-c", _CLI, "--output", output, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=seconds(60),
            check=False,
        )

    def cli_json(self, *args: str) -> Any:
        done = self.cli(*args, output="json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def start(self, **body: Any) -> str:
        data = json.dumps({"out": str(self.out), **body})
        started = self.cli_json("agent", "start", AGENT, "--force", "--data", data)
        assert set(started) == {"sessionId"}
        return str(started["sessionId"])

    def session(self, session_id: str) -> dict[str, Any]:
        record: dict[str, Any] = self.cli_json("agent", "sessions", AGENT, "--id", session_id)
        return record

    def ended(self, session_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + seconds(20)
        while (record := self.session(session_id))["endedAt"] is None:
            assert time.monotonic() < deadline, record
            time.sleep(0.1)
        return record


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    directory = tmp_path_factory.mktemp("pcc")
    config = write_config(
        directory, {AGENT: {"path": BOTS / "bot_session", "scaling": {"min_agents": 1}}}
    )
    home = directory / "home"
    home.mkdir()
    args = ["--config", str(config), "--state-dir", str(directory / "state")]
    with catflap_serve(args) as (_, port, _lines):
        http = f"http://127.0.0.1:{port}"
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("PIPECAT_") and key != "HOME"
        }
        env |= {
            "HOME": str(home),
            "PIPECAT_API_HOST": http,
            "PIPECAT_TOKEN": PRIVATE_KEY,
            "PIPECAT_ORG": "my-org",
            "PIPECAT_DEFAULT_PUBLIC_KEY": PUBLIC_KEY,
        }
        yield Served(http, env, directory / "received.jsonl")


def test_agent_list_prints_the_configured_agents(served: Served) -> None:
    done = served.cli("agent", "list")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "Agents for organization: my-org (1 results)" in lines
    header = "Name\tRegion\tAgent ID\tActive Deployment ID\tCreated At\tUpdated At\tGitHub"
    row = lines[lines.index(header) + 1].split("\t")
    assert row[:4] == [AGENT, "self-hosted", f"{AGENT}.my-org", ""]
    (agent,) = served.cli_json("agent", "list")["agents"]
    assert (agent["name"], agent["activeDeploymentId"]) == (AGENT, None)


def test_agent_status_prints_readiness_scaling_and_session_limit(served: Served) -> None:
    done = served.cli("agent", "status", AGENT)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for line in (
        f"Agent: {AGENT}",
        "Ready: True",
        "Max Session Duration: 7200s",
        "Min Agents: 1",
        "Max Agents: 50",
    ):
        assert line in lines
    status = served.cli_json("agent", "status", AGENT)
    assert status["ready"] is True
    assert (status["websocketAuth"], status["maxSessionDuration"]) == ("none", 7200)
    assert status["autoScaling"] == {"minReplicas": 1, "maxReplicas": 50}
    missing = served.cli("agent", "status", "nope")
    assert missing.returncode == 1
    assert "No deployment data found for agent with name 'nope'" in missing.stdout + missing.stderr


def test_start_then_sessions_details_and_logs(served: Served) -> None:
    done = served.cli(
        "agent", "start", AGENT, "--force", "--data", json.dumps({"out": str(served.out)})
    )
    assert done.returncode == 0, done.stderr
    assert f"Agent '{AGENT}' started successfully" in done.stdout
    session_id = done.stdout.split("Session ID: ")[1].split()[0]
    record = served.ended(session_id)
    assert (record["completionStatus"], record["endState"]) == ("completed", "completed")
    assert record["createdAt"].endswith("Z") and record["endedAt"] >= record["createdAt"]

    listed = served.cli("agent", "sessions", AGENT)
    assert listed.returncode == 0, listed.stderr
    header = "Session ID\tCreated At\tEnded At\tDuration\tStatus\tBot Start Seconds\tCold Start"
    lines = listed.stdout.splitlines()
    rows = [line.split("\t") for line in lines[lines.index(header) + 1 :]]
    (row,) = [r for r in rows if r[0] == session_id]
    assert (row[4], row[6]) == ("Complete", "False")
    assert row[1] == record["createdAt"][:19].replace("T", " ")

    details = served.cli("agent", "sessions", AGENT, "--id", session_id)
    assert details.returncode == 0, details.stderr
    assert f"Session ID: {session_id}" in details.stdout
    assert "Status: Complete (completed)" in details.stdout
    assert "Cold Start: No" in details.stdout

    logs = served.cli("agent", "logs", AGENT, "--session-id", session_id)
    assert logs.returncode == 0, logs.stderr
    assert "= session started (POST /bot, pipecat" in logs.stdout
    assert "= bot() returned" in logs.stdout
    lines_json = served.cli_json("agent", "logs", AGENT, "--session-id", session_id)["logs"]
    assert {line["sessionId"] for line in lines_json} == {session_id}


def test_resource_metrics_of_a_bot_holding_50_mb(served: Served) -> None:
    small = served.ended(served.start(then="sleep:2.5"))["resourceMetrics"]
    large = served.ended(served.start(then="sleep:2.5", mb=50))["resourceMetrics"]
    for metrics in (small, large):
        assert metrics["sampleCount"] == len(metrics["timeseries"]) >= 2
        assert (os.cpu_count() or 1) * 1000 >= metrics["cpuMillicoresP99"] >= 0
        assert metrics["cpuMillicoresP50"] <= metrics["cpuMillicoresP90"]
        assert metrics["memoryBytesP50"] <= metrics["memoryBytesP99"] < 4096 * MB
    # The ballast is held while the bot sleeps, so every sample carries it.
    assert large["memoryBytesP50"] - small["memoryBytesP50"] >= 45 * MB
    assert large["memoryBytesP99"] >= 50 * MB


def test_stop_ends_the_session_terminated(served: Served) -> None:
    session_id = served.start(then="wait")
    active = served.cli_json("agent", "sessions", AGENT, "--end-state", "active")["sessions"]
    assert session_id in [s["sessionId"] for s in active]
    done = served.cli("agent", "stop", AGENT, "--session-id", session_id, "--force")
    assert done.returncode == 0, done.stderr
    assert f"Session '{session_id}' stopped successfully" in done.stdout
    record = served.ended(session_id)
    assert (record["completionStatus"], record["endState"]) == ("stopped", "terminated")
    terminated = served.cli_json("agent", "sessions", AGENT, "--end-state", "terminated")
    assert session_id in [s["sessionId"] for s in terminated["sessions"]]
    completed = served.cli_json("agent", "sessions", AGENT, "--end-state", "completed")
    assert session_id not in [s["sessionId"] for s in completed["sessions"]]


@pytest.mark.parametrize(
    ("then", "status"), [("raise", "bot_error"), ("crash", "agent_crashed")], ids=str
)
def test_a_failing_bot_ends_as_agent_error(served: Served, then: str, status: str) -> None:
    record = served.ended(served.start(then=then))
    assert (record["completionStatus"], record["endState"]) == (status, "agent_error")


def test_calls_with_no_self_hosted_meaning_get_a_clear_501(served: Served) -> None:
    done = served.cli("agent", "deployments", AGENT)
    assert done.returncode == 1
    assert "Unable to get deployments for botsession: 501" in done.stdout + done.stderr
    with httpx.Client(base_url=served.http, timeout=seconds(10)) as client:
        for method, path, what in (
            ("POST", "/v1/organizations/my-org/services", "deploying an agent"),
            ("GET", "/v1/organizations/my-org/regions", "regions"),
            ("GET", "/v1/organizations/my-org/spend-limit", "the spend limit"),
            ("POST", "/v1/organizations/my-org/builds/upload-url", "cloud builds"),
            ("GET", "/auth/config", "logging in"),
        ):
            response = client.request(method, path)
            assert response.status_code == 501, (path, response.text)
            body = response.json()
            assert set(body) == {"error", "code"} and body["code"] == "not_supported_self_hosted"
            assert f"catflap is self-hosted and does not do {what}" in body["error"]


def test_another_organization_in_the_path_is_404_naming_the_keys_own(served: Served) -> None:
    with httpx.Client(base_url=served.http, timeout=seconds(10)) as client:
        response = client.get(
            f"/v1/organizations/other-org/services/{AGENT}/sessions",
            headers={"authorization": f"Bearer {PRIVATE_KEY}"},
        )
    assert response.status_code == 404
    assert response.json()["code"] == "404"
    assert "set PIPECAT_ORG=my-org" in response.json()["error"]


def test_openapi_documents_both_path_sets(served: Served) -> None:
    with httpx.Client(base_url=served.http, timeout=seconds(10)) as client:
        paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/v1/agents/{agent}/sessions",
        "/v1/organizations/{org}/services/{agent}/sessions/{session_id}",
        "/v1/organizations/{org}/services/{agent}/logs",
        "/v1/organizations/{org}/services/{agent}",
    ):
        assert "get" in paths[path], path
    assert set(paths["/v1/organizations/{org}/services"]) == {"get", "post", "put"}
