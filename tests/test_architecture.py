"""The package's structure: imports flow one way, no cycles, light modules stay light."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("data_tools", "workbench")

# Layers, bottom to top: a module may import its own layer and the layers below it.
LAYERS = [
    ("data_tools",),
    ("workbench.errors", "workbench.options", "workbench.mesh"),
    ("workbench.model",),
    ("workbench.execute",),
    ("workbench.training",),
    ("workbench.analysis",),
    ("workbench.app",),
    ("workbench.ui", "workbench.cli"),
]


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _type_checking(node) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of our packages that ``name`` imports anywhere (function-level imports
    included, ``TYPE_CHECKING`` blocks not)."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    found = set()

    def visit(node):
        if _type_checking(node):
            return
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{a.name}" for a in node.names]
        else:
            targets = []
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _layer(module: str) -> int | None:
    for rank, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None


def test_no_import_cycles(graph):
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def strongconnect(v):  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in graph:
                continue
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            strongconnect(v)
    # a package importing its own submodules (lazy re-exports) is not a cycle of roles
    cycles = [c for c in cycles if not all(m.startswith(c[0] + ".") or m == c[0] for m in c)]
    assert cycles == []


def test_imports_flow_one_way(graph):
    upward = []
    for module, targets in graph.items():
        mine = _layer(module)
        if mine is None or module == "workbench":  # the lazy top-level API may name anything
            continue
        for target in targets:
            theirs = _layer(target)
            if theirs is not None and theirs > mine:
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_ui_never_imports_the_cli(graph):
    assert [
        f"{m} -> {t}"
        for m, ts in graph.items()
        if m.startswith("workbench.ui")
        for t in ts
        if t.startswith("workbench.cli")
    ] == []


def test_the_cycle_check_sees_function_level_imports(tmp_path):
    """The check is not vacuous: a function-level import back up the layers is found."""
    fake = tmp_path / "m.py"
    fake.write_text("def f():\n    from workbench.cli import main\n")
    assert _imports("workbench.model.m", fake, {"workbench.cli", "workbench.model.m"}) == {"workbench.cli"}


@pytest.mark.parametrize(
    "module",
    [
        "data_tools",
        "data_tools.io",
        "workbench",
        "workbench.mesh",
        "workbench.options",
        "workbench.errors",
        "workbench.app",
        "workbench.ui.panel",
        "workbench.ui.notebook_viewer",
    ],
)
def test_light_modules_do_not_start_jax(module):
    code = f"import sys, {module}; print(sorted(m for m in ('jax', 'napari', 'PyQt6', 'flax') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_modules_stay_readable():
    """No module over ~500 lines (the notes name any exception)."""
    long = {str(p.relative_to(ROOT)): n for p in _modules().values() if (n := len(p.read_text().splitlines())) > 520}
    assert long == {}


def test_every_test_file_has_a_tier():
    """`pytest -m exactness` (or unit, integration) never silently misses a new file."""
    from conftest import TIERS

    files = sorted(p.name for p in (ROOT / "tests").glob("test_*.py"))
    assert [f for f in files if f not in TIERS] == []
    assert [f for f in TIERS if f not in files] == []
