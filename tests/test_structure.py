"""The package's structure rules (issue 14), checked on the source: no import cycle between its modules at import
time, and no class longer than a sitting's read (~300 lines)."""

from __future__ import annotations

import ast
from pathlib import Path

import lminf_gguf

PACKAGE = Path(lminf_gguf.__file__).parent
MAX_CLASS_LINES = 310


def _module_imports() -> dict:
    """module -> the package modules it imports at module level (imports inside functions are lazy on purpose)."""
    graph = {}
    for path in PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text())
        deps = set()
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    deps.add(node.module.split(".")[0])
                else:
                    deps.update(alias.name for alias in node.names)
        graph[path.stem] = deps & {p.stem for p in PACKAGE.glob("*.py")}
    return graph


def test_no_import_cycle():
    graph = _module_imports()
    assert graph["engine"] >= {"responses", "state", "context"}  # the walk sees the imports it should
    state = {}

    def visit(node, path):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", f"import cycle: {' -> '.join(path + [node])}"
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if dep != "__init__":
                visit(dep, path + [node])
        state[node] = "done"

    for module in sorted(graph):
        if module != "__init__":
            visit(module, [])


def test_classes_are_small():
    long = []
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                long.append(f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long
