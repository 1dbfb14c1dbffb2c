"""The package's layout holds: no import cycle, one command layer, a library that never prints.

Imports are read from the source (ast), inside functions too; only `if TYPE_CHECKING:` blocks
are left out, as they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "device_agent"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of every node inside an `if TYPE_CHECKING:` block."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for stmt in node.body:
                inside.update(id(n) for n in ast.walk(stmt))
    return inside


def _resolve(name: str) -> str | None:
    """The project module an imported name lands in (a module, or the package defining it)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str) -> set[str]:
    """The project modules `module` imports at run time, wherever the import statement is."""
    tree = ast.parse(MODULES[module].read_text())
    skip = _type_checking_nodes(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            target = _resolve(name)
            if target and target != module:
                found.add(target)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle in `graph` as a path that returns to its start, or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_imports_are_read_inside_functions_but_not_under_type_checking():
    assert "device_agent.commands" in imports_of("device_agent.__main__")
    # protocols.py names sync's types for mypy only: no run-time edge
    assert "device_agent.sync" not in imports_of("device_agent.shipping.protocols")


def test_no_import_cycle_counting_imports_inside_functions():
    graph = {module: imports_of(module) for module in MODULES}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


LIBRARY = sorted(m for m in MODULES
                 if not m.startswith("device_agent.commands") and m != "device_agent.__main__")


@pytest.mark.parametrize("module", LIBRARY)
def test_library_module_never_imports_the_command_layer(module: str):
    assert not {m for m in imports_of(module) if m.startswith("device_agent.commands")}


@pytest.mark.parametrize("module", LIBRARY)
def test_library_module_never_prints(module: str):
    tree = ast.parse(MODULES[module].read_text())
    offenders = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id == "print":
            offenders.append(f"print() at line {node.lineno}")
        if isinstance(node, ast.Attribute) and node.attr in ("stdout", "stderr") \
                and isinstance(node.value, ast.Name) and node.value.id == "sys":
            offenders.append(f"sys.{node.attr} at line {node.lineno}")
    assert not offenders, f"{module}: {offenders}"


def test_the_service_never_imports_the_lab():
    seen: set[str] = set()
    todo = ["device_agent.service", "device_agent.commands.service"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(imports_of(module))
    assert not {m for m in seen if m.startswith("device_agent.lab")}, sorted(seen)
