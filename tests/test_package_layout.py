# Package layout rules: no import circle between megatron_pr2 modules (top-level and lazy
# function-level imports alike), and no core module over 450 lines (rl/ is the demo, not core).
#
# The import graph is read from the source with ast (no module is imported), so the test also
# covers modules that need megatron-core or a GPU to import.

import ast
import os
from typing import Dict, List, Set

PACKAGE = "megatron_pr2"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)
MAX_CORE_LINES = 450


def _module_files() -> Dict[str, str]:
    modules = {}
    for directory, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[: -len(".py")]
                module = rel.replace(os.sep, ".")
                modules[module[: -len(".__init__")] if module.endswith(".__init__") else module] = (
                    path
                )
    return modules


def _imports(path: str, module: str, modules: Set[str]) -> Set[str]:
    """megatron_pr2 modules that `module` imports (resolving `from pkg import submodule`)."""
    is_package = path.endswith("__init__.py")
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module and not module.startswith(name + "."):
                found.add(name)
    return found


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    cycles, state = [], {}

    def visit(node: str, stack: List[str]) -> None:
        state[node] = "active"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "active":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_no_import_circle() -> None:
    files = _module_files()
    graph = {m: _imports(path, m, set(files)) for m, path in files.items()}
    # A package's __init__ re-exporting its submodules is not a circle with them.
    for module in graph:
        graph[module] = {m for m in graph[module] if not module.startswith(m + ".")}
    assert "megatron_pr2.session" in graph and graph["megatron_pr2.session"], graph
    assert _cycles(graph) == []


def test_detects_a_circle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_core_modules_are_small() -> None:
    oversized = {
        module: sum(1 for _ in open(path, encoding="utf-8"))
        for module, path in _module_files().items()
        if not module.startswith(f"{PACKAGE}.rl")
    }
    oversized = {m: n for m, n in oversized.items() if n > MAX_CORE_LINES}
    assert oversized == {}
