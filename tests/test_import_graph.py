"""The ``or_agent`` package's import graph, read from the source with ``ast`` (nothing is imported).

Why these rules hold the layering in place:

* no cycle among ``or_agent.pipelines`` modules: with one, whether a module imports at all depends on
  which module of the cycle was imported first (a half-initialised module), and the real-time dataflow
  cannot be split or reused piece by piece;
* ``or_agent.pipelines`` never imports ``or_agent.agent`` at module level: the dataflow is tested,
  benchmarked and reused without the agent (``pipelines/__init__.py``);
* no production module (``agent/``, ``pipelines/``, ``calibration/``) imports
  ``or_agent.models.training``, even inside a function: the training code needs torch, which the OR
  box does not install.

Module level means what runs when the module is imported: function bodies and ``if TYPE_CHECKING:``
blocks are not (the lazy imports of TensorRT and pycuda live in functions for that reason). Importing
``a.b.c`` first runs ``a`` and ``a.b`` (their ``__init__``), so those count as imported too, except
the importer's own enclosing packages, whose initialisation is already under way.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "or_agent"
# setup.py's package_dir: these folders are installed as or_agent.<folder>
FOLDERS = ("agent", "pipelines", "calibration", "proto", "synth", "models")
PRODUCTION = ("agent", "pipelines", "calibration")
PIPELINES = f"{PACKAGE}.pipelines"
TRAINING = f"{PACKAGE}.models.training"


def package_modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package (generated stubs left out:
    they import only protobuf and grpc)."""
    modules = {}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "_pb2" in path.stem:
                continue
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([PACKAGE, *parts])] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def module_level_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements that run when the module is imported (class bodies, try and if blocks
    included; function bodies and ``if TYPE_CHECKING:`` excluded)."""
    stack: list[ast.AST] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
        else:
            stack.extend(c for c in ast.iter_child_nodes(node) if isinstance(c, (ast.stmt, ast.excepthandler, ast.match_case)))


def all_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, wherever it is (functions and ``TYPE_CHECKING`` blocks included)."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node


def imported_modules(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, known: set[str]) -> set[str]:
    """The package's modules that ``node`` runs, as dotted names."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base_parts = importer.split(".") if is_package else importer.split(".")[:-1]
            base_parts = base_parts[:len(base_parts) - (node.level - 1)]
            base = ".".join(base_parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        # ``from pkg import name``: name is a submodule when the package has one by that name
        names = [base, *(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known)]
    found = set()
    for name in names:
        parts = name.split(".")
        for i in range(2, len(parts) + 1):  # the bare or_agent package only sets __version__
            target = ".".join(parts[:i])
            enclosing = importer == target or importer.startswith(target + ".")
            if target in known and not enclosing:
                found.add(target)
    return found


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def import_graph(module_level: bool = True) -> dict[str, set[str]]:
    """Importer -> the package's modules it imports (at module level, or anywhere)."""
    modules = package_modules()
    known = set(modules)
    graph = {}
    for name, path in modules.items():
        tree = _parse(path)
        is_package = path.name == "__init__.py"
        statements = module_level_imports(tree) if module_level else all_imports(tree)
        graph[name] = set().union(*(imported_modules(s, name, is_package, known) for s in statements))
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module, or a module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
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
            if len(component) > 1 or v in graph.get(v, ()):
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def cycle_through(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One cycle inside a strongly connected component, as a path that returns to its start."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, ()) & members):
                if w == start:
                    return [*paths[v], start]
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{component} is not strongly connected")


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(module_level=True)


def test_the_graph_sees_the_package(graph):
    """A guard on the reader itself: an empty or import-free graph would pass every rule below."""
    assert f"{PIPELINES}.backends.tensorrt" in graph and f"{PACKAGE}.agent.cli" in graph
    assert {f"{PIPELINES}.backends", f"{PIPELINES}.gpu", f"{PIPELINES}.gpu.kernels"} <= graph[f"{PIPELINES}.frame_path"]
    assert not any("_pb2" in name for name in graph)


def test_no_import_cycle_among_pipelines_modules(graph):
    sub = {v: {w for w in ws if _within(w, PIPELINES)} for v, ws in graph.items() if _within(v, PIPELINES)}
    cycles = [" -> ".join(cycle_through(sub, c)) for c in strongly_connected(sub)]
    assert not cycles, "import cycles among or_agent.pipelines modules (module level):\n" + "\n".join(cycles)


def test_backends_gpu_and_stages_are_in_no_cycle_even_through_lazy_imports():
    """The backends reach the device through ``gpu.context`` and the kernels never import a backend, so
    not even an import inside a function closes a cycle through them (it used to: kernels -> the TensorRT
    backend's CUDA context, the backend -> ``gpu.graphs``)."""
    full = import_graph(module_level=False)
    sub = {v: {w for w in ws if _within(w, PIPELINES)} for v, ws in full.items() if _within(v, PIPELINES)}
    watched = (f"{PIPELINES}.backends", f"{PIPELINES}.gpu", f"{PIPELINES}.stages")
    cycles = [" -> ".join(cycle_through(sub, c)) for c in strongly_connected(sub)
              if any(_within(v, w) for v in c for w in watched)]
    assert not cycles, "import cycles through backends/, gpu/ or stages.py (lazy imports included):\n" + "\n".join(cycles)


def test_pipelines_does_not_import_the_agent(graph):
    bad = sorted(f"{v} -> {w}" for v, ws in graph.items() if _within(v, PIPELINES)
                 for w in ws if _within(w, f"{PACKAGE}.agent"))
    assert not bad, "or_agent.pipelines imports or_agent.agent at module level:\n" + "\n".join(bad)


def test_production_code_never_imports_the_training_code():
    production = tuple(f"{PACKAGE}.{f}" for f in PRODUCTION)
    bad = sorted(f"{v} -> {w}" for v, ws in import_graph(module_level=False).items()
                 if any(_within(v, p) for p in production) for w in ws if _within(w, TRAINING))
    assert not bad, "production code imports or_agent.models.training (needs torch):\n" + "\n".join(bad)


def test_the_reader_resolves_imports():
    known = {"or_agent.pipelines", "or_agent.pipelines.gpu", "or_agent.pipelines.gpu.context", "or_agent.pipelines.gpu.graphs",
             "or_agent.pipelines.gpu.kernels", "or_agent.pipelines.backends", "or_agent.pipelines.backends.tensorrt",
             "or_agent.pipelines.stages"}
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "from or_agent.pipelines.gpu.context import CudaContext\n"
        "from . import tensorrt\n"
        "try:\n    import or_agent.pipelines.gpu.kernels\nexcept ImportError:\n    pass\n"
        "if TYPE_CHECKING:\n    from or_agent.pipelines.gpu.graphs import CapturedGraph\n"
        "class C:\n    def f(self):\n        from or_agent.pipelines import stages\n")
    importer = "or_agent.pipelines.backends.select"
    got = set().union(*(imported_modules(s, importer, False, known) for s in module_level_imports(tree)))
    # the package itself and or_agent.pipelines enclose the importer: already initialising, not edges
    assert got == {"or_agent.pipelines.gpu", "or_agent.pipelines.gpu.context", "or_agent.pipelines.gpu.kernels",
                   "or_agent.pipelines.backends.tensorrt"}
    everywhere = set().union(*(imported_modules(s, importer, False, known) for s in all_imports(tree)))
    assert everywhere == got | {"or_agent.pipelines.gpu.graphs", "or_agent.pipelines.stages"}
    cyclic = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d"}, "e": {"a"}}
    assert strongly_connected(cyclic) == [["a", "b", "c"], ["d"]]
    assert cycle_through(cyclic, ["a", "b", "c"]) == ["a", "b", "c", "a"]
