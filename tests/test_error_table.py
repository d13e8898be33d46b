"""README's error table lists every (HTTP status, ``code``) the gateway and the API can answer,
and nothing else.

The pairs come from the code, not from a list here: every JSON error catflap sends is a
:class:`~catflap.contract.errors.RequestRejected` subclass (the gateway writes them with
``http_error_response``, the API's exception handlers turn everything, Starlette's own 404 and
405 included, into one), so importing every catflap module and walking the subclasses finds
them all, wherever they are defined. A second check keeps it that way: no source file may build
an error body with a literal code outside ``contract/errors.py``, since this test would not see
it. A new error class, or a new ``TokenFailure``, fails this test until the README lists it.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from collections.abc import Iterator

import catflap
from catflap.auth.tokens import TokenFailure
from catflap.contract.errors import RequestRejected, TokenRejected

from .conftest import ROOT

SRC = ROOT / "src" / "catflap"
#: Calls that build an error body; their code must come from an error class.
_BODY_BUILDERS = {"error_body", "_error_response"}


def _import_every_module() -> None:
    for info in pkgutil.walk_packages(catflap.__path__, "catflap."):
        if not info.name.endswith("__main__"):  # running those starts the CLI
            importlib.import_module(info.name)


def _subclasses(cls: type[RequestRejected]) -> Iterator[type[RequestRejected]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def pairs_in_code() -> set[tuple[int, str]]:
    _import_every_module()
    pairs: set[tuple[int, str]] = set()
    for cls in {RequestRejected, *_subclasses(RequestRejected)}:
        if not cls.__module__.startswith("catflap."):
            continue  # a test's own subclass
        if cls.to_body is RequestRejected.to_body:
            pairs.add((cls.status, cls.code))
        else:
            # A class that makes its code per instance; only TokenRejected does, from a reason.
            assert issubclass(cls, TokenRejected), (
                f"{cls.__module__}.{cls.__name__} overrides to_body: teach this test its codes"
            )
            pairs |= {(cls.status, f"token_{reason.value}") for reason in TokenFailure}
    return pairs


def pairs_in_readme() -> set[tuple[int, str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Errors\n")[1].split("\n## ")[0]
    rows = re.findall(r"^\| (\d{3}) \| [^|]+ \| ([^|]+) \|$", section, flags=re.MULTILINE)
    assert rows, "no table rows in README's Errors section"
    pairs = {
        (int(status), code) for status, codes in rows for code in re.findall(r"`([^`]+)`", codes)
    }
    assert len(pairs) == sum(len(re.findall(r"`[^`]+`", codes)) for _, codes in rows), (
        "a (status, code) is listed twice"
    )
    return pairs


def test_readme_error_table_lists_every_status_and_code() -> None:
    in_code = pairs_in_code()
    in_readme = pairs_in_readme()
    missing = sorted(in_code - in_readme)
    stale = sorted(in_readme - in_code)
    assert not missing, f"README's error table does not list {missing}"
    assert not stale, f"README's error table lists {stale}, which no error class answers"


def _literal_code_bodies() -> Iterator[str]:
    """Places that build ``{"error": ..., "code": ...}`` without an error class."""
    for path in sorted(SRC.rglob("*.py")):
        if path == SRC / "contract" / "errors.py":
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        where = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.Dict):
                keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
                if {"error", "code"} <= keys:
                    yield f"{where}:{node.lineno}: an error dict literal"
            elif isinstance(node, ast.Call):
                func = node.func
                name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
                arguments = [*node.args, *(kw.value for kw in node.keywords)]
                if name in _BODY_BUILDERS and any(
                    isinstance(a, ast.Constant) and isinstance(a.value, str) for a in arguments
                ):
                    yield f"{where}:{node.lineno}: {name}() with a literal"


def test_every_error_body_comes_from_an_error_class() -> None:
    found = list(_literal_code_bodies())
    assert not found, (
        "raise a RequestRejected subclass instead (this table test cannot see these): "
        + "; ".join(found)
    )


def test_the_discovery_sees_classes_defined_outside_errors_py() -> None:
    # The API's own 404/405 and the sessions API's 404 live next to their routes.
    pairs_in_code()
    modules = {cls.__module__ for cls in _subclasses(RequestRejected)}
    assert {"catflap.contract.errors", "catflap.api.app", "catflap.api.sessions"} <= modules
