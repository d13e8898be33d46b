"""An agent folder's pcc-deploy.toml: the keys catflap reads, and every mistake in one error."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from catflap.config import load_config, read_pcc_deploy
from catflap.config.models import ENABLE_KRISP_REFUSED
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


def test_cloud_only_keys_are_skipped_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="catflap")
    folder = folder_with(
        tmp_path,
        'image = "me/bot:1"\nregion = "us-west"\nsecret_set = "s"\n'
        'agent_profile = "agent-1x"\nwebsocket_auth = "token"\n'
        '[krisp_viva]\naudio_filter = "tel"\n',
    )
    assert read_pcc_deploy(folder) == {"websocket_auth": "token", "secret_set": "s"}
    assert [r.getMessage() for r in caplog.records] == [
        f"{folder / 'pcc-deploy.toml'}: catflap ignores image, region, agent_profile, "
        "[krisp_viva] self-hosted (Pipecat Cloud's images, builds, regions and sizing); it "
        "reads agent_name, websocket_auth, max_session_duration, scaling, secret_set"
    ]


def test_a_file_without_cloud_only_keys_logs_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="catflap")
    read_pcc_deploy(folder_with(tmp_path, 'agent_name = "a1"\n'))
    assert caplog.records == []


def test_enable_krisp_is_refused_with_pipecatclouds_words(tmp_path: Path) -> None:
    err = refusal(folder_with(tmp_path, "enable_krisp = false\n"))
    assert (err.key, err.problem) == ("enable_krisp", ENABLE_KRISP_REFUSED)
    assert ENABLE_KRISP_REFUSED == (
        "'enable_krisp' is no longer supported. Krisp is now configured via the [krisp_viva] "
        "section in pcc-deploy.toml. Remove 'enable_krisp' from your config."
    )


def test_the_secret_set_is_read_into_the_agents_settings(tmp_path: Path) -> None:
    folder = tmp_path / "bot"
    folder.mkdir()
    folder_with(folder, 'secret_set = "from-deploy"\n')
    config = tmp_path / "catflap.toml"
    config.write_text(f'[organizations.my-org.agents.a1]\npath = "{folder}"\n')
    assert load_config(config).organizations["my-org"].agents["a1"].secret_set == "from-deploy"
    config.write_text(config.read_text() + 'secret_set = "from-catflap-toml"\n')
    agent = load_config(config).organizations["my-org"].agents["a1"]
    assert agent.secret_set == "from-catflap-toml"  # catflap.toml wins, as for other keys


def test_a_secret_set_name_outside_pccs_pattern_is_refused(tmp_path: Path) -> None:
    err = refusal(folder_with(tmp_path, 'secret_set = "my keys"\n'))
    assert err.key == "secret_set"
    assert err.problem.startswith("secret set name 'my keys' contains characters other than")


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


# --- the same files through pipecatcloud 1.4.0's own parser -----------------------------------

#: Files pipecatcloud 1.4.0 accepts, every key it knows among them.
ACCEPTED = {
    "every-image-key": (
        'agent_name = "my-agent"\nimage = "me/bot:1.0"\nimage_credentials = "pull"\n'
        'secret_set = "my-secrets"\nregion = "us-east"\nagent_profile = "agent-2x"\n'
        'websocket_auth = "token"\nmax_session_duration = 14400\narchitecture = "arm64"\n'
        '[scaling]\nmin_agents = 0\nmax_agents = 5\n[krisp_viva]\naudio_filter = "pro"\n'
        '[docker]\nauto_latest = true\nregistry = "x"\n'
        '[build]\ncontext_dir = "."\ndockerfile = "Dockerfile.pcc"\nunknown_here = 1\n'
        '[build.exclude]\npatterns = ["*.md"]\n'
    ),
    "git-and-resources": (
        '[git]\nrepo = "me/bot"\nbranch = "release/1.0"\ndockerfile_path = "Dockerfile"\n'
        'subdirectory = "agent"\n[resources]\ncpu = "2"\nmemory = "4Gi"\n'
    ),
    "build-id": 'build_id = "b-1"\nmax_session_duration = 60\n',
    "empty": "",
}
#: Files pipecatcloud 1.4.0 refuses, and a word its message and catflap's share.
REFUSED = {
    "enable-krisp": ("enable_krisp = true\n", "no longer supported"),
    "unknown-key": ('flavour = "x"\n', "flavour"),
    "force-redeploy": ("force_redeploy = true\n", "force_redeploy"),
    "image-without-tag": ('image = "me/bot"\n', "must include tag"),
    "image-and-build-id": ('image = "me/bot:1"\nbuild_id = "b"\n', "both 'image' and 'build_id'"),
    "git-and-image": (
        'image = "me/bot:1"\n[git]\nrepo = "me/bot"\nbranch = "main"\n',
        "GitHub source together",
    ),
    "git-without-branch": ('[git]\nrepo = "me/bot"\n', "requires both 'repo' and 'branch'"),
    "git-bad-repo": ('[git]\nrepo = "bot"\nbranch = "main"\n', "Invalid repo 'bot'"),
    "git-dot-branch": ('[git]\nrepo = "me/bot"\nbranch = "a/../b"\n', "Invalid branch"),
    "git-unknown-key": ('[git]\nrepo = "me/bot"\nbranch = "main"\nurl = "x"\n', "url"),
    "resources-cpu-only": ('[resources]\ncpu = "1"\n', "requires both 'cpu' and 'memory'"),
    "resources-bad-quantity": (
        '[resources]\ncpu = "2 cores"\nmemory = "4Gi"\n',
        "Invalid cpu quantity '2 cores'",
    ),
    "profile-and-resources": (
        'agent_profile = "agent-1x"\n[resources]\ncpu = "1"\nmemory = "1Gi"\n',
        "both 'agent_profile' and 'resources'",
    ),
    "architecture": ('architecture = "x86"\n', "amd64"),
    "session-too-short": ("max_session_duration = 30\n", "60"),
    "session-too-long": ("max_session_duration = 14401\n", "14400"),
    "negative-min-agents": ("[scaling]\nmin_agents = -1\n", "0"),
    "zero-max-agents": ("[scaling]\nmax_agents = 0\n", "max_agents"),
    "min-above-max": (
        "[scaling]\nmin_agents = 3\nmax_agents = 2\n",
        "max_agents must be greater than or equal to min_agents",
    ),
    "scaling-unknown-key": ("[scaling]\nmin_agent = 1\n", "min_agent"),
    "krisp-bad-filter": ('[krisp_viva]\naudio_filter = "studio"\n', "audio_filter"),
    "krisp-unknown-key": ('[krisp_viva]\nmodel = "tel"\n', "model"),
}


def pipecatcloud_reads(path: Path) -> str | None:
    """What pipecatcloud 1.4.0's ``load_deploy_config_file`` says of ``path``: None when it
    accepts the file, else its error text."""
    pytest.importorskip("pipecatcloud")
    import pipecatcloud.cli.config as pcc_config
    from pipecatcloud._utils.deploy_utils import load_deploy_config_file
    from pipecatcloud.exception import ConfigFileError

    saved = pcc_config.deploy_config_path
    pcc_config.deploy_config_path = str(path)
    try:
        assert load_deploy_config_file() is not None, "pipecatcloud did not read the file"
    except ConfigFileError as exc:
        return str(exc)
    finally:
        pcc_config.deploy_config_path = saved
    return None


@pytest.mark.parametrize("text", list(ACCEPTED.values()), ids=list(ACCEPTED))
def test_what_pipecatcloud_accepts_catflap_accepts(tmp_path: Path, text: str) -> None:
    folder = folder_with(tmp_path, text)
    assert pipecatcloud_reads(folder / "pcc-deploy.toml") is None
    read = read_pcc_deploy(folder)
    assert set(read) <= {
        "agent_name",
        "websocket_auth",
        "max_session_duration",
        "scaling",
        "secret_set",
    }


@pytest.mark.parametrize(("text", "word"), list(REFUSED.values()), ids=list(REFUSED))
def test_what_pipecatcloud_refuses_catflap_refuses(tmp_path: Path, text: str, word: str) -> None:
    folder = folder_with(tmp_path, text)
    theirs = pipecatcloud_reads(folder / "pcc-deploy.toml")
    assert theirs is not None, "pipecatcloud accepted it"
    ours = str(refusal(folder))
    assert word in theirs and word in ours, (theirs, ours)
