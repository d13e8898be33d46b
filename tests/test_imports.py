"""The import graph of ``src/catflap`` has no cycles, counting every import: module level,
inside functions, and under ``TYPE_CHECKING``. A cycle means two modules cannot be read, tested
or replaced one without the other; layering points client → gateway → pool → agent → bot.
And every module names its one job in the first line of its docstring."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"


def module_files() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for path in sorted((SRC / "catflap").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every catflap module ``name`` imports, wherever the import statement stands."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def known(target: str) -> str | None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(t for a in node.names if (t := known(a.name)))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                # ``from catflap.gateway import relay`` imports the module catflap.gateway.relay.
                target = f"{base}.{alias.name}"
                found.update(t for t in [known(target if target in modules else base)] if t)
    found.discard(name)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_the_parser_sees_a_cycle_where_there_is_one() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_counts_lazy_and_type_checking_imports() -> None:
    graph = import_graph()
    assert len(graph) > 50, "module discovery found too few modules"
    # cli/__init__.py imports the runtime inside a function: it must count.
    assert "catflap.runtime.main" in graph["catflap.cli"]


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    if found:
        graph = import_graph()
        lines = [
            f"{m} -> {sorted(graph[m] & set(component))}" for component in found for m in component
        ]
        pytest.fail("import cycles:\n" + "\n".join(lines))


def test_every_module_names_its_one_job_in_its_first_docstring_line() -> None:
    unnamed = [
        name
        for name, path in module_files().items()
        if not (ast.get_docstring(ast.parse(path.read_text())) or "").strip()
    ]
    assert not unnamed, f"modules without a docstring naming their job: {unnamed}"


def test_layers_point_one_way() -> None:
    """``contract`` is below everything (it imports only itself); the command line is above
    everything (only ``catflap.cli`` and ``python -m catflap`` import it)."""
    graph = import_graph()
    wrong = [
        f"{module} -> {target}"
        for module, targets in graph.items()
        for target in targets
        if (module.startswith("catflap.contract") and not target.startswith("catflap.contract"))
        or (
            target.startswith("catflap.cli")
            and not module.startswith("catflap.cli")
            and module != "catflap.__main__"
        )
    ]
    assert not wrong, wrong
