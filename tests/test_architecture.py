"""The package's layers: every import inside sodlib (function-local ones included) points down or sideways
within its own subpackage, and the module graph has no cycle."""

import ast
from pathlib import Path

import pytest

import sodlib

PACKAGE = Path(sodlib.__file__).parent

# lower number = lower layer; a module may import its own unit or a unit of a strictly lower layer
LAYERS = {
    "sodlib.config": 0,
    "sodlib.io": 0,
    "sodlib.box_ops": 0,
    "sodlib.hardware": 0,
    "sodlib.checkpoints": 1,
    "sodlib.data": 2,
    "sodlib.models": 2,
    "sodlib.evaluation": 2,
    "sodlib.losses": 3,
    "sodlib.build": 4,
    "sodlib.official": 5,
    "sodlib.inference": 6,
    "sodlib.training": 7,
    "sodlib.studies": 8,
    "sodlib.cli": 9,
    "sodlib.__main__": 10,
    "sodlib": 10,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> str:
    """The LAYERS key a module belongs to (its subpackage, or itself for top-level modules)."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def _imports(path: Path) -> set[str]:
    """Every sodlib module ``path`` imports, at any depth of the code."""
    return _imports_in(path.read_text(encoding="utf-8"), _module_name(path), path.name == "__init__.py")


def _imports_in(source: str, module: str, is_package: bool = False) -> set[str]:
    package = module if is_package else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "sodlib")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "sodlib":
                continue
            for a in node.names:  # `from sodlib.x import y` may name a submodule y
                sub = f"{target}.{a.name}"
                out.add(sub if _is_module(sub) else target)
    return out


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


GRAPH = {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_layer():
    assert {_unit(m) for m in GRAPH} <= set(LAYERS), {_unit(m) for m in GRAPH} - set(LAYERS)


def _upward(module: str, imports: set[str]) -> list[str]:
    unit = _unit(module)
    return sorted(t for t in imports if _unit(t) != unit and LAYERS[_unit(t)] >= LAYERS[unit])


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down(module):
    upward = _upward(module, GRAPH[module])
    assert not upward, f"{module} (layer {LAYERS[_unit(module)]}) imports {upward}"


def test_the_checker_sees_hidden_and_relative_imports():
    source = (
        "import torch\nfrom sodlib.config import RunConfig\n\n"
        "def f():\n    from sodlib.studies import viz\n    from ..training.engine import train\n"
        "    from . import decoder\n"
    )
    found = _imports_in(source, "sodlib.models.detector")
    assert found == {"sodlib.config", "sodlib.studies.viz", "sodlib.training.engine", "sodlib.models.decoder"}
    assert _upward("sodlib.models.detector", found) == ["sodlib.studies.viz", "sodlib.training.engine"]


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m: str, path: list[str]):
        state[m] = 1
        for t in sorted(GRAPH.get(m, ())):
            if t not in GRAPH or t == m:
                continue
            if state.get(t) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(t) :] + [t]) if t in path else t)
            if t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])


def test_every_subpackage_says_what_it_holds_and_may_import():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
        assert "May import" in doc, f"{init}: the docstring must say what the subpackage may import"
