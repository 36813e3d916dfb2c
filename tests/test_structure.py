"""The package's structure rules (issues 14 and 26), checked on the source: no import cycle between its modules at
import time, and no module reading another's underscore names: the state that the engine shares with the modules
that run it is public (LMInfinite.seq, .chat_format, .use, .model.llama), so that a class stays small by design,
not by pushing its work into other modules' private reads. A generous class size limit stays as a backstop."""

from __future__ import annotations

import ast
from pathlib import Path

import lminf_gguf

PACKAGE = Path(lminf_gguf.__file__).parent
MODULES = {p.stem for p in PACKAGE.glob("*.py")}
MAX_CLASS_LINES = 400

# `x._attr` on other objects than self/cls, where a third-party object has no public way: module -> {the access as
# ast.unparse writes it: why}
THIRD_PARTY_PRIVATE = {
    "_lib": {"lib._name": "ctypes.CDLL keeps the loaded library's path only as _name"},
    "models": {"llama_cpp._internals": "llama-cpp-python's LlamaModel lives there only"},
    "generate": {"llama_cpp._internals": "llama-cpp-python's LlamaSampler and LlamaTokenDataArray live there only"},
    "grammar": {"grammar._root": "llama-cpp-python's LlamaGrammar.from_string takes no root rule: it is set after"},
}


def _trees() -> dict:
    return {p.stem: ast.parse(p.read_text()) for p in sorted(PACKAGE.glob("*.py"))}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _on_self(node: ast.Attribute) -> bool:
    return isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")


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
        graph[path.stem] = deps & MODULES
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


def test_no_private_access_on_other_objects():
    """(a) `x._attr` on self or cls only (and the third-party objects listed above)."""
    found = []
    for module, tree in _trees().items():
        allowed = THIRD_PARTY_PRIVATE.get(module, {})
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr) and not _on_self(node) and \
                    ast.unparse(node) not in allowed:
                found.append(f"{module}.py:{node.lineno}: {ast.unparse(node)}")
    assert not found, f"{len(found)} private accesses on other objects: {found}"


def _engine_privates(tree: ast.Module) -> set:
    """The underscore attributes that engine.py assigns on self, and LMInfinite's underscore methods."""
    names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)
             and _on_self(n) and _private(n.attr)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "LMInfinite":
            names |= {f.name for f in node.body if isinstance(f, ast.FunctionDef) and _private(f.name)}
    return names


def _own_names(cls: ast.ClassDef) -> set:
    """What a class defines itself or assigns on self."""
    names = {f.name for f in cls.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    return names | {n.attr for n in ast.walk(cls) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)
                    and _on_self(n)}


def test_no_engine_privates_outside_the_engine():
    """(b) no code outside engine.py (LMInfinite's mixins, the in_use decorators) reads a `self._x` of the engine's,
    unless its own class defines that name itself."""
    trees = _trees()
    engine = _engine_privates(trees["engine"])
    assert {"_cancel", "_free"} <= engine  # the walk sees the engine's private names
    found = []

    def walk(node, module: str, own: set):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                walk(child, module, own | _own_names(child))
                continue
            if isinstance(child, ast.Attribute) and _on_self(child) and child.attr in engine and child.attr not in own:
                found.append(f"{module}.py:{child.lineno}: self.{child.attr}")
            walk(child, module, own)

    for module, tree in trees.items():
        if module != "engine":
            walk(tree, module, set())
    assert not found, f"{len(found)} reads of the engine's private names: {found}"


def test_no_private_imports_across_modules():
    """(c) no `from .x import _name` (the package's modules themselves, such as _lib, are not names of a module)."""
    found = []
    for module, tree in _trees().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level >= 1:
                found += [f"{module}.py:{node.lineno}: from {'.' * node.level}{node.module or ''} import {a.name}"
                          for a in node.names if _private(a.name) and not (node.module is None and a.name in MODULES)]
    assert not found, found


def test_classes_are_small():
    long = []
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                long.append(f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long
