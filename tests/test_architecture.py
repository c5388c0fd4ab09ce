"""The package's parts, as docs/architecture.md draws them: lower layers never import higher
ones, no module imports another's private names, the import graph has no cycles, and kd/'s top
level stays small."""

import ast
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "kd"

# Layers, lowest first: a module may import its own layer and those below, never above.
LAYERS = [
    ("base", ["kd.errors", "kd.util"]),
    ("core", ["kd.config", "kd.data", "kd.models", "kd.distillers"]),
    ("train", ["kd.train", "kd.hub", "kd.cli", "kd.eda"]),
    ("lab", ["kd.lab", "kd.bench"]),
    ("entry", ["kd.report", "kd.tune", "kd.leaderboard"]),
]
TOP_LEVEL_LIMIT = 12


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def layer(module: str) -> int:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes):
            return index
    return -1  # kd itself (its __init__)


def imports(module: str):
    """(imported kd module, names taken from it) for every import in the module, at any depth."""
    tree = ast.parse(MODULES[module].read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("kd"):
                    yield alias.name, []
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kd") and node.level == 0:
            names = [alias.name for alias in node.names]
            submodules = [f"{node.module}.{name}" for name in names if f"{node.module}.{name}" in MODULES]
            yield from ((sub, []) for sub in submodules)
            yield node.module, [name for name in names if f"{node.module}.{name}" not in MODULES]


def test_every_module_has_a_layer():
    assert [module for module in MODULES if module != "kd" and layer(module) < 0] == []


def test_top_level_is_small():
    top = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert len(top) <= TOP_LEVEL_LIMIT, top


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_upwards_and_no_private_names(module):
    wrong = []
    if module == "kd":  # the package's __init__ imports kd.models only to register them in timm
        assert {imported for imported, _ in imports(module)} - {"kd"} == {"kd.models"}
        return
    for imported, names in imports(module):
        if imported in ("kd",):
            continue
        if layer(imported) > layer(module):
            wrong.append(f"{module} ({LAYERS[layer(module)][0]}) imports {imported} ({LAYERS[layer(imported)][0]})")
        wrong += [f"{module} imports the private {imported}.{name}" for name in names if name.startswith("_")]
    assert not wrong, wrong


def test_no_import_cycles():
    graph = {module: {imported for imported, _ in imports(module) if imported in MODULES and imported != module}
             for module in MODULES}
    # a package's __init__ re-exporting its own modules is not a cycle of ideas; leave packages out
    packages = {module for module, path in MODULES.items() if path.name == "__init__.py"}
    graph = {module: edges - packages for module, edges in graph.items() if module not in packages}
    state, cycles = {}, []

    def visit(module, stack):
        state[module] = "open"
        for nxt in sorted(graph.get(module, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles
