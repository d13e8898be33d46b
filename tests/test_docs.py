"""Documentation that must not drift from the code."""

from __future__ import annotations

import re

from catflap.contract.closecodes import CLOSE_CODE_EXPLANATIONS, SENDABLE

from .conftest import ROOT


def test_operations_close_code_table_matches_the_code() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    table = text.split("<!-- close-codes:start -->")[1].split("<!-- close-codes:end -->")[0]
    rows = re.findall(r"^\| (\d+) \| (\w+) \| (.+) \|$", table, flags=re.MULTILINE)
    assert {int(code) for code, _, _ in rows} == set(SENDABLE)
    for code, name, when in rows:
        documented = next(c for c in CLOSE_CODE_EXPLANATIONS if int(c) == int(code))
        assert (name, when) == (documented.name, CLOSE_CODE_EXPLANATIONS[documented])
    assert not {1005, 1006, 1015} & set(SENDABLE)
