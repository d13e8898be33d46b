"""Documentation that must not drift from the code."""

from __future__ import annotations

import re
from typing import Any, get_args

from catflap.contract.closecodes import CLOSE_CODE_EXPLANATIONS, SENDABLE
from catflap.contract.status import END_STATES, CompletionStatus, EndState

from .conftest import ROOT
from .render_docs import ARCHITECTURE, RENDERED, section


def test_operations_close_code_table_matches_the_code() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    table = text.split("<!-- close-codes:start -->")[1].split("<!-- close-codes:end -->")[0]
    rows = re.findall(r"^\| (\d+) \| (\w+) \| (.+) \|$", table, flags=re.MULTILINE)
    assert {int(code) for code, _, _ in rows} == set(SENDABLE)
    for code, name, when in rows:
        documented = next(c for c in CLOSE_CODE_EXPLANATIONS if int(c) == int(code))
        assert (name, when) == (documented.name, CLOSE_CODE_EXPLANATIONS[documented])
    assert not {1005, 1006, 1015} & set(SENDABLE)


def test_operations_lists_every_metric_with_its_labels() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text.split("## Metrics")[1].split("\n## ")[0]
    rows = re.findall(r"^\| `(catflap_\w+)` \| (\w+) \| ([^|]*) \|", section, flags=re.MULTILINE)
    documented = {name.removesuffix("_total"): labels for name, _, labels in rows}
    sources = [ROOT / "src" / "catflap" / "metrics.py", ROOT / "src/catflap/runtime/metrics.py"]
    defined: dict[str, str] = {}
    named = 0
    for source in sources:
        code = source.read_text()
        named += len(re.findall(r'"catflap_\w+"', code))
        for match in re.finditer(r'"(catflap_\w+)",\s*"[^"]*",\s*(?:labels=)?\[([^\]]*)\]', code):
            defined[match.group(1)] = match.group(2)
    assert len(defined) == named  # every metric the code names was read with its labels
    assert set(documented) == set(defined)
    for name, labels in defined.items():
        expected = re.findall(r'"(\w+)"', labels)
        assert re.findall(r"`(\w+)`", documented[name]) == expected, name


def test_architecture_state_tables_are_rendered_from_the_code() -> None:
    text = ARCHITECTURE.read_text()
    for name, render in RENDERED.items():
        assert section(text, name) == render().strip(), (
            f"docs/architecture.md's {name} table is stale: run python -m tests.render_docs"
        )


def _literal_values(annotation: Any) -> set[str]:
    """Every string of a ``Literal``, or of a union of them."""
    args = get_args(annotation)
    if all(isinstance(arg, str) for arg in args):
        return set(args)
    return set().union(*(_literal_values(arg) for arg in args))


def test_operations_end_state_table_is_the_one_mapping() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    table = text.split("<!-- end-states:start -->")[1].split("<!-- end-states:end -->")[0]
    rows = re.findall(r"^\| `(\w+)` \| `(\w+)` \|$", table, flags=re.MULTILINE)
    assert rows == list(END_STATES.items())
    # Every completion status has a row, and every state is one PCC's CLI knows.
    assert set(END_STATES) == _literal_values(CompletionStatus)
    assert set(END_STATES.values()) <= set(get_args(EndState))
