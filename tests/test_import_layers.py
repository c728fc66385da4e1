"""The package's imports point only downward, and no modules import each other in a circle.

The layers, lowest first (docs/architecture.md draws the same picture).  A module may import
from its own unit (a subpackage imports itself freely) and from any unit on a lower layer;
units on the same layer are peers and do not import each other.  Deferred imports inside
functions count the same as top-level ones: a lazy import still ties the two modules.
"""
from __future__ import annotations

import ast
import pathlib
from collections import defaultdict

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "hpcqml"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "protocols"),
    ("io", "modes", "config"),
    ("parallel", "models", "verify"),
    ("store", "data", "petsc"),
    ("perf", "hessian", "carleman", "training"),
    ("hhl",),
    ("results",),
    ("report", "info"),
    ("preflight",),
    ("stages",),
    ("jobs", "runner", "calibrate"),
    ("cli",),
    ("__main__",),
)
# the package's own __init__ only hands names on lazily (importlib), so it sits at no layer


def _unit(module: str) -> str:
    """``hpcqml.hessian.slq`` -> ``hessian``; ``hpcqml.store`` -> ``store``; ``hpcqml`` -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: pathlib.Path) -> set[str]:
    """Every ``hpcqml...`` module named by an import statement anywhere in the file.

    The package uses absolute imports only; a relative one fails here so it cannot hide.
    """
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (use the absolute hpcqml... name)"
            if (node.module or "").startswith("hpcqml"):
                out.add(node.module or "")
                # `from hpcqml.stages import data` imports the module hpcqml.stages.data
                for alias in node.names:
                    submodule = f"{node.module}.{alias.name}"
                    if (PACKAGE.parent / submodule.replace(".", "/")).with_suffix(".py").is_file():
                        out.add(submodule)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name.startswith("hpcqml"))
    return out


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        graph[_module_name(path)] |= _imports(path)
    return graph


def _layer_of() -> dict[str, int]:
    return {unit: level for level, units in enumerate(LAYERS) for unit in units}


def test_every_unit_has_a_layer() -> None:
    """A new top-level module or subpackage must be placed in LAYERS (and in the docs' picture)."""
    layer = _layer_of()
    units = {_unit(m) for m in _graph()} - {""}
    assert sorted(units - set(layer)) == []


def test_imports_point_downward() -> None:
    layer = _layer_of()
    upward = []
    for module, targets in sorted(_graph().items()):
        src = _unit(module)
        for target in sorted(targets):
            dst = _unit(target)
            if dst in ("", src) or src == "":
                continue
            if layer[dst] >= layer[src]:
                upward.append(f"{module} -> {target} (layer {layer[src]} imports layer {layer[dst]})")
    assert upward == []


def test_no_import_circles() -> None:
    """Module-level circles (A imports B imports ... A), within a unit too."""
    graph = _graph()
    known = set(graph)
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            nxt = nxt if nxt in known else nxt.rsplit(".", 1)[0]  # `from pkg import module`
            if nxt not in known or nxt == node or node.startswith(nxt + ".") or nxt == "hpcqml":
                continue  # a package's own __init__ handing names to its modules is not a circle
            if state.get(nxt) == 1:
                circles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [])
    assert circles == []


def test_walker_sees_a_planted_upward_import(tmp_path: pathlib.Path) -> None:
    """The walker is not blind: a deferred import inside a function is found."""
    planted = tmp_path / "planted.py"
    planted.write_text("def f():\n    from hpcqml.stages import PIPELINE\n    return PIPELINE\n", encoding="utf-8")
    assert "hpcqml.stages" in _imports(planted)
