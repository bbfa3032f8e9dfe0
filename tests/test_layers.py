"""The package is a stack of layers: every module's kvlab imports (read with ast, function-level imports too)
form no cycle and never climb the stack; the study support never reaches a module that imports triton;
and nothing outside kvlab/quant/ asks a scheme its name."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "kvlab"

# the stack, bottom to top; folders of one rank do not import each other
RANKS = {
    "kvlab._io": 0, "kvlab.metrics": 0,
    "kvlab.quant": 1,
    "kvlab.kernels": 2,
    "kvlab.model": 3,
    "kvlab.emulation": 4, "kvlab.storage": 4,
    "kvlab.evaluation": 5,
    "kvlab.study": 6,
    "kvlab.cli": 7, "kvlab.__main__": 7, "kvlab": 7,
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _resolve(current: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = current.split(".") if is_pkg else current.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(name: str) -> set[str]:
    """The kvlab modules ``name`` imports anywhere in its body (``from a import b`` counts a.b when b is a module)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mod = _resolve(name, path.name == "__init__.py", node)
            subs = {f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in MODULES}
            found |= subs
            if len(subs) < len(node.names):  # names defined in mod itself
                found.add(mod)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {m: imports(m) for m in MODULES}


def rank(module: str) -> tuple[int, str]:
    for prefix in sorted(RANKS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return RANKS[prefix], prefix
    raise AssertionError(f"module {module} is in no layer of RANKS: add its folder to the stack")


def test_every_module_is_in_a_layer():
    for m in MODULES:
        rank(m)


def test_only_entry_points_and_shared_helpers_at_the_top():
    top = {p.name for p in PKG.glob("*.py")}
    assert top == {"__init__.py", "__main__.py", "cli.py", "_io.py", "metrics.py"}, top


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_climbs_the_stack(module):
    r, layer = rank(module)
    for dep in GRAPH[module]:
        if module in ("kvlab", "kvlab.__main__", "kvlab.cli"):
            continue
        dr, dlayer = rank(dep)
        assert dr < r or dlayer == layer, f"{module} (layer {layer}) imports {dep} (layer {dlayer})"


def test_no_cycles():
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for d in GRAPH[m]:
            if d == "kvlab" or (m.startswith(d + ".")):  # a module's own parent package runs first: not an edge
                continue
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, m, d]))
            if not state.get(d):
                visit(d, [*path, m])
        state[m] = 2

    for m in sorted(GRAPH):
        if not state.get(m):
            visit(m, [])


def _closure(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo += [d for d in GRAPH[m] if d != "kvlab"]
    return seen


def _imports_triton(module: str) -> bool:
    return bool(re.search(r"^\s*(import triton|from triton)", MODULES[module].read_text(), re.M))


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("kvlab.study")))
def test_study_support_never_reaches_triton(module):
    reached = sorted(m for m in _closure(module) if _imports_triton(m))
    assert not reached, f"{module} reaches {reached}"


def test_no_scheme_name_is_read_outside_quant():
    pattern = re.compile(r"\b(q|k|v|self\.q|quantizer)\.name\b|getattr\((q|self\.q), \"")
    bad = []
    for m, path in MODULES.items():
        if m.startswith("kvlab.quant"):
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                bad.append(f"{path.relative_to(PKG.parent)}:{i}: {line.strip()}")
    assert not bad, "\n".join(bad)


def test_the_test_catches_a_climbing_import():
    """The checks above can fail: a storage module importing evaluation is reported."""
    fake = {**GRAPH, "kvlab.storage.cache": GRAPH["kvlab.storage.cache"] | {"kvlab.evaluation.sweep"}}
    r, _ = rank("kvlab.storage.cache")
    assert any(rank(d)[0] > r for d in fake["kvlab.storage.cache"])
