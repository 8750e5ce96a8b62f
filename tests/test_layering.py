"""The package's layering, read from the source: which room may import which (README "Architecture").

Every import statement counts, also the ones inside functions (a late import is still a dependency).
A module may import from its own layer and the layers below it, never from a layer above; no two
modules import each other, directly or through others; and the method plugins reach the core only
through the public façade (``from compress import ...``), plus ``compress.testing`` in their tests.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "compress"

#: Bottom to top. A room is a top-level module or subpackage of ``compress``.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "hookspecs", "target", "progress", "assets"),  # vocabulary: no torch model yet
    ("model", "modeling"),  # adapters, plans, surgery, sizing, footprint; the export modeling file
    ("calib", "io", "evaluate", "probes"),  # data and statistics; files in and out; quality; process probes
    ("train",),  # recovery training
    ("pruner", "plugins", "catalog"),  # the method contract (with its services), the registry, its cache
    ("pipeline",),  # preflight, run, dry run, recover, the Python API
    ("bench", "cli", "testing", "__init__"),  # entry points
)
LAYER_OF = {room: i for i, rooms in enumerate(LAYERS) for room in rooms}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every ``compress...`` module this file imports (``from compress import x`` counts as the
    submodule ``compress.x`` when there is one, else as the façade)."""
    tree = ast.parse(path.read_text(), str(path))
    me = _module_name(path)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "compress"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = me.split(".")[: len(me.split(".")) - node.level + (1 if path.name == "__init__.py" else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "compress":
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}"
                found.add(sub if _exists(sub) else mod)
    return found


def _exists(module: str) -> bool:
    p = ROOT.joinpath(*module.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _package_modules() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted(PKG.rglob("*.py"))
            if "tasks" not in p.relative_to(PKG).parts}


def test_every_room_has_a_layer():
    rooms = {_room(m) for m in _package_modules()}
    assert rooms <= set(LAYER_OF), f"rooms without a layer in LAYERS: {sorted(rooms - set(LAYER_OF))}"


def test_no_room_imports_from_a_layer_above():
    bad = []
    for mod, deps in _package_modules().items():
        mine = LAYER_OF[_room(mod)]
        for dep in deps:
            if dep == "compress" and _room(mod) != "__init__":
                bad.append(f"{mod} imports the façade (compress); import the room that defines the name")
            elif dep != "compress" and LAYER_OF[_room(dep)] > mine:
                bad.append(f"{mod} (layer {mine}) imports {dep} (layer {LAYER_OF[_room(dep)]})")
    assert not bad, "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = {m: {d for d in deps if d != m} for m, deps in _package_modules().items()}
    # a package's __init__ re-exporting its own modules is not a cycle of concerns
    for m in graph:
        graph[m] = {d for d in graph[m] if not (d.startswith(m + ".") and _exists(d))}
    assert not _cycles(graph), _cycles(graph)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


PLUGIN_TREES = ("plugins", "baselines", "examples")


@pytest.mark.parametrize("tree", PLUGIN_TREES)
def test_methods_use_only_the_public_facade(tree):
    bad = []
    for path in sorted((ROOT / tree).rglob("*.py")):
        allowed = {"compress"} | ({"compress.testing"} if "tests" in path.parts or path.name.startswith("test_")
                                  else set())
        src = ast.parse(path.read_text(), str(path))
        for node in ast.walk(src):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            for n in names:
                if n.split(".")[0] == "compress" and n not in allowed:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {n}")
    assert not bad, "methods must use `from compress import ...` only:\n" + "\n".join(bad)


def test_the_facade_check_sees_a_submodule_import(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from compress.calib.stats import record\n")
    src = ast.parse(f.read_text())
    mods = [n.module for n in ast.walk(src) if isinstance(n, ast.ImportFrom)]
    assert mods == ["compress.calib.stats"]
