"""Config loading: the documented shape works; every mistake names file, key and problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from catflap.config import load_config, token_keyring, zero_config
from catflap.contract import limits
from catflap.contract.errors import ConfigError

from .conftest import ECHO

DOCUMENTED = """
listen = "127.0.0.1:8080"
public_url = "ws://127.0.0.1:8080"

[organizations.my-org]
public_keys = ["pk_test_123"]
private_keys = ["sk_test_123"]

[organizations.my-org.agents.my-agent]
path = "{path}"
websocket_auth = "none"
max_session_duration = 7200
[organizations.my-org.agents.my-agent.scaling]
min_agents = 1
max_agents = 5
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "catflap.toml"
    path.write_text(text)
    return path


def error(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    return info.value


def test_the_documented_config_loads(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, DOCUMENTED.format(path=ECHO)))
    (agent,) = cfg.agents()
    assert agent.key == "my-agent.my-org"
    assert agent.config.scaling.min_agents == 1 and agent.config.scaling.max_agents == 5
    assert cfg.ws_base_url == "ws://127.0.0.1:8080"
    assert cfg.host_port == ("127.0.0.1", 8080)


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    bot_dir = tmp_path / "bots" / "one"
    bot_dir.mkdir(parents=True)
    (bot_dir / "bot.py").write_text("async def bot(args): pass\n")
    cfg = load_config(write(tmp_path, DOCUMENTED.format(path="bots/one")))
    assert next(cfg.agents()).config.path == bot_dir


@pytest.mark.parametrize(
    ("change", "key", "problem"),
    [
        (
            ("max_agents = 5", "max_agents = 5\nmax_agent = 3"),
            "organizations.my-org.agents.my-agent.scaling.max_agent",
            "unknown key",
        ),
        (
            ("agents.my-agent", "agents.My_Agent"),
            "organizations.my-org.agents.My_Agent",
            "bad agent name",
        ),
        (
            ('websocket_auth = "none"', 'websocket_auth = "hmac"'),
            "organizations.my-org.agents.my-agent.websocket_auth",
            "'none' or 'token'",
        ),
        (
            ("max_session_duration = 7200", "max_session_duration = 30"),
            "organizations.my-org.agents.my-agent.max_session_duration",
            "greater than or equal",
        ),
        (
            ("min_agents = 1", "min_agents = 9"),
            "organizations.my-org.agents.my-agent.scaling",
            "larger than max_agents",
        ),
        (('listen = "127.0.0.1:8080"', 'listen = "8080"'), "listen", "host:port"),
        (('public_url = "ws://127.0.0.1:8080"', 'public_url = "http://x"'), "public_url", "ws://"),
    ],
)
def test_mistakes_name_the_file_key_and_problem(
    tmp_path: Path, change: tuple[str, str], key: str, problem: str
) -> None:
    err = error(tmp_path, DOCUMENTED.format(path=ECHO).replace(*change))
    assert err.source == str(tmp_path / "catflap.toml")
    assert err.key == key
    assert problem in err.problem
    assert str(err).startswith(f"{tmp_path / 'catflap.toml'}: {key}: ")


def test_logs_settings_default_and_resolve_against_the_config_file(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, DOCUMENTED.format(path=ECHO)))
    assert (cfg.logs.retention_days, cfg.logs.max_total_mb) == (7, 1024)
    assert cfg.log_dir == cfg.state_dir / "logs"
    assert cfg.gateway.dashboard is False
    text = DOCUMENTED.format(path=ECHO) + (
        '[gateway]\ndashboard = true\n[logs]\ndir = "var/logs"\nretention_days = 1.5\n'
        "max_total_mb = 10\n"
    )
    cfg = load_config(write(tmp_path, text))
    assert cfg.log_dir == tmp_path / "var" / "logs"
    assert (cfg.logs.retention_days, cfg.logs.max_total_mb) == (1.5, 10)
    assert cfg.gateway.dashboard is True


@pytest.mark.parametrize(
    ("table", "key", "problem"),
    [
        ("[logs]\nretention_days = 0\n", "logs.retention_days", "greater than 0"),
        ("[logs]\nmax_total_mb = -1\n", "logs.max_total_mb", "greater than 0"),
        ("[logs]\nkeep = 3\n", "logs.keep", "unknown key"),
    ],
)
def test_bad_logs_settings_are_refused(tmp_path: Path, table: str, key: str, problem: str) -> None:
    err = error(tmp_path, DOCUMENTED.format(path=ECHO) + table)
    assert (err.key, problem in err.problem) == (key, True)


def test_session_start_limits_default_and_load(tmp_path: Path) -> None:
    gateway = load_config(write(tmp_path, DOCUMENTED.format(path=ECHO))).gateway
    assert (gateway.session_starts_per_source, gateway.session_starts_burst) == (
        limits.SESSION_STARTS_PER_SOURCE_DEFAULT,
        limits.SESSION_STARTS_BURST_DEFAULT,
    )
    assert gateway.session_starts_exempt == [] and gateway.exempt_networks == []
    text = DOCUMENTED.format(path=ECHO) + (
        "[gateway]\nsession_starts_per_source = 0\nsession_starts_burst = 3\n"
        'session_starts_exempt = ["10.0.0.0/8", "203.0.113.7", "2001:db8::/32"]\n'
    )
    gateway = load_config(write(tmp_path, text)).gateway
    assert (gateway.session_starts_per_source, gateway.session_starts_burst) == (0, 3)
    assert [str(n) for n in gateway.exempt_networks] == [
        "10.0.0.0/8",
        "203.0.113.7/32",
        "2001:db8::/32",
    ]


@pytest.mark.parametrize(
    ("setting", "problem"),
    [
        ('session_starts_exempt = ["10.0.0.1/8"]', "'10.0.0.1/8' is not a network in CIDR"),
        ('session_starts_exempt = ["proxy.internal"]', "'proxy.internal' is not a network"),
        ('session_starts_exempt = ["10.0.0.0/33"]', 'write e.g. "10.0.0.0/8"'),
        ("session_starts_per_source = -1", "greater than or equal to 0"),
        ("session_starts_per_source = inf", "finite number"),
        ("session_starts_burst = 0", "greater than or equal to 1"),
    ],
)
def test_bad_session_start_limits_are_refused(tmp_path: Path, setting: str, problem: str) -> None:
    err = error(tmp_path, DOCUMENTED.format(path=ECHO) + f"[gateway]\n{setting}\n")
    assert err.key == f"gateway.{setting.split(' ')[0]}"
    assert problem in err.problem, err.problem


@pytest.mark.parametrize(
    ("setting", "problem"),
    [
        ("relay_thread_slice_us = 50", "must be 0 (the kernel's default) or at least 100"),
        ("relay_thread_slice_us = -1", "greater than or equal to 0"),
        ("relay_thread_slice_us = 100001", "less than or equal to 100000"),
    ],
)
def test_a_slice_the_kernel_would_not_give_is_refused(
    tmp_path: Path, setting: str, problem: str
) -> None:
    err = error(tmp_path, DOCUMENTED.format(path=ECHO) + f"[gateway]\n{setting}\n")
    assert err.key == "gateway.relay_thread_slice_us"
    assert problem in err.problem, err.problem


def test_the_relay_thread_slice_defaults_to_100_us_and_0_or_100_are_taken(tmp_path: Path) -> None:
    for setting, expected in (
        ("", 100),
        ("relay_thread_slice_us = 0", 0),
        ("relay_thread_slice_us = 100", 100),
    ):
        text = DOCUMENTED.format(path=ECHO) + f"[gateway]\n{setting}\n"
        assert load_config(write(tmp_path, text)).gateway.relay_thread_slice_us == expected


def test_missing_bot_py_is_refused(tmp_path: Path) -> None:
    err = error(tmp_path, DOCUMENTED.format(path=tmp_path))
    assert err.key == "organizations.my-org.agents.my-agent.path"
    assert "no bot.py" in err.problem


def test_pcc_deploy_is_read_and_catflap_toml_overrides_it(tmp_path: Path) -> None:
    bot_dir = tmp_path / "bot"
    bot_dir.mkdir()
    (bot_dir / "bot.py").write_text("async def bot(args): pass\n")
    (bot_dir / "pcc-deploy.toml").write_text(
        'agent_name = "x"\nimage = "ignored:1"\nwebsocket_auth = "token"\n'
        "max_session_duration = 600\n[scaling]\nmin_agents = 2\nmax_agents = 3\n"
    )
    text = DOCUMENTED.format(path=bot_dir).replace('websocket_auth = "none"\n', "")
    text = text.replace("max_session_duration = 7200\n", "").replace("min_agents = 1\n", "")
    agent = next(load_config(write(tmp_path, text)).agents())
    assert agent.config.websocket_auth == "token"  # from pcc-deploy.toml
    assert agent.config.max_session_duration == 600  # from pcc-deploy.toml
    assert agent.config.scaling.min_agents == 2  # from pcc-deploy.toml
    assert agent.config.scaling.max_agents == 5  # catflap.toml wins


def test_unknown_pcc_deploy_key_is_refused(tmp_path: Path) -> None:
    (tmp_path / "bot.py").write_text("async def bot(args): pass\n")
    (tmp_path / "pcc-deploy.toml").write_text('agent_name = "a1"\nflavour = "x"\n')
    with pytest.raises(ConfigError) as info:
        zero_config(tmp_path, org="my-org")
    assert info.value.source == str(tmp_path / "pcc-deploy.toml")
    assert info.value.key == "flavour"


def test_zero_config_names_the_agent_from_pcc_deploy_or_folder(tmp_path: Path) -> None:
    assert next(zero_config(ECHO, org="my-org").agents()).key == "my-agent.my-org"
    folder = tmp_path / "support-bot"
    folder.mkdir()
    (folder / "bot.py").write_text("async def bot(args): pass\n")
    assert next(zero_config(folder, org="acme").agents()).key == "support-bot.acme"


def test_token_keys_from_env() -> None:
    ring, generated = token_keyring({"CATFLAP_TOKEN_KEYS": "k1:secret-one,k0:secret-zero"})
    assert not generated and ring.current.kid == "k1" and ring.kids == ("k1", "k0")
    _, generated = token_keyring({})
    assert generated
    with pytest.raises(ConfigError) as info:
        token_keyring({"CATFLAP_TOKEN_KEYS": "no-colon"})
    assert info.value.key == "CATFLAP_TOKEN_KEYS"
