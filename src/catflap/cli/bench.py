"""``catflap bench``: the benchmark suite, which lives in ``bench/`` of a source checkout.

Every argument is passed on unchanged to ``bench.__main__.main(argv)``, so ``catflap bench``
and ``python -m bench`` take the same options (``catflap bench --help`` lists them).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import cast

import click

__all__ = ["bench"]


def _suite_main() -> Callable[[list[str]], int]:
    """``bench.__main__.main`` from this checkout (src/catflap/cli -> repository root)."""
    root = Path(__file__).resolve().parents[3]
    if (root / "bench" / "__main__.py").is_file() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        module = importlib.import_module("bench.__main__")
    except ModuleNotFoundError:
        raise click.ClickException(
            "the benchmark suite ships with catflap's source tree (bench/), not with the "
            "package; run it from a checkout: python -m bench"
        ) from None
    return cast(Callable[[list[str]], int], module.main)


@click.command(
    context_settings={
        "ignore_unknown_options": True,
        "allow_extra_args": True,
        "help_option_names": [],
    }
)
@click.pass_context
def bench(ctx: click.Context) -> None:
    """Benchmark catflap against nginx and a direct connection (`catflap bench --help`)."""
    sys.exit(_suite_main()(list(ctx.args)))
