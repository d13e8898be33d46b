"""The secret stores: one encrypted file in state_dir, and the cluster's Redis (the real one at
127.0.0.1:6379, as tests/test_cluster.py): the same interface, the same checks and bounds, the
key from CATFLAP_SECRETS_KEY (or a generated 0600 key file on one machine), and no value in
clear at rest."""

from __future__ import annotations

import os
import stat
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from cryptography.fernet import Fernet

from catflap.cluster.keys import Keys
from catflap.contract import limits
from catflap.contract.errors import (
    InvalidSecretName,
    InvalidSecretValue,
    SecretNotFound,
    SecretSetNotFound,
    SecretStoreError,
    SecretTooLarge,
    TooManySecretSets,
)
from catflap.secretsets.cipher import KEY_FILE, SECRETS_KEY_ENV, SecretCipher, generate_key
from catflap.secretsets.filestore import STORE_FILE, FileSecretStore
from catflap.secretsets.redisstore import RedisSecretStore
from catflap.secretsets.store import SecretStore, set_size

REDIS_URL = os.environ.get("CATFLAP_TEST_REDIS", "redis://127.0.0.1:6379/0")
KEY = generate_key()
VALUE = "value-5b2f6e4e0aa1b2c3d4e5f6"


@pytest.fixture
def redis_prefix() -> str:
    return f"cftest-{uuid.uuid4().hex[:8]}"


@pytest.fixture(params=["file", "redis"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, redis_prefix: str
) -> AsyncIterator[SecretStore]:
    if request.param == "file":
        yield FileSecretStore(tmp_path, {SECRETS_KEY_ENV: KEY})
        return
    client = aioredis.Redis.from_url(REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
    try:
        yield RedisSecretStore(client, Keys(redis_prefix), environ={SECRETS_KEY_ENV: KEY})
    finally:
        leftover = [key async for key in client.scan_iter(f"{redis_prefix}:*")]
        if leftover:
            await client.delete(*leftover)
        await client.aclose()


async def test_sets_are_put_listed_read_and_deleted(store: SecretStore) -> None:
    assert await store.set_names("my-org") == []
    assert await store.keys("my-org", "keys") is None
    assert await store.put("my-org", "keys", {"B": "2", "A": VALUE}) is True
    assert await store.put("my-org", "keys", {"A": "replaced", "C": ""}) is False
    assert await store.put("my-org", "other", {"X": "x"}) is True
    assert await store.put("other-org", "keys", {"Z": "z"}) is True
    assert await store.set_names("my-org") == ["keys", "other"]
    assert await store.keys("my-org", "keys") == ["A", "B", "C"]
    assert await store.values("my-org", "keys") == {"A": "replaced", "B": "2", "C": ""}
    await store.delete("my-org", "keys", "B")
    assert await store.values("my-org", "keys") == {"A": "replaced", "C": ""}
    await store.delete("my-org", "keys")
    assert await store.set_names("my-org") == ["other"]
    assert await store.values("other-org", "keys") == {"Z": "z"}


async def test_deleting_what_is_not_there_is_a_404(store: SecretStore) -> None:
    with pytest.raises(SecretSetNotFound) as no_set:
        await store.delete("my-org", "nope")
    assert (no_set.value.status, no_set.value.code) == (404, "secret_set_not_found")
    assert str(no_set.value) == (
        "organization 'my-org' has no secret set 'nope' (`catflap secrets list` shows its sets)"
    )
    await store.put("my-org", "keys", {"A": "a"})
    with pytest.raises(SecretNotFound) as no_key:
        await store.delete("my-org", "keys", "B")
    assert (no_key.value.status, no_key.value.code) == (404, "secret_not_found")
    assert str(no_key.value) == "secret set 'keys' has no secret 'B'"


@pytest.mark.parametrize(
    ("set_name", "secret", "problem"),
    [
        ("bad name", "A", "secret set name 'bad name' contains characters other than"),
        ("", "A", "secret set name is empty"),
        ("s" * (limits.SECRET_NAME_MAX_LEN + 1), "A", "secret set name is 65 characters long"),
        ("keys", "MY.KEY", "secret name 'MY.KEY' contains characters other than"),
        ("keys", "", "secret name is empty"),
        ("keys", "K" * (limits.SECRET_NAME_MAX_LEN + 1), "secret name is 65 characters long"),
    ],
    ids=["set-space", "set-empty", "set-long", "key-dot", "key-empty", "key-long"],
)
async def test_bad_names_are_400_invalid_secret_name(
    store: SecretStore, set_name: str, secret: str, problem: str
) -> None:
    with pytest.raises(InvalidSecretName) as info:
        await store.put("my-org", set_name, {secret: "v"})
    assert (info.value.status, info.value.code) == (400, "invalid_secret_name")
    assert info.value.message.startswith(problem)
    assert info.value.message.endswith(
        f"it must be 1 to {limits.SECRET_NAME_MAX_LEN} characters long, each a letter (a-z, A-Z), "
        f"a digit (0-9), '_' or '-', e.g. "
        f"{'my-secrets' if problem.startswith('secret set') else 'MY_API_KEY'}"
    )
    assert await store.set_names("my-org") == []


async def test_names_at_the_bound_and_pccs_characters_are_accepted(store: SecretStore) -> None:
    name = "a_B-9" + "x" * (limits.SECRET_NAME_MAX_LEN - 5)
    assert await store.put("my-org", name, {name: "v", "_-": "w"}) is True
    assert await store.keys("my-org", name) == sorted([name, "_-"])


async def test_oversize_values_and_sets_are_400_secret_too_large_naming_no_value(
    store: SecretStore,
) -> None:
    at_bound = "v" * limits.SECRET_VALUE_MAX_BYTES
    assert await store.put("my-org", "big", {"A": at_bound}) is True
    with pytest.raises(SecretTooLarge) as value_info:
        await store.put("my-org", "big", {"B": at_bound + "é"})
    assert (value_info.value.status, value_info.value.code) == (400, "secret_too_large")
    assert value_info.value.message == (
        f"the value of secret 'B' is {limits.SECRET_VALUE_MAX_BYTES + 2} bytes long; at most "
        f"{limits.SECRET_VALUE_MAX_BYTES} bytes are allowed (keep large files, e.g. "
        "certificates, outside the set and put their path in it)"
    )
    # Two values at the bound fill a set exactly; one byte more of name is over it.
    assert set_size({"A": at_bound, "B": at_bound}) == limits.SECRET_SET_MAX_BYTES + 2
    with pytest.raises(SecretTooLarge) as set_info:
        await store.put("my-org", "big", {"B": at_bound})
    assert set_info.value.message == (
        f"secret set 'big' would hold {limits.SECRET_SET_MAX_BYTES + 2} bytes of names and "
        f"values; at most {limits.SECRET_SET_MAX_BYTES} are allowed: split it, or remove "
        "secrets it no longer needs"
    )
    assert at_bound not in value_info.value.message + set_info.value.message
    assert await store.keys("my-org", "big") == ["A"]  # nothing of a refused put was kept


@pytest.mark.parametrize("value", ["a\0b", "\ud800"], ids=["nul", "lone-surrogate"])
async def test_values_no_environment_can_hold_are_400(store: SecretStore, value: str) -> None:
    with pytest.raises(InvalidSecretValue) as info:
        await store.put("my-org", "keys", {"A": value})
    assert (info.value.status, info.value.code) == (400, "invalid_secret_value")
    assert info.value.message == (
        "the value of secret 'A' holds a NUL byte or is not valid UTF-8 text, which no "
        "environment variable can hold: encode binary values (e.g. as base64)"
    )


async def test_an_organization_holds_at_most_secret_sets_per_org_max(store: SecretStore) -> None:
    for n in range(limits.SECRET_SETS_PER_ORG_MAX):
        await store.put("my-org", f"s{n}", {"A": "a"})
    with pytest.raises(TooManySecretSets) as info:
        await store.put("my-org", "one-more", {"A": "a"})
    assert (info.value.status, info.value.code) == (400, "too_many_secret_sets")
    await store.put("my-org", "s0", {"B": "b"})  # an existing set still takes secrets
    await store.put("other-org", "one-more", {"A": "a"})  # the bound is per organisation
    assert len(await store.set_names("my-org")) == limits.SECRET_SETS_PER_ORG_MAX


async def test_another_key_cannot_read_the_store_and_says_what_to_do(
    store: SecretStore, tmp_path: Path, redis_prefix: str
) -> None:
    await store.put("my-org", "keys", {"A": VALUE})
    other = {SECRETS_KEY_ENV: generate_key()}
    if isinstance(store, FileSecretStore):
        reader: SecretStore = FileSecretStore(tmp_path, other)
        what = f"the secret store {tmp_path / STORE_FILE}"
    else:
        client = aioredis.Redis.from_url(REDIS_URL)
        reader = RedisSecretStore(client, Keys(redis_prefix), environ=other)
        what = "secret set 'keys' of organization 'my-org' in Redis"
    try:
        with pytest.raises(SecretStoreError) as info:
            await reader.values("my-org", "keys")
    finally:
        if not isinstance(store, FileSecretStore):
            await client.aclose()
    assert str(info.value) == (
        f"{what} cannot be decrypted with the key from ${SECRETS_KEY_ENV}: it was written with "
        f"another key, or changed. Set {SECRETS_KEY_ENV} to the key it was written with (to "
        "rotate keys, give NEW,OLD: the first encrypts, all decrypt)"
    )


async def test_keys_rotate_new_first_old_still_decrypting(tmp_path: Path) -> None:
    old = FileSecretStore(tmp_path, {SECRETS_KEY_ENV: KEY})
    await old.put("my-org", "keys", {"A": VALUE})
    new_key = generate_key()
    rotated = FileSecretStore(tmp_path, {SECRETS_KEY_ENV: f"{new_key}, {KEY}"})
    assert await rotated.values("my-org", "keys") == {"A": VALUE}
    await rotated.put("my-org", "keys", {"B": "b"})  # re-encrypts with the new key
    only_new = FileSecretStore(tmp_path, {SECRETS_KEY_ENV: new_key})
    assert await only_new.values("my-org", "keys") == {"A": VALUE, "B": "b"}


async def test_a_malformed_key_is_refused_with_how_to_make_one(tmp_path: Path) -> None:
    store = FileSecretStore(tmp_path, {SECRETS_KEY_ENV: "not-a-key"})
    with pytest.raises(SecretStoreError) as info:
        await store.put("my-org", "keys", {"A": "a"})
    assert str(info.value) == (
        f"${SECRETS_KEY_ENV} is not a comma-separated list of Fernet keys (32 url-safe base64 "
        "bytes each): generate one with `catflap secrets generate-key`"
    )


async def test_without_the_variable_a_key_file_is_generated_0600_with_a_warning(
    tmp_path: Path,
) -> None:
    warnings: list[str] = []
    store = FileSecretStore(tmp_path / "state", {}, warn=warnings.append)
    assert await store.set_names("my-org") == []  # reading an absent store needs no key
    assert not (tmp_path / "state" / KEY_FILE).exists() and warnings == []
    await store.put("my-org", "keys", {"A": VALUE})
    key_file = tmp_path / "state" / KEY_FILE
    for path in (key_file, tmp_path / "state" / STORE_FILE):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert warnings == [
        f"{SECRETS_KEY_ENV} is not set: generated a key for the secret store in {key_file} "
        "(mode 0600). Anyone who can read that file can decrypt the secret sets: for "
        f"production, set {SECRETS_KEY_ENV} (e.g. from a secret manager; `catflap secrets "
        "generate-key` makes one) and keep the key out of the state dir"
    ]
    # Another process (the gateway) reads it with the same key file, and warns once.
    again: list[str] = []
    reader = FileSecretStore(tmp_path / "state", {}, warn=again.append)
    assert await reader.values("my-org", "keys") == {"A": VALUE}
    assert await reader.keys("my-org", "keys") == ["A"]
    assert len(again) == 1 and again[0].startswith(f"{SECRETS_KEY_ENV} is not set: using the key")
    # The file decrypts with the key file's key: it is Fernet, nothing home-made.
    token = (tmp_path / "state" / STORE_FILE).read_bytes()
    assert VALUE.encode() in Fernet(key_file.read_bytes().strip()).decrypt(token)
    assert VALUE.encode() not in token


async def test_a_store_file_without_any_key_says_which_key_is_missing(tmp_path: Path) -> None:
    await FileSecretStore(tmp_path, {SECRETS_KEY_ENV: KEY}).put("my-org", "keys", {"A": "a"})
    with pytest.raises(SecretStoreError) as info:
        await FileSecretStore(tmp_path, {}).values("my-org", "keys")
    assert str(info.value) == (
        f"the secret store {tmp_path / STORE_FILE} exists but there is no key to decrypt it: "
        f"set {SECRETS_KEY_ENV} to the key it was written with"
    )


async def test_a_changed_file_is_refused_not_misread(tmp_path: Path) -> None:
    store = FileSecretStore(tmp_path, {SECRETS_KEY_ENV: KEY})
    await store.put("my-org", "keys", {"A": "a"})
    path = tmp_path / STORE_FILE
    token = bytearray(path.read_bytes())
    token[40] ^= 1
    path.write_bytes(bytes(token))
    with pytest.raises(SecretStoreError, match="cannot be decrypted"):
        await store.set_names("my-org")


async def test_redis_holds_set_names_but_neither_secret_names_nor_values_in_clear(
    redis_prefix: str,
) -> None:
    client = aioredis.Redis.from_url(REDIS_URL)
    store = RedisSecretStore(
        client, Keys(redis_prefix), cipher=SecretCipher([KEY.encode()], source="t")
    )
    try:
        await store.put("my-org", "keys", {"MY_SECRET": VALUE})
        raw = await client.hgetall(f"{redis_prefix}:secrets:my-org")
        assert list(raw) == [b"keys"]
        assert VALUE.encode() not in raw[b"keys"] and b"MY_SECRET" not in raw[b"keys"]
    finally:
        await client.delete(f"{redis_prefix}:secrets:my-org")
        await client.aclose()


async def test_redis_without_the_key_refuses_to_write_but_lists(redis_prefix: str) -> None:
    client = aioredis.Redis.from_url(REDIS_URL)
    store = RedisSecretStore(client, Keys(redis_prefix), environ={})
    try:
        assert await store.set_names("my-org") == []
        with pytest.raises(SecretStoreError) as info:
            await store.put("my-org", "keys", {"A": "a"})
    finally:
        await client.aclose()
    assert str(info.value) == (
        f"{SECRETS_KEY_ENV} is not set: in cluster mode every gateway and agent host that reads "
        "or writes secret sets needs the same key (generate one with `catflap secrets "
        "generate-key`)"
    )


async def test_unreachable_redis_is_a_store_error() -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = aioredis.Redis(port=port, socket_connect_timeout=1)
    store = RedisSecretStore(client, Keys("x"), environ={SECRETS_KEY_ENV: KEY})
    try:
        with pytest.raises(SecretStoreError, match="the secret store in Redis cannot be reached"):
            await store.set_names("my-org")
        with pytest.raises(SecretStoreError, match="the secret store in Redis cannot be reached"):
            await store.put("my-org", "keys", {"A": "a"})
    finally:
        await client.aclose()
