"""Every limit on peer input is exercised by a test, so a new bound cannot land untested."""

from __future__ import annotations

import re

from catflap.contract import limits

from .conftest import ROOT

_CLASSIFIERS = {"PEER_INPUT_LIMITS", "OTHER_LIMITS"}


def _limit_names() -> set[str]:
    return set(limits.__all__) - _CLASSIFIERS


def test_every_limit_is_classified_once() -> None:
    names = _limit_names()
    assert names == limits.PEER_INPUT_LIMITS | limits.OTHER_LIMITS, (
        "classify each limit in contract/limits.py as PEER_INPUT_LIMITS or OTHER_LIMITS: "
        f"{sorted(names ^ (limits.PEER_INPUT_LIMITS | limits.OTHER_LIMITS))}"
    )
    assert not limits.PEER_INPUT_LIMITS & limits.OTHER_LIMITS


def test_every_module_level_limit_is_exported() -> None:
    source = (ROOT / "src" / "catflap" / "contract" / "limits.py").read_text()
    defined = set(re.findall(r"^([A-Z][A-Z0-9_]+)(?::[^=]+)? = ", source, flags=re.MULTILINE))
    assert defined == set(limits.__all__)


def test_every_peer_input_limit_is_exercised_by_a_test() -> None:
    """A test "exercises" a limit when it names it (``limits.NAME``): it then derives its
    attack or its expectation from the real value, not from a copy that could drift."""
    tests = [p for p in (ROOT / "tests").rglob("test_*.py") if p.name != "test_limits.py"]
    text = "\n".join(p.read_text() for p in tests)
    untested = sorted(n for n in limits.PEER_INPUT_LIMITS if f"limits.{n}" not in text)
    assert not untested, f"no test names these peer-input limits: {untested}"


def test_every_peer_input_limit_is_in_the_security_table() -> None:
    text = (ROOT / "docs" / "security.md").read_text()
    table = text.split("## Every bound on peer input")[1].split("\n## ")[0]
    missing = sorted(n for n in limits.PEER_INPUT_LIMITS if f"`{n}`" not in table)
    assert not missing, f"docs/security.md does not list: {missing}"
