"""The layering of docs/ARCHITECTURE.md, checked on the source: dependencies point one way, no
import cycles, no god files, and Qt / torch never imported by the runtime."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "ernie_edge"
MAX_LINES = 700

# Layers, lowest first: a module may import modules of its own layer or lower ones, never higher.
LAYERS = [
    ("base", ("ernie_edge.errors", "ernie_edge.config", "ernie_edge.paths")),
    ("kernels", ("ernie_edge.kernels",)),
    ("formats", ("ernie_edge.formats",)),
    ("runtime", ("ernie_edge",)),  # every other module of the package: storage, model, generation, engine
    ("converter", ("ernie_edge.quant",)),
    ("apps", ("ernie_edge.cli", "ernie_edge.cli_", "ernie_edge.demo", "ernie_edge.terminal_chat",
              "ernie_edge.server", "ernie_edge.gui")),
]


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    """The highest layer whose prefix matches (the most specific rule wins)."""
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".") or (p.endswith("_") and module.startswith(p))) \
                    and len(p) > best_len:
                best, best_len = i, len(p)
    return best


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported ernie_edge module, imported at module level?) for each import in the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    top |= {id(c) for n in tree.body if isinstance(n, (ast.If, ast.Try)) for c in ast.walk(n)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            mods = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for m in mods:
            if m == "ernie_edge" or m.startswith("ernie_edge."):
                out.append((m, id(node) in top))
    return out


SOURCES = sorted(PKG.rglob("*.py"))
KNOWN = {module_name(p) for p in SOURCES}


def resolve(m: str) -> str | None:
    """The module an imported name lives in (`from .x import y` names y, which may be a function)."""
    while m and m not in KNOWN:
        m = m.rpartition(".")[0]
    return m or None


def test_dependencies_point_one_way():
    bad = []
    for path in SOURCES:
        src = module_name(path)
        for target, _ in imports(path):
            target = resolve(target)
            if target and target != "ernie_edge" and layer_of(target) > layer_of(src):
                bad.append(f"{src} ({LAYERS[layer_of(src)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})")
    assert not bad, "\n".join(sorted(set(bad)))


def test_no_import_cycles_at_module_level():
    graph = {module_name(p): {resolve(t) for t, top in imports(p) if top} - {None, "ernie_edge"} for p in SOURCES}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_source_file_over_the_limit():
    long = {str(p.relative_to(PKG.parent)): n for p in SOURCES if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_heavy_dependencies_stay_where_they_belong():
    """Qt only under gui/; torch and transformers never in the package (tests only)."""
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
        assert not names & {"torch", "transformers"}, path
        if "gui" not in path.relative_to(PKG).parts:
            assert "PyQt6" not in names, path


def test_every_module_has_a_layer():
    assert all(layer_of(m) is not None for m in KNOWN)
