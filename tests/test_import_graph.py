"""The package's import graph: no cycles, and imports only go down the layers of the code map.

Every ``import`` of an ``hb_utils`` module counts, at module level or inside a function (a function-level
import still makes the two modules depend on each other; it is only allowed to delay loading a heavy
library, never to hide a cycle). Layers, lowest first (``hb_utils/__init__.py`` explains them):

    core (config, errors, run_dir, ...) < data, model < train < evaluate < export < chat < runs < cli

A module may import modules of a lower layer and of its own subpackage; ``data`` and ``model`` are
independent of each other. A later stage may read what an earlier one wrote (export reads 04's metrics),
never the reverse.
"""

from __future__ import annotations

import ast
from pathlib import Path

import hb_utils

PACKAGE = Path(hb_utils.__file__).parent
LAYERS = {"core": 0, "data": 1, "model": 1, "train": 2, "evaluate": 3, "export": 4, "chat": 5, "runs": 6, "cli": 7,
          "__main__": 8}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def group_of(module: str) -> str:
    """The layer group of ``hb_utils.x[.y]``: its subpackage, or ``core`` for a top-level module."""
    parts = module.split(".")
    if len(parts) == 1:
        return "core"
    if (PACKAGE / parts[1]).is_dir() or parts[1] in LAYERS:
        return parts[1]
    return "core"


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Every hb_utils module ``path`` imports (``from hb_utils.x import y`` counts ``hb_utils.x.y`` when
    that is a module, else ``hb_utils.x``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "hb_utils"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "hb_utils":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return {m for m in found if m in modules and m != "hb_utils"}


def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    return {m: imports_of(p, modules) - {m} for m, p in paths.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for m, targets in edges.items():
        g = group_of(m)
        if g not in LAYERS:
            bad.append(f"{m}: subpackage {g!r} has no layer in LAYERS")
            continue
        for t in targets:
            h = group_of(t)
            if h != g and LAYERS.get(h, 99) >= LAYERS[g]:
                bad.append(f"{m} ({g}) imports {t} ({h})")
    return sorted(bad)


def test_the_package_has_no_import_cycle():
    assert find_cycle(graph()) is None, f"import cycle: {' -> '.join(find_cycle(graph()) or [])}"


def test_imports_only_go_down_the_layers():
    assert upward_imports(graph()) == []


def test_the_checks_can_fail():
    """The two checks on a made-up graph: a cycle and an upward import are found."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert upward_imports({"hb_utils.model.loading": {"hb_utils.train.training"}}) == [
        "hb_utils.model.loading (model) imports hb_utils.train.training (train)"]
    assert upward_imports({"hb_utils.data.split": {"hb_utils.model.loading"}}) != []  # siblings stay apart


def test_the_code_map_names_every_subpackage():
    doc = hb_utils.__doc__ or ""
    subpackages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert subpackages and all(f"{name}/" in doc for name in subpackages), doc
