"""The shape of data_tools: one format table with one interface, imports without cycles."""

import ast
import inspect
from pathlib import Path

import pytest

import data_tools
from data_tools import formats

ROOT = Path(data_tools.__file__).parent
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    """``{"data_tools.formats.zarr": path, "data_tools.formats": path of __init__, ...}``."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """Every import statement, at any depth (function-level too), outside TYPE_CHECKING blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _import_graph() -> dict[str, set[str]]:
    """Intra-package edges ``module -> modules it makes Python execute``.

    Importing ``a.b.c`` also runs ``a`` and ``a.b``, so those count too, except the
    importer's own packages (already running when the importer runs).
    """
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = []
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets += [alias.name for alias in node.names]
                continue
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                targets.append(sub if sub in modules else source)
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        for target in targets:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                dep = ".".join(parts[:i])
                if dep in modules and dep != name and dep not in own:
                    graph[name].add(dep)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_import_graph_is_acyclic():
    graph = _import_graph()
    # the graph sees what it should: the old hidden cycle's two ends, now one way
    assert "data_tools.formats.zarr" in graph["data_tools.synthetic.write"]
    assert "data_tools.geometry" in graph["data_tools.formats.zarr"]
    assert not {m for m in graph["data_tools.formats.zarr"] if m.startswith("data_tools.synthetic")}
    assert graph["data_tools"] == set(), "the package __init__ must stay lazy"
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_no_cycle_is_found_when_there_is_one():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _cycle(graph) == ["a", "b", "c", "a"]


def test_modules_stay_small():
    long = {name: n for name, p in _modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules (over {MAX_LINES} lines): {long}"


@pytest.mark.parametrize("name", sorted(formats.MODULES))
def test_every_format_module_exposes_the_same_names(name):
    module = formats.MODULES[name]
    reference = formats.MODULES["nifti"]
    assert set(formats.INTERFACE) <= set(vars(module)), set(formats.INTERFACE) - set(vars(module))
    assert set(formats.INTERFACE) <= set(module.__all__)

    def params(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    for fn in ("sniff", "read", "read_box", "info"):
        assert params(getattr(module, fn)) == params(getattr(reference, fn)), fn
    assert [p[0] for p in params(module.write)[:2]] in (["volume", "path"], ["volume", "folder"])
    assert module.FORMATS and all(formats.format_module(f) is module for f in module.FORMATS)
    for suffix in module.SUFFIXES:
        assert formats.module_for_name(f"out{suffix}") is module


def test_format_table_covers_every_format_once():
    names = [f for module in formats.MODULES.values() for f in module.FORMATS]
    assert sorted(names) == sorted(formats.FORMATS) and len(names) == len(set(names))
    assert data_tools.io.FORMATS == formats.FORMATS
    assert formats.module_for_name("out.txt") is None
    with pytest.raises(KeyError, match="no format 'jpeg'"):
        formats.format_module("jpeg")


def test_package_names_resolve():
    for name in data_tools.__all__:
        assert getattr(data_tools, name) is not None
    assert data_tools.make_phantom is data_tools.synthetic.make_phantom
    assert data_tools.read_box is data_tools.io.read_box
