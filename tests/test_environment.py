"""An instance's environment: the allow-list of the gateway's, the agent's pass_env, its secrets
(pure functions; tests/test_secrets_env.py checks it in real agent processes)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from catflap.config import AgentConfig, AgentSpec
from catflap.contract.names import AgentName, OrgName, ServiceHost
from catflap.pool.environment import INSTANCE_ENV_ALLOWED, instance_environment, passed_through

GATEWAY_ENV = {
    "PATH": "/usr/bin",
    "HOME": "/home/cf",
    "LANG": "C.UTF-8",
    "LC_ALL": "C",
    "TZ": "UTC",
    "PYTHONPATH": "/src",
    "PYTHONUNBUFFERED": "1",
    "VIRTUAL_ENV": "/venv",
    "CATFLAP_TOKEN_KEYS": "k1:secret",
    "CATFLAP_SECRETS_KEY": "fernet-key",
    "AWS_SECRET_ACCESS_KEY": "aws",
    "HTTPS_PROXY": "http://user:pass@proxy",
    "DEEPGRAM_API_KEY": "dg",
    "DEEPGRAM_URL": "wss://dg",
    "PATHOLOGICAL": "not PATH",
}


def agent(**settings: object) -> AgentSpec:
    config = AgentConfig.model_validate({"path": Path("/bot"), **settings})
    return AgentSpec(ServiceHost(AgentName("a1"), OrgName("my-org")), config)


def test_only_the_allow_list_passes_by_default() -> None:
    assert instance_environment(GATEWAY_ENV, agent(), {}) == {
        "PATH": "/usr/bin",
        "HOME": "/home/cf",
        "LANG": "C.UTF-8",
        "LC_ALL": "C",
        "TZ": "UTC",
        "PYTHONPATH": "/src",
        "PYTHONUNBUFFERED": "1",
        "VIRTUAL_ENV": "/venv",
    }


def test_pass_env_names_and_prefixes_then_secrets_which_win() -> None:
    spec = agent(pass_env=["DEEPGRAM_*", "AWS_SECRET_ACCESS_KEY"])
    env = instance_environment(GATEWAY_ENV, spec, {"DEEPGRAM_API_KEY": "from-the-set", "X": "x"})
    assert {
        k: env[k] for k in ("DEEPGRAM_API_KEY", "DEEPGRAM_URL", "AWS_SECRET_ACCESS_KEY", "X")
    } == {
        "DEEPGRAM_API_KEY": "from-the-set",
        "DEEPGRAM_URL": "wss://dg",
        "AWS_SECRET_ACCESS_KEY": "aws",
        "X": "x",
    }
    assert "CATFLAP_SECRETS_KEY" not in env and "HTTPS_PROXY" not in env


def test_the_allow_list_holds_no_catflap_variable_and_matches_whole_names() -> None:
    assert not any(pattern.startswith("CATFLAP") for pattern in INSTANCE_ENV_ALLOWED)
    assert passed_through({"PATH": "p", "PATHOLOGICAL": "x", "LC_": "y"}, ["PATH", "LC_*"]) == {
        "PATH": "p",
        "LC_": "y",
    }


@pytest.mark.parametrize(
    "pattern", ["", "*", "A*B*", "A=B"], ids=["empty", "star", "two-stars", "eq"]
)
def test_pass_env_refuses_what_is_not_a_name_or_prefix(pattern: str) -> None:
    with pytest.raises(ValidationError, match="is not a variable name or a PREFIX\\* pattern"):
        agent(pass_env=[pattern])


def test_secret_set_is_checked_against_pccs_pattern() -> None:
    assert agent(secret_set="my_keys-1").config.secret_set == "my_keys-1"
    with pytest.raises(ValidationError, match="secret set name 'my keys' contains characters"):
        agent(secret_set="my keys")


def test_a_bot_folder_takes_pass_env_from_the_command_line(tmp_path: Path) -> None:
    import click

    from catflap.cli.flags import serve_config
    from catflap.config import zero_config

    from .conftest import ECHO

    cfg = zero_config(ECHO, org="my-org", pass_env=["OPENAI_API_KEY"])
    (spec,) = cfg.agents()
    assert spec.config.pass_env == ["OPENAI_API_KEY"]
    config = tmp_path / "catflap.toml"
    config.write_text(f'[organizations.my-org.agents.a1]\npath = "{ECHO}"\n')
    with pytest.raises(click.UsageError, match="with --config, set pass_env in the agent's table"):
        serve_config(None, config, None, None, None, (), (), pass_env=("X",))
