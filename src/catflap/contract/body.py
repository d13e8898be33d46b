"""Decoding and normalising ``?body=``, and encoding the body that ``POST /start`` returns.

The spec's decision table, which this module implements:

- Accept standard or URL-safe base64, padded or not, percent-encoded or raw. In a raw value a
  space is read as ``+``. The result must be UTF-8 JSON.
- At most :data:`~catflap.contract.limits.BODY_MAX_BYTES` bytes of decoded JSON. Malformed:
  400 (:class:`~catflap.contract.errors.InvalidBody`). Too large: 413
  (:class:`~catflap.contract.errors.BodyTooLarge`).
- Forwarded to the agent as percent-encoded, padded standard base64.

:func:`decode_body` never raises anything but those two errors, whatever string it is given.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import quote, unquote

from catflap.contract import errors, limits

__all__ = ["DecodedBody", "decode_body", "encode_body"]

_HINT = "?body= must be base64-encoded UTF-8 JSON, e.g. base64.b64encode(json.dumps(body).encode())"
_BASE64_RE = re.compile(r"[A-Za-z0-9+/_-]*=*", re.ASCII)
_NOT_BASE64_RE = re.compile(r"[^A-Za-z0-9+/_=-]", re.ASCII)
_URLSAFE_TO_STANDARD = str.maketrans("-_", "+/")


@dataclass(frozen=True, slots=True)
class DecodedBody:
    """A valid ``?body=``."""

    #: The parsed JSON value.
    value: Any
    #: The exact decoded bytes (UTF-8 JSON, at most ``BODY_MAX_BYTES``).
    json_bytes: bytes
    #: What the agent receives as ``?body=``: percent-encoded, padded standard base64.
    forward: str


def _invalid(problem: str) -> NoReturn:
    raise errors.InvalidBody(f"{_HINT}; {problem}")


def _too_large(what: str, size: int) -> NoReturn:
    raise errors.BodyTooLarge(
        f"{what} {size} bytes of JSON; at most {limits.BODY_MAX_BYTES} bytes are allowed: "
        "send a smaller body"
    )


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def decode_body(raw_value: str) -> DecodedBody:
    """Decode the raw (still percent-encoded) value of ``?body=``."""
    if len(raw_value) > limits.BODY_MAX_ENCODED_CHARS:
        raise errors.BodyTooLarge(
            f"?body= is {len(raw_value)} characters long; at most "
            f"{limits.BODY_MAX_ENCODED_CHARS} are accepted, and the decoded JSON may be at most "
            f"{limits.BODY_MAX_BYTES} bytes: send a smaller body"
        )
    try:
        text = unquote(raw_value, encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        _invalid("it has a percent-escape that is not UTF-8")
    # A form decoder turns '+' into ' ' and percent-encoding is optional: read a space as '+'.
    text = text.replace(" ", "+")
    if not text:
        raise errors.InvalidBody("empty ?body=: omit the parameter or pass base64-encoded JSON")
    if not _BASE64_RE.fullmatch(text):
        bad = _NOT_BASE64_RE.search(text)
        if bad is not None:
            _invalid(f"it contains {bad.group()!r}, which is not a base64 character")
        _invalid("'=' padding may only appear at the end")
    if any(c in text for c in "-_") and any(c in text for c in "+/"):
        _invalid(
            "it mixes the URL-safe ('-', '_') and standard ('+', '/') base64 alphabets: "
            "use one of them"
        )
    text = text.translate(_URLSAFE_TO_STANDARD).rstrip("=")
    if len(text) % 4 == 1:
        _invalid("its length is not a valid base64 length (it is truncated or has extra data)")
    text += "=" * (-len(text) % 4)
    try:
        json_bytes = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        _invalid("it is not valid base64")
    if len(json_bytes) > limits.BODY_MAX_BYTES:
        _too_large("?body= decodes to", len(json_bytes))
    try:
        json_text = json_bytes.decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        _invalid("it decodes to bytes that are not UTF-8: encode the JSON text as UTF-8")
    try:
        value = json.loads(json_text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        detail = str(exc) if isinstance(exc, ValueError) else "it is nested too deeply"
        _invalid(f"it decodes to text that is not valid JSON ({detail})")
    forward = quote(base64.b64encode(json_bytes).decode("ascii"), safe="")
    return DecodedBody(value=value, json_bytes=json_bytes, forward=forward)


def encode_body(value: Any) -> str:
    """Padded standard base64 of ``value`` as compact UTF-8 JSON (what ``POST /start`` returns).

    Raises :class:`~catflap.contract.errors.BodyTooLarge` if the JSON exceeds
    ``BODY_MAX_BYTES``, and :class:`~catflap.contract.errors.InvalidBody` if ``value`` cannot
    be written as JSON (NaN, infinities, non-JSON types, lone surrogates, too deep nesting).
    """
    try:
        json_bytes = json.dumps(
            value, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        raise errors.InvalidBody(f"body must be a JSON value: {exc}") from None
    if len(json_bytes) > limits.BODY_MAX_BYTES:
        _too_large("the body is", len(json_bytes))
    return base64.b64encode(json_bytes).decode("ascii")
