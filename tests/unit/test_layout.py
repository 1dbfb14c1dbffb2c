"""The package's layout holds: the folders' rules, no import cycle (not even one mypy alone
sees), one command layer, a library that never prints.

Imports are read from the source (ast), inside functions and inside `if TYPE_CHECKING:`
blocks: a type-only import is still a dependency a reader has to follow.

The house, as the folders say it (README, "How a byte travels"):

    core/       the record, settings, errors, files, S3 keys, clock, text: imports only itself
    link/       the serial port and its frames: the core only
    clinical/   beats, waves, intervals, axes: the core only
    documents/  record JSON, PDF, DICOM, patient file, package folder: the core and clinical
    shipping/   outbox, drain, uploader, transport, finders: the core and documents
    ops/        status, doctor, disk, notify, spool: the core, documents and shipping
    capture.py, sync.py, service.py, assemble.py: the orchestrators, which wire the stages
    commands/   the command line: the only layer that prints; lab/ only from here
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


def imports_of(module: str, *, typing: bool = True) -> set[str]:
    """The project modules `module` imports, wherever the import statement is; with
    typing=False, the ones it imports at run time (not under `if TYPE_CHECKING:`)."""
    tree = ast.parse(MODULES[module].read_text())
    skip = set() if typing else _type_checking_nodes(tree)
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


def test_imports_are_read_inside_functions_and_under_type_checking():
    assert "device_agent.commands" in imports_of("device_agent.__main__")
    # shipping.protocols names the outbox's types for mypy only: an edge, not a run-time one
    assert "device_agent.shipping.outbox" in imports_of("device_agent.shipping.protocols")
    assert "device_agent.shipping.outbox" not in imports_of("device_agent.shipping.protocols",
                                                            typing=False)


def test_no_import_cycle_counting_imports_inside_functions_and_for_typing():
    graph = {module: imports_of(module) for module in MODULES}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


ORCHESTRATORS = ("capture", "sync", "service", "assemble")
# folder -> the folders (and top-level modules) it may import; "" is the package itself
MAY_IMPORT = {
    "core": {"", "core"},
    "link": {"", "core", "link"},
    "clinical": {"", "core", "clinical"},
    "documents": {"", "core", "clinical", "documents"},
    "shipping": {"", "core", "documents", "shipping"},
    "ops": {"", "core", "documents", "shipping", "ops"},
}


def _place(module: str) -> str:
    """The folder a module stands in ("" for the package's __init__, the name for a top file)."""
    parts = module.split(".")[1:]
    return parts[0] if parts else ""


def test_every_module_stands_in_a_known_place():
    places = {_place(m) for m in MODULES}
    assert places <= {*MAY_IMPORT, *ORCHESTRATORS, "", "__main__", "commands", "lab"}, places


@pytest.mark.parametrize("folder", sorted(MAY_IMPORT))
def test_a_stage_imports_only_the_stages_under_it(folder: str):
    offenders = {f"{module} -> {target}"
                 for module in MODULES if _place(module) == folder
                 for target in imports_of(module)
                 if _place(target) not in MAY_IMPORT[folder]}
    assert not offenders, sorted(offenders)


def test_the_rules_can_fail():
    # the documents knowing the queue was the last such edge (package.py -> outbox)
    assert _place("device_agent.shipping.outbox") not in MAY_IMPORT["documents"]
    assert _place("device_agent.capture") not in MAY_IMPORT["ops"]


def test_only_the_command_layer_and_the_lab_import_the_lab():
    offenders = {f"{module} -> {target}" for module in MODULES
                 if _place(module) not in ("commands", "lab")
                 for target in imports_of(module) if _place(target) == "lab"}
    assert not offenders, sorted(offenders)


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


def test_every_package_folder_is_in_the_wheel():
    # pyproject names the packages one by one: a new folder left out is missing from the
    # wheel the unit installs, while the editable install the tests use still finds it
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    folders = {_module_name(p) for p in PACKAGE.rglob("__init__.py")}
    assert folders == listed, sorted(folders ^ listed)
