"""Secret sets of one machine: one Fernet-encrypted file in ``state_dir``, mode 0600.

``<state_dir>/secrets.fernet`` holds one Fernet token of the JSON document
``{"version": 1, "organizations": {org: {set: {name: value}}}}``: names and values are both
encrypted, and a changed file is refused (Fernet's HMAC). ``catflap secrets`` and a running
``catflap serve`` share it: every change takes an exclusive ``flock`` on
``<state_dir>/secrets.lock``, reads, changes, writes a new file (0600) and renames it over the
old one, so a reader (the launcher, at each instance start) sees the old document or the new
one, never half of one. Nothing is cached: a change made by the CLI reaches the next instance
the gateway starts.

The file I/O runs on a worker thread, so an instance start never blocks the gateway's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from catflap.contract.errors import SecretNotFound, SecretSetNotFound, SecretStoreError
from catflap.secretsets.cipher import SecretCipher, local_cipher
from catflap.secretsets.store import check_set_name, merged_set

__all__ = ["LOCK_FILE", "STORE_FILE", "FileSecretStore"]

log = logging.getLogger("catflap")

#: The encrypted store, in state_dir.
STORE_FILE = "secrets.fernet"
#: Taken (``flock``) by every change, so two writers never lose each other's change.
LOCK_FILE = "secrets.lock"
_VERSION = 1

#: One organisation's sets: set name -> secret name -> value.
_Sets = dict[str, dict[str, str]]


class FileSecretStore:
    """A :class:`~catflap.secretsets.store.SecretStore` in one encrypted file."""

    def __init__(
        self,
        state_dir: Path,
        environ: Mapping[str, str] = os.environ,
        *,
        warn: Callable[[str], None] = log.warning,
    ) -> None:
        """Args:
        state_dir: Where ``secrets.fernet`` (and, without ``CATFLAP_SECRETS_KEY``, the
            generated ``secrets.key``) are.
        environ: Where ``CATFLAP_SECRETS_KEY`` is read, when the store is first used.
        warn: Told, once, when the key is the key file's rather than the variable's.
        """
        self.path = state_dir / STORE_FILE
        self._state_dir = state_dir
        self._environ = environ
        self._warn = warn
        self._warned = False

    # --- the interface -----------------------------------------------------------------------

    async def set_names(self, org: str) -> list[str]:
        return sorted(await asyncio.to_thread(self._org_sets, org))

    async def keys(self, org: str, name: str) -> list[str] | None:
        found = (await asyncio.to_thread(self._org_sets, org)).get(name)
        return None if found is None else sorted(found)

    async def values(self, org: str, name: str) -> dict[str, str] | None:
        found = (await asyncio.to_thread(self._org_sets, org)).get(name)
        return None if found is None else dict(found)

    async def put(self, org: str, name: str, secrets: Mapping[str, str]) -> bool:
        check_set_name(name)

        def change(sets: _Sets) -> bool:
            existing = sets.get(name)
            sets[name] = merged_set(name, existing, secrets, set_count=len(sets))
            return existing is None

        return await asyncio.to_thread(self._change, org, change)

    async def delete(self, org: str, name: str, key: str | None = None) -> None:
        def change(sets: _Sets) -> None:
            found = sets.get(name)
            if found is None:
                raise SecretSetNotFound(_no_set(org, name))
            if key is None:
                del sets[name]
            elif key in found:
                del found[key]
            else:
                raise SecretNotFound(f"secret set {name!r} has no secret {key!r}")

        await asyncio.to_thread(self._change, org, change)

    async def close(self) -> None:
        """Nothing is held open between calls."""

    # --- the file ----------------------------------------------------------------------------

    def _cipher(self, *, create: bool) -> SecretCipher | None:
        cipher, warning = local_cipher(self._state_dir, self._environ, create=create)
        if warning and not self._warned:
            self._warned = True
            self._warn(warning)
        return cipher

    def _read(self) -> dict[str, Any]:
        try:
            token = self.path.read_bytes()
        except FileNotFoundError:
            return {"version": _VERSION, "organizations": {}}
        except OSError as exc:
            raise SecretStoreError(f"cannot read the secret store {self.path}: {exc}") from None
        cipher = self._cipher(create=False)
        if cipher is None:
            raise SecretStoreError(
                f"the secret store {self.path} exists but there is no key to decrypt it: set "
                "CATFLAP_SECRETS_KEY to the key it was written with"
            )
        document = json.loads(cipher.decrypt(token, what=f"the secret store {self.path}"))
        if not isinstance(document, dict) or document.get("version") != _VERSION:
            raise SecretStoreError(
                f"the secret store {self.path} is not a version {_VERSION} store: it was "
                "written by another catflap version"
            )
        return document

    def _org_sets(self, org: str) -> _Sets:
        sets: _Sets = self._read()["organizations"].get(org, {})
        return sets

    def _change(self, org: str, change: Callable[[_Sets], Any]) -> Any:
        with self._locked():
            document = self._read()
            sets = document["organizations"].setdefault(org, {})
            result = change(sets)
            if not sets:
                del document["organizations"][org]
            cipher = self._cipher(create=True)
            assert cipher is not None  # create=True makes one or raises
            self._write(cipher.encrypt(json.dumps(document).encode()))
        return result

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self._state_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise SecretStoreError(
                f"cannot lock the secret store in {self._state_dir}: {exc}; check that the "
                "state_dir is writable (--state-dir DIR)"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _write(self, token: bytes) -> None:
        tmp = self.path.with_name(f"{STORE_FILE}.{os.getpid()}.tmp")
        try:
            tmp.unlink(missing_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                os.fchmod(out.fileno(), 0o600)  # whatever the umask
                out.write(token)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise SecretStoreError(f"cannot write the secret store {self.path}: {exc}") from None


def _no_set(org: str, name: str) -> str:
    return (
        f"organization {org!r} has no secret set {name!r} (`catflap secrets list` shows its sets)"
    )
