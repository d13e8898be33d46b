"""An agent folder's pcc-deploy.toml: the keys catflap reads, and every mistake in one error."""

from __future__ import annotations

from pathlib import Path

import pytest

from catflap.config import load_config, read_pcc_deploy
from catflap.contract.errors import ConfigError

from .conftest import ECHO


def folder_with(tmp_path: Path, deploy: str) -> Path:
    (tmp_path / "bot.py").write_text("async def bot(args): pass\n")
    (tmp_path / "pcc-deploy.toml").write_text(deploy)
    return tmp_path


def refusal(folder: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        read_pcc_deploy(folder)
    return info.value


def test_a_folder_without_the_file_sets_nothing(tmp_path: Path) -> None:
    assert read_pcc_deploy(tmp_path) == {}


def test_only_the_keys_the_file_sets_come_back(tmp_path: Path) -> None:
    folder = folder_with(tmp_path, 'agent_name = "a1"\n[scaling]\nmin_agents = 2\n')
    assert read_pcc_deploy(folder) == {"agent_name": "a1", "scaling": {"min_agents": 2}}


def test_cloud_only_keys_are_skipped(tmp_path: Path) -> None:
    folder = folder_with(
        tmp_path,
        'image = "me/bot:1"\nregion = "us-west"\nsecret_set = "s"\nenable_krisp = true\n'
        'agent_profile = "agent-1x"\nwebsocket_auth = "token"\n',
    )
    assert read_pcc_deploy(folder) == {"websocket_auth": "token"}


def test_every_bad_key_and_value_is_listed_in_one_error_in_file_order(tmp_path: Path) -> None:
    folder = folder_with(
        tmp_path,
        'agent_name = "a1"\nimage = "x:1"\nflavour = "x"\nwebsocket_auth = "hmac"\n'
        "max_session_duration = 30\n[scaling]\nmin_agents = -1\nmax_agent = 3\n",
    )
    err = refusal(folder)
    path = folder / "pcc-deploy.toml"
    assert (err.source, err.key) == (str(path), "(5 problems)")
    assert str(err) == (
        f"{path}: (5 problems): "
        "flavour: unknown key (pcc-deploy.toml does not accept it); "
        "websocket_auth: Input should be 'none' or 'token'; "
        "max_session_duration: Input should be greater than or equal to 60; "
        "scaling.min_agents: Input should be greater than or equal to 0; "
        "scaling.max_agent: unknown key"
    )


def test_one_problem_is_reported_under_its_own_key(tmp_path: Path) -> None:
    err = refusal(folder_with(tmp_path, "max_session_duration = 100000\n"))
    assert (err.key, err.problem) == (
        "max_session_duration",
        "Input should be less than or equal to 14400",
    )


def test_wrong_types_are_named(tmp_path: Path) -> None:
    err = refusal(folder_with(tmp_path, "agent_name = 5\nscaling = 3\n"))
    assert (err.key, err.problem) == (
        "(2 problems)",
        "agent_name: Input should be a valid string; scaling: must be a table",
    )


def test_bad_toml_is_refused_as_syntax(tmp_path: Path) -> None:
    err = refusal(folder_with(tmp_path, "agent_name = \n"))
    assert err.key == "(syntax)"
    assert err.problem.startswith("not valid TOML: ")


def test_load_config_names_the_deploy_file_not_catflap_toml(tmp_path: Path) -> None:
    folder = tmp_path / "bot"
    folder.mkdir()
    folder_with(folder, 'websocket_auth = "hmac"\n[scaling]\nmax_agents = 0\n')
    config = tmp_path / "catflap.toml"
    config.write_text(f'[organizations.my-org.agents.a1]\npath = "{folder}"\n')
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert str(info.value) == (
        f"{folder / 'pcc-deploy.toml'}: (2 problems): "
        "websocket_auth: Input should be 'none' or 'token'; "
        "scaling.max_agents: Input should be greater than or equal to 1"
    )


def test_the_echo_example_reads_cleanly() -> None:
    assert read_pcc_deploy(ECHO) == {"agent_name": "my-agent"}
