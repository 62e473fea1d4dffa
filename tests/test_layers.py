"""The package's layers point down, and no module imports another in a circle.

Layers, lowest first (DEVELOPERS.md): values, errors, defaults, cpus -> store -> executors ->
signals, tokens -> engine -> server -> notebook face -> agents. A module may import its own
layer and those below; the package's ``__init__`` and ``__main__`` sit above everything. Every
import counts, also those inside functions (an import deferred to get round a cycle is still
one); only ``if TYPE_CHECKING:`` imports, which never run, are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import durable_monty_nb

PACKAGE = "durable_monty_nb"
ROOT = Path(durable_monty_nb.__file__).parent
LAYERS = (
    ("values", "errors", "defaults", "cpus"),
    ("store",),
    ("executors",),
    ("signals", "tokens"),
    ("engine",),
    ("server",),
    ("notebook",),
    ("agents",),
)
TOP = len(LAYERS)  # the package itself and its command line


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return TOP
    for level, names in enumerate(LAYERS):
        if parts[1] in names:
            return level
    raise AssertionError(f"{module} is in no layer: add its top-level name to LAYERS (and to DEVELOPERS.md)")


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(path: Path, modules: set[str], name: str | None = None) -> set[str]:
    """The package's modules that ``path`` (module ``name``) imports, resolved to modules."""
    name = name or module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def resolve(target: str) -> None:
        while target and target not in modules:  # a name imported from a module: that module
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking_only(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == PACKAGE:
                        resolve(alias.name)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    source = ".".join(base + ([child.module] if child.module else []))
                else:
                    source = child.module or ""
                if source.split(".")[0] != PACKAGE:
                    continue
                for alias in child.names:
                    full = f"{source}.{alias.name}"
                    resolve(full if full in modules else source)
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in ROOT.rglob("*.py") if "migrations" not in p.parts}
    modules = set(paths)
    return {name: imports_of(path, modules) for name, path in paths.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles (strongly connected components of more than one module, or a self-import)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def connect(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_imports_point_down_the_layers() -> None:
    upward = [
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module, targets in sorted(import_graph().items())
        for target in sorted(targets)
        if layer_of(target) > layer_of(module)
    ]
    assert upward == [], "imports running up the layers:\n" + "\n".join(upward)


def test_no_module_imports_another_in_a_circle() -> None:
    found = cycles(import_graph())
    assert found == [], "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_graph_sees_deferred_and_relative_imports(tmp_path: Path) -> None:
    """The checks would catch what they look for: a lazy upward import and a two-module cycle."""
    graph = import_graph()
    assert "durable_monty_nb.store.store" in graph["durable_monty_nb.engine.engine"]  # a relative import
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert layer_of("durable_monty_nb.store.store") < layer_of("durable_monty_nb.executors.base")
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..engine import engine\n"
        "def f():\n    from ..executors import base\n"
    )
    found = imports_of(probe, set(graph), name="durable_monty_nb.store.probe")
    assert found == {"durable_monty_nb.executors.base"}  # the deferred one; not the type-only one
