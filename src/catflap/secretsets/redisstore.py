"""Secret sets of a cluster: one Redis hash per organisation, each set Fernet-encrypted.

``{prefix}:secrets:{org}`` maps each set name to a Fernet token of the set's JSON
``{name: value}``, encrypted with ``CATFLAP_SECRETS_KEY`` (which every gateway and agent host
of the deployment must share; there is no generated fallback here). Set names are readable in
Redis, as they are in PCC's API; secret names and values are not. A change is a
``WATCH``/``MULTI`` transaction on the hash, retried when another writer got there first.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, WatchError

from catflap.cluster.keys import Keys
from catflap.contract.errors import SecretNotFound, SecretSetNotFound, SecretStoreError
from catflap.secretsets.cipher import SECRETS_KEY_ENV, SecretCipher, cipher_from_env
from catflap.secretsets.store import check_set_name, merged_set

__all__ = ["RedisSecretStore"]

#: A change retried this many times when other writers keep changing the same hash.
_WATCH_ATTEMPTS = 20


class RedisSecretStore:
    """A :class:`~catflap.secretsets.store.SecretStore` on the cluster's Redis."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        *,
        cipher: SecretCipher | None = None,
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        """Args:
        client: The deployment's Redis (the caller closes it).
        keys: Its key names.
        cipher: The key; None reads ``CATFLAP_SECRETS_KEY`` when a set is first read or
            written (so a cluster that uses no secret set needs no key).
        environ: Where ``CATFLAP_SECRETS_KEY`` is read.
        """
        self._redis = client
        self._keys = keys
        self._cipher = cipher
        self._environ = environ

    def _key(self) -> SecretCipher:
        if self._cipher is None:
            self._cipher = cipher_from_env(self._environ)
            if self._cipher is None:
                raise SecretStoreError(
                    f"{SECRETS_KEY_ENV} is not set: in cluster mode every gateway and agent host "
                    "that reads or writes secret sets needs the same key (generate one with "
                    "`catflap secrets generate-key`)"
                )
        return self._cipher

    def _decode(self, org: str, name: str, token: bytes | str) -> dict[str, str]:
        what = f"secret set {name!r} of organization {org!r} in Redis"
        raw = token.encode() if isinstance(token, str) else token
        secrets: dict[str, str] = json.loads(self._key().decrypt(raw, what=what))
        return secrets

    async def _call(self, make: Callable[[], Any]) -> Any:
        try:
            return await make()
        except RedisError as exc:
            raise SecretStoreError(f"the secret store in Redis cannot be reached: {exc}") from None

    async def set_names(self, org: str) -> list[str]:
        names = await self._call(lambda: self._redis.hkeys(self._keys.secret_sets(org)))
        return sorted(_text(name) for name in names)

    async def values(self, org: str, name: str) -> dict[str, str] | None:
        token = await self._call(lambda: self._redis.hget(self._keys.secret_sets(org), name))
        return None if token is None else self._decode(org, name, token)

    async def keys(self, org: str, name: str) -> list[str] | None:
        found = await self.values(org, name)
        return None if found is None else sorted(found)

    async def put(self, org: str, name: str, secrets: Mapping[str, str]) -> bool:
        check_set_name(name)
        self._key()  # no key: refuse before anything is read

        def change(existing: dict[str, str] | None, count: int) -> dict[str, str] | None:
            return merged_set(name, existing, secrets, set_count=count)

        created: bool = await self._change(org, name, change)
        return created

    async def delete(self, org: str, name: str, key: str | None = None) -> None:
        def change(existing: dict[str, str] | None, count: int) -> dict[str, str] | None:
            if existing is None:
                raise SecretSetNotFound(
                    f"organization {org!r} has no secret set {name!r} (`catflap secrets list` "
                    "shows its sets)"
                )
            if key is None:
                return None
            if key not in existing:
                raise SecretNotFound(f"secret set {name!r} has no secret {key!r}")
            return {k: v for k, v in existing.items() if k != key}

        await self._change(org, name, change)

    async def _change(
        self,
        org: str,
        name: str,
        change: Callable[[dict[str, str] | None, int], dict[str, str] | None],
    ) -> bool:
        """Apply ``change`` (existing set, set count -> new set, or None to delete it) in one
        transaction; True when the set did not exist before."""
        hash_key = self._keys.secret_sets(org)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                for _ in range(_WATCH_ATTEMPTS):
                    try:
                        await pipe.watch(hash_key)
                        token = await pipe.hget(hash_key, name)
                        count = await pipe.hlen(hash_key)
                        existing = None if token is None else self._decode(org, name, token)
                        result = change(existing, count)
                        pipe.multi()  # type: ignore[no-untyped-call]  # redis-py's stubs
                        if result is None:
                            pipe.hdel(hash_key, name)
                        else:
                            encrypted = self._key().encrypt(json.dumps(result).encode())
                            pipe.hset(hash_key, name, encrypted)
                        await pipe.execute()
                        return existing is None
                    except WatchError:
                        continue
        except RedisError as exc:
            raise SecretStoreError(f"the secret store in Redis cannot be reached: {exc}") from None
        raise SecretStoreError(
            f"secret set {name!r} kept changing under {_WATCH_ATTEMPTS} attempts to change it; "
            "try again"
        )

    async def close(self) -> None:
        """The Redis client belongs to the caller."""


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
