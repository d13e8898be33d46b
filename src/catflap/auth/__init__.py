"""Session tokens: HMAC-SHA256 signing with a rotating key ring, and single-use enforcement.

- :mod:`~catflap.auth.tokens`: mint and verify ``payload.signature`` tokens.
- :mod:`~catflap.auth.replay`: remember used token ids until they expire.
"""

from __future__ import annotations

from catflap.auth.replay import MemoryReplayStore, ReplayStore, consume_or_reject
from catflap.auth.tokens import (
    TOKEN_MAX_CHARS,
    KeyRing,
    SigningKey,
    TokenClaims,
    TokenFailure,
    mint_token,
    rejection,
    verify_token,
)

__all__ = [
    "TOKEN_MAX_CHARS",
    "KeyRing",
    "MemoryReplayStore",
    "ReplayStore",
    "SigningKey",
    "TokenClaims",
    "TokenFailure",
    "consume_or_reject",
    "mint_token",
    "rejection",
    "verify_token",
]
