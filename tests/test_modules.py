"""The package's module graph: no import cycles, and every module imports on
its own (without the package ``__init__`` having loaded the rest first)."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import memattr

PKG = Path(memattr.__file__).parent
# __main__ runs the CLI when imported.
MODULES = sorted(p.stem for p in PKG.glob("*.py") if p.stem not in ("__init__", "__main__"))


def _module_name(path: Path) -> str:
    return "memattr" if path.stem == "__init__" else f"memattr.{path.stem}"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> set[str]:
    """memattr modules this source imports, at module level or in a function
    (a deferred import still runs), leaving out ``if TYPE_CHECKING:`` blocks."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "memattr")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "memattr":
                # `from memattr import x`: the submodule x if there is one,
                # else a name the package __init__ defines.
                for a in node.names:
                    sub = f"memattr.{a.name}"
                    found.add(sub if (PKG / f"{a.name}.py").exists() or a.name == "_native" else "memattr")
            elif node.module.split(".")[0] == "memattr":
                found.add(node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the memattr modules (with Python source) it imports."""
    sources = {_module_name(p): p for p in PKG.glob("*.py")}
    graph = {}
    for name, path in sources.items():
        deps = _imports(ast.parse(path.read_text(encoding="utf-8"), str(path)))
        graph[name] = {d for d in deps if d in sources and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path (first node repeated at the end), or None."""
    state: dict[str, int] = {}  # 1 = on the DFS stack, 2 = done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state:
                found = dfs(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = dfs(node)
            if found:
                return found
    return None


def test_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    tree = ast.parse(
        "import memattr\nfrom memattr import trace, nope\nfrom memattr.uapi import X\n"
        "if TYPE_CHECKING:\n    from memattr.vm import Vm\n"
        "def f():\n    from memattr.batch import run_batch\n"
    )
    assert _imports(tree) == {"memattr", "memattr.trace", "memattr.uapi", "memattr.batch"}


def test_module_graph_is_acyclic() -> None:
    graph = import_graph()
    # The split modules are really there, and the graph sees the old cycle's edges.
    assert {"memattr.trace_format", "memattr.replayer", "memattr.generators"} <= set(graph)
    assert "memattr.qemu" in graph["memattr.workloads"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_only_the_package_init_imports_the_package() -> None:
    # `import memattr` from inside the package would make it depend on
    # everything the package __init__ loads.
    graph = import_graph()
    assert [m for m, deps in graph.items() if "memattr" in deps] == []


# Imports memattr.<name> with a bare package object standing in for memattr,
# so the package __init__ does not load every other module first: the module
# must load its own dependencies, in its own order.
_ALONE = """
import importlib, importlib.util, sys, types
spec = importlib.util.find_spec("memattr")
pkg = types.ModuleType("memattr")
pkg.__path__ = list(spec.submodule_search_locations)
sys.modules["memattr"] = pkg
importlib.import_module("memattr." + sys.argv[1])
loaded = sorted(m for m in sys.modules if m.startswith("memattr."))
assert "memattr." + sys.argv[1] in loaded
"""


def test_every_module_imports_alone_in_a_fresh_interpreter() -> None:
    assert "trace" in MODULES and "workloads" in MODULES and len(MODULES) > 20
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", _ALONE, name], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name in MODULES
    }
    failures = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        if proc.returncode != 0:
            failures[name] = err.strip().splitlines()[-1:] if err.strip() else out
    assert failures == {}


@pytest.mark.parametrize("name", ["trace", "workloads"])
def test_the_facades_reexport_every_name_they_list(name: str) -> None:
    mod = importlib.import_module(f"memattr.{name}")
    assert sorted(set(mod.__all__)) == sorted(mod.__all__)
    assert [n for n in mod.__all__ if not hasattr(mod, n)] == []
    assert importlib.util.find_spec(f"memattr.{name}") is not None
