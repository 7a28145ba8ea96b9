"""The package's layers import one way, read from the source (AST, no third-party tool):

    providers/  imports nothing from policies/ or broker/
    policies/   imports nothing from local_backend/, broker/ or gateway/
    and no module imports another that (through any chain) imports it back.

Imports under `if TYPE_CHECKING:` are for type checkers only and do not count; imports inside
functions do (they run, only later).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "imagebroker"
FORBIDDEN = {
    "imagebroker.providers": ("imagebroker.policies", "imagebroker.broker", "imagebroker.local_backend",
                              "imagebroker.gateway", "imagebroker.cli"),
    "imagebroker.policies": ("imagebroker.local_backend", "imagebroker.broker", "imagebroker.gateway",
                             "imagebroker.cli"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(path: Path, known: set[str]) -> set[str]:
    """The imagebroker modules `path` imports at run time (a `from X import name` counts as X.name
    when that is a module, else X)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in known else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {m for m in found if m in known and m != me}


def graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(f) for f in files}
    return {module_name(f): imports(f, known) for f in files}


def test_the_graph_reader_sees_relative_function_level_and_type_checking_imports(tmp_path: Path) -> None:
    known = {"imagebroker.providers.x", "imagebroker.policies.schema", "imagebroker.broker.core",
             "imagebroker.types"}
    src = PACKAGE / "providers" / "_graph_probe.py"
    src.write_text("from typing import TYPE_CHECKING\nfrom ..types import ImageRequest\n"
                   "if TYPE_CHECKING:\n    from ..broker.core import AsyncBroker\n"
                   "def f():\n    from ..policies import schema\n")
    try:
        assert imports(src, known) == {"imagebroker.types", "imagebroker.policies.schema"}
    finally:
        src.unlink()


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_one_way(layer: str) -> None:
    wrong = sorted(f"{m} imports {dep}" for m, deps in graph().items()
                   if m == layer or m.startswith(layer + ".")
                   for dep in deps if dep.startswith(FORBIDDEN[layer]))
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_itself_back() -> None:
    g = graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the path, 2 done
    path: list[str] = []

    def walk(m: str) -> None:
        state[m] = 1
        path.append(m)
        for dep in sorted(g[m]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                walk(dep)
        path.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            walk(m)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)
