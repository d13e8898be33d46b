"""The key secret sets are encrypted with at rest: Fernet, from ``CATFLAP_SECRETS_KEY``.

``CATFLAP_SECRETS_KEY`` holds one or more Fernet keys (``catflap secrets generate-key``),
separated by commas: the first encrypts, every one decrypts, so a key is rotated by putting the
new one first and keeping the old one until the next write has re-encrypted the store. Fernet
(``cryptography``) is AES-128-CBC with an HMAC-SHA256 over it: a store written with another key,
or changed on disk, is refused rather than misread.

Without the variable, ``catflap serve`` keeps a generated key in ``<state_dir>/secrets.key``
(mode 0600) and warns: anyone who can read the state dir can then read the secrets. In cluster
mode there is no such fallback: every gateway and agent host must share the key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from catflap.contract.errors import SecretStoreError

__all__ = [
    "KEY_FILE",
    "SECRETS_KEY_ENV",
    "SecretCipher",
    "cipher_from_env",
    "generate_key",
    "local_cipher",
]

#: Env var holding the Fernet key ring: ``key1,key0`` (first encrypts, all decrypt).
SECRETS_KEY_ENV = "CATFLAP_SECRETS_KEY"
#: The generated key of a ``catflap serve`` run without ``CATFLAP_SECRETS_KEY``, in state_dir.
KEY_FILE = "secrets.key"


class SecretCipher:
    """Encrypts and decrypts the store's documents; says where its key came from."""

    def __init__(self, keys: list[bytes], *, source: str) -> None:
        self._fernet = MultiFernet([Fernet(key) for key in keys])
        #: ``$CATFLAP_SECRETS_KEY`` or the key file's path: named in errors, never the key.
        self.source = source

    def encrypt(self, data: bytes) -> bytes:
        return self._fernet.encrypt(data)

    def decrypt(self, token: bytes, *, what: str) -> bytes:
        """``token`` decrypted.

        Raises:
            SecretStoreError: ``what`` (e.g. the store file) was not written with these keys,
                or was changed since.
        """
        try:
            return self._fernet.decrypt(token)
        except InvalidToken:
            raise SecretStoreError(
                f"{what} cannot be decrypted with the key from {self.source}: it was written "
                f"with another key, or changed. Set {SECRETS_KEY_ENV} to the key it was written "
                "with (to rotate keys, give NEW,OLD: the first encrypts, all decrypt)"
            ) from None


def generate_key() -> str:
    """A new random Fernet key, as ``CATFLAP_SECRETS_KEY`` takes it."""
    return Fernet.generate_key().decode("ascii")


def _parse(value: str, source: str) -> SecretCipher:
    keys = [part.strip().encode("ascii", "replace") for part in value.split(",") if part.strip()]
    try:
        return SecretCipher(keys, source=source)
    except ValueError:
        # Fernet's own message quotes nothing, but ours says what to do.
        raise SecretStoreError(
            f"{source} is not a comma-separated list of Fernet keys (32 url-safe base64 "
            "bytes each): generate one with `catflap secrets generate-key`"
        ) from None


def cipher_from_env(environ: Mapping[str, str] = os.environ) -> SecretCipher | None:
    """The cipher of ``CATFLAP_SECRETS_KEY``, or None when it is not set.

    Raises:
        SecretStoreError: it is set but holds no valid key.
    """
    value = environ.get(SECRETS_KEY_ENV, "").strip()
    return _parse(value, f"${SECRETS_KEY_ENV}") if value else None


def local_cipher(
    state_dir: Path, environ: Mapping[str, str] = os.environ, *, create: bool
) -> tuple[SecretCipher | None, str | None]:
    """The cipher of a single machine's store: ``CATFLAP_SECRETS_KEY``, else the key file.

    Args:
        state_dir: Where the key file is (or goes).
        environ: Where ``CATFLAP_SECRETS_KEY`` is looked up.
        create: Generate the key file when neither exists (a write); a read needs no key.

    Returns:
        The cipher (None when there is no key and ``create`` is false) and, when the key is
        the key file's, the warning to show: the key sits beside what it protects.

    Raises:
        SecretStoreError: the variable is malformed, or the key file cannot be read or written.
    """
    from_env = cipher_from_env(environ)
    if from_env is not None:
        return from_env, None
    path = state_dir / KEY_FILE
    try:
        text = path.read_text(encoding="ascii").strip()
        generated = False
    except FileNotFoundError:
        if not create:
            return None, None
        text = generate_key()
        generated = _write_private(path, text + "\n")
        if not generated:  # another process made it first: use theirs
            text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise SecretStoreError(f"cannot read the secrets key {path}: {exc}") from None
    cipher = _parse(text, str(path))
    what = "generated a key for the secret store in" if generated else "using the key in"
    return cipher, (
        f"{SECRETS_KEY_ENV} is not set: {what} {path} (mode 0600). Anyone who can read that "
        f"file can decrypt the secret sets: for production, set {SECRETS_KEY_ENV} (e.g. from a "
        "secret manager; `catflap secrets generate-key` makes one) and keep the key out of "
        "the state dir"
    )


def _write_private(path: Path, text: str) -> bool:
    """Create ``path`` with mode 0600 and ``text``; False when it exists already."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    except OSError as exc:
        raise SecretStoreError(
            f"cannot create the secrets key {path}: {exc}; check that the state_dir is "
            f"writable (--state-dir DIR), or set {SECRETS_KEY_ENV}"
        ) from None
    with os.fdopen(fd, "w", encoding="ascii") as out:
        os.fchmod(out.fileno(), 0o600)  # whatever the umask
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    return True
