"""The package's import graph points one way: no cycle, and own modules are imported at module top.

Read from the source with :mod:`ast`, so a cycle is found even where Python
would happen to tolerate it at run time. Imports under ``if TYPE_CHECKING:``
are annotations only and do not count.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "celery_persist"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
        return
    base = module if is_package else module.rpartition(".")[0]
    if node.level:
        for _ in range(node.level - 1):
            base = base.rpartition(".")[0]
        target = f"{base}.{node.module}" if node.module else base
    else:
        target = node.module or ""
    yield target
    yield from (f"{target}.{alias.name}" for alias in node.names)


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(tree: ast.AST, in_function: bool = False) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    for child in ast.iter_child_nodes(tree):
        if _is_type_checking(child):
            continue
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, in_function
        yield from _imports(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, int, str]]]:
    """``({module: own modules it imports at module level}, [(module, line, target) imported in a function]``."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    inner: list[tuple[str, int, str]] = []
    for name, path in files.items():
        for node, in_function in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            own = {t for t in _targets(name, path.name == "__init__.py", node) if t in files and t != name}
            if in_function:
                inner.extend((name, node.lineno, t) for t in sorted(own))
            else:
                graph[name] |= own
    return graph, inner


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first repeated last), or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            cycle = visit(nxt)
            if cycle:
                return cycle
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start)
        if cycle:
            return cycle
    return None


def test_no_import_cycle_among_package_modules() -> None:
    graph, _ = import_graph()
    # The package __init__ re-exports lazily from every floor; it is the entry, not a floor.
    graph = {k: v - {"celery_persist"} for k, v in graph.items() if k != "celery_persist"}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_own_modules_are_imported_at_module_top() -> None:
    # The package __init__ loads the Celery layer on first use through importlib (not an
    # import statement), so `import celery_persist` stays free of Celery; nothing else is lazy.
    _, inner = import_graph()
    assert inner == []


#: The floors of ARCHITECTURE.md, bottom first. A module imports only from its own floor or below.
FLOORS: tuple[tuple[str, ...], ...] = (
    ("errors", "stores.base"),
    ("keys", "crypto", "codecs", "retry", "stores.drivers", "stores.sql_migrations", "tracing", "schemas"),
    ("serializer", "stores", "stores.*", "metrics"),
    ("config", "maintenance"),
    ("hub",),
    # The Celery layer.
    ("registry",),
    ("journal",),
    ("flow", "handlers", "waits", "people", "bulk"),
    ("task", "tasks"),
    ("persist",),
    ("cli", "demo", "demo_app", "testing", "web", "web.app", "web.auth", "web.forms", "web.server", "web.cli"),
)


def _floor(module: str) -> int:
    short = module.removeprefix("celery_persist.")
    for index, names in enumerate(FLOORS):
        if short in names or (short.startswith("stores.") and "stores.*" in names and short not in FLOORS[0] + FLOORS[1]):
            return index
    raise AssertionError(f"{module} is on no floor: add it to FLOORS and to ARCHITECTURE.md")


def test_imports_point_down_the_floors() -> None:
    graph, _ = import_graph()
    upward = [
        f"{module} (floor {_floor(module)}) imports {target} (floor {_floor(target)})"
        for module, targets in sorted(graph.items())
        if module != "celery_persist"
        for target in sorted(targets - {"celery_persist"})
        if _floor(target) > _floor(module)
    ]
    assert upward == []


def test_the_library_layer_does_not_import_celery() -> None:
    celery_layer = {name for names in FLOORS[FLOORS.index(("registry",)) :] for name in names}
    for path in PACKAGE.rglob("*.py"):
        module = _module_name(path)
        if module.removeprefix("celery_persist.") in celery_layer or module == "celery_persist":
            continue
        for node, _ in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            assert not any(n == "celery" or n.startswith("celery.") for n in names), f"{module} imports Celery"


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
