"""The package's layers, from its imports: one direction, no private names across modules, no cycles.

Layers, lowest first (a module may import its own layer and the ones below):

    numerics  <  parallel  <  io  <  operators  <  stages, solvers  <  pipeline, perf  <  cli  <  the package root

``config`` is readable by every layer and imports nothing of cubefit_mpi outside itself.  The
package root holds ``__init__``, ``__main__`` and the thin re-exports of the spec's import paths.
Every import counts, also those made inside functions.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cubefit_mpi"
LEVELS = {"config": 0, "numerics": 1, "parallel": 2, "io": 3, "operators": 4, "stages": 5, "solvers": 5,
          "pipeline": 6, "perf": 6, "cli": 7}
ROOT_LEVEL = 8


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer(module: str) -> tuple[str, int]:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in LEVELS:
        return parts[1], LEVELS[parts[1]]
    return "root", ROOT_LEVEL


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(path: Path, package: Path = PACKAGE) -> list[tuple[str, str | None, int]]:
    """``(imported module, imported name or None, line)`` for every cubefit_mpi import in ``path``."""
    module = module_name(path, package)
    tree = ast.parse(path.read_text())
    modules = {module_name(p, package) for p in package.rglob("*.py")}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "cubefit_mpi":
                    found.append((alias.name, None, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node, module, path.name == "__init__.py")
            if target.split(".")[0] != "cubefit_mpi":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in modules:                        # from package import module
                    found.append((sub, None, node.lineno))
                else:
                    found.append((target, alias.name, node.lineno))
    return found


def private_attribute_uses(path: Path, package: Path = PACKAGE) -> list[tuple[str, int]]:
    """``module._name`` attribute uses on names bound to cubefit_mpi modules in ``path``."""
    tree = ast.parse(path.read_text())
    bound = {}
    module = module_name(path, package)
    modules = {module_name(p, package) for p in package.rglob("*.py")}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = _resolve(node, module, path.name == "__init__.py")
            for alias in node.names:
                if f"{target}.{alias.name}" in modules:
                    bound[alias.asname or alias.name] = f"{target}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("cubefit_mpi") and alias.asname:
                    bound[alias.asname] = alias.name
    out = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            out.append((f"{bound[node.value.id]}.{node.attr}", node.lineno))
    return out


def layer_violations(package: Path = PACKAGE) -> list[str]:
    wrong = []
    for path in sorted(package.rglob("*.py")):
        here = module_name(path, package)
        name, level = layer(here)
        for target, _, line in imports_of(path, package):
            t_name, t_level = layer(target)
            if t_name == "config" or (target == "cubefit_mpi" and name == "root"):
                continue
            if name == "config" or t_level > level:
                wrong.append(f"{path.relative_to(package.parent)}:{line}: {name} imports {target} ({t_name})")
    return wrong


def private_violations(package: Path = PACKAGE) -> list[str]:
    wrong = []
    for path in sorted(package.rglob("*.py")):
        for target, name, line in imports_of(path, package):
            if name is not None and name.startswith("_") and not name.startswith("__"):
                wrong.append(f"{path.relative_to(package.parent)}:{line}: imports {target}.{name}")
        for use, line in private_attribute_uses(path, package):
            wrong.append(f"{path.relative_to(package.parent)}:{line}: uses {use}")
    return wrong


def import_cycles(package: Path = PACKAGE) -> list[str]:
    sources = sorted(package.rglob("*.py"))
    modules = {module_name(p, package) for p in sources}
    graph = defaultdict(set)
    for path in sources:
        here = module_name(path, package)
        for target, _, _ in imports_of(path, package):
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target not in (here, "cubefit_mpi"):
                graph[here].add(target)
    cycles, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_every_import_goes_down_the_layers():
    wrong = layer_violations()
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_no_private_names_across_modules():
    wrong = private_violations()
    assert not wrong, "private names used across modules:\n" + "\n".join(wrong)


def test_no_import_cycles():
    cycles = import_cycles()
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checks_catch_what_they_are_for(tmp_path):
    fake = tmp_path / "cubefit_mpi"
    for sub in ("numerics", "stages", "config"):
        (fake / sub).mkdir(parents=True)
        (fake / sub / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("")
    (fake / "stages" / "build.py").write_text("from ..numerics import kernels\n")
    (fake / "numerics" / "kernels.py").write_text("def f():\n    from ..stages.build import x\n")
    (fake / "numerics" / "nnls.py").write_text("from .kernels import _helper\nfrom . import kernels\nkernels._cache\n")
    (fake / "config" / "knobs.py").write_text("from ..numerics.nnls import y\n")
    assert layer_violations(fake) == [
        "cubefit_mpi/config/knobs.py:1: config imports cubefit_mpi.numerics.nnls (numerics)",
        "cubefit_mpi/numerics/kernels.py:2: numerics imports cubefit_mpi.stages.build (stages)"]
    assert private_violations(fake) == ["cubefit_mpi/numerics/nnls.py:1: imports cubefit_mpi.numerics.kernels._helper",
                                        "cubefit_mpi/numerics/nnls.py:3: uses cubefit_mpi.numerics.kernels._cache"]
    assert import_cycles(fake) == ["cubefit_mpi.numerics.kernels -> cubefit_mpi.stages.build -> "
                                   "cubefit_mpi.numerics.kernels"]


def undocumented_modules(package: Path = PACKAGE, doc: Path = PACKAGE.parent / "docs" / "architecture.md") -> list:
    """Modules of the layer folders that docs/architecture.md's table does not name (as `name`)."""
    rows = {}
    for line in doc.read_text().splitlines():
        if line.startswith("| `") and "/` |" in line.split("|")[1] + "|":
            rows[line.split("`")[1].rstrip("/")] = line
    missing = []
    for layer in LEVELS:
        for path in sorted((package / layer).rglob("*.py")):
            name = path.stem
            if name != "__init__" and f"`{name}`" not in rows.get(layer, ""):
                missing.append(f"{layer}/{path.relative_to(package / layer)}")
    return missing


def test_the_architecture_doc_names_every_module():
    missing = undocumented_modules()
    assert not missing, "modules missing from docs/architecture.md's layer table:\n" + "\n".join(missing)
