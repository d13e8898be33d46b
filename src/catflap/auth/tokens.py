"""HMAC-SHA256 session tokens: minted by ``POST /v1/public/{agent}/start``, checked on upgrade.

Wire format (no padding anywhere)::

    base64url(payload JSON) "." base64url(HMAC-SHA256(secret, payload segment))

The MAC covers the exact ASCII bytes of the base64url payload segment, so verification never
has to re-serialise JSON. The payload is compact JSON with exactly these claims:

- ``sh``: the service host (``agent.org``) the token is good for;
- ``exp``: expiry, integer unix seconds; the token is refused from ``exp`` on;
- ``iat``: issue time, integer unix seconds;
- ``jti``: the token id (catflap uses the session id); each jti opens one session only, see
  :mod:`catflap.auth.replay`;
- ``kid``: the id of the :class:`SigningKey` that signed it.

Every failure of :func:`verify_token` is a :class:`~catflap.contract.errors.TokenRejected`
(403, JSON code ``token_<reason>``) whose ``reason`` is a :class:`TokenFailure` value; no
input string makes it raise anything else.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import json
import math
import re
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from catflap.contract import limits
from catflap.contract.errors import CatflapMisuse, TokenRejected

__all__ = [
    "TOKEN_MAX_CHARS",
    "KeyRing",
    "SigningKey",
    "TokenClaims",
    "TokenFailure",
    "mint_token",
    "rejection",
    "verify_token",
]

#: Longest token worth decoding. A real one is about 250 characters (a 200-character service
#: host, a UUID jti and a short kid); anything past this is refused before any decoding.
TOKEN_MAX_CHARS = 2048

_ENV_FORMAT_HINT = (
    'expected "kid:secret" entries separated by commas, current key first, '
    'e.g. "k2:new-secret,k1:old-secret"'
)
_CLAIMS = ("sh", "exp", "iat", "jti", "kid")
_INT_CLAIMS = frozenset({"exp", "iat"})
_MAC_LEN = hashlib.sha256().digest_size
_B64URL_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")
_START = "POST /v1/public/{agent}/start"


@dataclass(frozen=True)
class SigningKey:
    """One HMAC key. Its ``repr`` shows the kid only, never the secret.

    Attributes:
        kid: Key id, written into every token the key signs.
        secret: Raw HMAC-SHA256 key bytes.
    """

    kid: str
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not self.kid:
            raise ValueError("signing key id (kid) must be a non-empty string")
        if not self.secret:
            raise ValueError(f"signing key {self.kid!r} has an empty secret")


class KeyRing:
    """The keys a gateway trusts: the first (current) one signs, every one verifies.

    Rotate by putting a new key first and keeping the old one behind it for at least one token
    TTL; once it is dropped, tokens it signed fail with ``unknown_key``.
    """

    def __init__(self, keys: Sequence[SigningKey]) -> None:
        """Build a ring from ``keys``, current key first.

        Args:
            keys: At least one key; kids must be unique.

        Raises:
            ValueError: ``keys`` is empty or two keys share a kid.
        """
        self._keys: tuple[SigningKey, ...] = tuple(keys)
        if not self._keys:
            raise ValueError("a key ring needs at least one signing key")
        self._by_kid: dict[str, SigningKey] = {}
        for key in self._keys:
            if key.kid in self._by_kid:
                raise ValueError(f"duplicate signing key id {key.kid!r}: kids must be unique")
            self._by_kid[key.kid] = key

    @property
    def current(self) -> SigningKey:
        """The key that signs new tokens."""
        return self._keys[0]

    @property
    def kids(self) -> tuple[str, ...]:
        """Every kid on the ring, current first."""
        return tuple(key.kid for key in self._keys)

    def get(self, kid: str) -> SigningKey | None:
        """The key called ``kid``, or ``None`` if it is not (or no longer) on the ring."""
        return self._by_kid.get(kid)

    @classmethod
    def from_env(cls, value: str) -> KeyRing:
        """Parse the environment format ``"kid1:secret1,kid0:secret0"``.

        The first entry signs; all verify. Whitespace around the whole value and around each
        kid is ignored; the secret is the UTF-8 bytes of everything after the entry's first
        ``:`` (so secrets may contain ``:`` but not ``,``).

        Args:
            value: The raw environment variable value.

        Returns:
            The key ring.

        Raises:
            ValueError: An entry has no ``:``, an empty kid or secret, or a kid repeats. The
                message says which entry and shows the expected format; it never contains a
                secret.
        """
        text = value.strip()
        if not text:
            raise ValueError(f"no signing keys given: {_ENV_FORMAT_HINT}")
        keys: list[SigningKey] = []
        seen: set[str] = set()
        for position, entry in enumerate(text.split(","), start=1):
            kid_text, colon, secret_text = entry.partition(":")
            kid = kid_text.strip()
            if not colon:
                raise ValueError(f"signing key entry {position} has no ':': {_ENV_FORMAT_HINT}")
            if not kid:
                raise ValueError(
                    f"signing key entry {position} has an empty kid: {_ENV_FORMAT_HINT}"
                )
            if not secret_text:
                raise ValueError(
                    f"signing key {kid!r} (entry {position}) has an empty secret: "
                    f"{_ENV_FORMAT_HINT}"
                )
            if kid in seen:
                raise ValueError(
                    f"signing key id {kid!r} appears twice (entry {position}); kids must be "
                    f"unique: {_ENV_FORMAT_HINT}"
                )
            seen.add(kid)
            keys.append(SigningKey(kid=kid, secret=secret_text.encode("utf-8")))
        return cls(keys)

    @classmethod
    def generate(cls) -> KeyRing:
        """A ring with one fresh random key (32-byte secret, 8-hex-digit kid).

        Tokens it signs are only valid in this process; use :meth:`from_env` to share keys
        between gateways or across restarts.
        """
        return cls([SigningKey(kid=secrets.token_hex(4), secret=secrets.token_bytes(32))])

    def __repr__(self) -> str:
        return f"KeyRing(kids={self.kids!r})"


@dataclass(frozen=True)
class TokenClaims:
    """The verified (or freshly minted) claims of a token.

    Attributes:
        sh: Service host (``agent.org``) the token is good for.
        exp: Expiry, unix seconds; invalid from this second on.
        iat: Issue time, unix seconds.
        jti: Token id; catflap uses the session id.
        kid: Id of the signing key.
    """

    sh: str
    exp: int
    iat: int
    jti: str
    kid: str


# The contract fixes ``(str, enum.Enum)``: members compare and JSON-encode as their values.
class TokenFailure(str, enum.Enum):  # noqa: UP042
    """Why a token was refused; the value is :attr:`TokenRejected.reason`."""

    MISSING = "missing"
    MALFORMED = "malformed"
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    WRONG_AGENT = "wrong_agent"
    REPLAYED = "replayed"


_MESSAGES: dict[TokenFailure, tuple[str, str]] = {
    TokenFailure.MISSING: (
        "session token missing",
        f"add ?token=<token> from {_START} to the WebSocket URL",
    ),
    TokenFailure.MALFORMED: (
        "session token malformed",
        f"pass the token exactly as {_START} returned it",
    ),
    TokenFailure.UNKNOWN_KEY: (
        "session token signed with a key this gateway does not know (rotated out?)",
        f"call {_START} for a new one",
    ),
    TokenFailure.BAD_SIGNATURE: (
        "session token signature invalid",
        f"call {_START} for a new one and pass it unmodified",
    ),
    TokenFailure.EXPIRED: (
        "session token expired",
        f"call {_START} for a new one",
    ),
    TokenFailure.NOT_YET_VALID: (
        "session token not yet valid (issued in the future; check the gateway clocks)",
        f"call {_START} for a new one",
    ),
    TokenFailure.WRONG_AGENT: (
        "session token was issued for another agent",
        f"connect with the serviceHost the token was issued for, or call {_START} for this agent",
    ),
    TokenFailure.REPLAYED: (
        "session token already used (each token opens one session)",
        f"call {_START} for a new one",
    ),
}


def rejection(reason: TokenFailure, detail: str = "") -> TokenRejected:
    """Build the 403 for ``reason`` with a message that says what went wrong and what to do.

    Args:
        reason: Why the token is refused.
        detail: Optional precision inserted after the summary, e.g. ``claim 'exp' missing``.
            It must not contain secrets or unescaped client input.

    Returns:
        ``TokenRejected(reason.value, message)``, ready to raise; its JSON code is
        ``token_<reason>``.
    """
    summary, todo = _MESSAGES[reason]
    if detail:
        summary = f"{summary} ({detail})"
    return TokenRejected(reason.value, f"{summary}: {todo}")


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64decode(segment: str, what: str) -> bytes:
    """Decode one unpadded, canonical base64url segment, or raise MALFORMED."""
    if _B64URL_SEGMENT.fullmatch(segment) is None or len(segment) % 4 == 1:
        raise rejection(TokenFailure.MALFORMED, f"{what} is not unpadded base64url")
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):  # pragma: no cover - excluded by the checks above
        raise rejection(TokenFailure.MALFORMED, f"{what} is not unpadded base64url") from None
    # Unused trailing bits must be zero; otherwise several strings would carry the same bytes.
    if _b64encode(raw) != segment:
        raise rejection(TokenFailure.MALFORMED, f"{what} is not canonical base64url")
    return raw


def _mac(key: SigningKey, payload_segment: str) -> bytes:
    return hmac.new(key.secret, payload_segment.encode("ascii"), hashlib.sha256).digest()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key in JSON object")
    return obj


def _parse_claims(payload: bytes) -> TokenClaims:
    """Parse and type-check the payload JSON, or raise MALFORMED naming the problem."""
    try:
        document = json.loads(
            payload.decode("utf-8"),
            object_pairs_hook=_unique_object,
            parse_constant=_reject_constant,
        )
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError included
        raise rejection(TokenFailure.MALFORMED, "payload is not a JSON object") from None
    if not isinstance(document, dict):
        raise rejection(TokenFailure.MALFORMED, "payload is not a JSON object")
    for name in _CLAIMS:
        if name not in document:
            raise rejection(TokenFailure.MALFORMED, f"claim {name!r} missing")
        claim = document[name]
        if name in _INT_CLAIMS:
            if type(claim) is not int:  # bool is an int subclass and is refused here
                raise rejection(TokenFailure.MALFORMED, f"claim {name!r} must be an integer")
        elif not isinstance(claim, str) or not claim:
            raise rejection(TokenFailure.MALFORMED, f"claim {name!r} must be a non-empty string")
    return TokenClaims(
        sh=document["sh"],
        exp=document["exp"],
        iat=document["iat"],
        jti=document["jti"],
        kid=document["kid"],
    )


def mint_token(
    ring: KeyRing,
    service_host: str,
    *,
    now: float,
    jti: str | None = None,
    ttl: int = limits.TOKEN_TTL_S,
) -> tuple[str, TokenClaims]:
    """Sign a token for ``service_host`` with the ring's current key.

    Args:
        ring: Keys; :attr:`KeyRing.current` signs.
        service_host: The ``agent.org`` the token is good for.
        now: Current unix time in seconds; ``iat`` is its floor and ``exp`` is ``iat + ttl``.
        jti: Token id; catflap passes the session id. Defaults to a random UUID4 string.
        ttl: Lifetime in seconds.

    Returns:
        The token string and its claims.

    Raises:
        CatflapMisuse: ``service_host`` or ``jti`` is empty, ``ttl`` is not positive, or the
            token would exceed :data:`TOKEN_MAX_CHARS` (so it could never verify). These are
            caller bugs, not client errors.
    """
    if not service_host:
        raise CatflapMisuse("mint_token: service_host must be non-empty")
    if jti is None:
        jti = str(uuid.uuid4())
    elif not jti:
        raise CatflapMisuse("mint_token: jti must be non-empty")
    if ttl <= 0:
        raise CatflapMisuse(f"mint_token: ttl must be positive, got {ttl}")
    key = ring.current
    iat = math.floor(now)
    claims = TokenClaims(sh=service_host, exp=iat + ttl, iat=iat, jti=jti, kid=key.kid)
    payload = json.dumps(
        {"sh": claims.sh, "exp": claims.exp, "iat": claims.iat, "jti": claims.jti, "kid": key.kid},
        separators=(",", ":"),
    )
    payload_segment = _b64encode(payload.encode("ascii"))
    token = f"{payload_segment}.{_b64encode(_mac(key, payload_segment))}"
    if len(token) > TOKEN_MAX_CHARS:
        raise CatflapMisuse(
            f"mint_token: token would be {len(token)} characters, over {TOKEN_MAX_CHARS}"
        )
    return token, claims


def verify_token(token: str, ring: KeyRing, *, service_host: str, now: float) -> TokenClaims:
    """Check ``token`` for ``service_host`` at time ``now`` and return its claims.

    Checks run in this order, and the first failure is reported: shape, base64url, JSON and
    claim types; key id; signature (constant-time); expiry; issue time; service host. Extra
    claims are ignored. Single use is not checked here; see
    :func:`catflap.auth.replay.consume_or_reject`.

    Args:
        token: The ``?token=`` value as received (any string).
        ring: Keys to verify with.
        service_host: The ``agent.org`` being connected to.
        now: Current unix time in seconds.

    Returns:
        The verified claims.

    Raises:
        TokenRejected: 403 for every failure, with ``reason`` (JSON code ``token_<reason>``):
            ``missing`` (empty token); ``malformed`` (longer than :data:`TOKEN_MAX_CHARS`, not
            two unpadded canonical base64url segments, signature not 32 bytes, payload not a
            UTF-8 JSON object, a claim missing or of the wrong type); ``unknown_key`` (kid not
            on the ring, e.g. rotated out); ``bad_signature``; ``expired`` (``now >= exp``);
            ``not_yet_valid`` (``iat > now + TOKEN_CLOCK_SKEW_S``); ``wrong_agent`` (``sh``
            is not ``service_host``). Never any other exception, whatever the string.
    """
    if not isinstance(token, str):
        raise rejection(TokenFailure.MALFORMED, "token is not a string")
    if not token:
        raise rejection(TokenFailure.MISSING)
    if len(token) > TOKEN_MAX_CHARS:
        raise rejection(TokenFailure.MALFORMED, f"longer than {TOKEN_MAX_CHARS} characters")
    parts = token.split(".")
    if len(parts) != 2:
        raise rejection(TokenFailure.MALFORMED, "expected two '.'-separated segments")
    payload_segment, signature_segment = parts
    payload = _b64decode(payload_segment, "payload")
    signature = _b64decode(signature_segment, "signature")
    if len(signature) != _MAC_LEN:
        raise rejection(TokenFailure.MALFORMED, f"signature must be {_MAC_LEN} bytes")
    claims = _parse_claims(payload)

    key = ring.get(claims.kid)
    if key is None:
        raise rejection(TokenFailure.UNKNOWN_KEY)
    if not hmac.compare_digest(_mac(key, payload_segment), signature):
        raise rejection(TokenFailure.BAD_SIGNATURE)

    if now >= claims.exp:
        raise rejection(TokenFailure.EXPIRED)
    if claims.iat > now + limits.TOKEN_CLOCK_SKEW_S:
        raise rejection(TokenFailure.NOT_YET_VALID)
    if claims.sh != service_host:
        raise rejection(TokenFailure.WRONG_AGENT)
    return claims
