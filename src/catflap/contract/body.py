"""Decoding and normalising ``?body=``, and encoding the body that ``POST /start`` returns.

The spec's decision table, which this module implements:

- Accept standard or URL-safe base64, padded or not, percent-encoded or raw. In a raw value a
  space is read as ``+``. The result must be UTF-8 JSON.
- At most :data:`~catflap.contract.limits.BODY_MAX_BYTES` bytes of decoded JSON. Malformed:
  400 (:class:`~catflap.contract.errors.InvalidBody`). Too large: 413
  (:class:`~catflap.contract.errors.BodyTooLarge`).
- The JSON must be strict (:func:`loads_strict`, the same rules as ``POST /start``'s request).
- Forwarded to the agent as percent-encoded, padded standard base64.

:func:`decode_body` never raises anything but those two errors, whatever string it is given.

Strict JSON is RFC 8259 read as I-JSON (RFC 7493) reads it: UTF-8 only; no ``NaN``,
``Infinity`` or ``-Infinity``; no number outside an IEEE double's range (Python would read
``1e999`` as ``inf`` and an integer of 400 digits exactly, and a bot, a JavaScript client or
``json.dumps(allow_nan=False)`` further on would then get ``Infinity``, an error or a different
number); no unpaired surrogate escape such as ``"\\ud800"`` (Python keeps it as a lone
surrogate, which no UTF-8 encoder will write again). Both the ``?body=`` decoder and the
``/start`` handler parse with :func:`loads_strict`, so one rule decides what a body may be.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import sys
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import quote, unquote

from catflap.contract import errors, limits

__all__ = ["DecodedBody", "NotJson", "UnportableJson", "decode_body", "encode_body", "loads_strict"]

_HINT = "?body= must be base64-encoded UTF-8 JSON, e.g. base64.b64encode(json.dumps(body).encode())"
_BASE64_RE = re.compile(r"[A-Za-z0-9+/_-]*=*", re.ASCII)
_NOT_BASE64_RE = re.compile(r"[^A-Za-z0-9+/_=-]", re.ASCII)
_URLSAFE_TO_STANDARD = str.maketrans("-_", "+/")
#: A ``\uD800``-``\uDFFF`` escape: the only way a surrogate gets into parsed JSON (raw UTF-8
#: cannot encode one). Seeing none, :func:`loads_strict` skips the walk over the value.
_SURROGATE_ESCAPE_RE = re.compile(r"\\u[dD][89a-fA-F]", re.ASCII)
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
#: Digits of the largest finite double (1.8e308): a longer integer cannot be one, and Python
#: would parse it exactly (quadratic in its length) only to have it overflow later.
_DOUBLE_MAX_DIGITS = len(str(int(sys.float_info.max)))


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


class NotJson(ValueError):
    """The bytes are not UTF-8 JSON text; the message says why (no value is quoted)."""


class UnportableJson(NotJson):
    """The text parses as JSON for Python's lenient reader, but breaks a strict rule: ``NaN``
    or an infinity, a number beyond a double's range, or an unpaired surrogate escape."""


def _reject_constant(name: str) -> NoReturn:
    raise UnportableJson(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise UnportableJson(f"a number of {len(text)} characters is beyond a double's range")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > _DOUBLE_MAX_DIGITS:
        raise UnportableJson(f"an integer of {len(text)} characters is beyond a double's range")
    value = int(text)
    if abs(value) > sys.float_info.max:
        raise UnportableJson("an integer is beyond a double's range")
    return value


def _has_lone_surrogate(value: Any) -> bool:
    # Iterative: the value may be nested as deep as the JSON parser allowed.
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE_RE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def loads_strict(data: bytes) -> Any:
    """Parse UTF-8 JSON by the strict rules in the module docstring.

    Raises:
        UnportableJson: JSON that a strict reader refuses (NaN, infinities, numbers beyond a
            double, lone surrogates).
        NotJson: anything else that is not UTF-8 JSON (bad UTF-8, a BOM, a syntax error,
            nesting too deep for the parser).
    """
    try:
        # Strict UTF-8, unlike json.loads(bytes), which also guesses UTF-16 and UTF-32.
        text = data.decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        raise NotJson("bytes that are not UTF-8: encode the JSON text as UTF-8") from None
    try:
        value = json.loads(
            text,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
            parse_int=_bounded_int,
        )
    except UnportableJson as exc:
        raise UnportableJson(f"text that is not valid JSON ({exc})") from None
    except ValueError as exc:
        raise NotJson(f"text that is not valid JSON ({exc})") from None
    except RecursionError:
        raise NotJson("text that is not valid JSON (it is nested too deeply)") from None
    if _SURROGATE_ESCAPE_RE.search(text) and _has_lone_surrogate(value):
        raise UnportableJson(
            "text that is not valid JSON (an unpaired surrogate escape such as \\ud800: "
            "escape characters beyond U+FFFF as a surrogate pair, or send them as UTF-8)"
        )
    return value


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
        value = loads_strict(json_bytes)
    except NotJson as exc:
        _invalid(f"it decodes to {exc}")
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
