"""What a secret store does, and the checks every store applies before it writes.

A secret set is a named mapping of environment variable names to values that belongs to an
organisation (PCC: "sets live in the organisation"); an agent selects one with ``secret_set``.
:class:`SecretStore` is the whole interface: the ``catflap secrets`` commands, the API routes
and the launcher (through :class:`~catflap.secretsets.inject.AgentSecrets`) call only these
methods. Listing never returns a value; only :meth:`SecretStore.values`, which the launcher
calls when it starts an instance, does.

Two stores implement it: :class:`~catflap.secretsets.filestore.FileSecretStore` (one encrypted
file in ``state_dir``) and :class:`~catflap.secretsets.redisstore.RedisSecretStore` (cluster
mode). Both encrypt with :class:`~catflap.secretsets.cipher.SecretCipher`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from catflap.contract import limits
from catflap.contract.errors import (
    InvalidSecretName,
    InvalidSecretValue,
    SecretTooLarge,
    TooManySecretSets,
)
from catflap.contract.names import secret_name_problem

__all__ = ["SecretStore", "check_set_name", "merged_set", "set_size"]


class SecretStore(Protocol):
    """An organisation's secret sets. Every method may raise
    :class:`~catflap.contract.errors.SecretStoreError` (no usable key, store unreadable)."""

    async def set_names(self, org: str) -> list[str]:
        """The organisation's set names, sorted (no keys, no values)."""
        ...

    async def keys(self, org: str, name: str) -> list[str] | None:
        """The names of the secrets in set ``name``, sorted; None when there is no such set.
        Never the values."""
        ...

    async def values(self, org: str, name: str) -> dict[str, str] | None:
        """Set ``name`` with its values (for an instance's environment); None when absent."""
        ...

    async def put(self, org: str, name: str, secrets: Mapping[str, str]) -> bool:
        """Add ``secrets`` to set ``name`` (creating it), replacing same-named ones.

        Returns:
            True when the set was created.

        Raises:
            InvalidSecretName: the set's or a secret's name is not PCC's ``[a-zA-Z0-9_-]{1,64}``.
            InvalidSecretValue: a value holds a NUL byte.
            SecretTooLarge: a value or the resulting set is over its bound.
            TooManySecretSets: a new set in an organisation at ``SECRET_SETS_PER_ORG_MAX``.
        """
        ...

    async def delete(self, org: str, name: str, key: str | None = None) -> None:
        """Delete set ``name``, or only its secret ``key``.

        Raises:
            SecretSetNotFound: there is no such set.
            SecretNotFound: the set has no secret ``key``.
        """
        ...

    async def close(self) -> None:
        """Release what the store holds (a Redis client it was given stays open)."""
        ...


def check_set_name(name: str) -> None:
    """Raises :class:`InvalidSecretName` unless ``name`` is a valid secret set name."""
    problem = secret_name_problem("secret set", name)
    if problem:
        raise InvalidSecretName(problem)


def set_size(secrets: Mapping[str, str]) -> int:
    """What a set weighs against ``SECRET_SET_MAX_BYTES``: its names and values in UTF-8."""
    return sum(len(key.encode()) + len(value.encode()) for key, value in secrets.items())


def merged_set(
    name: str,
    existing: Mapping[str, str] | None,
    secrets: Mapping[str, str],
    *,
    set_count: int,
) -> dict[str, str]:
    """Set ``name`` after ``secrets`` are put into it, every bound checked.

    Args:
        name: The set's name.
        existing: The set as stored; None when it is new.
        secrets: What is put: names to values.
        set_count: How many sets the organisation has now (a new one must fit).

    Raises:
        As :meth:`SecretStore.put`. Messages name sets, secrets and sizes, never a value.
    """
    check_set_name(name)
    if existing is None and set_count >= limits.SECRET_SETS_PER_ORG_MAX:
        raise TooManySecretSets(
            f"the organization has {set_count} secret sets, the most it may have "
            f"({limits.SECRET_SETS_PER_ORG_MAX}): delete one (`catflap secrets unset NAME`) "
            "or add these secrets to an existing set"
        )
    for key, value in secrets.items():
        problem = secret_name_problem("secret", key)
        if problem:
            raise InvalidSecretName(problem)
        try:
            size = len(value.encode())
        except UnicodeEncodeError:
            size = -1
        if size < 0 or "\0" in value:
            raise InvalidSecretValue(
                f"the value of secret {key!r} holds a NUL byte or is not valid UTF-8 text, "
                "which no environment variable can hold: encode binary values (e.g. as base64)"
            )
        if size > limits.SECRET_VALUE_MAX_BYTES:
            raise SecretTooLarge(
                f"the value of secret {key!r} is {size} bytes long; at most "
                f"{limits.SECRET_VALUE_MAX_BYTES} bytes are allowed (keep large files, e.g. "
                "certificates, outside the set and put their path in it)"
            )
    result = {**(existing or {}), **secrets}
    total = set_size(result)
    if total > limits.SECRET_SET_MAX_BYTES:
        raise SecretTooLarge(
            f"secret set {name!r} would hold {total} bytes of names and values; at most "
            f"{limits.SECRET_SET_MAX_BYTES} are allowed: split it, or remove secrets it no "
            "longer needs"
        )
    return result
