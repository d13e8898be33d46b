"""``catflap secrets``: set, list, unset and generate-key, on a state dir and on Redis, printing
names only; bad input gets the store's message and exit code 1."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner

from catflap.cli import cli
from catflap.secretsets.cipher import SECRETS_KEY_ENV, generate_key

from .conftest import ECHO

REDIS_URL = os.environ.get("CATFLAP_TEST_REDIS", "redis://127.0.0.1:6379/0")
VALUE = "cli-value-0aa1b2c3d4e5f60718"


def run(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["secrets", *args], env=env)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def key_env() -> dict[str, str]:
    return {SECRETS_KEY_ENV: generate_key()}


def test_set_list_unset_on_a_state_dir(tmp_path: Path, key_env: dict[str, str]) -> None:
    where = ["--org", "my-org", "--state-dir", str(tmp_path)]
    code, out, err = run(["set", "keys", f"MY_SECRET={VALUE}", "URL=a=b", *where], key_env)
    assert (code, out, err) == (
        0,
        "secret set 'keys' created in organization 'my-org': MY_SECRET, URL\n",
        "",
    )
    code, out, _ = run(["set", "keys", "URL=c", *where], key_env)
    assert (code, out) == (
        0,
        "secret set 'keys' updated in organization 'my-org': URL\n"
        "instances started from now on get it; running ones keep their old values\n",
    )
    assert run(["list", *where], key_env) == (0, "keys\n", "")
    assert run(["list", "keys", *where], key_env) == (0, "MY_SECRET\nURL\n", "")
    assert run(["unset", "keys", "URL", *where], key_env) == (
        0,
        "secret 'URL' deleted from secret set 'keys'\n",
        "",
    )
    assert run(["unset", "keys", *where], key_env) == (
        0,
        "secret set 'keys' deleted from organization 'my-org'\n",
        "",
    )
    assert run(["list", *where], key_env) == (0, "", "organization 'my-org' has no secret sets\n")


def test_errors_name_the_problem_and_exit_1(tmp_path: Path, key_env: dict[str, str]) -> None:
    where = ["--org", "my-org", "--state-dir", str(tmp_path)]
    code, out, err = run(["set", "bad.name", "A=b", *where], key_env)
    assert (code, out) == (1, "")
    assert err.startswith("catflap: secret set name 'bad.name' contains characters other than")
    code, _, err = run(["list", "nope", *where], key_env)
    assert (code, err) == (1, "catflap: organization 'my-org' has no secret set 'nope'\n")
    code, _, err = run(["unset", "nope", *where], key_env)
    assert (code, err) == (
        1,
        "catflap: organization 'my-org' has no secret set 'nope' (`catflap secrets list` "
        "shows its sets)\n",
    )
    # A value typed without its name is never echoed back.
    code, _, err = run(["set", "keys", VALUE, *where], key_env)
    assert code == 2 and VALUE not in err
    assert "argument 1 is not KEY=VALUE (e.g. OPENAI_API_KEY=sk-...)" in err
    code, _, err = run(["set", "keys", *where], key_env)
    assert code == 2 and "give KEY=VALUE arguments or --file FILE (one of the two)" in err


def test_values_can_come_from_a_file(tmp_path: Path, key_env: dict[str, str]) -> None:
    env_file = tmp_path / "keys.env"
    env_file.write_text(f'# the bot\'s keys\n\nMY_SECRET="{VALUE}"\nOTHER = x y\n')
    where = ["--org", "my-org", "--state-dir", str(tmp_path / "state")]
    assert run(["set", "keys", "--file", str(env_file), *where], key_env)[0] == 0
    assert run(["list", "keys", *where], key_env)[1] == "MY_SECRET\nOTHER\n"

    async def read() -> dict[str, str] | None:
        from catflap.secretsets.filestore import FileSecretStore

        return await FileSecretStore(tmp_path / "state", key_env).values("my-org", "keys")

    import asyncio

    assert asyncio.run(read()) == {"MY_SECRET": VALUE, "OTHER": "x y"}


def test_the_org_and_state_dir_come_from_the_config_file(
    tmp_path: Path, key_env: dict[str, str]
) -> None:
    config = tmp_path / "catflap.toml"
    config.write_text(
        f'state_dir = "st"\n[organizations.acme.agents.echo]\npath = "{ECHO}"\n'
        'secret_set = "keys"\n'
    )
    code, out, _ = run(["set", "keys", "A=1", "--config", str(config)], key_env)
    assert (code, out) == (0, "secret set 'keys' created in organization 'acme': A\n")
    assert (tmp_path / "st" / "secrets.fernet").is_file()
    config.write_text(config.read_text() + f'[organizations.other.agents.e2]\npath = "{ECHO}"\n')
    code, _, err = run(["list", "--config", str(config)], key_env)
    assert code == 2 and "give the organization with --org (the config file has acme, other)" in err


def test_without_a_key_the_cli_warns_that_it_generated_one(tmp_path: Path) -> None:
    env = {SECRETS_KEY_ENV: ""}
    code, _, err = run(["set", "keys", "A=1", "--org", "o", "--state-dir", str(tmp_path)], env)
    assert code == 0
    assert err.startswith(
        f"catflap: warning: {SECRETS_KEY_ENV} is not set: generated a key for the secret store "
        f"in {tmp_path / 'secrets.key'} (mode 0600)."
    )


def test_generate_key_prints_a_fernet_key() -> None:
    from cryptography.fernet import Fernet

    code, out, _ = run(["generate-key"])
    assert code == 0
    Fernet(out.strip().encode())  # a valid key, or this raises


def test_set_list_unset_on_redis(key_env: dict[str, str]) -> None:
    prefix = f"cftest-{uuid.uuid4().hex[:8]}"
    where = ["--org", "my-org", "--redis", REDIS_URL, "--prefix", prefix]
    try:
        assert run(["set", "keys", f"A={VALUE}", *where], key_env)[0] == 0
        assert run(["list", *where], key_env)[1] == "keys\n"
        assert run(["list", "keys", *where], key_env)[1] == "A\n"
        raw = redis.Redis.from_url(REDIS_URL).hget(f"{prefix}:secrets:my-org", "keys")
        assert raw is not None and VALUE.encode() not in raw
        assert run(["unset", "keys", *where], key_env)[0] == 0
        assert run(["list", *where], key_env)[1] == ""
        code, _, err = run(["set", "keys", "A=1", *where], {SECRETS_KEY_ENV: ""})
        assert code == 1 and err.startswith(f"catflap: {SECRETS_KEY_ENV} is not set")
    finally:
        redis.Redis.from_url(REDIS_URL).delete(f"{prefix}:secrets:my-org")
