"""``catflap agent`` (catflap.runtime.main): flags become AgentOptions with the model's own
defaults and help, and the runtime's exit code is the command's, whether it is run as
``catflap agent`` or as ``python -m catflap.runtime.main``. ``run_agent`` is replaced by a fake:
no event loop work, no sockets, no processes."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import catflap.runtime.main as runtime_main
from catflap.cli import cli
from catflap.config import AgentConfig, AgentSpec, IceServer, ScalingConfig, WebRTCConfig
from catflap.contract.errors import ConfigError
from catflap.contract.names import AgentName, OrgName, ServiceHost
from catflap.pool.launcher import SubprocessLauncher
from catflap.runtime.exits import EXIT_BOT_STUCK, EXIT_CONFIG, EXIT_LISTEN_FAILED, EXIT_OK
from catflap.runtime.process import AgentOptions


class FakeRuntime:
    """Stands in for ``run_agent`` and ``configure_logging``; records what they were given."""

    def __init__(self, code: int = EXIT_OK, error: Exception | None = None) -> None:
        self.code = code
        self.error = error
        self.options: list[AgentOptions] = []
        self.logging: list[tuple[str, str]] = []

    async def run_agent(self, options: AgentOptions) -> int:
        self.options.append(options)
        if self.error is not None:
            raise self.error
        return self.code

    def configure_logging(self, level: str, log_format: str) -> None:
        self.logging.append((level, log_format))


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeRuntime:
    runtime = FakeRuntime()
    monkeypatch.setattr(runtime_main, "run_agent", runtime.run_agent)
    monkeypatch.setattr(runtime_main, "configure_logging", runtime.configure_logging)
    return runtime


def catflap_agent(*args: str) -> Any:
    """``catflap agent ARGS`` through the top-level command group."""
    return CliRunner().invoke(cli, ["agent", *args], prog_name="catflap")


def test_only_listen_is_required_and_the_rest_are_the_models_defaults(fake: FakeRuntime) -> None:
    assert runtime_main.main(["--listen", "unix:/run/a.sock"]) == EXIT_OK
    assert fake.options == [AgentOptions(listen="unix:/run/a.sock")]
    (options,) = fake.options
    assert (options.bot_dir, options.control_fd, options.agent_name) == (Path("."), None, None)
    assert (options.log_level, options.log_format, options.log_dir) == ("info", "json", None)
    assert fake.logging == [("info", "json")]


def test_every_flag_reaches_the_options(fake: FakeRuntime, tmp_path: Path) -> None:
    argv = [
        "--bot-dir", str(tmp_path),
        "--listen", "tcp:127.0.0.1:0",
        "--control-fd", "7",
        "--agent-name", "my-agent.my-org",
        "--log-level", "warning",
        "--log-format", "text",
        "--log-dir", str(tmp_path / "logs"),
    ]  # fmt: skip
    assert runtime_main.main(argv) == EXIT_OK
    assert fake.options == [
        AgentOptions(
            bot_dir=tmp_path,
            listen="tcp:127.0.0.1:0",
            control_fd=7,
            agent_name="my-agent.my-org",
            log_level="warning",
            log_format="text",
            log_dir=tmp_path / "logs",
        )
    ]
    assert fake.logging == [("warning", "text")]


def test_the_pools_launcher_passes_every_option_the_runtime_reads(
    fake: FakeRuntime, tmp_path: Path
) -> None:
    """The argv a pool instance starts with, read by the runtime's own parser: in particular
    ``--sessions-per-instance``, so that the runtime's count matches the pool's."""
    scaling = ScalingConfig(sessions_per_instance=3)
    spec = AgentSpec(
        ServiceHost(AgentName("my-agent"), OrgName("my-org")),
        AgentConfig(path=tmp_path, scaling=scaling, webrtc=WebRTCConfig(offer_timeout=7.5)),
    )
    launcher = SubprocessLauncher(tmp_path, log_level="debug", log_dir=tmp_path / "logs")
    argv = [*launcher.runtime_args(spec, "unix:/run/i1.sock"), "--control-fd", "7"]
    assert runtime_main.main(argv) == EXIT_OK
    assert fake.options == [
        AgentOptions(
            bot_dir=tmp_path,
            listen="unix:/run/i1.sock",
            control_fd=7,
            agent_name="my-agent.my-org",
            log_level="debug",
            log_format="json",
            log_dir=tmp_path / "logs",
            sessions_per_instance=3,
            webrtc_offer_timeout=7.5,
        )
    ]


def test_the_launcher_gives_ice_servers_as_pccs_ice_config_url_never_on_the_command_line(
    tmp_path: Path,
) -> None:
    """``[webrtc] ice_servers`` reach the runtime as ``ICE_CONFIG_URL``, a ``data:`` URL of
    PCC's document (the runtime reads it as PCC's base image does); no argument carries them."""
    import base64
    import json

    server = IceServer(urls=["turn:turn.example:3478"], username="u", credential="s3cret")
    spec = AgentSpec(
        ServiceHost(AgentName("my-agent"), OrgName("my-org")),
        AgentConfig(path=tmp_path, webrtc=WebRTCConfig(ice_servers=[server])),
    )
    launcher = SubprocessLauncher(tmp_path)
    env = launcher.runtime_env(spec)
    prefix = "data:application/json;base64,"
    assert list(env) == ["ICE_CONFIG_URL"] and env["ICE_CONFIG_URL"].startswith(prefix)
    assert json.loads(base64.b64decode(env["ICE_CONFIG_URL"][len(prefix) :])) == {
        "iceConfig": {
            "iceServers": [
                {"urls": ["turn:turn.example:3478"], "username": "u", "credential": "s3cret"}
            ]
        }
    }
    assert "s3cret" not in " ".join(launcher.runtime_args(spec, "unix:/run/i1.sock"))
    plain = AgentSpec(spec.service_host, AgentConfig(path=tmp_path))
    assert launcher.runtime_env(plain) == {}


def test_a_relative_log_dir_is_made_absolute_before_the_bot_changes_directory(
    fake: FakeRuntime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    runtime_main.main(["--listen", "unix:a.sock", "--log-dir", "logs"])
    assert fake.options[0].log_dir == tmp_path.resolve() / "logs"


def test_trace_logs_the_runtime_at_debug(fake: FakeRuntime) -> None:
    runtime_main.main(["--listen", "unix:/a", "--log-level", "trace"])
    assert fake.options[0].log_level == "trace"  # uvicorn gets its own trace level
    assert fake.logging == [("debug", "json")]


def test_the_runtimes_exit_code_is_the_commands(fake: FakeRuntime) -> None:
    fake.code = EXIT_LISTEN_FAILED
    assert runtime_main.main(["--listen", "unix:/a"]) == EXIT_LISTEN_FAILED
    assert catflap_agent("--listen", "unix:/a").exit_code == EXIT_LISTEN_FAILED


def test_an_unparsable_listen_is_a_config_error(fake: FakeRuntime) -> None:
    fake.error = ConfigError("--listen", "nope", "expected unix:/path/to.sock or tcp:HOST:PORT")
    result = catflap_agent("--listen", "nope")
    assert result.exit_code == EXIT_CONFIG
    assert result.stderr == (
        "catflap agent: --listen: nope: expected unix:/path/to.sock or tcp:HOST:PORT\n"
    )


def test_a_stuck_bot_exits_at_once_without_closing_the_loop(
    fake: FakeRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Exited(Exception):
        pass

    codes: list[int] = []

    def fake_exit(code: int) -> None:
        codes.append(code)
        raise Exited

    monkeypatch.setattr(os, "_exit", fake_exit)
    fake.code = EXIT_BOT_STUCK
    with pytest.raises(Exited):
        runtime_main.main(["--listen", "unix:/a"])
    assert codes == [EXIT_BOT_STUCK]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "Error: Missing option '--listen'."),
        (["--listen"], "Error: Option '--listen' requires an argument."),
        (
            ["--listen", "unix:/a", "--log-level", "loud"],
            "Error: Invalid value for '--log-level': 'loud' is not one of 'critical', 'error', "
            "'warning', 'info', 'debug', 'trace'.",
        ),
        (
            ["--listen", "unix:/a", "--log-format", "xml"],
            "Error: Invalid value for '--log-format': 'xml' is not one of 'json', 'text'.",
        ),
        (
            ["--listen", "unix:/a", "--control-fd", "three"],
            "Error: Invalid value for '--control-fd': 'three' is not a valid integer.",
        ),
        (["--listen", "unix:/a", "--colour"], "Error: No such option '--colour'."),
    ],
    ids=["no-listen", "listen-without-value", "log-level", "log-format", "control-fd", "unknown"],
)
def test_bad_flags_are_usage_errors_and_the_runtime_never_starts(
    fake: FakeRuntime, argv: list[str], message: str
) -> None:
    result = catflap_agent(*argv)
    assert result.exit_code == EXIT_CONFIG
    lines = result.stderr.splitlines()
    assert lines[-1] == message
    # click names the command in a usage line, except for an option missing its value.
    if argv != ["--listen"]:
        assert lines[:2] == [
            "Usage: catflap agent [OPTIONS]",
            "Try 'catflap agent --help' for help.",
        ]
    assert fake.options == []


def test_main_returns_the_usage_error_code_instead_of_exiting(
    fake: FakeRuntime, capsys: pytest.CaptureFixture[str]
) -> None:
    assert runtime_main.main([]) == EXIT_CONFIG
    assert capsys.readouterr().err.splitlines()[-1] == "Error: Missing option '--listen'."
    assert fake.options == []


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_shows_every_option_with_the_models_description_and_default(
    fake: FakeRuntime, flag: str
) -> None:
    result = catflap_agent(flag)
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    assert text.startswith("Usage: catflap agent [OPTIONS] Run one agent's bot.py behind WS /ws")
    for name, field in AgentOptions.model_fields.items():
        assert f"--{name.replace('_', '-')}" in text
        assert field.description is not None and field.description in text
    assert re.search(r"--bot-dir DIR Folder with bot\.py\. \[default: \.\]", text)
    assert "--listen ADDRESS unix:/path/to.sock or tcp:HOST:PORT" in text
    assert "[required]" in text
    assert "uvicorn's log level. [default: info]" in text
    assert "Log lines on stderr. [default: json]" in text
    assert fake.options == []


def test_catflap_lists_the_agent_command_with_its_summary() -> None:
    result = CliRunner().invoke(cli, ["--help"], prog_name="catflap")
    assert result.exit_code == 0
    (listed,) = [line.split() for line in result.stdout.splitlines() if "agent " in line[:9]]
    assert listed[:4] == ["agent", "Run", "one", "agent's"]
