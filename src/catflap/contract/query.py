"""Parsing the raw query string of an HTTP request target.

The query is split on ``&`` only (never ``;``). Keys are percent-decoded; values are kept raw
(still percent-encoded) so that each parameter can be decoded by the rule that fits it:
``?body=`` needs the raw value to read a space as ``+``. Decoding uses
:func:`urllib.parse.unquote`, never ``unquote_plus``: a ``+`` stays a ``+``. Invalid UTF-8 in a
percent-escape is a 400; a ``%`` that does not start a valid escape (``%zz``) is kept literally,
as WHATWG URL parsers do.

Nothing here raises anything but :class:`~catflap.contract.errors.BadRequest`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote

from catflap.contract import errors

__all__ = ["QueryParams", "parse_query"]


def _decode(text: str, what: str) -> str:
    try:
        return unquote(text, encoding="utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        raise errors.BadRequest(
            f"{what} has a percent-escape that is not UTF-8 ({exc.reason}): "
            "percent-encode the UTF-8 bytes of the text"
        ) from None


@dataclass(frozen=True)
class QueryParams:
    """Query parameters by percent-decoded name; values are still percent-encoded."""

    raw: Mapping[str, list[str]] = field(default_factory=dict)

    def get_one(self, name: str) -> str | None:
        """The raw value of ``name``, ``None`` if absent; 400 if it is given more than once."""
        values = self.raw.get(name)
        if not values:
            return None
        if len(values) > 1:
            raise errors.BadRequest(f"duplicate query parameter {name!r}: give it once")
        return values[0]

    def get_one_decoded(self, name: str) -> str | None:
        """Like :meth:`get_one`, but percent-decoded (``+`` stays ``+``)."""
        value = self.get_one(name)
        if value is None:
            return None
        return _decode(value, f"query parameter {name!r}")


def parse_query(query: str) -> QueryParams:
    """Parse ``query`` (the part of the request target after ``?``, without the ``?``).

    Pieces are separated by ``&``; empty pieces are skipped; a piece without ``=`` has the
    value ``""``. Keys are percent-decoded (strict UTF-8); values stay raw.
    """
    raw: dict[str, list[str]] = {}
    for piece in query.split("&"):
        if not piece:
            continue
        key, _, value = piece.partition("=")
        raw.setdefault(_decode(key, "a query parameter name"), []).append(value)
    return QueryParams(raw)
