"""Tables in docs/architecture.md rendered from the code; ``tests/test_docs.py`` checks them.

python -m tests.render_docs    # rewrite them after changing a state table
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from catflap.gateway.relaystate import render_markdown as relay_states
from catflap.pool.instance import render_transitions_markdown as instance_states

ARCHITECTURE = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"

#: Marker name in the document -> what renders the text between its start and end markers.
RENDERED: dict[str, Callable[[], str]] = {
    "relay-states": relay_states,
    "instance-states": instance_states,
}


def section(text: str, name: str) -> str:
    """The text between ``<!-- name:start -->`` and ``<!-- name:end -->``, stripped."""
    return text.split(f"<!-- {name}:start -->")[1].split(f"<!-- {name}:end -->")[0].strip()


def rendered(text: str) -> str:
    """``text`` with every rendered section replaced by what the code renders now."""
    for name, render in RENDERED.items():
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        before, rest = text.split(start)
        after = rest.split(end)[1]
        text = f"{before}{start}\n{render().strip()}\n{end}{after}"
    return text


if __name__ == "__main__":
    ARCHITECTURE.write_text(rendered(ARCHITECTURE.read_text()))
