"""The package's import graph: no cycles, no private names across modules, the layering of DESIGN.md.

Every ``import``/``from ... import`` anywhere in a module counts, including the ones inside
functions: a lazy import hides a cycle from Python but not from the next engineer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import blip_ase

ROOT = Path(blip_ase.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(name: str) -> list[tuple[str, str | None, int]]:
    """``(module, imported name or None, line)`` of every blip_ase import in module ``name``."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names if alias.name.startswith("blip_ase")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.startswith("blip_ase"):
                found += [(base, alias.name, node.lineno) for alias in node.names]
    return found


def _edges(name: str) -> set[str]:
    """Modules that ``name`` imports (a name that is a submodule counts as that submodule)."""
    out = set()
    for module, imported, _ in _imports(name):
        target = f"{module}.{imported}" if imported and f"{module}.{imported}" in MODULES else module
        if target in MODULES and target != name:
            out.add(target)
    return out


GRAPH = {name: _edges(name) for name in MODULES}


def test_the_package_has_no_import_cycle():
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


def test_no_module_imports_a_private_name_of_another_module():
    offences = [
        f"{name}:{line} imports {imported} from {module}"
        for name in MODULES
        for module, imported, line in _imports(name)
        if imported and imported.startswith("_") and not imported.startswith("__") and module != name
    ]
    assert not offences, "\n".join(offences)


LAYERS = {  # package -> packages it must never import (DESIGN.md, "Dependency direction")
    "blip_ase.bayes": ("blip_ase.training", "blip_ase.md", "blip_ase.uq", "blip_ase.active", "blip_ase.cli",
                       "blip_ase.calculator", "blip_ase.inference", "blip_ase.models"),
    "blip_ase.models": ("blip_ase.training", "blip_ase.md", "blip_ase.uq", "blip_ase.active", "blip_ase.cli",
                        "blip_ase.calculator", "blip_ase.inference"),
    "blip_ase.inference": ("blip_ase.training", "blip_ase.md", "blip_ase.uq", "blip_ase.active", "blip_ase.cli",
                           "blip_ase.calculator"),
    "blip_ase.calculator": ("blip_ase.training", "blip_ase.md", "blip_ase.uq", "blip_ase.active", "blip_ase.cli"),
    "blip_ase.md": ("blip_ase.training", "blip_ase.active", "blip_ase.cli"),
    "blip_ase.uq": ("blip_ase.training", "blip_ase.md", "blip_ase.active", "blip_ase.cli"),
    "blip_ase.training": ("blip_ase.active", "blip_ase.cli", "blip_ase.md"),
    "blip_ase.active": ("blip_ase.cli",),
}


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_each_layer_imports_only_what_lies_below_it(layer):
    forbidden = LAYERS[layer]
    offences = [
        f"{name} imports {target}"
        for name in MODULES
        if name == layer or name.startswith(layer + ".")
        for target in GRAPH[name]
        if any(target == f or target.startswith(f + ".") for f in forbidden)
    ]
    assert not offences, "\n".join(offences)


def test_the_walk_sees_the_imports_it_checks():
    """The checks above are only as good as the graph: it must hold known edges."""
    assert "blip_ase.inference.engine" in GRAPH["blip_ase.calculator"]
    assert "blip_ase.inference" in GRAPH["blip_ase.md.torchsim"]
    assert len(MODULES) > 50
