"""The import graph of megatron/remoe, read from the source with `ast`: no cycle, and no
underscore-private name imported from another module.

Every import counts: module level, inside functions, under `if TYPE_CHECKING:`. A lazy import
hides a cycle from Python, not from a reader; the layering (errors/compat/logs <- data, cpu <-
method <- training <- applications) holds only if the whole graph is a DAG. A private name
imported across modules (`from megatron.remoe.x import _y`) means the name is not private: make it
public or move it to its user.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers.paths import ROOT as PATHS_ROOT

ROOT = Path(PATHS_ROOT)
PACKAGE = "megatron.remoe"


# ------------------------------------------------------------------------------------------------
# The checker (a pure function of the files; tested below on a synthetic package)
# ------------------------------------------------------------------------------------------------
def module_files(root: Path, package: str) -> dict:
    """{dotted module name: file} of every .py file of `package` under `root`."""
    base = root.joinpath(*package.split("."))
    modules = {}
    for path in sorted(base.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported_names(path: Path, module: str | None, is_package: bool = False) -> list:
    """[(imported module, name or None, line)] of every import in the file, at any depth.
    `import a.b` gives ("a.b", None); `from a import b, c` gives ("a", "b") and ("a", "c");
    relative imports are resolved against `module` (None: a file outside any package)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:
                if module is None:
                    continue
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                source = ".".join(anchor + ([source] if source else []))
            found += [(source, alias.name, node.lineno) for alias in node.names]
    return found


def target_module(source: str, name: str | None, modules: dict) -> str | None:
    """The package module an import loads: `source.name` when that is a module (`from
    megatron.remoe import dial`), else `source` (the module that defines `name`); None outside the
    package."""
    if name is not None and f"{source}.{name}" in modules:
        return f"{source}.{name}"
    return source if source in modules else None


def import_graph(modules: dict) -> dict:
    """{module: set of the package modules it imports}."""
    graph = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for source, name, _ in imported_names(path, module, is_package):
            target = target_module(source, name, modules)
            if target is not None and target != module:
                edges.add(target)
        graph[module] = edges
    return graph


def cycles(graph: dict) -> list:
    """One cycle (a list of modules, first == last) per strongly connected component that has one
    (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
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
                    components.append(set(component))
    return [cycle_in(graph, component) for component in components]


def cycle_in(graph: dict, component: set) -> list:
    """A concrete cycle through the smallest module of a strongly connected component."""
    start = min(component)
    paths, seen = [[start]], {start}
    while paths:  # breadth-first: the shortest way back to `start`
        path = paths.pop(0)
        for child in sorted(graph[path[-1]] & component):
            if child == start:
                return path + [start]
            if child not in seen:
                seen.add(child)
                paths.append(path + [child])
    raise AssertionError(f"no cycle in {component}")


def is_private(name: str | None) -> bool:
    return bool(name) and name.startswith("_") and not name.startswith("__")


def private_imports(files: dict, modules: dict, package: str, root: Path) -> list:
    """'file:line: from M import _name' for every underscore name imported from a package module
    into another file (paths relative to `root`). `files`: {path: its module name, or None outside
    the package}."""
    found = []
    for path, module in files.items():
        is_package = path.name == "__init__.py"
        for source, name, line in imported_names(path, module, is_package):
            if not (source == package or source.startswith(package + ".")) or not is_private(name):
                continue
            if target_module(source, name, modules) != module:
                shown = path.relative_to(root) if path.is_relative_to(root) else path
                found.append(f"{shown}:{line}: from {source} import {name}")
    return found


def python_files(root: Path, folders) -> dict:
    return {path: None for folder in folders for path in sorted((root / folder).rglob("*.py"))}


def format_cycles(found: list) -> str:
    return "\n".join(" -> ".join(cycle) for cycle in found)


# ------------------------------------------------------------------------------------------------
# The package
# ------------------------------------------------------------------------------------------------
MODULES = module_files(ROOT, PACKAGE)


def test_package_import_graph_has_no_cycle():
    graph = import_graph(MODULES)
    assert len(graph) > 50 and sum(map(len, graph.values())) > 200  # the graph was read
    found = cycles(graph)
    assert not found, f"{len(found)} import cycle(s) (function-level imports included):\n" + \
        format_cycles(found)


def test_no_private_name_imported_across_modules():
    files = {path: module for module, path in MODULES.items()}
    files.update(python_files(ROOT, ["tools", "bench"]))
    found = private_imports(files, MODULES, PACKAGE, ROOT)
    assert not found, f"{len(found)} private name(s) imported from another module; make them " \
        "public or move them:\n" + "\n".join(found)


# ------------------------------------------------------------------------------------------------
# The checker can fail: a synthetic package with a cycle through a function-level import, one
# through a TYPE_CHECKING import, and private imports
# ------------------------------------------------------------------------------------------------
def write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def synthetic(tmp_path):
    write(tmp_path, "pkg/__init__.py", "")
    write(tmp_path, "pkg/a.py", "from pkg.b import helper\n")
    write(tmp_path, "pkg/b.py", "def helper():\n    from pkg import c  # lazy\n    return c\n")
    write(tmp_path, "pkg/c.py", "from .a import x\n_secret = 1\n")
    write(tmp_path, "pkg/sub/__init__.py", "from . import d\n")
    write(tmp_path, "pkg/sub/d.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                    "    from pkg.sub.e import E\n")
    write(tmp_path, "pkg/sub/e.py", "import pkg.sub.d\nfrom pkg.c import _secret\n")
    write(tmp_path, "pkg/leaf.py", "import os\nfrom pkg.sub import d\n")
    write(tmp_path, "tools/tool.py", "from pkg.c import _secret, helper\nfrom pkg import __doc__\n")
    return tmp_path


def test_checker_finds_cycles_through_lazy_and_type_checking_imports(synthetic):
    modules = module_files(synthetic, "pkg")
    assert set(modules) == {"pkg", "pkg.a", "pkg.b", "pkg.c", "pkg.sub", "pkg.sub.d",
                            "pkg.sub.e", "pkg.leaf"}
    graph = import_graph(modules)
    # `from pkg import c` is the module pkg.c; `from . import d` in pkg/sub/__init__ is pkg.sub.d;
    # `from .a import x` in pkg/c.py is pkg.a
    assert graph["pkg.b"] == {"pkg.c"} and graph["pkg.sub"] == {"pkg.sub.d"}
    assert graph["pkg.c"] == {"pkg.a"} and graph["pkg.leaf"] == {"pkg.sub.d"}
    found = cycles(graph)
    assert sorted(found) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"],
                             ["pkg.sub.d", "pkg.sub.e", "pkg.sub.d"]]
    assert "pkg.a -> pkg.b -> pkg.c -> pkg.a" in format_cycles(found)


def test_checker_finds_private_imports_across_modules(synthetic):
    modules = module_files(synthetic, "pkg")
    files = {path: module for module, path in modules.items()}
    files.update(python_files(synthetic, ["tools"]))
    found = private_imports(files, modules, "pkg", synthetic)
    assert [f.split(": ", 1)[1] for f in found] == ["from pkg.c import _secret"] * 2
    assert sorted(f.split(":")[0] for f in found) == ["pkg/sub/e.py", "tools/tool.py"]


def test_checker_passes_an_acyclic_package(synthetic):
    write(synthetic, "pkg/c.py", "_secret = 1\n")  # cut a -> b -> c -> a
    write(synthetic, "pkg/sub/d.py", "X = 1\n")  # cut d <-> e
    assert cycles(import_graph(module_files(synthetic, "pkg"))) == []
