"""The architecture as a test: imports go down the three layers (pipelines -> dcgan -> preprocessing), never up, and
no module takes part in an import cycle, counting the imports inside functions too (a lazy import that closes a
cycle still ties the two modules into one). Read from the source with `ast`: nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("preprocessing", "dcgan", "pipelines")  # bottom to top


def modules() -> dict[str, Path]:
    out = {}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> dict[str, int]:
    """The project modules `name` imports, each with the line of its first import."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{a.name}" for a in node.names]  # `from pkg import module`
        else:
            continue
        for target in targets:
            if target in known and target != name:
                found.setdefault(target, node.lineno)
    return found


def graph() -> dict[str, dict[str, int]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


def upward(g: dict[str, dict[str, int]]) -> list[str]:
    return [f"{a}:{line} imports {b}" for a, targets in g.items() for b, line in targets.items() if layer(b) > layer(a)]


def cycles(g: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in g:
        if root in index:
            continue
        work = [(root, iter(g[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(g[child])))
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
                    found.append(sorted(component))
    return found


def test_imports_only_go_down_the_layers():
    assert upward(graph()) == []


def test_no_module_is_part_of_an_import_cycle():
    assert cycles(graph()) == []


@pytest.mark.parametrize("edges, bad", [
    ({"preprocessing.a": {"dcgan.b": 3}, "dcgan.b": {}}, "upward"),
    ({"dcgan.a": {"dcgan.b": 1}, "dcgan.b": {"dcgan.c": 1}, "dcgan.c": {"dcgan.a": 9}}, "cycle"),
])
def test_the_checks_catch_an_upward_import_and_a_cycle(edges, bad):
    """The two checks would fail on a graph that breaks the rule (they are not vacuous)."""
    assert bool(upward(edges)) == (bad == "upward")
    assert bool(cycles(edges)) == (bad == "cycle")
    assert graph()["dcgan.train"]  # and the real graph is read: the trainer imports project modules


LAYOUT_MODULES = {"preprocessing.dataset_layout", "dcgan.run_layout"}


def spelled_paths(name: str, path: Path) -> list[str]:
    """Calls of `storage.join(base, "literal", ...)` (or f-strings) in `name`: a storage path spelled outside the two
    layout modules, which own every name under a dataset or a run."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "join"
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "storage"):
            continue
        if any(isinstance(arg, (ast.Constant, ast.JoinedStr)) for arg in node.args[1:]):
            found.append(f"{name}:{node.lineno}")
    return found


def test_storage_paths_are_spelled_only_in_the_layout_modules():
    spelled = [hit for name, path in modules().items() if name not in LAYOUT_MODULES
               for hit in spelled_paths(name, path)]
    assert spelled == []


def test_the_path_check_catches_a_spelled_path(tmp_path):
    module = tmp_path / "m.py"
    module.write_text('from preprocessing import storage\nuri = storage.join(run, "metrics", "metrics.csv")\n'
                      'ok = storage.join(run, entry["path"])\n')
    assert spelled_paths("m", module) == ["m:2"]
